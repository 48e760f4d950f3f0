"""Helpers of the gate-gradient accuracy tests (docs/math.md §12.1): a plain float32 chain rule of
the chunkwise mLSTM, and a model-shaped problem around the cell.

``chain_rule_fp32`` is reverse-mode differentiation of the chunkwise forward of docs/math.md §4
(mLSTMexp, no initial state) with every intermediate in float32, as an autograd framework would
run it: gate vectors by float32 cumulative sums, the stabilizers m and M computed in float32 and
held constant (stop-gradient), each gate gradient collected from the products it enters (dD̃ of
the L × L block, dβ̄, dγ, dā) and pushed through the cumulative sums, never through the
identity dλ_t = Σ_{u ≥ t}(q·dq − k·dk). With ``normalizer_grad=True`` N is differentiated too
(the augmented value column of §6.6, which is the chain rule through den) and the ε·e^{M} term is
routed through the running maximum (``_normgrad.stabilizer_grads``; an O(ε) term).

The model: x (B, S, E) → q, k, v, ĩ, f̃ by linear maps (ĩ, f̃ with a bias and the soft cap
15·tanh(·/15) of the xLSTM 7B block) → mLSTM → a per-head RMS norm plus a skip of the raw cell
output (so the loss is not invariant to the scale of each h_t and the normalizer gradient
matters) → loss = Σ T₁ ⊙ norm(h) + Σ T₂ ⊙ h. Its parameter gradients are composed from the
cell's token gradients by the same code in every precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tfla_cupy import _normgrad

f32 = np.float32
CAP = 15.0            # the gate soft cap of the xLSTM 7B block
NORM_EPS = 1e-6
SKIP = 0.3            # weight of the raw cell output in the loss


# ------------------------------------------------------------------------------------------
# float32 chain rule of the chunkwise mLSTM (exp gate, no initial state)
# ------------------------------------------------------------------------------------------


def _logsig(x):
    return (np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))).astype(x.dtype)


def _sig(x):
    return (0.5 * (1 + np.tanh(0.5 * x))).astype(x.dtype)


def _mm(a, b):
    return np.matmul(a, b)


def _t(a):
    return np.swapaxes(a, -1, -2)


def chunkwise_forward(q, k, v, i, f, *, L, eps, dtype=f32):
    """The chunkwise forward of §4 in ``dtype`` (heads flattened: q, k (H, S, DK), v (H, S, DV),
    i, f (H, S)). Returns h and the cache of chain_rule_backward."""
    q, k, v, i, f = (x.astype(dtype) for x in (q, k, v, i, f))
    H, S, DK = q.shape
    DV = v.shape[-1]
    s = dtype(DK ** -0.5)
    lam, iota = _logsig(f), i
    one = np.ones((H, S, 1), dtype)
    vx = np.concatenate([v, one], -1)            # [v, 1]: column DV carries n and den
    C = np.zeros((H, DK, DV + 1), dtype)
    m = np.zeros(H, dtype)
    h = np.empty((H, S, DV), dtype)
    chunks = []
    for c0 in range(0, S, L):
        sl = slice(c0, min(S, c0 + L))
        Lc = sl.stop - sl.start
        b = np.cumsum(lam[:, sl], -1, dtype=dtype)
        g = b[:, -1]
        suf = np.flip(np.cumsum(np.flip(lam[:, sl], -1), -1, dtype=dtype), -1)
        a = np.concatenate([suf[:, 1:], np.zeros((H, 1), dtype)], -1) + iota[:, sl]
        mask = np.tril(np.ones((Lc, Lc), bool))
        D = b[:, :, None] - b[:, None, :] + iota[:, None, sl]
        mu = np.maximum(np.where(mask, D, -np.inf).max(-1), dtype(-10.0))
        M = np.maximum(b + m[:, None], mu)                                   # stop-gradient
        m_next = np.maximum(g + m, a.max(-1))                                # stop-gradient
        P = np.where(mask, np.exp(np.where(mask, D - M[..., None], -np.inf)), 0).astype(dtype)
        bbar = np.exp(b + m[:, None] - M)
        A = s * _mm(q[:, sl], _t(k[:, sl]))
        qC = s * _mm(q[:, sl], C)                                            # (H, Lc, DV+1)
        num = bbar[..., None] * qC + _mm(P * A, vx[:, sl])
        den = num[..., DV]
        N = np.maximum(np.abs(den), np.exp(-M))
        h[:, sl] = num[..., :DV] / (N + dtype(eps))[..., None]
        gam = np.exp(g + m - m_next)
        abar = np.exp(a - m_next[:, None])
        chunks.append(dict(sl=sl, b=b, g=g, a=a, mask=mask, M=M, P=P, bbar=bbar, A=A, den=den, N=N, gam=gam,
                           abar=abar, C=C, num=num))
        C = gam[:, None, None] * C + _mm(_t(k[:, sl] * abar[..., None]), vx[:, sl])
        m = m_next
    cache = dict(q=q, k=k, vx=vx, i=i, f=f, lam=lam, s=s, eps=eps, chunks=chunks, h=h, dtype=dtype)
    return h, cache


def chain_rule_backward(cache, dh, *, normalizer_grad):
    """Reverse mode of chunkwise_forward in its dtype. Returns dq, dk, dv, di, df."""
    dt = cache["dtype"]
    q, k, vx, s, eps = cache["q"], cache["k"], cache["vx"], cache["s"], dt(cache["eps"])
    dh = dh.astype(dt)
    H, S, DK = q.shape
    DV = vx.shape[-1] - 1
    h = cache["h"]
    dq, dk, dvx = np.empty_like(q), np.empty_like(k), np.empty_like(vx)
    dlam, diota = np.empty((H, S), dt), np.empty((H, S), dt)
    dh_h = np.sum(dh * h, -1)
    e = np.zeros((H, S), dt)                          # ∂loss/∂M through ε·e^{M} (normalizer_grad)
    dC = np.zeros((H, DK, DV + 1), dt)
    for ch in reversed(cache["chunks"]):
        sl, b, a, mask, M, P, bbar, A, N = (ch[n] for n in ("sl", "b", "a", "mask", "M", "P", "bbar", "A", "N"))
        gam, abar, C = ch["gam"], ch["abar"], ch["C"]
        qc, kc, vc = q[:, sl], k[:, sl], vx[:, sl]
        G = dh[:, sl] / (N + eps)[..., None]                                 # ∂/∂num
        col = np.zeros(G.shape[:-1] + (1,), dt)
        if normalizer_grad:   # ∂/∂den through N = max(|den|, e^{-M}) on the upper branch
            upper = np.abs(ch["den"]) > np.exp(-M)
            col[..., 0] = np.where(upper, -dh_h[:, sl] / (N + eps) * np.sign(ch["den"]), 0)
            e[:, sl] = -dh_h[:, sl] * eps / (N + eps)
        Gx = np.concatenate([G, col], -1)                                   # ∂/∂[num, den]
        qC = s * _mm(qc, C)
        dbbar = np.sum(Gx * qC, -1)
        dW = _mm(Gx, _t(vc))                                                 # ∂/∂(P ⊙ A)
        dvx[:, sl] = _mm(_t(P * A), Gx) + abar[..., None] * _mm(kc, dC)
        Z = np.where(mask, dW * A * P, 0).astype(dt)                         # ∂/∂D̃
        dA = dW * P
        dq[:, sl] = s * _mm(dA, kc) + s * _mm(bbar[..., None] * Gx, _t(C))
        dkc = s * _mm(_t(dA), qc)
        dCc = s * _mm(_t(qc), bbar[..., None] * Gx)
        db = Z.sum(-1) - Z.sum(-2) + dbbar * bbar
        dio = Z.sum(-2)
        # C^{c+1} = γ C^c + (K ⊙ ā)ᵀ [V, 1]
        dg = np.sum(dC * C, (-1, -2)) * gam
        da = np.sum(kc * _mm(vc, _t(dC)), -1) * abar
        dk[:, sl] = dkc + abar[..., None] * _mm(vc, _t(dC))
        dC = gam[:, None, None] * dC + dCc
        # b = cumsum λ, g = Σ λ, a_τ = Σ_{u>τ} λ_u + ι_τ
        rc = np.flip(np.cumsum(np.flip(db, -1), -1, dtype=dt), -1)
        ex = np.concatenate([np.zeros((H, 1), dt), np.cumsum(da, -1, dtype=dt)[:, :-1]], -1)
        dlam[:, sl] = rc + dg[:, None] + ex
        diota[:, sl] = dio + da
    i, f = cache["i"], cache["f"]
    di = diota
    df = dlam * _sig(-f)
    if normalizer_grad:
        ddi, ddf, _ = _normgrad.stabilizer_grads(np, i, f, np.zeros(H), e)
        di = di + ddi.astype(dt)
        df = df + ddf.astype(dt)
    return dq, dk, dvx[..., :DV], di.astype(dt), df.astype(dt)


# ------------------------------------------------------------------------------------------
# The model-shaped problem
# ------------------------------------------------------------------------------------------


@dataclass
class Model:
    """Parameters (float64) of one mLSTM layer with projections; every array rounded to float32."""

    Wq: np.ndarray
    Wk: np.ndarray
    Wv: np.ndarray
    Wi: np.ndarray
    bi: np.ndarray
    Wf: np.ndarray
    bf: np.ndarray
    NH: int
    DK: int
    DV: int

    NAMES = ("Wq", "Wk", "Wv", "Wi", "bi", "Wf", "bf")

    def params(self):
        return {n: getattr(self, n) for n in self.NAMES}


def _r32(x):
    return np.asarray(x, np.float64).astype(f32).astype(np.float64)


def make_model(rng, E, NH, DK, DV, *, f_bias):
    """Random parameters, rounded to float32 values: q, k, v ~ N(0, 1) per component for x ~ N(0, 1),
    gate pre-activations of spread ~1 around bias 0 (ĩ) and ``f_bias`` (f̃)."""
    return Model(Wq=_r32(rng.standard_normal((E, NH * DK)) / np.sqrt(E)),
                 Wk=_r32(rng.standard_normal((E, NH * DK)) / np.sqrt(E)),
                 Wv=_r32(rng.standard_normal((E, NH * DV)) / np.sqrt(E)),
                 Wi=_r32(rng.standard_normal((E, NH)) / np.sqrt(E)),
                 bi=_r32(0.3 * rng.standard_normal(NH)),
                 Wf=_r32(rng.standard_normal((E, NH)) / np.sqrt(E)),
                 bf=_r32(f_bias + 0.3 * rng.standard_normal(NH)), NH=NH, DK=DK, DV=DV)


def model_inputs(rng, B, S, E, NH, DV):
    """x (B, S, E) and the loss weights T₁, T₂ (B, NH, S, DV), float32 values."""
    return (_r32(rng.standard_normal((B, S, E))), _r32(rng.standard_normal((B, NH, S, DV))),
            _r32(rng.standard_normal((B, NH, S, DV))))


def cell_inputs(model, x, dtype):
    """q, k, v (B, NH, S, D), ĩ, f̃ (B, NH, S) in ``dtype``, and the soft-cap derivatives."""
    p = {n: v.astype(dtype) for n, v in model.params().items()}
    x = x.astype(dtype)
    B, S, _ = x.shape
    NH = model.NH

    def heads(y, D):
        return np.ascontiguousarray(y.reshape(B, S, NH, D).transpose(0, 2, 1, 3))

    q, k, v = heads(x @ p["Wq"], model.DK), heads(x @ p["Wk"], model.DK), heads(x @ p["Wv"], model.DV)
    gates, caps = [], []
    for W, b in ((p["Wi"], p["bi"]), (p["Wf"], p["bf"])):
        raw = x @ W + b                                         # (B, S, NH)
        th = np.tanh(raw / dtype(CAP))
        gates.append(np.ascontiguousarray((dtype(CAP) * th).transpose(0, 2, 1)))
        caps.append(np.ascontiguousarray((1 - th * th).transpose(0, 2, 1)))
    return (q, k, v, gates[0], gates[1]), caps


def loss_and_dh(h, T1, T2, dtype):
    """loss = Σ T₁ ⊙ rmsnorm_DV(h) + SKIP·Σ T₂ ⊙ h and its gradient dh, in ``dtype``."""
    h, T1, T2 = (a.astype(dtype) for a in (h, T1, T2))
    DV = h.shape[-1]
    r = np.sqrt(np.mean(h * h, -1, keepdims=True) + dtype(NORM_EPS))
    y = h / r
    loss = np.sum(T1 * y, dtype=np.float64) + SKIP * np.sum(T2 * h, dtype=np.float64)
    dh = (T1 - y * np.sum(T1 * y, -1, keepdims=True) / dtype(DV)) / r + dtype(SKIP) * T2
    return loss, dh.astype(dtype)


def param_grads(model, x, caps, grads, dtype):
    """Parameter gradients from the cell's token gradients (dq, dk, dv, di, df), in ``dtype``."""
    dq, dk, dv, di, df = (g.astype(dtype) for g in grads)
    x = x.astype(dtype)
    B, S, E = x.shape

    def flat(d):    # (B, NH, S, D) -> (B·S, NH·D)
        return d.transpose(0, 2, 1, 3).reshape(B * S, -1)

    xf = x.reshape(B * S, E)
    out = dict(Wq=xf.T @ flat(dq), Wk=xf.T @ flat(dk), Wv=xf.T @ flat(dv))
    for name, dg, cap in (("i", di, caps[0]), ("f", df, caps[1])):
        draw = (dg * cap.astype(dtype)).transpose(0, 2, 1).reshape(B * S, -1)   # (B·S, NH)
        out["W" + name] = xf.T @ draw
        out["b" + name] = draw.sum(0)
    return out


