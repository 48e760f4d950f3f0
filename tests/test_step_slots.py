"""mlstm_step's decode options on the NumPy path (float64 reference): out_state (in place and
into other buffers), state slots (state_indices into a pool, −1 skips), the StepPlan, prefill →
decode, and their validation errors. The GPU path has the same semantics (tests/test_gpu_step.py)."""

from __future__ import annotations

import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import MLSTMState
from tfla_cupy.reference import recurrent

from conftest import GATE_PARAMS, TOL_EXACT, TOL_SAME, Shape, random_inputs, random_state, ref_opts, rel_err

SHAPE = Shape(3, 2, 1, 16, 24)
P = 5


def _token(rng, shape=SHAPE):
    return {n: a[:, :, 0] for n, a in random_inputs(rng, shape).items()}


def _pool(rng, gate, normalize):
    pool = random_state(rng, Shape(P, SHAPE.NH, 1, SHAPE.DK, SHAPE.DV), gate)
    return MLSTMState(pool[0], pool[1] if normalize else None, pool[2] if gate == "exp" else None)


def _ref(x, C, n, m, gate, normalize):
    return recurrent.step(**x, C=C, n=n, m=m, **ref_opts(SHAPE, gate, normalize))


@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_out_state_in_place_equals_out_of_place(rng, gate, normalize):
    x = _token(rng)
    C0, n0, m0 = random_state(rng, SHAPE, gate)
    h_ref, new = tfla_cupy.mlstm_step(**x, state=MLSTMState(C0, n0, m0), gate=gate, normalize=normalize)
    st = MLSTMState(C0.copy(), n0.copy(), m0.copy())
    h, out = tfla_cupy.mlstm_step(**x, state=st, out_state=st, gate=gate, normalize=normalize)
    assert out.C is st.C and np.array_equal(h, h_ref) and np.array_equal(st.C, new.C)
    if normalize:
        assert out.n is st.n and np.array_equal(st.n, new.n)
    if gate == "exp":
        assert out.m is st.m and np.array_equal(st.m, new.m)
    # separate buffers: the input state is left alone
    bufs = MLSTMState(np.empty_like(C0), np.empty_like(n0), np.empty_like(m0))
    _, out2 = tfla_cupy.mlstm_step(**x, state=MLSTMState(C0, n0, m0), out_state=bufs, gate=gate, normalize=normalize)
    assert out2.C is bufs.C and np.array_equal(bufs.C, new.C)


@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_state_indices_update_selected_pool_rows(rng, gate, normalize):
    x = _token(rng)
    pool = _pool(rng, gate, normalize)
    before = MLSTMState(*(None if a is None else a.copy() for a in pool))
    idx = np.array([3, -1, 0], dtype=np.int32)
    h, out = tfla_cupy.mlstm_step(**x, state=pool, state_indices=idx, gate=gate, normalize=normalize)
    assert out.C is pool.C
    zeros_n = np.zeros((SHAPE.NH, SHAPE.DK))
    zeros_m = np.zeros(SHAPE.NH)
    for b, slot in enumerate(idx):
        if slot < 0:
            assert np.all(h[b] == 0)
            continue
        xb = {n: a[b] for n, a in x.items()}
        h_ref, C, n, m = _ref(xb, before.C[slot], zeros_n if before.n is None else before.n[slot],
                              zeros_m if before.m is None else before.m[slot], gate, normalize)
        assert rel_err(h[b], h_ref) <= TOL_SAME and rel_err(pool.C[slot], C) <= TOL_EXACT
        if normalize:
            assert rel_err(pool.n[slot], n) <= TOL_EXACT
        if gate == "exp":
            assert rel_err(pool.m[slot], m) <= TOL_EXACT
    for slot in (1, 2, 4):  # not selected: bit-identical
        assert np.array_equal(pool.C[slot], before.C[slot])
        if normalize:
            assert np.array_equal(pool.n[slot], before.n[slot])


def test_state_indices_equal_batched_rows(rng):
    """Stepping pool rows through indices equals stepping the same rows as a batch."""
    x = _token(rng)
    pool = _pool(rng, "exp", True)
    idx = np.array([4, 1, 2], dtype=np.int32)
    batch = MLSTMState(pool.C[idx], pool.n[idx], pool.m[idx])
    h_ref, new = tfla_cupy.mlstm_step(**x, state=batch)
    h, _ = tfla_cupy.mlstm_step(**x, state=pool, state_indices=idx)
    assert np.array_equal(h, h_ref) and np.array_equal(pool.C[idx], new.C) and np.array_equal(pool.m[idx], new.m)


