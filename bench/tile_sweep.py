"""Time alternative KernelConfig tiles at the main shape (bf16, exp, chunk 128) against the
default, checking each variant's outputs against the default's in the same run."""

import sys
from dataclasses import replace
from pathlib import Path

import cupy as cp
import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tfla_cupy  # noqa: E402
from bench import Timer, make_inputs  # noqa: E402
from tfla_cupy.config import ChunkTile, StateTile, pick_config  # noqa: E402

B, NH, S, DK, DV, L = 8, 16, 8192, 128, 256, 128
x = make_inputs(cp, B, NH, S, DK, DV, ml_dtypes.bfloat16)
dh = cp.ones((B, NH, S, DV), dtype=ml_dtypes.bfloat16)
base = pick_config("MmaBF16", DK, DV, L)
timer = Timer(cp, warmup=5, repeat=15)


def rel(a, b):
    a, b = cp.asnumpy(a).astype(np.float64), cp.asnumpy(b).astype(np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


h_ref = tfla_cupy.mlstm(*x, chunk_size=L)
h, _, ctx = tfla_cupy.mlstm_fwd(*x, chunk_size=L)
g_ref = tfla_cupy.mlstm_bwd(ctx, dh)
variants = {
    "default": base,
    "states bt128": replace(base, states=StateTile(64, 128, 128, 4, 2)),
    "states bt32": replace(base, states=StateTile(64, 128, 32, 4, 2)),
    "states 64x64 w4": replace(base, states=StateTile(64, 64, 64, 4, 1)),
    "fwd_h bn256": replace(base, fwd_h=ChunkTile(64, 64, 128, 256, 2)),
    "fwd_h bm128 wn2": replace(base, fwd_h=ChunkTile(128, 64, 128, 128, 2)),
    "bwd bm128": replace(base, bwd_dq=ChunkTile(128, 64, 128, 128, 2), bwd_dk=ChunkTile(128, 64, 128, 128, 2),
                         bwd_dv=ChunkTile(128, 64, 128, 128, 2)),
}
print(f"{'variant':18s} {'fw ms':>8s} {'fwbw ms':>8s}  check")
for name, cfg in variants.items():
    try:
        def fw():
            return tfla_cupy.mlstm(*x, chunk_size=L, config=cfg)

        def fwbw():
            hh, _, c = tfla_cupy.mlstm_fwd(*x, chunk_size=L, config=cfg)
            return hh, tfla_cupy.mlstm_bwd(c, dh)
        hh, gg = fwbw()
        err = max([rel(hh, h_ref)] + [rel(a, b) for a, b in zip(gg[:5], g_ref[:5])])
        t_fw, t_fwbw = timer(fw), timer(fwbw)
        print(f"{name:18s} {t_fw:8.3f} {t_fwbw:8.3f}  max rel diff vs default {err:.1e}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"{name:18s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    cp.get_default_memory_pool().free_all_blocks()