def heads_first(a):
    """(B, NH, S, ...) -> (B·NH, S, ...)"""
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def model_grads_fp32_chain_rule(model, x, T1, T2, *, L, eps, normalizer_grad):
    """The whole model in float32 with the cell's float32 chain rule: (loss, parameter gradients)."""
    (q, k, v, i, f), caps = cell_inputs(model, x, f32)
    B, NH = q.shape[:2]
    h, cache = chunkwise_forward(*(heads_first(a) for a in (q, k, v, i, f)), L=L, eps=eps)
    h = h.reshape(B, NH, *h.shape[1:])
    loss, dh = loss_and_dh(h, T1, T2, f32)
    g = chain_rule_backward(cache, heads_first(dh), normalizer_grad=normalizer_grad)
    g = [a.reshape((B, NH) + a.shape[1:]) for a in g]
    return loss, param_grads(model, x, caps, g, f32)


def model_grads_library(model, x, T1, T2, *, L, eps, normalizer_grad, dtype, to_device=None, to_host=None):
    """The whole model with tfla_cupy's cell (NumPy path for float64 arrays, GPU path for device
    arrays via ``to_device`` / ``to_host``): (loss, parameter gradients), the rest in ``dtype``."""
    import tfla_cupy
    dev = to_device or (lambda a: a)
    host = to_host or (lambda a: a)
    (q, k, v, i, f), caps = cell_inputs(model, x, dtype)
    h, vjp = tfla_cupy.mlstm_vjp(*(dev(a) for a in (q, k, v, i, f)), chunk_size=L, eps=eps,
                                 normalizer_grad=normalizer_grad)
    loss, dh = loss_and_dh(host(h), T1, T2, dtype)
    g = vjp(dev(dh))
    return loss, param_grads(model, x, caps, [host(a) for a in g[:5]], dtype)