@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_prefill_state_feeds_decode_and_a_pool_row(rng, gate, normalize):
    """mlstm(..., return_state=True) over a prompt, then mlstm_step per token (also from a pool
    row), equals one mlstm call over prompt + continuation."""
    shape = Shape(2, 2, 12, 16, 24)
    x = random_inputs(rng, shape)
    opts = dict(gate=gate, normalize=normalize)
    h_all = tfla_cupy.mlstm(**x, **opts)
    _, st = tfla_cupy.mlstm(**{n: a[:, :, :8] for n, a in x.items()}, **opts, return_state=True)
    pool = MLSTMState(np.zeros((4, 2, 16, 24)), np.zeros((4, 2, 16)) if normalize else None,
                      np.zeros((4, 2)) if gate == "exp" else None)
    slots = np.array([2, 0], dtype=np.int32)
    for a, b in zip(pool, st):
        if a is not None:
            a[slots] = b
    for t in range(8, 12):
        xt = {n: a[:, :, t] for n, a in x.items()}
        h, st = tfla_cupy.mlstm_step(**xt, state=st, **opts)
        assert rel_err(h, h_all[:, :, t]) <= TOL_EXACT
        h_pool, _ = tfla_cupy.mlstm_step(**xt, state=pool, state_indices=slots, **opts)
        assert np.array_equal(h_pool, h)
    assert rel_err(pool.C[slots], st.C) <= TOL_EXACT


def test_step_plan_numpy_updates_in_place(rng):
    x = _token(rng)
    C0, n0, m0 = random_state(rng, SHAPE, "exp")
    h_ref, new = tfla_cupy.mlstm_step(**x, state=MLSTMState(C0, n0, m0))
    st = MLSTMState(C0.copy(), n0.copy(), m0.copy())
    plan = tfla_cupy.mlstm_step_plan(**x, state=st)
    assert isinstance(plan, tfla_cupy.StepPlan) and "numpy" in repr(plan)
    hbuf = np.empty_like(h_ref)
    h, out = plan(*(x[n] for n in "qkvif"), st, h=hbuf)
    assert h is hbuf and out.C is st.C and np.array_equal(h, h_ref) and np.array_equal(st.C, new.C)
    pool = _pool(rng, "exp", True)
    pplan = tfla_cupy.mlstm_step_plan(**x, state=pool, state_indices=np.zeros(3, np.int32) - 1)
    with pytest.raises(ValueError, match="^state_indices: required by this pool plan$"):
        pplan(*(x[n] for n in "qkvif"), pool)
    with pytest.raises(ValueError, match="^state_indices: this plan was made without state_indices"):
        plan(*(x[n] for n in "qkvif"), st, state_indices=np.zeros(3, np.int32))


