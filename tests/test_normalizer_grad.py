"""normalizer_grad=True (docs/math.md §6.6) on the NumPy path: the gradient of h as computed,
checked against central finite differences of the public forward with nothing frozen, at ε ≈ 0
(1e-300: N + ε == N in float64), float64 inputs, fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest

import tfla_cupy
from conftest import Shape, random_inputs, random_state, rel_err

EPS0 = 1e-300           # ε = 0 for all purposes (the API wants ε > 0)
STEP = 1e-6
TOL = 1e-6
SAMPLES = 16
DIRECTIONS = 3
SHAPE = Shape(1, 2, 37, 8, 4, 16)   # three chunks, the last one ragged

GATES = [pytest.param("exp", id="exp"), pytest.param("sig", id="sig")]


def _inputs(rng, gate):
    x = random_inputs(rng, SHAPE, f_offset=1.0)
    # spread |n·q| around the lower bound so that both branches of N = max(|den|, e^{-M}) occur
    x["q"] *= 0.5 if gate == "exp" else 2.0
    return x


def _forward(x, state, gate, **kw):
    return tfla_cupy.mlstm_fwd(x["q"], x["k"], x["v"], x["i"], x["f"], gate=gate, initial_state=state,
                               chunk_size=SHAPE.L, eps=EPS0, **kw)


def _loss_fn(x, state, gate, w_h, w_C=None, w_n=None):
    h, last, _ = _forward(x, state, gate)
    loss = np.sum(w_h * h)
    if w_C is not None:
        loss += np.sum(w_C * last.C) + np.sum(w_n * last.n)
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


def _branches(x, state, gate):
    """How many steps are on each branch of the normalizer (both must occur for the test to bite)."""
    from tfla_cupy.reference import chunkwise
    st = state or (np.zeros((1, 2, 8, 4)), np.zeros((1, 2, 8)), np.zeros((1, 2)))
    _, N, M, (C, n, m) = chunkwise.fwd(x["q"], x["k"], x["v"], x["i"], x["f"], *st, gate=gate, normalize=True,
                                       L=SHAPE.L, eps=EPS0, scale=SHAPE.DK ** -0.5)
    upper = N != np.exp(-M)   # N = max(|den|, e^{-M}) exactly
    return int(upper.sum()), int((~upper).sum())


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_matches_finite_differences(rng, gate, with_state):
    x = _inputs(rng, gate)
    state = None
    if with_state:
        C0, n0, m0 = random_state(rng, SHAPE, gate)
        state = tfla_cupy.MLSTMState(C0, n0, m0)
    upper, lower = _branches(x, state, gate)
    assert upper > 0 and lower > 0, (upper, lower)
    w_h = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.S, SHAPE.DV))
    # a loss on the last state is exact by finite differences only without a stabilizer (§6.6)
    last_loss = gate == "sig"
    w_C = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.DK, SHAPE.DV)) if last_loss else None
    w_n = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.DK)) if last_loss else None

    h, last, ctx = _forward(x, state, gate, normalizer_grad=True)
    d_state = tfla_cupy.MLSTMState(w_C, w_n, None) if last_loss else None
    g = tfla_cupy.mlstm_bwd(ctx, w_h, d_state)

    def fn():
        return _loss_fn(x, state, gate, w_h, w_C, w_n)

    for name, got in (("q", g.dq), ("k", g.dk), ("v", g.dv), ("i", g.di), ("f", g.df)):
        _fd_check(fn, x[name], got, rng, name)
    if with_state:
        _fd_check(fn, state.C, g.d_initial_state.C, rng, "C0")
        _fd_check(fn, state.n, g.d_initial_state.n, rng, "n0")
        assert np.max(np.abs(g.d_initial_state.n)) > 0


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
