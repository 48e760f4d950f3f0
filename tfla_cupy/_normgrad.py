"""``normalizer_grad=True``: the gradient of h as computed (docs/math.md §6.6).

Done at the array level, shared by the NumPy and the GPU path, in two parts.

**The normalizer.** n follows the recurrence of C with the value 1 in place of v_t, so the
forward runs on the augmented values v' = [v, 1, 0…] with the initial C' = [C0, n0, 0…], and its
column DV is den / (N + ε). The backward is then the custom backward of §6.1–6.5 on the
augmented problem with

    dh' = [dh, dden·(N + ε), 0…],   dden = −(dh·h)/(N + ε) · sign(den)  where |den| > e^{−M}, else 0,
    dC_last' = [dC_last, dn_last, 0…],

which gives the gradient of n_0 (column DV of dC0') and uses an incoming gradient of n_last. The
GPU path pads DV' to DV + 8 (a multiple of 8); the NumPy path to DV + 1.

**The stabilizer (mLSTMexp).** In unstabilized units h_t = num_t / (max(|den_t|, 1) + ε e^{M_t}),
so h depends on the stabilizers only through ε e^{M_t}, with ∂h_t/∂M_t · dh_t = e_t,

    e_t = −(dh_t·h_t) · ε / (N_t + ε),

and M_t = max(m_t, −10) where m_t = max(λ_t + m_{t−1}, ι_t) is the step stabilizer (§4.3). The
gradient of m_t goes to the branch that attained the maximum: a reverse scan over tokens,

    x_t = e_t·[m_t >= −10] + [t+1 not a record]·x_{t+1},    x_S also takes dm_last,
    dλ_t += x_t where t is not a record,   dι_t += x_t where it is (record: ι_t > λ_t + m_{t−1}),

and what passes token 1 is the gradient of m_0 with the unstabilized initial state (e^{m_0}C_0,
e^{m_0}n_0) held fixed — the convention in which an incoming dm_last is read, so that chained
calls compose. Both scans (the max-plus one for m_t and the linear one for x_t) run in float64
as log2(S) doubling steps of whole-array operations (any xp; no in-place writes).
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from . import _arrays
from ._gpu.operands import check_head_dims
from ._types import MLSTMContext, MLSTMGrads, MLSTMState
from .config import MAX_DV
from .reference.gates import LOG_FORGET_FLOOR, LOG_INPUT_FLOOR, ROW_MAX_FLOOR


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


def _shifted(xp, x, k, fill, *, later):
    """x moved k places along the last axis: y_t = x_{t+k} (later) or x_{t−k}, ``fill`` where
    that leaves the array."""
    pad = xp.full(x.shape[:-1] + (k,), fill, x.dtype)
    return xp.concatenate([x[..., k:], pad] if later else [pad, x[..., :-k]], axis=-1)


def _exp_log_gates(xp, i, f):
    """(ι, λ, dι/dĩ, dλ/df̃) of mLSTMexp in float64 with the floors of reference.gates (NaN stays
    NaN, the derivative is zero where a floor is active)."""
    i, f = i.astype(np.float64), f.astype(np.float64)
    raw_f = -xp.logaddexp(0.0, -f)
    log_f = xp.where(raw_f < LOG_FORGET_FLOOR, LOG_FORGET_FLOOR, raw_f)
    log_i = xp.where(i < LOG_INPUT_FLOOR, LOG_INPUT_FLOOR, i)
    d_f = xp.where(raw_f < LOG_FORGET_FLOOR, 0.0, 0.5 * (1.0 - xp.tanh(0.5 * f)))   # σ(−f̃)
    d_i = xp.where(i < LOG_INPUT_FLOOR, 0.0, 1.0)
    return log_i, log_f, d_i, d_f


def step_stabilizers(xp, log_i, log_f, m0):
    """m_t = max(λ_t + m_{t−1}, ι_t) for t = 1 … S (last axis) from m0 (...), float64: a max-plus
    scan of the maps x ↦ max(x + λ_t, ι_t), composed pairwise in log2(S) doubling steps."""
    G, A = log_f, log_i
    k, S = 1, log_f.shape[-1]
    while k < S:   # element t: the composition of the maps t−2k+1 … t
        A = xp.maximum(_shifted(xp, A, k, -np.inf, later=False) + G, A)
        G = _shifted(xp, G, k, 0.0, later=False) + G
        k *= 2
    return xp.maximum(m0[..., None] + G, A)


def _reverse_gated_sum(xp, e, keep):
    """x_t = e_t + keep_t·x_{t+1} along the last axis (keep boolean, keep_{S−1} ignored), float64,
    in log2(S) doubling steps; a product keep·x is a select, so a NaN does not cross a cut."""
    X, K = e, keep
    k, S = 1, e.shape[-1]
    while k < S:   # element t: Σ_{j = t … t+k−1} [no cut in t … j−1] e_j, K: no cut in t … t+k−1
        X = X + xp.where(K, _shifted(xp, X, k, 0.0, later=True), 0.0)
        K = K & _shifted(xp, K, k, False, later=True)
        k *= 2
    return X


def stabilizer_grads(xp, i, f, m0, e, dm_last=None):
    """The gradient that flows through the stabilizers of mLSTMexp (module docstring, §6.6).

    i, f (..., S) gate pre-activations; m0 (...) the initial stabilizer (zeros when absent);
    e (..., S) = ∂loss/∂M_t, the derivative of the loss through ε·e^{M_t}; dm_last (...) an
    incoming gradient of m_last with the unstabilized last state held fixed (None: zero).
    Returns float64 (di, df, dm0): the additions to dĩ, df̃ and the gradient of m_0 with the
    unstabilized initial state held fixed."""
    log_i, log_f, d_i, d_f = _exp_log_gates(xp, i, f)
    m0 = m0.astype(np.float64)
    m = step_stabilizers(xp, log_i, log_f, m0)
    m_prev = xp.concatenate([m0[..., None], m[..., :-1]], axis=-1)
    record = log_i > log_f + m_prev                        # m_t = ι_t: the second branch attained it
    e = xp.where(m < ROW_MAX_FLOOR, 0.0, e.astype(np.float64))   # M_t = −10 there: no gradient
    if dm_last is not None:
        e = xp.concatenate([e[..., :-1], e[..., -1:] + dm_last.astype(np.float64)[..., None]], axis=-1)
    x = _reverse_gated_sum(xp, e, ~_shifted(xp, record, 1, True, later=True))
    d_log_f = xp.where(record, 0.0, x)
    d_log_i = xp.where(record, x, 0.0)
    dm0 = xp.where(record[..., 0], 0.0, x[..., 0])
    return d_log_i * d_i, d_log_f * d_f, dm0


def forward(problem, arrays, state, path, **kw):
    """The forward of ``path`` on the augmented problem; returns (h, state, ctx) like it."""
    kind, DV = problem.kind, problem.DV
    xp, pad = _xp(kind), _pad(kind)
    if kind == "cuda":
        check_head_dims(problem.DK, DV)
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


def _saved_gates(kind, inner):
    """The gate pre-activations i, f and the initial m (None where absent) of the inner context: its
    private copies (float64 on NumPy, float32 on the GPU), never the caller's arrays."""
    if kind == "numpy":
        _, _, _, i, f = inner.saved["inputs"]
        return i, f, inner.saved["initial"][2]
    return inner.saved["i"], inner.saved["f"], inner.saved["m0"]


