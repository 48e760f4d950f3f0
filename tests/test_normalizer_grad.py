"""normalizer_grad=True (docs/math.md §6.6) on the NumPy path: the gradient of h as computed,
checked against central finite differences of the public forward with nothing frozen — at ε ≈ 0
(1e-300: N + ε == N in float64), at the default ε = 1e-6 and at ε = 1e-3, where the ε·e^{M} term
through the running maximum matters — float64 inputs, fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import _normgrad, _numpy_path
from conftest import Shape, random_inputs, random_state, rel_err

EPS0 = 1e-300           # ε = 0 for all purposes (the API wants ε > 0)
STEP = 1e-6
TOL = 1e-6
SAMPLES = 16
DIRECTIONS = 3
SHAPE = Shape(1, 2, 37, 8, 4, 16)   # three chunks, the last one ragged
#: more shapes for the ε > 0 checks: one chunk, a multiple of the chunk, a ragged last chunk of one token
SHAPES = [SHAPE, Shape(2, 1, 16, 4, 8, 16), Shape(1, 1, 48, 8, 8, 16), Shape(1, 1, 33, 8, 4, 16)]
EPSILONS = [pytest.param(EPS0, id="eps0"), pytest.param(1e-6, id="eps1e-6"), pytest.param(1e-3, id="eps1e-3")]

GATES = [pytest.param("exp", id="exp"), pytest.param("sig", id="sig")]


def _inputs(rng, gate, shape=SHAPE):
    """Inputs on which both branches of N = max(|den|, e^{-M}) occur. For mLSTMexp input gates
    around 3, an initial m around 3 and small queries make the stabilized N small next to ε·e^{M}:
    the ε·e^{M} term that the stabilizer gradient carries then moves di, df by 1e-5 relative at
    ε = 1e-6 (ten times the tolerance)."""
    x = random_inputs(rng, shape, f_offset=1.0, i_offset=3.0 if gate == "exp" else 0.0)
    x["q"] *= 0.05 if gate == "exp" else 2.0
    return x


def _state(rng, gate, shape=SHAPE):
    C0, n0, m0 = random_state(rng, shape, gate)
    return tfla_cupy.MLSTMState(C0, n0, m0 + 3.0 if gate == "exp" else m0)


def _forward(x, state, gate, eps=EPS0, L=SHAPE.L, **kw):
    return tfla_cupy.mlstm_fwd(x["q"], x["k"], x["v"], x["i"], x["f"], gate=gate, initial_state=state,
                               chunk_size=L, eps=eps, **kw)


def _loss_fn(x, state, gate, w_h, w_C=None, w_n=None, eps=EPS0, L=SHAPE.L):
    """Σ w_h·h (+ ⟨w_C, C̃_last⟩ + ⟨w_n, ñ_last⟩ on the unstabilized last state e^{m_last}(C, n),
    what a following call consumes; m_last ≡ 0 for mLSTMsig)."""
    h, last, _ = _forward(x, state, gate, eps, L)
    loss = np.sum(w_h * h)
    if w_C is not None:
        scale = np.ones(last.C.shape[:2]) if last.m is None else np.exp(last.m)
        loss += np.sum(w_C * scale[..., None, None] * last.C) + np.sum(w_n * scale[..., None] * last.n)
    return loss


def _fd_check(fn, arr, grad, rng, name):
    """Central differences of fn() (arr edited in place and restored) against grad: on SAMPLES
    random entries and along DIRECTIONS random directions (which see every entry)."""
    got, want = [], []
    for flat in rng.choice(arr.size, size=min(SAMPLES, arr.size), replace=False):
        idx = np.unravel_index(flat, arr.shape)
        old = arr[idx]
        arr[idx] = old + STEP
        up = fn()
        arr[idx] = old - STEP
        down = fn()
        arr[idx] = old
        want.append((up - down) / (2 * STEP))
        got.append(grad[idx])
    assert rel_err(np.array(got), np.array(want)) < TOL, f"{name}: entries"
    for _ in range(DIRECTIONS):
        u = rng.standard_normal(arr.shape)
        base = arr.copy()
        arr[...] = base + STEP * u
        up = fn()
        arr[...] = base - STEP * u
        down = fn()
        arr[...] = base
        fd = (up - down) / (2 * STEP)
        scale = np.sqrt(np.sum(grad ** 2) * np.sum(u ** 2))   # Cauchy-Schwarz bound of <grad, u>
        assert abs(np.sum(grad * u) - fd) < TOL * scale, f"{name}: direction"


def _branches(x, state, gate, shape=SHAPE):
    """How many steps are on each branch of the normalizer (both must occur for the test to bite)."""
    from tfla_cupy.reference import chunkwise
    B, NH = shape.B, shape.NH
    st = state or (np.zeros((B, NH, shape.DK, shape.DV)), np.zeros((B, NH, shape.DK)), np.zeros((B, NH)))
    _, N, M, (C, n, m) = chunkwise.fwd(x["q"], x["k"], x["v"], x["i"], x["f"], *st, gate=gate, normalize=True,
                                       L=shape.L, eps=EPS0, scale=shape.DK ** -0.5)
    upper = N != np.exp(-M)   # N = max(|den|, e^{-M}) exactly
    return int(upper.sum()), int((~upper).sum())


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_matches_finite_differences(rng, gate, with_state, eps):
    x = _inputs(rng, gate)
    state = _state(rng, gate) if with_state else None
    upper, lower = _branches(x, state, gate)
    assert upper > 0 and lower > 0, (upper, lower)
    w_h = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.S, SHAPE.DV))
    w_C = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.DK, SHAPE.DV))
    w_n = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.DK))

    h, last, ctx = _forward(x, state, gate, eps, normalizer_grad=True)
    # the loss on the unstabilized last state: its gradient with respect to the returned (stabilized) C, n
    scale = np.ones((SHAPE.B, SHAPE.NH)) if last.m is None else np.exp(last.m)
    g = tfla_cupy.mlstm_bwd(ctx, w_h, tfla_cupy.MLSTMState(w_C * scale[..., None, None], w_n * scale[..., None],
                                                           None))

    def fn():
        return _loss_fn(x, state, gate, w_h, w_C, w_n, eps)

    for name, got in (("q", g.dq), ("k", g.dk), ("v", g.dv), ("i", g.di), ("f", g.df)):
        _fd_check(fn, x[name], got, rng, name)
    if with_state:
        _fd_check(fn, state.C, g.d_initial_state.C, rng, "C0")
        _fd_check(fn, state.n, g.d_initial_state.n, rng, "n0")
        assert np.max(np.abs(g.d_initial_state.n)) > 0


def _bias_grads(g):
    return g.di.sum(axis=2), g.df.sum(axis=2)


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
@pytest.mark.parametrize("eps", [pytest.param(1e-6, id="eps1e-6"), pytest.param(1e-3, id="eps1e-3")])
@pytest.mark.parametrize("gate", GATES)
def test_gate_grads_at_any_eps(rng, gate, eps, shape):
    """di, df (per token and summed like a gate bias) and dC0, dn0 against finite differences at
    ε > 0 with an initial state, on shapes with one, several and ragged chunks. For mLSTMexp the
    stabilizer part must matter: the gradient without it (M frozen) misses by more than 5·TOL."""
    x = _inputs(rng, gate, shape)
    state = _state(rng, gate, shape)
    w_h = rng.standard_normal((shape.B, shape.NH, shape.S, shape.DV))
    _, _, ctx = _forward(x, state, gate, eps, shape.L, normalizer_grad=True)
    g = tfla_cupy.mlstm_bwd(ctx, w_h)

    def fn():
        return _loss_fn(x, state, gate, w_h, eps=eps, L=shape.L)

    for name, got in (("i", g.di), ("f", g.df), ("v", g.dv)):
        _fd_check(fn, x[name], got, rng, name)
    _fd_check(fn, state.C, g.d_initial_state.C, rng, "C0")
    _fd_check(fn, state.n, g.d_initial_state.n, rng, "n0")
    # a gate bias: the gradient along the all-ones direction of i (f)
    for name, got in zip("if", _bias_grads(g)):
        base = x[name].copy()
        x[name][...] = base + STEP
        up = fn()
        x[name][...] = base - STEP
        down = fn()
        x[name][...] = base
        assert abs(got.sum() - (up - down) / (2 * STEP)) < TOL * np.abs(getattr(g, "d" + name)).sum(), name
    if gate == "exp":   # the ε·e^{M} term through the running maximum is what makes this exact
        frozen = _frozen_stabilizer_grads(ctx, w_h)
        assert max(rel_err(frozen.di, g.di), rel_err(frozen.df, g.df)) > 5 * TOL


def _frozen_stabilizer_grads(ctx, dh):
    """The normalizer_grad backward without the stabilizer part (M stop-gradient)."""
    p = ctx.problem
    s = ctx.saved
    dh_h = (dh * s["h"][..., :p.DV]).sum(-1)
    dh_aug = np.concatenate([dh, (-dh_h * s["sign"])[..., None]], axis=-1)
    return _numpy_path.backward(s["inner"], dh_aug, None)


def test_initial_m_gradient(rng):
    """d_initial_state.m (mLSTMexp) is the derivative along m_0 with the unstabilized initial state
    e^{m_0}(C_0, n_0) held fixed, at ε = 1e-3; zero at ε ≈ 0."""
    x = _inputs(rng, "exp")
    state = _state(rng, "exp")
    w_h = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.S, SHAPE.DV))
    for eps in (1e-3, EPS0):
        _, _, ctx = _forward(x, state, "exp", eps, normalizer_grad=True)
        g = tfla_cupy.mlstm_bwd(ctx, w_h)
        u = rng.standard_normal(state.m.shape)

        def moved(d):
            return tfla_cupy.MLSTMState(state.C * np.exp(-d)[..., None, None], state.n * np.exp(-d)[..., None],
                                        state.m + d)

        fd = (_loss_fn(x, moved(STEP * u), "exp", w_h, eps=eps)
              - _loss_fn(x, moved(-STEP * u), "exp", w_h, eps=eps)) / (2 * STEP)
        got = np.sum(g.d_initial_state.m * u)
        if eps == EPS0:
            assert not np.any(g.d_initial_state.m) or abs(got) < 1e-12
        else:
            assert abs(fd) > 1e-4 and abs(got - fd) < TOL * abs(fd), (got, fd)


@pytest.mark.parametrize("eps", [pytest.param(1e-6, id="eps1e-6"), pytest.param(1e-3, id="eps1e-3")])
def test_two_call_identity_at_eps(rng, eps):
    """One call's gradients = two chained calls' at ε > 0 (mLSTMexp), with the second call's
    d_initial_state (C, n and m) fed into the first call's backward."""
    x = _inputs(rng, "exp")
    state = _state(rng, "exp")
    dh = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.S, SHAPE.DV))
    cut = 21
    x["i"][:, :, cut] = -5.0    # the second call's first token attains no maximum: its m-gradient reaches m_0
    _, _, ctx = _forward(x, state, "exp", eps, normalizer_grad=True)
    g = tfla_cupy.mlstm_bwd(ctx, dh)
    first = {n: a[:, :, :cut] for n, a in x.items()}
    second = {n: a[:, :, cut:] for n, a in x.items()}
    _, mid, ctx1 = _forward(first, state, "exp", eps, normalizer_grad=True)
    _, _, ctx2 = _forward(second, mid, "exp", eps, normalizer_grad=True)
    g2 = tfla_cupy.mlstm_bwd(ctx2, dh[:, :, cut:])
    d2 = g2.d_initial_state
    assert np.max(np.abs(d2.m)) > 0
    g1 = tfla_cupy.mlstm_bwd(ctx1, dh[:, :, :cut], d2)   # the public call passes d_state.m on
    for name in ("dq", "dk", "dv", "di", "df"):
        chained = np.concatenate([getattr(g1, name), getattr(g2, name)], axis=2)
        assert rel_err(chained, getattr(g, name)) < 1e-9, name
    for name in "Cnm":
        assert rel_err(getattr(g1.d_initial_state, name), getattr(g.d_initial_state, name)) < 1e-9, name
    # without the m part the chain misses the ε·e^{M} term of the second call
    g1_no_m = _normgrad.backward(ctx1, dh[:, :, :cut], d2.C, d2.n, _numpy_path)
    assert rel_err(g1_no_m.df, g1.df) > 1e3 * eps * 1e-9 / 1e-6


