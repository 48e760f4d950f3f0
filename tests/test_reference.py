"""The float64 references against each other (docs/math.md §2-4, §6, §7), the manual backward
against finite differences, and state passing through the public NumPy path.

Ids read "B2-NH1-S129-DK16-DV48-L64-exp[-state]": sizes, chunk size L, gate variant ("exp",
"sig", "sig-nonorm" = sig with normalize=False) and whether an initial state is given.
"""

from __future__ import annotations

import numpy as np
import pytest

import tfla_cupy
from tfla_cupy.reference import chunkwise, parallel, recurrent
from tfla_cupy.reference.gates import LOG_FORGET_FLOOR, ROW_MAX_FLOOR, d_log_gates, log_gates

from conftest import (EPS, FD_MISMATCH_MIN, FD_SAMPLES, FD_STEP, GATE_PARAMS, TOL_EXACT, TOL_FD,
                      TOL_FLOOR, TOL_STATE_PASSING, Shape, random_inputs, random_state, ref_opts,
                      rel_err, state_kwargs, zero_state)

# Every S in {1, 2, 17, 64, 127, 128, 129, 500}, chunk size in {16, 64, 128, 256} and
# (DK, DV) in {(8, 8), (16, 48), (48, 96), (64, 128), (96, 64)} appears at least once; ragged
# last chunks (S % L != 0) and single chunks longer than S are both covered.
SHAPES = [
    Shape(1, 1, 1, 8, 8, 16),
    Shape(2, 1, 2, 16, 48, 16),
    Shape(1, 2, 17, 8, 8, 16),
    Shape(2, 1, 17, 48, 96, 64),
    Shape(1, 2, 64, 16, 48, 64),
    Shape(1, 1, 64, 96, 64, 256),
    Shape(1, 1, 127, 64, 128, 128),
    Shape(2, 2, 128, 16, 48, 64),
    Shape(2, 1, 129, 16, 48, 64),
    Shape(1, 1, 129, 96, 64, 128),
    Shape(1, 1, 500, 8, 8, 16),
    Shape(1, 2, 500, 48, 96, 128),
    Shape(1, 1, 500, 64, 128, 256),
]
SHAPE_PARAMS = [pytest.param(s, id=s.id) for s in SHAPES]
STATE_PARAMS = [pytest.param(False, id="nostate"), pytest.param(True, id="state")]


def _initial_state(rng, shape, gate, with_state):
    return random_state(rng, shape, gate) if with_state else zero_state(shape)


# ------------------------------------------------------------------------------------------
# Forward: step ≡ chunkwise ≡ parallel
# ------------------------------------------------------------------------------------------


def _check_step_vs_chunkwise(x, state, shape, gate, normalize, L):
    """Chunkwise without the floor equals the step recurrence: h and the last C, n, m."""
    opts = ref_opts(shape, gate, normalize)
    h_ref, C_ref, n_ref, m_ref = recurrent.fwd_recurrent(**x, **state_kwargs(state), **opts)
    h, _, _, (C, n, m) = chunkwise.fwd(**x, **state_kwargs(state), L=L, floor=None, **opts)
    assert rel_err(h, h_ref) <= TOL_EXACT
    assert rel_err(C[..., -1, :, :], C_ref) <= TOL_EXACT
    assert rel_err(n[..., -1, :], n_ref) <= TOL_EXACT
    assert rel_err(m[..., -1], m_ref) <= TOL_EXACT


@pytest.mark.parametrize("with_state", STATE_PARAMS)
@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_step_equals_chunkwise(rng, shape, gate, normalize, with_state):
    x = random_inputs(rng, shape)
    state = _initial_state(rng, shape, gate, with_state)
    _check_step_vs_chunkwise(x, state, shape, gate, normalize, shape.L)


@pytest.mark.parametrize("L", [1, 4, 16, 64, 128, 256], ids=lambda L: f"L{L}")
@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_every_chunk_size_equals_step(rng, gate, normalize, L):
    """One sequence (ragged for every L > 1), with an initial state, under every chunk size."""
    shape = Shape(2, 1, 129, 16, 48, L)
    x = random_inputs(rng, shape)
    _check_step_vs_chunkwise(x, random_state(rng, shape, gate), shape, gate, normalize, L)


@pytest.mark.parametrize("with_state", STATE_PARAMS)
@pytest.mark.parametrize("i_offset", [pytest.param(0.0, id="floor-inactive"),
                                      pytest.param(-15.0, id="floor-active")])
