"""The two rank-local passes sequence parallelism adds to an ordinary forward and backward,
on the NumPy path (float64 reference stages) and the GPU path (the kernels, states only)."""

from __future__ import annotations

import numpy as np

from .. import _gpu
from .._numpy_path import _QUIET, _f64, _initial
from ..reference import chunkwise
from ..reference.gates import log_gates
from ._algebra import EMPTY_M, Summary


def summary(problem, arrays, state, *, empty):
    """The slice-end state and G = Σλ (float64) of a validated slice: from the empty state
    (``empty=True``, ranks >= 1) or from ``state`` (None: zeros with m_0 = 0; rank 0)."""
    if problem.kind == "cuda":
        last, G = _gpu.segment_summary(problem, arrays, state, empty_m=EMPTY_M if empty else None)
        m = None if last.m is None else last.m.astype(np.float64)
        return Summary(last.C, last.n, m, G)
    return _numpy_summary(problem, arrays, state, empty)


@np.errstate(**_QUIET)
def _numpy_summary(p, arrays, state, empty):
    q, k, v, i, f = (_f64(x) for x in arrays)
    C0, n0, m0 = _initial(p, None if empty else state)
    if empty:
        m0 = np.full_like(m0, EMPTY_M)
    log_i, log_f = log_gates(i, f, p.gate)
    C, n, m = chunkwise.fwd_states(k, v, log_i, log_f, C0, n0, m0, L=p.chunk_size, stabilized=p.stabilized)
    return Summary(C[..., -1, :, :], n[..., -1, :] if p.has_n else None, m[..., -1] if p.has_m else None,
                   log_f.sum(-1))


def initial_state_grad(ctx, dh, dC_last):
    """d(initial C) of a local forward for the given dh and slice-end gradient dC_last (None:
    zero), without the token gradients. float32 on the GPU, float64 on NumPy."""
    if ctx.kind == "cuda":
        return _gpu.initial_state_grad(ctx, dh, dC_last)
    return _numpy_initial_state_grad(ctx, dh, dC_last)


@np.errstate(**_QUIET)
def _numpy_initial_state_grad(ctx, dh, dC_last):
    p = ctx.problem
    q, k, v, i, f = ctx.saved["inputs"]
    C0, n0, m0 = ctx.saved["initial"]
    log_i, log_f = log_gates(i, f, p.gate)
    _, N, M, (_, _, m) = chunkwise.fwd(q, k, v, i, f, C0, n0, m0, gate=p.gate, normalize=p.normalize,
                                       L=p.chunk_size, eps=p.eps, scale=p.scale)
    dC = chunkwise.bwd_dstates(q, log_i, log_f, m, N, M, _f64(dh), None if dC_last is None else _f64(dC_last),
                               L=p.chunk_size, scale=p.scale, eps=p.eps, normalize=p.normalize)
    return dC[..., 0, :, :]