def test_stabilizer_scan_matches_step_form(rng):
    """The doubling scans of _normgrad against a token loop: m_t = max(λ_t + m_{t−1}, ι_t) and the
    reverse routing of its gradient to the branch that attained each maximum."""
    from tfla_cupy.reference.gates import log_gates
    B, NH, S = 2, 3, 77
    i = rng.standard_normal((B, NH, S)) + rng.choice([-3.0, 0.0, 3.0], (B, NH, S))
    f = 2.0 + 2 * rng.standard_normal((B, NH, S))
    f[0, 0, 10] = -np.inf     # a reset
    i[1, 2, 20] = -np.inf     # a token that writes nothing
    m0 = rng.standard_normal((B, NH)) * 5
    m0[1, 1], i[1, 1, :30] = -15.0, -20.0    # the −10 floor of M is active there
    e = rng.standard_normal((B, NH, S))
    dm_last = rng.standard_normal((B, NH))
    log_i, log_f = log_gates(i, f, "exp")
    m_want = np.empty((B, NH, S))
    m = m0
    rec = np.empty((B, NH, S), bool)
    for t in range(S):
        rec[..., t] = log_i[..., t] > log_f[..., t] + m
        m = np.maximum(log_f[..., t] + m, log_i[..., t])
        m_want[..., t] = m
    assert rel_err(_normgrad.step_stabilizers(np, log_i, log_f, m0), m_want) < 1e-14
    # reverse routing, token by token
    from tfla_cupy.reference.gates import ROW_MAX_FLOOR, d_log_gates
    ee = np.where(m_want < ROW_MAX_FLOOR, 0.0, e)
    dl, di_ = np.zeros((B, NH, S)), np.zeros((B, NH, S))
    x = dm_last.copy()
    for t in reversed(range(S)):
        x = x + ee[..., t]
        di_[..., t] = np.where(rec[..., t], x, 0.0)
        dl[..., t] = np.where(rec[..., t], 0.0, x)
        x = np.where(rec[..., t], 0.0, x)
    d_i, d_f = d_log_gates(i, f, "exp")
    got_i, got_f, got_m0 = _normgrad.stabilizer_grads(np, i, f, m0, e, dm_last)
    assert rel_err(got_i, di_ * d_i) < 1e-13 and rel_err(got_f, dl * d_f) < 1e-13
    assert rel_err(got_m0, x) < 1e-13
    assert rec.any() and (~rec).any() and (m_want < ROW_MAX_FLOOR).any()