@pytest.mark.parametrize("shape", [pytest.param(s, id=s.id) for s in (SHAPES[8], SHAPES[11])])
def test_floor_only_changes_eps_term(rng, shape, i_offset, with_state):
    """The −10 row-max floor (exp only) raises M_t = max(m_t, −10). In unstabilized units that
    replaces ε·e^{m_t} by ε·e^{−10} next to a normalizer >= 1 and changes nothing else, so each
    h_t moves by at most ε·e^{−10} ≈ 4.5e-11 relative (TOL_FLOOR) and the states not at all.
    With ĩ ~ −15 + N(0, 1) the stabilizer sinks below −10 and the floor is really used."""
    x = random_inputs(rng, shape, i_offset=i_offset, f_offset=0.0)
    state = _initial_state(rng, shape, "exp", with_state)
    opts = ref_opts(shape, "exp", True)
    h_ref, C_ref, n_ref, m_ref = recurrent.fwd_recurrent(**x, **state_kwargs(state), **opts)
    h, _, M, (C, n, m) = chunkwise.fwd(**x, **state_kwargs(state), L=shape.L, **opts)
    assert M.min() >= ROW_MAX_FLOOR
    rounding = TOL_EXACT * np.max(np.abs(h_ref))
    assert np.all(np.abs(h - h_ref) <= TOL_FLOOR * np.abs(h_ref) + rounding)
    assert rel_err(C[..., -1, :, :], C_ref) <= TOL_EXACT
    assert rel_err(n[..., -1, :], n_ref) <= TOL_EXACT
    assert rel_err(m[..., -1], m_ref) <= TOL_EXACT
    if i_offset < ROW_MAX_FLOOR:
        # Somewhere the floor moved h by far more than rounding: the case exercises it.
        h_nofloor, *_ = chunkwise.fwd(**x, **state_kwargs(state), L=shape.L, floor=None, **opts)
        assert np.max(np.abs(h - h_nofloor) / np.abs(h_nofloor)) > 1e-13


@pytest.mark.parametrize("eps", [pytest.param(0.0, id="eps0"), pytest.param(EPS, id="eps1e-6")])
@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
@pytest.mark.parametrize("shape", [pytest.param(s, id=s.id) for s in SHAPES if s.S > 1][::2])
def test_parallel_equals_chunkwise(rng, shape, gate, normalize, eps):
    """The quadratic form (no initial state) against the chunkwise form.

    Both are h = C̃ᵀq̂ / (max(|ñᵀq̂|, 1) + ε·e^{stabilizer}) in unstabilized units; only the
    stabilizer differs: parallel uses the plain row max m^par_t, chunkwise
    M_t = max(m^par_t, Σλ (the m_0 = 0 term), −10) >= m^par_t. So with ε = 0 they agree
    exactly, and otherwise |h − h^par| <= ε·|e^{M_t} − e^{m^par_t}|·|h| <= ε·e^{M_t}·|h| per
    element (docs/math.md §2.3, §3). The sig variant has no stabilizer (M ≡ m^par ≡ 0): exact.
    """
    x = random_inputs(rng, shape, f_offset=0.0)
    opts = ref_opts(shape, gate, normalize, eps=eps)
    h_par = parallel.fwd_parallel(**x, **opts)
    h, _, M, _ = chunkwise.fwd(**x, **state_kwargs(zero_state(shape)), L=shape.L, **opts)
    eps_term = eps * np.exp(M)[..., None] * np.abs(h) if gate == "exp" else 0.0
    bound = eps_term + TOL_EXACT * np.max(np.abs(h))
    assert np.all(np.abs(h - h_par) <= bound)


# ------------------------------------------------------------------------------------------
# Backward vs finite differences of the forward with N, M and the stabilizers frozen
# ------------------------------------------------------------------------------------------

GRAD_NAMES = ("q", "k", "v", "i", "f", "C0")


def _frozen_loss(x, state, dh, dC_last, shape, gate, normalize):
    """The loss Σ h·dh (+ Σ C_last·dC_last) as a function of (q, k, v, i, f, C0), with N, M and
    the boundary stabilizers m frozen at their values for the given inputs (docs/math.md §6.4)."""
    C0, n0, m0 = state
    opts = ref_opts(shape, gate, normalize)
    _, N, M, (_, _, m) = chunkwise.fwd(**x, C0=C0, n0=n0, m0=m0, L=shape.L, **opts)
    stabilized = gate == "exp"

    def loss(q, k, v, i, f, C0):
        log_i, log_f = log_gates(i, f, gate)
        C, n, m_ = chunkwise.fwd_states(k, v, log_i, log_f, C0, n0, m0, L=shape.L,
                                        stabilized=stabilized, m_frozen=m)
        h, _, _ = chunkwise.fwd_outputs(q, k, v, log_i, log_f, C, n, m_, L=shape.L,
                                        scale=opts["scale"], eps=EPS, stabilized=stabilized,
                                        normalize=normalize, M_frozen=M, N_frozen=N)
        value = np.sum(h * dh)
        if dC_last is not None:
            value += np.sum(C[..., -1, :, :] * dC_last)
        return value

    return loss