def backward(ctx, dh, dC_last, dn_last, path, dm_last=None):
    """The gradients of ``forward``'s h and last state. ``dm_last``: an incoming gradient of m_last with
    the unstabilized last state held fixed (the convention of the returned ``d_initial_state.m``);
    None is zero."""
    p, s = ctx.problem, ctx.saved
    kind, DV, pad = p.kind, p.DV, s["pad"]
    xp = _xp(kind)
    with _device(kind, s["h"]):
        ct = s["hN"].dtype
        dh_ct = dh.astype(ct)
        dh_h = (dh_ct * s["h"][..., :DV].astype(ct)).sum(-1)      # dh·h, with h the output as returned
        # dh'[DV] = dden·(N+ε) = −(dh·h)·sign(den)
        dh_aug = _augment(xp, dh.astype(p.dtype if kind == "cuda" else np.float64), -dh_h * s["sign"], pad)
        dC_aug = None
        if dC_last is not None or dn_last is not None:
            sd = np.float32 if kind == "cuda" else np.float64
            dC = xp.zeros((p.B, p.NH, p.DK, DV), sd) if dC_last is None else dC_last.astype(sd)
            dn = xp.zeros((p.B, p.NH, p.DK), sd) if dn_last is None else dn_last.astype(sd)
            dC_aug = _augment(xp, dC, dn, pad)
        g = path.backward(s["inner"], dh_aug, dC_aug)
        di, df, dm0 = g.di, g.df, None
        if p.stabilized:   # the ε·e^{M} term through the running maximum
            i, f, m0 = _saved_gates(kind, s["inner"])
            m0 = xp.zeros((p.B, p.NH), np.float64) if m0 is None else m0
            e = -dh_h.astype(np.float64) * p.eps / s["hN"].astype(np.float64)
            ddi, ddf, dm0 = stabilizer_grads(xp, i, f, m0, e, dm_last)
            di = (di.astype(np.float64) + ddi).astype(di.dtype)
            df = (df.astype(np.float64) + ddf).astype(df.dtype)
        d_initial = None
        if g.d_initial_state is not None:
            dC0, dm = g.d_initial_state.C, g.d_initial_state.m
            if dm is not None and dm0 is not None:
                dm = dm0.astype(dm.dtype)
            d_initial = MLSTMState(xp.ascontiguousarray(dC0[..., :DV]), xp.ascontiguousarray(dC0[..., DV]), dm)
        return MLSTMGrads(g.dq, g.dk, xp.ascontiguousarray(g.dv[..., :DV]), di, df, d_initial)
