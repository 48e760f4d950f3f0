"""The step recurrence, the ground truth of the mLSTM (docs/math.md §2.1, §7).

Arrays are batched over leading axes (B, NH): q, k (..., DK), v (..., DV), i, f (...),
states C (..., DK, DV), n (..., DK), m (...). Everything is float64.
"""

from __future__ import annotations

import numpy as np

from .gates import is_stabilized, log_gates

#: Largest x with a finite e^x in float64.
_MAX_EXP = float(np.log(np.finfo(np.float64).max))


def step(q, k, v, i, f, C, n, m, *, gate, normalize, eps, scale):
    """One token of §2.1. Returns (h, C, n, m) with the new states.

    For ``gate="sig"`` the stabilizer is absent: ``m`` is ignored and returned as zeros.
    """
    log_i, log_f = log_gates(i, f, gate)
    if is_stabilized(gate):
        m_new = np.maximum(log_f + m, log_i)
        alpha = np.exp(log_f + m - m_new)
        beta = np.exp(log_i - m_new)
    else:
        m_new = np.zeros_like(log_f)
        alpha = np.exp(log_f)
        beta = np.exp(log_i)
    C = alpha[..., None, None] * C + beta[..., None, None] * k[..., :, None] * v[..., None, :]
    n = alpha[..., None] * n + beta[..., None] * k
    q_hat = scale * q
    num = np.einsum("...k,...kv->...v", q_hat, C)
    if not normalize:
        return num, C, n, m_new
    den = np.einsum("...k,...k->...", q_hat, n)
    # The lower bound e^{−m'} of the normalizer is 1 in unstabilized units (docs/math.md §2.2).
    # After ĩ = −∞ tokens m' reaches the floor of ι (−1e30), where e^{−m'} exceeds float64: the
    # bound is +∞ there and h is exactly 0. That case is taken apart instead of letting exp overflow.
    beyond = -m_new > _MAX_EXP
    N = np.maximum(np.abs(den), np.exp(np.where(beyond, 0.0, -m_new)))
    h = np.where(beyond[..., None], 0.0, num / (N + eps)[..., None])
    return h, C, n, m_new


def fwd_recurrent(q, k, v, i, f, C0, n0, m0, *, gate, normalize, eps, scale):
    """The whole sequence token by token: (h, C_last, n_last, m_last).

    q, k: (..., S, DK); v: (..., S, DV); i, f: (..., S).
    """
    S = q.shape[-2]
    h = np.empty(q.shape[:-1] + (v.shape[-1],))
    C, n, m = C0, n0, m0
    for t in range(S):
        h[..., t, :], C, n, m = step(
            q[..., t, :], k[..., t, :], v[..., t, :], i[..., t], f[..., t], C, n, m,
            gate=gate, normalize=normalize, eps=eps, scale=scale,
        )
    return h, C, n, m