def _sample_indices(rng, grad):
    """The entry of largest |grad| plus FD_SAMPLES − 1 random others."""
    flat = {int(np.argmax(np.abs(grad)))}
    flat.update(int(j) for j in rng.choice(grad.size, size=min(FD_SAMPLES - 1, grad.size), replace=False))
    return [np.unravel_index(j, grad.shape) for j in sorted(flat)]


def _fd_error(rng, loss, args, name, grad):
    """max |fd − grad| / max |grad| over sampled entries of the gradient of argument ``name``."""
    fd, exact = [], []
    for idx in _sample_indices(rng, grad):
        plus, minus = dict(args), dict(args)
        plus[name] = args[name].copy()
        minus[name] = args[name].copy()
        plus[name][idx] += FD_STEP
        minus[name][idx] -= FD_STEP
        fd.append((loss(**plus) - loss(**minus)) / (2 * FD_STEP))
        exact.append(grad[idx])
    return rel_err(fd, exact)


def _setup_backward(rng, shape, gate, with_state, with_dC_last):
    x = random_inputs(rng, shape)
    state = _initial_state(rng, shape, gate, with_state)
    dh = rng.standard_normal((shape.B, shape.NH, shape.S, shape.DV))
    dC_last = rng.standard_normal((shape.B, shape.NH, shape.DK, shape.DV)) if with_dC_last else None
    return x, state, dh, dC_last


FD_SHAPES = [Shape(1, 2, 40, 8, 8, 16), Shape(2, 1, 129, 16, 48, 64)]


@pytest.mark.parametrize("with_dC_last", [pytest.param(False, id="nodC"), pytest.param(True, id="dC")])
@pytest.mark.parametrize("with_state", STATE_PARAMS)
@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
@pytest.mark.parametrize("shape", [pytest.param(s, id=s.id) for s in FD_SHAPES])
def test_backward_matches_finite_differences(rng, shape, gate, normalize, with_state, with_dC_last):
    x, state, dh, dC_last = _setup_backward(rng, shape, gate, with_state, with_dC_last)
    grads = chunkwise.bwd(**x, **state_kwargs(state), dh=dh, dC_last=dC_last,
                          L=shape.L, **ref_opts(shape, gate, normalize))
    loss = _frozen_loss(x, state, dh, dC_last, shape, gate, normalize)
    args = dict(x, C0=state[0])
    errors = {name: _fd_error(rng, loss, args, name, g) for name, g in zip(GRAD_NAMES, grads)}
    assert all(e <= TOL_FD for e in errors.values()), errors


@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_df_needs_last_state_term(rng, gate, normalize):
    """Upstream's defect (docs/math.md §6.5): without ⟨dC_last, C_last⟩ in every dλ_t, df misses
    the finite differences by O(1) when a gradient flows into the last state. Our bwd adds it."""
    shape = FD_SHAPES[0]
    x, state, dh, dC_last = _setup_backward(rng, shape, gate, True, True)
    dq, dk, _, _, df, _ = chunkwise.bwd(**x, **state_kwargs(state), dh=dh,
                                        dC_last=dC_last, L=shape.L, **ref_opts(shape, gate, normalize))
    _, df_upstream = chunkwise.bwd_gates(x["q"], x["k"], dq, dk, x["i"], x["f"], gate=gate,
                                         last_state_dot=None)
    loss = _frozen_loss(x, state, dh, dC_last, shape, gate, normalize)
    args = dict(x, C0=state[0])
    assert _fd_error(rng, loss, args, "f", df) <= TOL_FD
    assert _fd_error(rng, loss, args, "f", df_upstream) > FD_MISMATCH_MIN


# ------------------------------------------------------------------------------------------
# State passing through the public NumPy path, forward and backward
# ------------------------------------------------------------------------------------------


def _cut(x, a, b):
    return {name: arr[:, :, a:b] for name, arr in x.items()}


