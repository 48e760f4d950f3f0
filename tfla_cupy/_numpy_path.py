"""The NumPy path: float64 reference arithmetic, results in the input dtypes."""

from __future__ import annotations

import numpy as np

from ._types import MLSTMContext, MLSTMGrads, MLSTMState
from .reference import chunkwise, recurrent


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def _f64_copy(x):
    """A float64 copy: np.asarray would alias a float64 input into the saved context, and a later
    in-place edit of that input would change the gradients."""
    return np.array(x, dtype=np.float64, copy=True)


def _initial(problem, state, convert=_f64):
    """Initial states in float64; zeros where absent (m_0 = 0, docs/math.md §1.1)."""
    B, NH, DK, DV = problem.B, problem.NH, problem.DK, problem.DV
    C0 = np.zeros((B, NH, DK, DV))
    n0 = np.zeros((B, NH, DK))
    m0 = np.zeros((B, NH))
    if state is not None:
        C0 = convert(state.C)
        if state.n is not None:
            n0 = convert(state.n)
        if state.m is not None and problem.stabilized:
            m0 = convert(state.m)
    return C0, n0, m0


def _public_state(problem, C, n, m):
    return MLSTMState(C, n if problem.has_n else None, m if problem.has_m else None)


# NaN / Inf inputs propagate to the outputs (documented); NumPy must not warn or raise on them.
_QUIET = dict(invalid="ignore", over="ignore", divide="ignore", under="ignore")


@np.errstate(**_QUIET)
def forward(problem, arrays, state, *, out=None, copy_saved=True):
    convert = _f64_copy if copy_saved else _f64
    q, k, v, i, f = (convert(x) for x in arrays)
    C0, n0, m0 = _initial(problem, state, convert)
    h, N, M, (C, n, m) = chunkwise.fwd(q, k, v, i, f, C0, n0, m0, gate=problem.gate,
                                       normalize=problem.normalize, L=problem.chunk_size,
                                       eps=problem.eps, scale=problem.scale)
    last = _public_state(problem, C[..., -1, :, :], n[..., -1, :], m[..., -1])
    dtypes = tuple(x.dtype for x in arrays)
    ctx = MLSTMContext("numpy", problem, dict(inputs=(q, k, v, i, f), initial=(C0, n0, m0),
                                               dtypes=dtypes, N=N, M=M))
    if out is not None:  # the caller's buffers receive the last state
        for dst, src in zip((out["C_last"], out["n_last"], out["m_last"]), last):
            if dst is not None:
                dst[...] = src
        last = _public_state(problem, out["C_last"], out["n_last"], out["m_last"])
    return h.astype(problem.dtype), last, ctx


@np.errstate(**_QUIET)
def backward(ctx, dh, dC_last):
    p = ctx.problem
    q, k, v, i, f = ctx.saved["inputs"]
    C0, n0, m0 = ctx.saved["initial"]
    dC_last = None if dC_last is None else _f64(dC_last)
    grads = chunkwise.bwd(q, k, v, i, f, C0, n0, m0, _f64(dh), dC_last, gate=p.gate,
                          normalize=p.normalize, L=p.chunk_size, eps=p.eps, scale=p.scale)
    dq, dk, dv, di, df, dC0 = (g.astype(dt) for g, dt in zip(grads, ctx.saved["dtypes"] + (np.float64,)))
    d_initial = None
    if p.has_initial_state:
        d_initial = _public_state(p, dC0, np.zeros_like(n0), np.zeros_like(m0))
    return MLSTMGrads(dq, dk, dv, di, df, d_initial)


@np.errstate(**_QUIET)
def step(problem, arrays, state, out=None, indices=None):
    """One token. With ``indices`` the state is a pool: rows ``indices[b]`` are gathered, stepped
    and written back in place (cast to the pool's dtypes); −1 rows are skipped with h = 0. With
    ``out`` the new state is written into its arrays (any of them may be the input's)."""
    q, k, v, i, f = (_f64(x) for x in arrays)
    p = problem
    if indices is None:
        C0, n0, m0 = _initial(p, state)
        h, C, n, m = recurrent.step(q, k, v, i, f, C0, n0, m0, gate=p.gate, normalize=p.normalize,
                                    eps=p.eps, scale=p.scale)
        if out is None:
            return h.astype(p.dtype), _public_state(p, C, n, m)
        for dst, src in zip(out, (C, n, m)):
            if dst is not None:
                dst[...] = src
        return h.astype(p.dtype), _public_state(p, out.C, out.n, out.m)
    rows = np.flatnonzero(indices >= 0)
    slots = indices[rows]
    h = np.zeros((p.B, p.NH, p.DV))
    if len(rows):
        C0 = _f64(state.C[slots])
        n0 = _f64(state.n[slots]) if state.n is not None else np.zeros(C0.shape[:-1])
        m0 = _f64(state.m[slots]) if (state.m is not None and p.stabilized) else np.zeros(C0.shape[:-2])
        h[rows], C, n, m = recurrent.step(q[rows], k[rows], v[rows], i[rows], f[rows], C0, n0, m0, gate=p.gate,
                                          normalize=p.normalize, eps=p.eps, scale=p.scale)
        state.C[slots] = C
        if state.n is not None:
            state.n[slots] = n
        if state.m is not None:
            state.m[slots] = m
    return h.astype(p.dtype), state
