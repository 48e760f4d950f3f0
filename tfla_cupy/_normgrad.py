"""``normalizer_grad=True``: the exact gradient of h through the normalizer (docs/math.md §6.6).

Done at the array level, shared by the NumPy and the GPU path: n follows the recurrence of C with
the value 1 in place of v_t, so the forward runs on the augmented values v' = [v, 1, 0…] with the
initial C' = [C0, n0, 0…], and its column DV is den / (N + ε). The backward is then the custom
backward of §6.1–6.5 on the augmented problem with

    dh' = [dh, dden·(N + ε), 0…],   dden = −(dh·h)/(N + ε) · sign(den)  where |den| > e^{−M}, else 0,
    dC_last' = [dC_last, dn_last, 0…],

which gives the gradient of n_0 (column DV of dC0') and uses an incoming gradient of n_last. M and
the stabilizers stay stop-gradient (exact at ε = 0). The GPU path pads DV' to DV + 8 (a multiple
of 8); the NumPy path to DV + 1.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from . import _arrays
from ._types import MLSTMContext, MLSTMGrads, MLSTMState


def _xp(kind):
    return np if kind == "numpy" else _arrays.cupy_module()


def _pad(kind):
    return 1 if kind == "numpy" else 8


def _device(kind, x):
    return contextlib.nullcontext() if kind == "numpy" else x.device


def _augment(xp, x, first, pad):
    """[x, first, 0…] along the last axis (``first`` broadcast to x's leading shape), x's dtype.
    The column is built in float32 / float64 and cast once (no scalar stores into 16-bit arrays)."""
    col = xp.zeros(x.shape[:-1] + (pad,), np.float64 if xp is np else np.float32)
    col[..., 0] = first
    return xp.concatenate([x, col.astype(x.dtype)], axis=-1)


#: On the GPU the branch of N = max(|den|, e^{-M}) is read from the stored fp32 N: the kernels' N equals
#: expf(-M) on the lower branch; a margin of a few ulps absorbs a different exp implementation.
_BRANCH_MARGIN = 1e-6


def upper_branch_sign(xp, h_den, N, M, *, exact):
    """dN/dden: sign(den) where |den| > e^{-M} (M ≡ 0 without a stabilizer), else 0. The branch is
    read from N itself (N > bound), whose precision is fp32 or better: den from the augmented
    output column (in the dtype of h) only gives the sign."""
    bound = 1.0 if M is None else xp.exp(-M)
    upper = N > bound if exact else N > bound * (1 + _BRANCH_MARGIN)
    return xp.where(upper, xp.sign(h_den.astype(N.dtype)), 0).astype(N.dtype)


def forward(problem, arrays, state, path, **kw):
    """The forward of ``path`` on the augmented problem; returns (h, state, ctx) like it."""
    kind, DV = problem.kind, problem.DV
    xp, pad = _xp(kind), _pad(kind)
    if kind == "cuda":
        from ._cuda_path import MAX_DV, _check_head_dims
        _check_head_dims(problem.DK, DV)
        if DV + pad > MAX_DV:
            raise ValueError(f"v: normalizer_grad=True on the GPU path needs DV + {pad} <= {MAX_DV} (an augmented "
                             f"value column, padded to a multiple of 8), got DV={DV}")
    q, k, v, i, f = arrays
    with _device(kind, v):
        if kind == "cuda" and kw.get("copy_saved", True):
            # private copies for the context (mlstm_fwd's promise), made here: v' and C0' are new
            # arrays already, which the inner forward would copy once more
            q, k, i, f = (x.copy() for x in (q, k, i, f))
            if state is not None:
                state = MLSTMState(state.C, *(None if x is None else x.copy() for x in state[1:]))
            kw = {**kw, "copy_saved": False}
        v_aug = _augment(xp, v, 1, pad)
        state_aug = None
        if state is not None:
            state_aug = MLSTMState(_augment(xp, state.C, state.n, pad), state.n, state.m)
        inner_problem = dataclasses.replace(problem, DV=DV + pad, normalizer_grad=False)
        h_aug, last, inner = path.forward(inner_problem, (q, k, v_aug, i, f), state_aug, **kw)
        N, M = inner.saved["N"], inner.saved["M"]
        ct = np.float64 if kind == "numpy" else np.float32
        hN = N.astype(ct) + problem.eps
        sign = upper_branch_sign(xp, h_aug[..., DV], N.astype(ct), None if M is None else M.astype(ct),
                                 exact=kind == "numpy")
        h = xp.ascontiguousarray(h_aug[..., :DV])
        last = MLSTMState(xp.ascontiguousarray(last.C[..., :DV]), last.n, last.m)
    saved = dict(inner=inner, h=h_aug, hN=hN, sign=sign, pad=pad)
    return h, last, MLSTMContext(kind, problem, saved)


def backward(ctx, dh, dC_last, dn_last, path):
    p, s = ctx.problem, ctx.saved
    kind, DV, pad = p.kind, p.DV, s["pad"]
    xp = _xp(kind)
    with _device(kind, s["h"]):
        ct = s["hN"].dtype
        dh_ct = dh.astype(ct)
        # dh'[DV] = dden·(N+ε) = −(dh·h)·sign(den), with h the output as returned
        col = -(dh_ct * s["h"][..., :DV].astype(ct)).sum(-1) * s["sign"]
        dh_aug = _augment(xp, dh.astype(p.dtype if kind == "cuda" else np.float64), col, pad)
        dC_aug = None
        if dC_last is not None or dn_last is not None:
            sd = np.float32 if kind == "cuda" else np.float64
            dC = xp.zeros((p.B, p.NH, p.DK, DV), sd) if dC_last is None else dC_last.astype(sd)
            dn = xp.zeros((p.B, p.NH, p.DK), sd) if dn_last is None else dn_last.astype(sd)
            dC_aug = _augment(xp, dC, dn, pad)
        g = path.backward(s["inner"], dh_aug, dC_aug)
        d_initial = None
        if g.d_initial_state is not None:
            dC0 = g.d_initial_state.C
            d_initial = MLSTMState(xp.ascontiguousarray(dC0[..., :DV]), xp.ascontiguousarray(dC0[..., DV]),
                                   g.d_initial_state.m)
        return MLSTMGrads(g.dq, g.dk, xp.ascontiguousarray(g.dv[..., :DV]), g.di, g.df, d_initial)
