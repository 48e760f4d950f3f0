"""The NumPy path: float64 reference arithmetic, results in the input dtypes and layout.

The (B, S, NH, D) layout is a transpose to (B, NH, S, D) and back; packed sequences
(cu_seqlens) run the reference once per sequence, each with its own initial state."""

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
    B, NH, DK, DV = problem.NSEQ, problem.NH, problem.DK, problem.DV
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


def _bhsd(problem, x):
    """A sequence tensor in (B, NH, S, ...) order (a view); the same call converts back."""
    return np.swapaxes(x, 1, 2) if problem.layout == "bshd" else x


def _segments(problem):
    """The token slices of the sequences: one of length S, or those of cu_seqlens (B = 1)."""
    if not problem.varlen:
        return None
    cu = np.asarray(problem.cu_seqlens, dtype=np.int64)
    return [slice(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:])]


def _per_sequence(problem, fn, seqs, states):
    """fn(sequence tensors, states) per sequence; results concatenated (tokens along S, the
    sequence axis 2 in (B, NH, S, ...), states along axis 0)."""
    segments = _segments(problem)
    if segments is None:
        return fn(seqs, states)
    outs = [fn([None if x is None else x[:, :, sl] for x in seqs],
               [None if x is None else x[j:j + 1] for x in states])
            for j, sl in enumerate(segments)]
    return outs


@np.errstate(**_QUIET)
def forward(problem, arrays, state, *, out=None, copy_saved=True):
    convert = _f64_copy if copy_saved else _f64
    p = problem
    q, k, v, i, f = (convert(_bhsd(p, x)) for x in arrays)
    C0, n0, m0 = _initial(p, state, convert)

    def run(seqs, init):
        h, N, M, (C, n, m) = chunkwise.fwd(*seqs, *init, gate=p.gate, normalize=p.normalize, L=p.chunk_size,
                                           eps=p.eps, scale=p.scale)
        return h, N, M, (C[..., -1, :, :], n[..., -1, :], m[..., -1])

    res = _per_sequence(p, run, [q, k, v, i, f], [C0, n0, m0])
    if p.varlen:
        h, N, M = (np.concatenate([o[j] for o in res], axis=2) for j in range(3))
        C, n, m = (np.concatenate([o[3][j] for o in res], axis=0) for j in range(3))
    else:
        h, N, M, (C, n, m) = res
    last = _public_state(p, C, n, m)
    dtypes = tuple(x.dtype for x in arrays)
    ctx = MLSTMContext("numpy", p, dict(inputs=(q, k, v, i, f), initial=(C0, n0, m0), dtypes=dtypes, N=N, M=M))
    if out is not None:  # the caller's buffers receive the last state
        for dst, src in zip((out["C_last"], out["n_last"], out["m_last"]), last):
            if dst is not None:
                dst[...] = src
        last = _public_state(p, out["C_last"], out["n_last"], out["m_last"])
    return _bhsd(p, h).astype(p.dtype, order="C"), last, ctx


@np.errstate(**_QUIET)
def backward(ctx, dh, dC_last):
    p = ctx.problem
    q, k, v, i, f = ctx.saved["inputs"]
    C0, n0, m0 = ctx.saved["initial"]
    dC_last = None if dC_last is None else _f64(dC_last)

    def run(seqs, init):
        *x, dh_j = seqs
        C0_j, n0_j, m0_j, dC_j = init
        return chunkwise.bwd(*x, C0_j, n0_j, m0_j, dh_j, dC_j, gate=p.gate, normalize=p.normalize,
                             L=p.chunk_size, eps=p.eps, scale=p.scale)

    out = _per_sequence(p, run, [q, k, v, i, f, _f64(_bhsd(p, dh))], [C0, n0, m0, dC_last])
    if p.varlen:
        grads = [np.concatenate([o[j] for o in out], axis=2 if j < 5 else 0) for j in range(6)]
    else:
        grads = out
    dq, dk, dv, di, df = (_bhsd(p, g) for g in grads[:5])
    dC0 = grads[5]
    dq, dk, dv, di, df, dC0 = (g.astype(dt, order="C") for g, dt in zip((dq, dk, dv, di, df, dC0),
                                                             ctx.saved["dtypes"] + (np.float64,)))
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
