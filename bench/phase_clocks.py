"""Where the fused Hopper forward's cycles go: per-phase clock64() sums of a profiling build.

    python bench/phase_clocks.py [exp|sig] [--B 8] [--S 8192]

Rebuilds the fused forward with -DTFLA_FUSED_CLOCKS (cuda_src/fwd_fused_sm90.cuh), runs one
warmed-up forward at the main shape and prints, per warpgroup, the mean cycles per chunk of each
phase as thread 0 of the warpgroup sees them (waits at barriers count to the phase that ends
there). A profiling tool, not a benchmark: the instrumented kernel is a little slower.
"""

import argparse
import os
import time

os.environ["TFLA_CUPY_FAMILY"] = "sm90"  # before the library reads it

import cupy as cp
import ml_dtypes
import numpy as np

import tfla_cupy
from tfla_cupy import _loader

PHASES = ("issue next chunk's copies", "wait for this chunk's", "row terms, ā, Cᵀ", "Q·C, Q·Kᵀ (+ ā⊙V, q·n)", "P",
          "P·V, state (+ Σāk, N)", "outputs, n, barrier")

ap = argparse.ArgumentParser()
ap.add_argument("variant", nargs="?", default="exp", choices=("exp", "sig"))
ap.add_argument("--B", type=int, default=8)
ap.add_argument("--S", type=int, default=8192)
args = ap.parse_args()

modules = {}


def _instrumented(device_id, cc, name):
    module = cp.RawModule(code=_loader.source(), name_expressions=(name,),
                          options=_loader.OPTIONS + ("-DTFLA_FUSED_CLOCKS",) + _loader._arch_options(cc))
    modules[name] = module
    return module.get_function(name)


_loader._function = _instrumented
gate, normalize = {"exp": ("exp", True), "sig": ("sig", False)}[args.variant]
B, NH, S, DK, DV = args.B, 16, args.S, 128, 256
rng = cp.random.default_rng(0)
q, k = (rng.standard_normal((B, NH, S, DK), dtype=cp.float32).astype(ml_dtypes.bfloat16) for _ in range(2))
v = rng.standard_normal((B, NH, S, DV), dtype=cp.float32).astype(ml_dtypes.bfloat16)
i, f = (rng.standard_normal((B, NH, S), dtype=cp.float32) for _ in range(2))
for _ in range(2):  # the first call compiles
    tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=gate, normalize=normalize, chunk_size=128)
fused = [n for n in modules if "fwd_fused" in n]
assert len(fused) == 1, modules.keys()
clocks = modules[fused[0]].get_global("tfla_fused_clocks")
init = np.zeros((2, 16), np.uint64)
init[:, 10] = np.iinfo(np.uint64).max
clocks.copy_from_host(init.ctypes.data, init.nbytes)
start, stop = cp.cuda.Event(), cp.cuda.Event()
start.record()
tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=gate, normalize=normalize, chunk_size=128)
stop.record()
stop.synchronize()
host = np.empty((2, 16), np.uint64)
clocks.copy_to_host(host.ctypes.data, host.nbytes)
print(f"{fused[0]}  B {B} S {S}: {cp.cuda.get_elapsed_time(start, stop):.3f} ms (instrumented, whole forward)")
for wg in range(2):
    n = max(int(host[wg, 8]), 1)
    per = host[wg, :7].astype(float) / n
    ctas = B * NH * (DV // 64)
    span = (int(host[wg, 11]) - int(host[wg, 10])) * 1e-6
    print(f"warpgroup {wg}: {n} CTA-chunks, {host[wg, 7] / n:.0f} cycles per chunk in the kernel; kernel span "
          f"{span:.3f} ms, mean CTA {host[wg, 9] / ctas * 1e-6:.3f} ms = {host[wg, 7] / max(host[wg, 9], 1):.2f} GHz")
    for name, c in zip(PHASES, per):
        print(f"  {name:28s} {c:8.0f}")
t0 = time.perf_counter()
for _ in range(20):  # launches only: the host's share of a call (the GPU is behind)
    tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=gate, normalize=normalize, chunk_size=128)
host_ms = (time.perf_counter() - t0) / 20 * 1e3
cp.cuda.Device().synchronize()
print(f"host time of one call (launches only): {host_ms:.3f} ms")
