"""Special gate values on the NumPy path (docs/math.md §1.2): ĩ = −∞ writes nothing, f̃ = +∞ keeps
everything, f̃ = −∞ is a reset; ĩ = +∞ and NaN stay confined to their head and later tokens.

Every check compares the public NumPy path (the chunkwise reference the kernels mirror) with an
independent form: the step recurrence token by token, an unpadded call, or separate calls."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tfla_cupy
from conftest import EPS, GATE_PARAMS, GATE_VARIANTS, TOL_EXACT, rel_err
from tfla_cupy.reference import recurrent
from tfla_cupy.reference.gates import LOG_FORGET_FLOOR, LOG_INPUT_FLOOR, log_gates

INF = np.inf


def _inputs(rng, B, NH, S, DK, DV):
    q, k = rng.standard_normal((2, B, NH, S, DK))
    v = rng.standard_normal((B, NH, S, DV))
    i = rng.standard_normal((B, NH, S))
    f = 3.0 + rng.standard_normal((B, NH, S))
    return q, k, v, i, f


def _step_form(q, k, v, i, f, gate, normalize, state=None):
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    if state is None:
        state = (np.zeros((B, NH, DK, DV)), np.zeros((B, NH, DK)), np.zeros((B, NH)))
    h, C, n, m = recurrent.fwd_recurrent(q, k, v, i, f, *state, gate=gate, normalize=normalize, eps=EPS,
                                         scale=DK ** -0.5)
    return h, C, n, m


# Where the −10 row-max floor of the chunkwise form is active it only changes the ε term (conftest
# TOL_FLOOR); against the step form we allow that plus float64 rounding.
TOL_VS_STEP = 1e-9


def test_floors_are_the_kernels_constants():
    assert LOG_FORGET_FLOOR == -1e4 and LOG_INPUT_FLOOR == -1e30
    with np.errstate(invalid="ignore"):  # the NaN entries are on purpose: NaN stays NaN
        log_i, log_f = log_gates(np.array([-INF, 0.0, np.nan]), np.array([-INF, INF, np.nan]), "exp")
    assert log_f[0] == LOG_FORGET_FLOOR and log_f[1] == 0.0 and np.isnan(log_f[2])
    assert log_i[0] == LOG_INPUT_FLOOR and np.isnan(log_i[2])
    # e^{floor} is exactly zero in float64 (and so in every narrower format): the floor changes no output
    assert math.exp(LOG_FORGET_FLOOR) == 0.0


@pytest.mark.parametrize("tokens", [1, 3], ids=["reset", "reset-then-masked"])
def test_step_form_without_overflow_when_every_write_has_decayed(rng, tokens):
    """A reset (f̃ = −∞) of tokens that write nothing (ĩ = −∞) drives the exp variant's m to
    −1e4 and below, where the normalizer's lower bound e^{−m} is beyond float64: h is exactly 0,
    as the bound +∞ says, and no floating-point overflow happens on the way."""
    B, NH, DK, DV = 2, 3, 8, 16
    q, k = rng.standard_normal((2, B, NH, tokens, DK))
    v = rng.standard_normal((B, NH, tokens, DV))
    i, f = np.full((2, B, NH, tokens), -INF)
    state = (rng.standard_normal((B, NH, DK, DV)), rng.standard_normal((B, NH, DK)), np.zeros((B, NH)))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        h, C, n, m = _step_form(q, k, v, i, f, "exp", True, state)
    assert np.all(m <= LOG_FORGET_FLOOR)
    assert np.all(h == 0.0) and np.isfinite(C).all() and np.isfinite(n).all()


@pytest.mark.parametrize("gate,normalize", GATE_PARAMS)
@pytest.mark.parametrize("where", ["first", "last", "boundary", "chunk", "sequence"])
def test_masked_tokens_are_finite_and_write_nothing(rng, gate, normalize, where):
    B, NH, S, DK, DV, L = 1, 2, 70, 8, 16, 16
    q, k, v, i, f = _inputs(rng, B, NH, S, DK, DV)
    sl = {"first": slice(0, 1), "last": slice(S - 1, S), "boundary": slice(15, 17), "chunk": slice(16, 32),
          "sequence": slice(0, S)}[where]
    i[..., sl] = -INF
    h, state, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=gate, normalize=normalize, chunk_size=L)
    g = tfla_cupy.mlstm_bwd(ctx, rng.standard_normal(h.shape))
    assert np.isfinite(h).all() and all(np.isfinite(x).all() for x in g[:5])
    assert np.all(g.di[..., sl] == 0.0)
    h_ref, C_ref, *_ = _step_form(q, k, v, i, f, gate, normalize)
    assert rel_err(h, h_ref) <= TOL_VS_STEP
    assert rel_err(state.C, C_ref) <= TOL_VS_STEP
    # writing nothing: the same call with zero keys and values at those tokens
    k0, v0 = k.copy(), v.copy()
    k0[..., sl, :], v0[..., sl, :] = 0.0, 0.0
    assert rel_err(h, tfla_cupy.mlstm(q, k0, v0, i, f, gate=gate, normalize=normalize, chunk_size=L)) <= TOL_EXACT


@pytest.mark.parametrize("gate,normalize", GATE_PARAMS)
@pytest.mark.parametrize("pad", [1, 16, 37])
def test_left_padding_equals_the_unpadded_call(rng, gate, normalize, pad):
    B, NH, S, DK, DV, L = 2, 2, 45, 8, 16, 16
    q, k, v, i, f = _inputs(rng, B, NH, S, DK, DV)
    qp, kp, vp, ip, fp = _inputs(rng, B, NH, S + pad, DK, DV)
    qp[..., pad:, :], kp[..., pad:, :], vp[..., pad:, :] = q, k, v
    ip[..., pad:], fp[..., pad:] = i, f
    ip[1, :, :pad], fp[1, :, :pad] = -INF, INF  # row 1 is left-padded; row 0 keeps random tokens there
    h, st_p, ctx = tfla_cupy.mlstm_fwd(qp, kp, vp, ip, fp, gate=gate, normalize=normalize, chunk_size=L)
    h0, st0, ctx0 = tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=gate, normalize=normalize, chunk_size=L)
    assert rel_err(h[1, :, pad:], h0[1]) <= TOL_EXACT
    assert rel_err(st_p.C[1], st0.C[1]) <= TOL_EXACT
    dh = rng.standard_normal(h0.shape)
    dhp = np.zeros(h.shape)
    dhp[..., pad:, :] = dh
    g, g0 = tfla_cupy.mlstm_bwd(ctx, dhp), tfla_cupy.mlstm_bwd(ctx0, dh)
    for name in ("dq", "dk", "dv", "di", "df"):
        a, b = getattr(g, name)[1, :, pad:], getattr(g0, name)[1]
        assert rel_err(a, b) <= 1e-9, name
        assert np.isfinite(getattr(g, name)).all(), name


@pytest.mark.parametrize("gate,normalize", GATE_PARAMS)
@pytest.mark.parametrize("at", [0, 15, 16, 30, 49])
def test_reset_equals_a_new_sequence(rng, gate, normalize, at):
    """f̃ = −∞ at token t: equal to a separate call from a zero state starting at t (same tokens)."""
    B, NH, S, DK, DV, L = 1, 2, 50, 8, 16, 16
    q, k, v, i, f = _inputs(rng, B, NH, S, DK, DV)
    f[..., at] = -INF
    init = tuple(rng.standard_normal(s) for s in ((B, NH, DK, DV), (B, NH, DK), (B, NH)))
    init = tfla_cupy.MLSTMState(*init)
    h, state, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=gate, normalize=normalize, chunk_size=L,
                                        initial_state=init)
    tail = [x[..., at:, :] for x in (q, k, v)] + [x[..., at:] for x in (i, f)]
    h2, state2, ctx2 = tfla_cupy.mlstm_fwd(*tail, gate=gate, normalize=normalize, chunk_size=L)
    assert np.isfinite(h).all()
    assert rel_err(h[..., at:, :], h2) <= 1e-9
    assert rel_err(state.C, state2.C) <= 1e-9
    dh = rng.standard_normal(h.shape)
    g, g2 = tfla_cupy.mlstm_bwd(ctx, dh), tfla_cupy.mlstm_bwd(ctx2, dh[..., at:, :])
    assert all(np.isfinite(x).all() for x in g[:5])
    assert np.all(g.df[..., at] == 0.0)
    for name in ("dq", "dk", "dv", "di"):
        assert rel_err(getattr(g, name)[..., at:, :] if name in ("dq", "dk", "dv") else getattr(g, name)[..., at:],
                       getattr(g2, name)) <= 1e-9, name
    # nothing before the reset reaches anything after it: the initial state gets no gradient from h[t:]
    dh_tail = np.zeros(h.shape)
    dh_tail[..., at:, :] = dh[..., at:, :]
    assert np.all(tfla_cupy.mlstm_bwd(ctx, dh_tail).d_initial_state.C == 0.0)


@pytest.mark.parametrize("gate,normalize", GATE_PARAMS)
def test_undefined_values_stay_in_their_head_and_later_tokens(rng, gate, normalize):
    B, NH, S, DK, DV, L = 1, 3, 60, 8, 16, 16
    q, k, v, i, f = _inputs(rng, B, NH, S, DK, DV)
    h_clean = tfla_cupy.mlstm(q, k, v, i, f, gate=gate, normalize=normalize, chunk_size=L)
    f[0, 0, 20] = np.nan
    i[0, 1, 40] = np.nan
    h, state = tfla_cupy.mlstm(q, k, v, i, f, gate=gate, normalize=normalize, chunk_size=L, return_state=True)
    assert np.array_equal(h[0, 2], h_clean[0, 2])
    assert np.array_equal(h[0, 0, :20], h_clean[0, 0, :20]) and np.isnan(h[0, 0, 20:]).all()
    assert np.array_equal(h[0, 1, :40], h_clean[0, 1, :40]) and np.isnan(h[0, 1, 40:]).all()
    assert np.isnan(state.C[0, :2]).all() and np.isfinite(state.C[0, 2]).all()


# ------------------------------------------------------------------------------------------
# Property test: sprinkled special values, the chunkwise path against the step recurrence.
# ------------------------------------------------------------------------------------------

SPECIALS = st.fixed_dictionaries({
    "i_minf": st.floats(0.0, 0.5), "f_minf": st.floats(0.0, 0.2), "f_pinf": st.floats(0.0, 0.5),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), NH=st.integers(1, 2), S=st.integers(1, 80), DK=st.sampled_from([4, 8]),
       DV=st.sampled_from([4, 8]), L=st.sampled_from([16, 32, 64]), variant=st.sampled_from(GATE_VARIANTS),
       density=SPECIALS, init=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_property_chunkwise_equals_step_with_special_values(B, NH, S, DK, DV, L, variant, density, init, seed):
    gate, normalize = variant
    rng = np.random.default_rng(seed)
    q, k, v, i, f = _inputs(rng, B, NH, S, DK, DV)
    i[rng.random(i.shape) < density["i_minf"]] = -INF
    f[rng.random(f.shape) < density["f_minf"]] = -INF
    f[rng.random(f.shape) < density["f_pinf"]] = INF
    state = None
    if init:
        state = (rng.standard_normal((B, NH, DK, DV)), rng.standard_normal((B, NH, DK)),
                 rng.standard_normal((B, NH)) if gate == "exp" else np.zeros((B, NH)))
    h, last = tfla_cupy.mlstm(q, k, v, i, f, gate=gate, normalize=normalize, chunk_size=L, return_state=True,
                              initial_state=state)
    h_ref, C_ref, n_ref, m_ref = _step_form(q, k, v, i, f, gate, normalize, state)
    assert np.isfinite(h).all() and np.isfinite(last.C).all()
    assert rel_err(h, h_ref) <= TOL_VS_STEP
    assert rel_err(last.C, C_ref) <= TOL_VS_STEP
    if gate == "exp":
        assert np.allclose(last.m, m_ref, rtol=1e-12, atol=1e-9)
