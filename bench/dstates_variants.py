"""The Hopper reverse dC pass (bwd_dstates_sm90_kernel) in variants — copy path (bulk tensor copies
or cp.async), stages, minimum CTAs per SM — at the main shape, in one process: each variant is the
shipped source with those constants replaced, compiled afresh; the pass is timed with CUDA events
inside mlstm_bwd (median of five calls), and dk is compared with the first variant's. Needs a GPU
of compute capability 9.0 (bench/NOTES.md, v17).

    python bench/dstates_variants.py
"""
import cupy as cp

import tfla_cupy
from tfla_cupy import _loader, _cuda_path
from backward_ab import main_shape_inputs

q, k, v, i, f, dh = main_shape_inputs()
orig_src = _loader.source()
orig_dstates = _cuda_path._Launch.dstates
times = []
def timed(self, hopper, params, *rest):
    a, b = cp.cuda.Event(), cp.cuda.Event()
    a.record(); orig_dstates(self, hopper, params, *rest); b.record(); b.synchronize()
    times.append(cp.cuda.get_elapsed_time(a, b))
_cuda_path._Launch.dstates = timed
ref = None
for stages, blocks, tma in ((3, 2, 1), (2, 3, 1), (4, 1, 1), (3, 2, 0), (2, 3, 0)):
    src = orig_src.replace("kThreads = 128, kStages = 3;", f"kThreads = 128, kStages = {stages};")
    src = src.replace("__launch_bounds__(BwdDStatesSm90Smem::kThreads, 2)\n", f"__launch_bounds__(BwdDStatesSm90Smem::kThreads, {blocks})\n")
    assert src.count(f"kStages = {stages};") >= 1 and f"kThreads, {blocks})" in src, "the source changed"
    _loader._function.cache_clear(); _loader._kernel.cache_clear()
    _loader.source = (lambda s: (lambda: s))(src)
    from tfla_cupy import _tma
    _tma.unavailable = (lambda: None) if tma else (lambda: 'off')
    _cuda_path.BWD_DSTATES_SM90_SMEM_BYTES = stages * 2 * 128 * 128 + 512 + 1024
    for gate, norm in (("exp", True), ("sig", False)):
        h, _, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=gate, normalize=norm, chunk_size=128)
        g = tfla_cupy.mlstm_bwd(ctx, dh)
        if gate == "exp":
            if ref is None: ref = g.dk.astype(cp.float32)
            diff = float(cp.abs(g.dk.astype(cp.float32) - ref).max())
        times.clear()
        ev = [cp.cuda.Event(), cp.cuda.Event()]
        ev[0].record()
        for _ in range(5): tfla_cupy.mlstm_bwd(ctx, dh)
        ev[1].record(); ev[1].synchronize()
        print(f"tma {tma} stages {stages} blocks {blocks} {gate}: dstates {sorted(times)[2]:.3f} ms, backward {cp.cuda.get_elapsed_time(*ev)/5:.3f} ms, dk vs first variant {diff:.2e}", flush=True)