def _err_cases():
    B, NH, DK, DV = SHAPE.B, SHAPE.NH, SHAPE.DK, SHAPE.DV
    pool = MLSTMState(np.zeros((P, NH, DK, DV)), np.zeros((P, NH, DK)), np.zeros((P, NH)))
    i32 = lambda *v: np.array(v, dtype=np.int32)  # noqa: E731
    return [
        ("idx-int64", dict(state=pool, state_indices=np.zeros(B, np.int64)), TypeError,
         r"^state_indices: expected dtype int32, got int64$"),
        ("idx-list", dict(state=pool, state_indices=[0, 1, 2]), TypeError,
         r"^state_indices: expected a \(B,\) int32 NumPy or CuPy array, got list$"),
        ("idx-length", dict(state=pool, state_indices=i32(0, 1)), ValueError,
         r"^state_indices: expected shape \(3,\) \(B,\) to match q, got \(2\)$"),
        ("idx-range-high", dict(state=pool, state_indices=i32(0, 5, 1)), ValueError,
         r"^state_indices: expected values in \[-1, 5\) .*got state_indices\[1\] = 5$"),
        ("idx-range-low", dict(state=pool, state_indices=i32(-2, 0, 1)), ValueError,
         r"^state_indices: expected values in \[-1, 5\) .*got state_indices\[0\] = -2$"),
        ("idx-duplicate", dict(state=pool, state_indices=i32(1, -1, 1)), ValueError,
         r"^state_indices: a pool row may be selected once per step, got duplicates in \[1, -1, 1\]$"),
        ("idx-no-state", dict(state_indices=i32(0, 1, 2)), ValueError, r"^state: required with state_indices"),
        ("idx-out-state", dict(state=pool, out_state=pool, state_indices=i32(0, 1, 2)), ValueError,
         r"^out_state: must be None with state_indices"),
        ("pool-rank", dict(state=pool._replace(C=np.zeros((P, NH, DK))), state_indices=i32(0, 1, 2)), ValueError,
         r"^state\.C: expected a state pool of shape \(P, NH, DK, DV\) = \(P, 2, 16, 24\) with P >= 1, "
         r"got \(5, 2, 16\)$"),
        ("pool-n-rows", dict(state=pool._replace(n=np.zeros((P + 1, NH, DK))), state_indices=i32(0, 1, 2)),
         ValueError, r"^state\.n: expected shape \(5, 2, 16\) \(P, NH, DK\), got \(6, 2, 16\)$"),
        ("out-shape", dict(out_state=MLSTMState(np.zeros((B, NH, DK, DK)), np.zeros((B, NH, DK)),
                                                np.zeros((B, NH)))), ValueError,
         r"^out_state\.C: expected shape \(3, 2, 16, 24\) \(B, NH, DK, DV\), got \(3, 2, 16, 16\)$"),
        ("out-m-missing", dict(out_state=MLSTMState(np.zeros((B, NH, DK, DV)), np.zeros((B, NH, DK)))), ValueError,
         r"^out_state\.m: required for gate='exp', got None$"),
    ]


@pytest.mark.parametrize("opts, exc, match", [pytest.param(*c[1:], id=c[0]) for c in _err_cases()])
def test_decode_option_errors(rng, opts, exc, match):
    with pytest.raises(exc, match=match):
        tfla_cupy.mlstm_step(**_token(rng), **opts)


def test_read_only_out_state_is_an_error(rng):
    x = _token(rng)
    C, n, m = random_state(rng, SHAPE, "exp")
    C.flags.writeable = False
    with pytest.raises(ValueError, match=r"^out_state\.C: expected a writeable array, got a read-only one$"):
        tfla_cupy.mlstm_step(**x, out_state=MLSTMState(C, n, m))


@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_forward_out_state_receives_the_last_state(rng, gate, normalize):
    shape = Shape(2, 2, 20, 16, 24)
    x = random_inputs(rng, shape)
    _, last = tfla_cupy.mlstm(**x, gate=gate, normalize=normalize, return_state=True)
    bufs = MLSTMState(np.full((2, 2, 16, 24), np.nan), np.full((2, 2, 16), np.nan), np.full((2, 2), np.nan))
    _, got = tfla_cupy.mlstm(**x, gate=gate, normalize=normalize, return_state=True, out_state=bufs)
    assert got.C is bufs.C and np.array_equal(bufs.C, last.C)
    assert (got.n is None) == (last.n is None) and (got.m is None) == (last.m is None)
    if normalize:
        assert got.n is bufs.n and np.array_equal(bufs.n, last.n)
    if gate == "exp":
        assert got.m is bufs.m and np.array_equal(bufs.m, last.m)
    with pytest.raises(ValueError, match=r"^out_state\.C: expected shape \(2, 2, 16, 24\) \(B, NH, DK, DV\)"):
        tfla_cupy.mlstm(**x, out_state=bufs._replace(C=np.zeros((2, 2, 16, 16))))


@pytest.mark.parametrize("B, lanes", [(1, 2), (8, 8), (64, 32), (256, 32)])
def test_step_slab_width_fills_the_gpu(B, lanes):
    """The decode shape (NH 8, DV 512) on 132 SMs: the widest slab that launches >= 4 CTAs per
    SM (B = 1 cannot reach it: it gets the narrowest), never wider than DV needs."""
    from tfla_cupy.config import step_lanes
    got = step_lanes(B * 8, 512, 132)
    assert got == lanes
    ctas = B * 8 * -(-128 // got)
    assert ctas >= 4 * 132 or got == 2
    assert step_lanes(1, 8, 132) == 2 and step_lanes(4096, 16, 132) == 4
