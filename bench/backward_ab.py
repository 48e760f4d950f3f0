"""The backward alone at the main shape, its Hopper kernels against the sm80 family in one process:
one forward per gate variant, then mlstm_bwd timed (CUDA events, 5 calls after a warm-up) with
TFLA_CUPY_FAMILY=auto and =sm80 in turn, three rounds. Needs a GPU (compute capability 9.0 for
the Hopper kernels; elsewhere both rows are the sm80 family).

    python bench/backward_ab.py
"""

import os

import cupy as cp
import ml_dtypes

import tfla_cupy
from tfla_cupy import config

B, NH, S, DK, DV = 8, 16, 8192, 128, 256


def main_shape_inputs():
    """q, k, v, dh (bf16) and i, f (float32) at the main shape, fixed seed (also bench/dstates_variants.py)."""
    rng = cp.random.default_rng(0)
    bf = ml_dtypes.bfloat16
    q, k = (rng.standard_normal((B, NH, S, DK), dtype=cp.float32).astype(bf) for _ in range(2))
    v = rng.standard_normal((B, NH, S, DV), dtype=cp.float32).astype(bf)
    i, f = (rng.standard_normal((B, NH, S), dtype=cp.float32) for _ in range(2))
    dh = rng.standard_normal((B, NH, S, DV), dtype=cp.float32).astype(bf)
    return q, k, v, i, f, dh


def main():
    q, k, v, i, f, dh = main_shape_inputs()
    before = os.environ.get(config.FAMILY_ENV)
    for gate, norm in (("exp", True), ("sig", False)):
        h, _, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=gate, normalize=norm, chunk_size=128)
        res = {}
        for _ in range(3):
            for fam in ("auto", "sm80"):
                os.environ[config.FAMILY_ENV] = fam
                tfla_cupy.mlstm_bwd(ctx, dh)
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record()
                for _ in range(5):
                    tfla_cupy.mlstm_bwd(ctx, dh)
                e1.record()
                e1.synchronize()
                res.setdefault(fam, []).append(cp.cuda.get_elapsed_time(e0, e1) / 5)
        print(gate, {fam: " ".join(f"{x:.3f}" for x in t) for fam, t in res.items()}, "ms per backward")
    if before is None:
        os.environ.pop(config.FAMILY_ENV, None)
    else:
        os.environ[config.FAMILY_ENV] = before


if __name__ == "__main__":
    main()