@pytest.mark.parametrize("gate", GATES)
def test_default_backward_differs_and_is_unchanged(rng, gate):
    """normalizer_grad=False is today's custom backward (dn0 = 0), and the correction is not zero."""
    x = _inputs(rng, gate)
    C0, n0, m0 = random_state(rng, SHAPE, gate)
    state = tfla_cupy.MLSTMState(C0, n0, m0)
    dh = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.S, SHAPE.DV))
    h0, last0, ctx0 = _forward(x, state, gate)
    h1, last1, ctx1 = _forward(x, state, gate, normalizer_grad=True)
    assert rel_err(h1, h0) < 1e-12 and rel_err(last1.C, last0.C) < 1e-12
    assert rel_err(last1.n, last0.n) < 1e-12
    g0, g1 = tfla_cupy.mlstm_bwd(ctx0, dh), tfla_cupy.mlstm_bwd(ctx1, dh)
    assert not np.any(g0.d_initial_state.n)
    assert rel_err(g0.dq, g1.dq) > 1e-3


@pytest.mark.parametrize("gate", GATES)
def test_two_call_identity(rng, gate):
    """Gradients of one call = gradients of two chained calls, the second call's d_initial_state
    (C and n) fed into the first call's backward: the last-state gradients of §6.6 for mLSTMexp."""
    x = _inputs(rng, gate)
    C0, n0, m0 = random_state(rng, SHAPE, gate)
    state = tfla_cupy.MLSTMState(C0, n0, m0)
    dh = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.S, SHAPE.DV))
    _, _, ctx = _forward(x, state, gate, normalizer_grad=True)
    g = tfla_cupy.mlstm_bwd(ctx, dh)
    cut = 21
    first = {n: a[:, :, :cut] for n, a in x.items()}
    second = {n: a[:, :, cut:] for n, a in x.items()}
    _, mid, ctx1 = _forward(first, state, gate, normalizer_grad=True)
    _, _, ctx2 = _forward(second, mid, gate, normalizer_grad=True)
    g2 = tfla_cupy.mlstm_bwd(ctx2, dh[:, :, cut:])
    assert np.max(np.abs(g2.d_initial_state.n)) > 0
    g1 = tfla_cupy.mlstm_bwd(ctx1, dh[:, :, :cut], g2.d_initial_state)
    for name in ("dq", "dk", "dv", "di", "df"):
        chained = np.concatenate([getattr(g1, name), getattr(g2, name)], axis=2)
        assert rel_err(chained, getattr(g, name)) < 1e-9, name
    assert rel_err(g1.d_initial_state.C, g.d_initial_state.C) < 1e-9
    assert rel_err(g1.d_initial_state.n, g.d_initial_state.n) < 1e-9


def test_nonorm_is_a_no_op(rng):
    x = random_inputs(rng, SHAPE)
    dh = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.S, SHAPE.DV))
    args = (x["q"], x["k"], x["v"], x["i"], x["f"])
    _, vjp0 = tfla_cupy.mlstm_vjp(*args, gate="sig", normalize=False)
    _, vjp1 = tfla_cupy.mlstm_vjp(*args, gate="sig", normalize=False, normalizer_grad=True)
    for a, b in zip(vjp0(dh)[:5], vjp1(dh)[:5]):
        assert rel_err(b, a) < 1e-14


def test_bad_value():
    x = random_inputs(np.random.default_rng(1), SHAPE)
    with pytest.raises(TypeError, match="normalizer_grad"):
        tfla_cupy.mlstm_fwd(x["q"], x["k"], x["v"], x["i"], x["f"], normalizer_grad="yes")
    with pytest.raises(TypeError, match="normalizer_grad"):
        tfla_cupy.mlstm(x["q"], x["k"], x["v"], x["i"], x["f"], normalizer_grad=1)
