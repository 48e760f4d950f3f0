"""The parallel (quadratic) stabilized form, no initial state (docs/math.md §3, §7).

An independent cross-check of the chunkwise form. Its stabilizer is the plain row maximum
(no m_0 = 0 term, no −10 floor), so it agrees with the chunkwise and step forms exactly when
ε = 0 and up to O(ε·e^m) otherwise (§2.2, §2.3).
"""

from __future__ import annotations

import numpy as np

from .gates import is_stabilized, log_gates


def fwd_parallel(q, k, v, i, f, *, gate, normalize, eps, scale):
    """h for q, k (..., S, DK), v (..., S, DV), i, f (..., S), float64."""
    log_i, log_f = log_gates(i, f, gate)
    S = q.shape[-2]
    causal = np.tril(np.ones((S, S), dtype=bool))
    # F[t, j] = Σ_{u=j+1..t} λ_u by a masked cumulative sum down the rows (no global differences).
    lam = np.broadcast_to(log_f[..., :, None], log_f.shape + (S,))
    F = np.cumsum(np.where(np.tril(np.ones((S, S), dtype=bool), -1), lam, 0.0), axis=-2)
    log_D = np.where(causal, F + log_i[..., None, :], -np.inf)
    if is_stabilized(gate):
        m = np.max(log_D, axis=-1)
    else:
        m = np.zeros(log_D.shape[:-1])
    W = np.exp(log_D - m[..., None]) * (scale * np.einsum("...tk,...jk->...tj", q, k))
    num = W @ v
    if not normalize:
        return num
    N = np.maximum(np.abs(W.sum(-1)), np.exp(-m))
    return num / (N + eps)[..., None]
