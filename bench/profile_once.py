"""One warmed-up forward + backward at the main shape between cudaProfilerStart/Stop, for
    ncu --profile-from-start off --metrics ... python bench/profile_once.py [exp|sig]
which gives the per-kernel time breakdown of bench/NOTES.md."""

import sys

import cupy as cp
import ml_dtypes

import tfla_cupy

variant = sys.argv[1] if len(sys.argv) > 1 else "exp"
gate, normalize = {"exp": ("exp", True), "sig": ("sig", False)}[variant]
B, NH, S, DK, DV = 8, 16, 8192, 128, 256
rng = cp.random.default_rng(0)
q, k = (rng.standard_normal((B, NH, S, DK), dtype=cp.float32).astype(ml_dtypes.bfloat16) for _ in range(2))
v = rng.standard_normal((B, NH, S, DV), dtype=cp.float32).astype(ml_dtypes.bfloat16)
i, f = (rng.standard_normal((B, NH, S), dtype=cp.float32) for _ in range(2))
dh = cp.ones((B, NH, S, DV), dtype=ml_dtypes.bfloat16)
for profiled in (False, True):
    if profiled:
        cp.cuda.profiler.start()
    h, _, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=gate, normalize=normalize, chunk_size=128)
    g = tfla_cupy.mlstm_bwd(ctx, dh)
    cp.cuda.Device().synchronize()
    if profiled:
        cp.cuda.profiler.stop()
print("profiled", variant)