@pytest.mark.parametrize("i_offset", [pytest.param(0.0, id="floor-inactive"),
                                      pytest.param(-15.0, id="floor-active")])
@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
@pytest.mark.parametrize("shape, cuts", [
    pytest.param(Shape(2, 1, 129, 16, 48, 64), (37, 100), id="B2-NH1-S129-DK16-DV48-L64-cut37,100"),
    pytest.param(Shape(1, 2, 500, 8, 8, 16), (1, 255, 256), id="B1-NH2-S500-DK8-DV8-L16-cut1,255,256"),
    pytest.param(Shape(1, 1, 300, 48, 96, 128), (128, 129), id="B1-NH1-S300-DK48-DV96-L128-cut128,129"),
])
def test_state_passing(rng, shape, cuts, gate, normalize, i_offset):
    """A sequence cut into pieces with the state carried gives the h, last state and gradients
    of one call. The backward runs over the pieces in reverse, feeding each piece's
    d_initial_state as the previous piece's d_state.

    The floor does not break this: it makes M_t = max(m_t, −10) with m_t the step stabilizer,
    which does not depend on where chunks or pieces start, and the custom backward is the
    derivative with M, N and m frozen, so the gradients are partition-independent too. The
    tolerance is rounding only, and the floor-active inputs (ĩ ~ −15 + N(0, 1)) check it.
    """
    x = random_inputs(rng, shape, i_offset=i_offset, f_offset=0.0)
    state0 = tfla_cupy.MLSTMState(*random_state(rng, shape, gate))
    opts = dict(gate=gate, normalize=normalize, chunk_size=shape.L)
    dh = rng.standard_normal((shape.B, shape.NH, shape.S, shape.DV))
    dC_last = rng.standard_normal((shape.B, shape.NH, shape.DK, shape.DV))

    h, last, ctx = tfla_cupy.mlstm_fwd(**x, initial_state=state0, **opts)
    grads = tfla_cupy.mlstm_bwd(ctx, dh, (dC_last, None, None))

    bounds = list(zip((0,) + cuts, cuts + (shape.S,)))
    state, pieces = state0, []
    for a, b in bounds:
        h_piece, state, ctx_piece = tfla_cupy.mlstm_fwd(**_cut(x, a, b), initial_state=state, **opts)
        pieces.append((h_piece, ctx_piece))
    d_state, piece_grads = (dC_last, None, None), []
    for (a, b), (_, ctx_piece) in reversed(list(zip(bounds, pieces))):
        g = tfla_cupy.mlstm_bwd(ctx_piece, dh[:, :, a:b], d_state)
        piece_grads.insert(0, g)
        d_state = g.d_initial_state

    assert rel_err(np.concatenate([p[0] for p in pieces], axis=2), h) <= TOL_STATE_PASSING
    for field in ("C", "n", "m"):
        if getattr(last, field) is None:
            assert getattr(state, field) is None
        else:
            assert rel_err(getattr(state, field), getattr(last, field)) <= TOL_STATE_PASSING
    for name in ("dq", "dk", "dv", "di", "df"):
        joined = np.concatenate([getattr(g, name) for g in piece_grads], axis=2)
        assert rel_err(joined, getattr(grads, name)) <= TOL_STATE_PASSING, name
    assert rel_err(piece_grads[0].d_initial_state.C, grads.d_initial_state.C) <= TOL_STATE_PASSING


# ------------------------------------------------------------------------------------------
# Extreme gates
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
@pytest.mark.parametrize("shape", [pytest.param(s, id=s.id) for s in (SHAPES[8], SHAPES[12])])
def test_extreme_gates_stay_finite(rng, shape, gate, normalize):
    """ĩ ~ U[−30, 30], f̃ ~ U[−20, 20]: h, the states and every gradient are finite, and the
    chunkwise form still equals the step form (the stabilizer keeps every exponent <= 0)."""
    x = random_inputs(rng, shape, i_range=(-30, 30), f_range=(-20, 20))
    state = random_state(rng, shape, gate)
    _check_step_vs_chunkwise(x, state, shape, gate, normalize, shape.L)

    h, last, ctx = tfla_cupy.mlstm_fwd(**x, initial_state=state, gate=gate, normalize=normalize,
                                       chunk_size=shape.L)
    dh = rng.standard_normal(h.shape)
    dC_last = rng.standard_normal(last.C.shape)
    grads = tfla_cupy.mlstm_bwd(ctx, dh, (dC_last, None, None))
    outputs = [h, *last, *grads[:5], *grads.d_initial_state]
    assert all(np.isfinite(a).all() for a in outputs if a is not None)


