#!/usr/bin/env bash
# One call on the lent GPU machine: precompile, GPU tests, benchmark. Everything it prints
# also lands in $OUT (when set) so that a killed run still returns its log.
#   bash bench/device_run.sh [tests|bench|all] [extra pytest args...]
set -uo pipefail
what=${1:-all}; shift || true
out=${OUT:-/tmp/tfla_out}; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cupy_cache
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$out/card.txt"
python3 -m tfla_cupy.precompile --jobs 16 2>&1 | tail -3 | tee "$out/precompile.txt"
if [[ $what == tests || $what == all || $what == dev || $what == final ]]; then
  python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider --timeout=500 "$@" tests 2>&1 | tee "$out/pytest.txt" | tail -60
fi
if [[ $what == profile || $what == all || $what == dev ]] && command -v ncu > /dev/null; then
  ncu --profile-from-start off --kernel-name-base demangled --csv --metrics \
    gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem \
    python3 bench/profile_once.py exp > "$out/ncu.csv" 2> "$out/ncu.err"
  python3 bench/ncu_table.py "$out/ncu.csv" | tee "$out/ncu.txt"
fi
if [[ $what == sweep || $what == dev ]]; then
  python3 bench/tile_sweep.py 2>&1 | tee "$out/sweep.txt"
fi
if [[ $what == sweep ]]; then
  ncu --profile-from-start off --kernel-name-base demangled -k regex:"fwd_h|fwd_states|bwd_dq" -c 3 \
    --section WarpStateStats --section SchedulerStats --section Occupancy --csv \
    python3 bench/profile_once.py exp > "$out/ncu_stalls.csv" 2> "$out/ncu_stalls.err"
  python3 - "$out/ncu_stalls.csv" <<'PY'
import csv, sys
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
for r in csv.DictReader(lines):
    n = r["Metric Name"]
    if "Stall" in n or "Warp Cycles" in n or "Issued" in n or "Eligible" in n or "Active Warps" in n:
        print(r["Kernel Name"][:40], "|", n, "|", r["Metric Value"], r.get("Metric Unit", ""))
PY
fi
if [[ $what == bench || $what == all ]]; then
  python3 bench/bench.py --no-peers --out "$out" 2>&1 | tee "$out/bench.txt" | tail -20
fi
if [[ $what == final ]]; then
  # peers side by side: the TFLA exp peer needs DISABLE_LLVM_OPT=1 under Triton 3.6 (docs/performance.md),
  # the others run without it; then our S sweep. Results are packed into one archive.
  res=/tmp/tfla_res; mkdir -p "$res"
  DISABLE_LLVM_OPT=1 python3 bench/bench.py --variants exp --peers tfla_exp --out "$res" --tag main_exp 2>&1 | tee "$res/main_exp.txt"
  python3 bench/bench.py --variants sig --peers tfla_sig,fla,sdpa --out "$res" --tag main_sig 2>&1 | tee "$res/main_sig.txt"
  python3 bench/bench.py --sweep --no-peers --out "$res" --tag sweep 2>&1 | tee "$res/sweep.txt"
  tar czf "$out/results.tgz" -C "$res" .
  grep -h "^|" "$res"/main_exp.txt "$res"/main_sig.txt "$res"/sweep.txt > "$out/tables.txt"
fi
