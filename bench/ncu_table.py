"""Summarise an `ncu --csv --metrics ...` log: one line per kernel launch."""

import csv
import sys
from collections import defaultdict

rows = defaultdict(dict)
order = []
with open(sys.argv[1]) as fh:
    lines = [ln for ln in fh if ln.startswith('"')]
for r in csv.DictReader(lines):
    key = (r["ID"], r["Kernel Name"].split("(")[0].replace("tfla::", "")[:60])
    if key not in rows:
        order.append(key)
    value = r["Metric Value"]
    if r["Metric Name"] == "gpu__time_duration.sum":
        scale = {"nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(r.get("Metric Unit", ""), 1.0)
        value = str(float(value.replace(",", "")) * scale)
    rows[key][r["Metric Name"]] = value
short = {"gpu__time_duration.sum": "us", "sm__warps_active.avg.pct_of_peak_sustained_active": "occ%",
         "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram%",
         "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active": "mma%",
         "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active": "tensor%",
         "launch__registers_per_thread": "regs", "launch__occupancy_limit_registers": "lim_reg",
         "launch__occupancy_limit_shared_mem": "lim_smem"}
print(" ".join(f"{v:>8s}" for v in short.values()), " kernel")
total = 0.0
for key in order:
    m = rows[key]
    vals = []
    for k in short:
        v = m.get(k, "")
        if k == "gpu__time_duration.sum" and v:
            v = float(v.replace(",", ""))
            total += v
            v = f"{v / 1e3:.1f}"
        vals.append(f"{v:>8s}")
    print(" ".join(vals), "", key[1])
print(f"total {total / 1e6:.3f} ms")