def test_log_gates_and_their_derivatives_across_the_line():
    """logσ and σ over |x| up to 700: logσ(x) = −log(1 + e^{−x}) to rounding (written without
    cancellation on each side of 0), logσ(x) → x and → −e^{−x} in the tails, and dλ/df̃ = σ(−f̃) = e^{logσ(−f̃)} to rounding also where σ(−f̃) is far
    below the float64 epsilon (a 1 + tanh form rounds it to 0 there)."""
    x = np.concatenate([np.linspace(-700, 700, 14001), [-1e6, 1e6]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        log_i, log_f = log_gates(x, x, "sig")
        d_i, d_f = d_log_gates(x, x, "sig")
    mid = x[np.abs(x) <= 30]
    exact = np.where(mid >= 0, -np.log1p(np.exp(-np.abs(mid))), mid - np.log1p(np.exp(-np.abs(mid))))
    assert np.allclose(log_f[np.abs(x) <= 30], exact, rtol=1e-14, atol=0)
    assert log_f[x == -700][0] == -700.0 and log_f[x == 700][0] == pytest.approx(-np.exp(-700.0), rel=1e-12)
    assert log_f[x == -1e6][0] == LOG_FORGET_FLOOR and d_f[x == -1e6][0] == 0.0   # the forget floor
    live = log_f > LOG_FORGET_FLOOR
    assert np.allclose(d_f[live], np.exp(log_gates(-x, -x, "sig")[1][live]), rtol=1e-12, atol=0)
    assert d_f[x == 700][0] > 0.0
    assert np.array_equal(log_i[live], log_f[live]) and np.array_equal(d_i[live], d_f[live])


# ------------------------------------------------------------------------------------------
# Suspected reference defect
# ------------------------------------------------------------------------------------------


def test_sig_chunkwise_ignores_m0(rng):
    shape = Shape(1, 2, 40, 8, 8, 16)
    x = random_inputs(rng, shape)
    C0, n0, _ = random_state(rng, shape, "sig")
    m0 = rng.standard_normal((shape.B, shape.NH))
    opts = ref_opts(shape, "sig", True)
    h_ref, *_ = recurrent.fwd_recurrent(**x, C0=C0, n0=n0, m0=m0, **opts)
    h, *_ = chunkwise.fwd(**x, C0=C0, n0=n0, m0=m0, L=shape.L, **opts)
    assert rel_err(h, h_ref) <= TOL_EXACT


@pytest.mark.parametrize("gate,normalize", GATE_PARAMS)
@pytest.mark.parametrize("L,parts", [(16, 1), (16, 3), (32, 2)])
def test_reverse_walk_equals_the_stages(rng, gate, normalize, L, parts):
    """chunkwise.bwd_walk (the fused backward's reverse walk, value columns in parts) gives the
    stages' dq, dk, dv and dC0, and its gate terms (bwd_gates_walk) the identity's di, df, in
    float64, with an initial state, a last-state gradient and a ragged last chunk."""
    shape = Shape(2, 2, 75, 8, 6, L)
    x = random_inputs(rng, shape, f_offset=1.0)
    C0, n0, m0 = random_state(rng, shape, gate)
    dh = rng.standard_normal((2, 2, 75, 6))
    dC_last = rng.standard_normal((2, 2, 8, 6))
    opts = dict(L=L, scale=8 ** -0.5, eps=1e-6, normalize=normalize)
    q, k, v, i, f = (x[n] for n in "qkvif")
    want = chunkwise.bwd(q, k, v, i, f, C0, n0, m0, dh, dC_last, gate=gate, **opts)
    h, N, M, (C, n, m) = chunkwise.fwd(q, k, v, i, f, C0, n0, m0, gate=gate, **opts)
    log_i, log_f = log_gates(i, f, gate)
    dq, dk, dv, dC0, terms = chunkwise.bwd_walk(q, k, v, log_i, log_f, C, m, N, M, dh, dC_last, parts=parts, **opts)
    di, df = chunkwise.bwd_gates_walk(terms, i, f, gate=gate, L=L)
    for name, got, ref in zip(("dq", "dk", "dv", "di", "df", "dC0"), (dq, dk, dv, di, df, dC0), want):
        assert rel_err(got, ref) < 1e-12, name
    assert terms["q_terms"].shape == (parts, 2, 2, 75) and terms["k_terms"].shape == (2, parts, 2, 2, 75)
