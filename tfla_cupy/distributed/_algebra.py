"""The state-passing algebra of sequence parallelism (docs/distributed.md §1, docs/math.md §2.2).

Rank r holds the contiguous slice [s_r, s_{r+1}) of the sequence. Its *summary* is the state
at the slice end computed from the empty state (C = 0, n = 0, m = −∞) together with the
slice's total log forget gate G_r = Σ_{t in slice} λ_t. With unstabilized states
C̃ = e^m C the slice maps an incoming state to

    C̃_end = e^{G_r} C̃_in + C̃_s,       m_end = max(G_r + m_in, m_s)

(the second is the closed form of the step stabilizer, docs/math.md §2.2, split at the slice
start: m_s is the maximum over the slice's own tokens). In stabilized units:

    C_end = e^{G_r + m_in − m_end} C_in + e^{m_s − m_end} C_s        (n alike)

and for mLSTMsig, which has no stabilizer, C_end = e^{G_r} C_in + C_s. The same functions run
on NumPy (float64) and CuPy arrays: states C, n in their own dtype (float32 on the GPU), m and
G in float64, the two scale factors formed in float64 and cast to the dtype of C.

Backward (the custom backward holds N, M and every m constant, docs/math.md §6): the map
C_in → C_end of rank r is affine with linear part e^{G_r + m_in − m_end}·Id, so its adjoint
gives d(C_in) = a_r + D_r d(C_end) with a_r the local d(C_in) for d(C_end) = 0 and the scalar
decay D_r = e^{G_r + m_in,r − m_in,r+1}. A reverse scan over ranks of (a_r, D_r) gives each
rank the gradient of its slice-end state.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

from .._types import MLSTMState

#: The stabilizer of the empty state. Exactly −∞ in effect: every stabilizer reached from it
#: is a log gate sum of at least one token (>= −1e30 + Σλ, and Σλ >= −1e4·S), so
#: max(G + EMPTY_M, m_s) = m_s and e^{EMPTY_M + G − m'} = 0 in float32 and float64; it stays
#: finite so that no ∞ − ∞ can appear in the kernels' exponents.
EMPTY_M = -1e30


class Summary(NamedTuple):
    """What rank r contributes to the forward exchange, per (batch, head).

    C (B, NH, DK, DV), n (B, NH, DK) or None, m (B, NH) float64 or None: the slice-end state
    from the empty state (from the initial state on rank 0). G (B, NH) float64: Σ λ over the slice.
    """

    C: Any
    n: Optional[Any]
    m: Optional[Any]
    G: Any


def _xp(x):
    if isinstance(x, np.ndarray):
        return np
    import cupy
    return cupy.get_array_module(x)


def _factors(G, m_in, s, stabilized, dtype):
    """(e^{G + m_in − m'}, e^{m_s − m'}, m') in float64, the two factors cast to ``dtype``."""
    xp = _xp(G)
    if not stabilized:
        return xp.exp(G).astype(dtype), None, None
    m_new = xp.maximum(G + m_in, s.m)
    return xp.exp(G + m_in - m_new).astype(dtype), xp.exp(s.m - m_new).astype(dtype), m_new


def combine(state, s, *, stabilized):
    """The state after a slice whose summary is ``s``, from the incoming ``state`` (an
    :class:`MLSTMState`: C, n in the state dtype, m float64; n None without a normalizer, m
    None for mLSTMsig). Returns an MLSTMState of the same kinds."""
    alpha, beta, m_new = _factors(s.G, state.m, s, stabilized, state.C.dtype)
    if stabilized:
        C = alpha[..., None, None] * state.C + beta[..., None, None] * s.C
        n = None if s.n is None else alpha[..., None] * state.n + beta[..., None] * s.n
    else:
        C = alpha[..., None, None] * state.C + s.C
        n = None if s.n is None else alpha[..., None] * state.n + s.n
    return MLSTMState(C, n, m_new)


def _as_state(s):
    return MLSTMState(s.C, s.n, s.m)


def incoming_state(summaries, rank, *, stabilized):
    """The state entering ``rank`` >= 1: rank 0's summary (its true slice-end state, computed
    from the initial state) folded with the summaries of ranks 1 … rank−1."""
    if rank < 1:
        raise ValueError(f"rank: the incoming state of rank 0 is the initial state; got rank={rank}")
    state = _as_state(summaries[0])
    for s in summaries[1:rank]:
        state = combine(state, s, stabilized=stabilized)
    return state


def stabilizer_chain(summaries, *, stabilized):
    """m_in of every rank >= 1 (index r holds rank r's; index 0 is None), float64: only the
    scalars of the fold, so every rank gets all of them from one exchange. None for mLSTMsig."""
    if not stabilized:
        return [None] * len(summaries)
    xp = _xp(summaries[0].G)
    chain = [None, summaries[0].m]
    for s in summaries[1:-1]:
        chain.append(xp.maximum(s.G + chain[-1], s.m))
    return chain


def decays(summaries, chain, *, stabilized):
    """D_r = e^{G_r + m_in,r − m_in,r+1} (e^{G_r} for mLSTMsig) for r = 1 … P−2, float64
    (index r; None at 0 and P−1): the linear part of rank r's state map, for the backward scan."""
    P = len(summaries)
    xp = _xp(summaries[0].G)
    out = [None] * P
    for r in range(1, P - 1):
        G = summaries[r].G
        out[r] = xp.exp(G + chain[r] - chain[r + 1]) if stabilized else xp.exp(G)
    return out


def slice_end_grad(a, D, rank, dC_last):
    """d(C_end) of ``rank``: ``dC_last`` (the gradient of the last state, or None) on rank
    P−1; otherwise the reverse scan  x ← a_{P−1};  x ← a_j + D_j x  for j = P−2 … rank+1,
    where a_j is rank j's d(C_in) computed with d(C_end) = 0 (on rank P−1 with dC_last)."""
    P = len(a)
    if rank == P - 1:
        return dC_last
    x = a[P - 1]
    for j in range(P - 2, rank, -1):
        x = a[j] + D[j].astype(x.dtype)[..., None, None] * x
    return x
