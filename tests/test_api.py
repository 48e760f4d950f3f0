"""The public API on NumPy inputs: results against the float64 references, output dtypes and
None fields, the step API, NaN/Inf propagation, and every validation error with its message."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import MLSTMContext, MLSTMGrads, MLSTMState, _arrays
from tfla_cupy.reference import chunkwise, recurrent

from conftest import (GATE_PARAMS, TOL_EXACT, TOL_SAME, Shape, random_inputs, random_state,
                      ref_opts, rel_err, state_kwargs, zero_state)

SHAPE = Shape(2, 2, 37, 16, 24)
STATE_PARAMS = [pytest.param(False, id="nostate"), pytest.param(True, id="state")]
BF16 = np.dtype(ml_dtypes.bfloat16)


def _as_state(state):
    return None if state is None else MLSTMState(*state)


def _check_state_fields(state, gate, normalize, shape):
    """Every field float64 of the documented shape, or None where the variant has none."""
    assert state.C.dtype == np.float64 and state.C.shape == (shape.B, shape.NH, shape.DK, shape.DV)
    if normalize:
        assert state.n.dtype == np.float64 and state.n.shape == (shape.B, shape.NH, shape.DK)
    else:
        assert state.n is None
    if gate == "exp":
        assert state.m.dtype == np.float64 and state.m.shape == (shape.B, shape.NH)
    else:
        assert state.m is None


def _check_state_values(state, C, n, m):
    assert rel_err(state.C, C) <= TOL_EXACT
    if state.n is not None:
        assert rel_err(state.n, n) <= TOL_EXACT
    if state.m is not None:
        assert rel_err(state.m, m) <= TOL_EXACT


# ------------------------------------------------------------------------------------------
# Results against the references (float64 inputs)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 16, 64, 1024], ids=lambda L: f"L{L}")
@pytest.mark.parametrize("with_state", STATE_PARAMS)
@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_mlstm_matches_step_reference(rng, gate, normalize, with_state, chunk_size):
    """h and the last state equal the step recurrence; with ordinary inputs the −10 floor is
    inactive (every stabilizer is far above it), so the agreement is exact."""
    x = random_inputs(rng, SHAPE)
    state = random_state(rng, SHAPE, gate) if with_state else None
    h, last = tfla_cupy.mlstm(**x, gate=gate, normalize=normalize, initial_state=_as_state(state),
                              return_state=True, chunk_size=chunk_size)
    h_ref, C, n, m = recurrent.fwd_recurrent(**x, **state_kwargs(state or zero_state(SHAPE)),
                                             **ref_opts(SHAPE, gate, normalize))
    assert h.dtype == np.float64
    assert rel_err(h, h_ref) <= TOL_EXACT
    _check_state_fields(last, gate, normalize, SHAPE)
    _check_state_values(last, C, n, m)


@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_eps_and_scale_are_used(rng, gate, normalize):
    x = random_inputs(rng, SHAPE)
    h = tfla_cupy.mlstm(**x, gate=gate, normalize=normalize, eps=1e-2, scale=0.7)
    h_ref, *_ = recurrent.fwd_recurrent(**x, **state_kwargs(zero_state(SHAPE)),
                                        **ref_opts(SHAPE, gate, normalize, eps=1e-2, scale=0.7))
    assert rel_err(h, h_ref) <= TOL_EXACT


def _bwd_case(rng, gate, with_state, with_dC_last):
    x = random_inputs(rng, SHAPE)
    state = random_state(rng, SHAPE, gate) if with_state else None
    dh = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.S, SHAPE.DV))
    dC_last = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.DK, SHAPE.DV)) if with_dC_last else None
    return x, state, dh, dC_last


def _ref_grads(x, state, dh, dC_last, gate, normalize, L):
    return chunkwise.bwd(**x, **state_kwargs(state or zero_state(SHAPE)), dh=dh, dC_last=dC_last, L=L,
                         **ref_opts(SHAPE, gate, normalize))


def _check_grads(grads, ref, gate, normalize, with_state):
    assert isinstance(grads, MLSTMGrads)
    for name, g, r in zip(("dq", "dk", "dv", "di", "df"), grads, ref):
        assert g.dtype == np.float64, name
        assert rel_err(g, r) <= TOL_SAME, name
    d0 = grads.d_initial_state
    if not with_state:
        assert d0 is None
        return
    assert rel_err(d0.C, ref[5]) <= TOL_SAME
    assert d0.C.dtype == np.float64
    # n and m gradients are zeros by construction (N and the stabilizers are constants).
    if normalize:
        assert d0.n.shape == (SHAPE.B, SHAPE.NH, SHAPE.DK) and not d0.n.any()
    else:
        assert d0.n is None
    if gate == "exp":
        assert d0.m.shape == (SHAPE.B, SHAPE.NH) and not d0.m.any()
    else:
        assert d0.m is None


@pytest.mark.parametrize("with_dC_last", [pytest.param(False, id="nodC"), pytest.param(True, id="dC")])
@pytest.mark.parametrize("with_state", STATE_PARAMS)
@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_mlstm_fwd_bwd_match_reference(rng, gate, normalize, with_state, with_dC_last):
    x, state, dh, dC_last = _bwd_case(rng, gate, with_state, with_dC_last)
    h, last, ctx = tfla_cupy.mlstm_fwd(**x, gate=gate, normalize=normalize, chunk_size=16,
                                       initial_state=_as_state(state))
    h_ref, *_ = chunkwise.fwd(**x, **state_kwargs(state or zero_state(SHAPE)), L=16,
                              **ref_opts(SHAPE, gate, normalize))
    assert rel_err(h, h_ref) <= TOL_SAME
    assert isinstance(ctx, MLSTMContext)
    d_state = None if dC_last is None else MLSTMState(dC_last)
    ref = _ref_grads(x, state, dh, dC_last, gate, normalize, 16)
    _check_grads(tfla_cupy.mlstm_bwd(ctx, dh, d_state), ref, gate, normalize, with_state)
    # The context can be used more than once.
    _check_grads(tfla_cupy.mlstm_bwd(ctx, dh, d_state), ref, gate, normalize, with_state)


@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_mlstm_vjp_matches_reference(rng, gate, normalize):
    x, state, dh, dC_last = _bwd_case(rng, gate, True, True)
    (h, last), vjp_fn = tfla_cupy.mlstm_vjp(**x, gate=gate, normalize=normalize, return_state=True,
                                            initial_state=_as_state(state), chunk_size=32)
    h_ref, C, n, m = recurrent.fwd_recurrent(**x, **state_kwargs(state), **ref_opts(SHAPE, gate, normalize))
    assert rel_err(h, h_ref) <= TOL_EXACT
    _check_state_values(last, C, n, m)
    grads = vjp_fn(dh, (dC_last, None, None))
    _check_grads(grads, _ref_grads(x, state, dh, dC_last, gate, normalize, 32), gate, normalize, True)
    # Without return_state the first element is h alone.
    h2, _ = tfla_cupy.mlstm_vjp(**x, gate=gate, normalize=normalize, initial_state=_as_state(state))
    assert rel_err(h2, h_ref) <= TOL_EXACT


@pytest.mark.parametrize("with_state", STATE_PARAMS)
@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_mlstm_step_matches_reference(rng, gate, normalize, with_state):
    shape = Shape(2, 3, 1, 16, 24)
    x = {name: a[:, :, 0] for name, a in random_inputs(rng, shape).items()}
    state = random_state(rng, shape, gate) if with_state else None
    h, new = tfla_cupy.mlstm_step(**x, state=_as_state(state), gate=gate, normalize=normalize)
    h_ref, C, n, m = recurrent.step(**x, **state_kwargs(state or zero_state(shape), "Cnm"),
                                **ref_opts(shape, gate, normalize))
    assert h.dtype == np.float64 and h.shape == (shape.B, shape.NH, shape.DV)
    assert rel_err(h, h_ref) <= TOL_SAME
    _check_state_fields(new, gate, normalize, shape)
    _check_state_values(new, C, n, m)


@pytest.mark.parametrize("with_state", STATE_PARAMS)
@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_step_by_step_equals_mlstm(rng, gate, normalize, with_state):
    """mlstm_step applied token by token (state carried) equals mlstm over the sequence."""
    x = random_inputs(rng, SHAPE)
    state = _as_state(random_state(rng, SHAPE, gate)) if with_state else None
    h_seq, last = tfla_cupy.mlstm(**x, gate=gate, normalize=normalize, initial_state=state,
                                  return_state=True)
    hs = []
    for t in range(SHAPE.S):
        h_t, state = tfla_cupy.mlstm_step(x["q"][:, :, t], x["k"][:, :, t], x["v"][:, :, t],
                                          x["i"][:, :, t], x["f"][:, :, t], state,
                                          gate=gate, normalize=normalize)
        hs.append(h_t)
    assert rel_err(np.stack(hs, axis=2), h_seq) <= TOL_EXACT
    _check_state_values(state, last.C, last.n, last.m)
    assert (state.n is None) == (last.n is None) and (state.m is None) == (last.m is None)


@pytest.mark.parametrize("normalize", [True, False], ids=["sig", "sig-nonorm"])
def test_sig_ignores_initial_m(rng, normalize):
    """gate="sig" has no stabilizer: an m in the initial state is accepted and ignored (§7)."""
    x = random_inputs(rng, SHAPE)
    C0, n0, zeros = random_state(rng, SHAPE, "sig")
    m0 = rng.standard_normal((SHAPE.B, SHAPE.NH))
    h, last = tfla_cupy.mlstm(**x, gate="sig", normalize=normalize,
                              initial_state=MLSTMState(C0, n0, m0), return_state=True)
    h_ref, C, n, m = recurrent.fwd_recurrent(**x, C0=C0, n0=n0, m0=zeros,
                                             **ref_opts(SHAPE, "sig", normalize))
    assert rel_err(h, h_ref) <= TOL_EXACT
    _check_state_values(last, C, n, m)
    x0 = {name: a[:, :, 0] for name, a in x.items()}
    h0, _ = tfla_cupy.mlstm_step(**x0, state=MLSTMState(C0, n0, m0), gate="sig", normalize=normalize)
    assert rel_err(h0, h_ref[:, :, 0]) <= TOL_EXACT


def test_state_as_tuple_or_list(rng):
    x = random_inputs(rng, SHAPE)
    C0, n0, m0 = random_state(rng, SHAPE, "exp")
    h = tfla_cupy.mlstm(**x, initial_state=MLSTMState(C0, n0, m0))
    assert rel_err(tfla_cupy.mlstm(**x, initial_state=(C0, n0, m0)), h) == 0
    assert rel_err(tfla_cupy.mlstm(**x, initial_state=[C0, n0, m0]), h) == 0


def test_dlpack_cpu_producer_runs_numpy_path(rng):
    """A host DLPack producer (not an ndarray) is accepted and gives NumPy results."""

    class Producer:
        def __init__(self, a):
            self._a = a

        def __dlpack__(self, *args, **kwargs):
            return self._a.__dlpack__(*args, **kwargs)

        def __dlpack_device__(self):
            return self._a.__dlpack_device__()

    x = random_inputs(rng, SHAPE)
    h = tfla_cupy.mlstm(**{name: Producer(a) for name, a in x.items()})
    assert isinstance(h, np.ndarray)
    assert rel_err(h, tfla_cupy.mlstm(**x)) == 0


# ------------------------------------------------------------------------------------------
# Dtypes: outputs follow the inputs, computed in float64, states float64
# ------------------------------------------------------------------------------------------

DTYPE_PARAMS = [
    pytest.param(np.dtype(np.float32), np.dtype(np.float32), id="f32"),
    pytest.param(np.dtype(np.float16), np.dtype(np.float16), id="f16"),
    pytest.param(BF16, BF16, id="bf16"),
    pytest.param(BF16, np.dtype(np.float32), id="bf16-gates-f32"),
    pytest.param(np.dtype(np.float16), np.dtype(np.float64), id="f16-gates-f64"),
]


def _round(x, qkv_dtype, gate_dtype):
    return {name: a.astype(qkv_dtype if name in "qkv" else gate_dtype) for name, a in x.items()}


def _unit_roundoff(dtype):
    return float(ml_dtypes.finfo(dtype).eps)


@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
@pytest.mark.parametrize("qkv_dtype, gate_dtype", DTYPE_PARAMS)
def test_output_dtypes_follow_inputs(rng, qkv_dtype, gate_dtype, gate, normalize):
    """h, dq, dk, dv in the dtype of q, k, v; di, df in those of i, f; states and
    d_initial_state float64. Values: the float64 reference on the rounded inputs, rounded
    once at the end (error <= one unit roundoff of the output dtype, relative to the max)."""
    x = _round(random_inputs(rng, SHAPE), qkv_dtype, gate_dtype)
    x64 = {name: a.astype(np.float64) for name, a in x.items()}
    state = random_state(rng, SHAPE, gate)
    state_f32 = MLSTMState(*(s.astype(np.float32) for s in state))
    state64 = tuple(s.astype(np.float64) for s in state_f32)
    dh = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.S, SHAPE.DV)).astype(qkv_dtype)

    h, last, ctx = tfla_cupy.mlstm_fwd(**x, gate=gate, normalize=normalize, initial_state=state_f32)
    grads = tfla_cupy.mlstm_bwd(ctx, dh)
    opts = ref_opts(SHAPE, gate, normalize)
    h_ref, C, n, m = recurrent.fwd_recurrent(**x64, **state_kwargs(state64), **opts)
    ref = chunkwise.bwd(**x64, **state_kwargs(state64), dh=dh.astype(np.float64), dC_last=None,
                        L=ctx.problem.chunk_size, **opts)

    assert h.dtype == qkv_dtype
    assert rel_err(h, h_ref) <= _unit_roundoff(qkv_dtype)
    _check_state_fields(last, gate, normalize, SHAPE)
    _check_state_values(last, C, n, m)
    grad_dtypes = (qkv_dtype,) * 3 + (gate_dtype,) * 2
    for name, g, r, dt in zip(("dq", "dk", "dv", "di", "df"), grads, ref, grad_dtypes):
        assert g.dtype == dt, name
        assert rel_err(g, r) <= _unit_roundoff(dt), name
    assert grads.d_initial_state.C.dtype == np.float64
    assert rel_err(grads.d_initial_state.C, ref[5]) <= TOL_SAME


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16), BF16], ids=str)
def test_step_output_dtype(rng, dtype):
    shape = Shape(2, 3, 1, 16, 24)
    x = {name: a[:, :, 0].astype(dtype) for name, a in random_inputs(rng, shape).items()}
    h, new = tfla_cupy.mlstm_step(**x)
    x64 = {name: a.astype(np.float64) for name, a in x.items()}
    h_ref, C, n, m = recurrent.step(**x64, **state_kwargs(zero_state(shape), "Cnm"),
                                    **ref_opts(shape, "exp", True))
    assert h.dtype == dtype
    assert rel_err(h, h_ref) <= _unit_roundoff(dtype)
    _check_state_fields(new, "exp", True, shape)
    _check_state_values(new, C, n, m)


# ------------------------------------------------------------------------------------------
# NaN / Inf propagate to the affected head only, never an exception
# ------------------------------------------------------------------------------------------

# NumPy may emit "invalid value" RuntimeWarnings on NaN/Inf arithmetic; those are not errors.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name, value", [("q", np.nan), ("k", np.inf), ("v", -np.inf),
                                         ("i", np.nan), ("f", np.nan)])
@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_nonfinite_inputs_propagate_per_head(rng, gate, normalize, name, value):
    x = random_inputs(rng, SHAPE)
    t = 5
    bad = (1, 0)  # (batch, head) that receives the non-finite value
    x[name][bad + (t,)] = value
    h, last, ctx = tfla_cupy.mlstm_fwd(**x, gate=gate, normalize=normalize, chunk_size=16)
    grads = tfla_cupy.mlstm_bwd(ctx, np.ones_like(h))

    def other_heads(a):
        mask = np.ones(a.shape[:2], dtype=bool)
        mask[bad] = False
        return a[mask]

    assert not np.isfinite(h[bad]).all()
    if name == "q":
        assert np.isnan(h[bad + (t,)]).all()
    for a in (h, *last, *grads[:5]):
        if a is not None:
            assert np.isfinite(other_heads(a)).all()


# ------------------------------------------------------------------------------------------
# Validation: every error names the argument, what was received and what was expected
# ------------------------------------------------------------------------------------------

B, NH, S, DK, DV = 2, 3, 5, 8, 4   # all different, so a wrong size is recognizable


def _arrays_ok():
    shapes = dict(q=(B, NH, S, DK), k=(B, NH, S, DK), v=(B, NH, S, DV), i=(B, NH, S), f=(B, NH, S))
    return {name: np.zeros(shape) for name, shape in shapes.items()}


def _state_ok():
    return MLSTMState(np.zeros((B, NH, DK, DV)), np.zeros((B, NH, DK)), np.zeros((B, NH)))


def _fwd(arrays=None, **opts):
    """mlstm_fwd on valid inputs, with some arrays and options replaced."""
    x = _arrays_ok()
    x.update(arrays or {})
    return tfla_cupy.mlstm_fwd(**x, **opts)


# (id, arrays replaced, options, exception, message regex)
SEQUENCE_ERRORS = [
    # ranks
    ("q-rank", dict(q=np.zeros((NH, S, DK))), {}, ValueError,
     r"^q: expected a 4-d array \(B, NH, S, DK\), got shape \(3, 5, 8\)$"),
    ("k-rank", dict(k=np.zeros((1, B, NH, S, DK))), {}, ValueError,
     r"^k: expected a 4-d array \(B, NH, S, DK\), got shape \(1, 2, 3, 5, 8\)$"),
    ("v-rank", dict(v=np.zeros((B, NH, S))), {}, ValueError,
     r"^v: expected a 4-d array \(B, NH, S, DV\), got shape \(2, 3, 5\)$"),
    ("i-rank", dict(i=np.zeros((B, NH, S, 1))), {}, ValueError,
     r"^i: expected a 3-d array \(B, NH, S\), got shape \(2, 3, 5, 1\)$"),
    ("f-rank", dict(f=np.zeros((B, S))), {}, ValueError,
     r"^f: expected a 3-d array \(B, NH, S\), got shape \(2, 5\)$"),
    # sizes that disagree with q
    ("k-B", dict(k=np.zeros((1, NH, S, DK))), {}, ValueError,
     r"^k: expected shape \(2, 3, 5, 8\) \(B, NH, S, DK\) to match q, got \(1, 3, 5, 8\)$"),
    ("k-DK", dict(k=np.zeros((B, NH, S, DK + 8))), {}, ValueError,
     r"^k: expected shape \(2, 3, 5, 8\) \(B, NH, S, DK\) to match q, got \(2, 3, 5, 16\)$"),
    ("v-NH", dict(v=np.zeros((B, 1, S, DV))), {}, ValueError,
     r"^v: expected shape \(2, 3, 5, 4\) \(B, NH, S, DV\) to match q's B, NH, S, got \(2, 1, 5, 4\)$"),
    ("v-S", dict(v=np.zeros((B, NH, S + 1, DV))), {}, ValueError,
     r"^v: expected shape \(2, 3, 5, 4\) \(B, NH, S, DV\) to match q's B, NH, S, got \(2, 3, 6, 4\)$"),
    ("i-S", dict(i=np.zeros((B, NH, S - 1))), {}, ValueError,
     r"^i: expected shape \(2, 3, 5\) \(B, NH, S\) to match q, got \(2, 3, 4\)$"),
    ("f-B", dict(f=np.zeros((B + 1, NH, S))), {}, ValueError,
     r"^f: expected shape \(2, 3, 5\) \(B, NH, S\) to match q, got \(3, 3, 5\)$"),
    # dtypes
    ("q-int32", dict(q=np.zeros((B, NH, S, DK), dtype=np.int32)), {}, TypeError,
     r"^q: expected a floating dtype \(float16, bfloat16, float32 or float64\), got int32$"),
    ("f-bool", dict(f=np.zeros((B, NH, S), dtype=bool)), {}, TypeError,
     r"^f: expected a floating dtype \(float16, bfloat16, float32 or float64\), got bool$"),
    ("i-complex", dict(i=np.zeros((B, NH, S), dtype=np.complex128)), {}, TypeError,
     r"^i: expected a floating dtype \(float16, bfloat16, float32 or float64\), got complex128$"),
    ("k-dtype-mismatch", dict(k=np.zeros((B, NH, S, DK), dtype=np.float32)), {}, TypeError,
     r"^k: expected the dtype of q \(float64\), got float32$"),
    ("v-dtype-mismatch", dict(v=np.zeros((B, NH, S, DV), dtype=BF16)), {}, TypeError,
     r"^v: expected the dtype of q \(float64\), got bfloat16$"),
    # not arrays
    ("q-list", dict(q=np.zeros((B, NH, S, DK)).tolist()), {}, TypeError,
     r"^q: expected a NumPy array, a CuPy array or a DLPack producer, got builtins\.list$"),
    ("f-float", dict(f=0.5), {}, TypeError,
     r"^f: expected a NumPy array, a CuPy array or a DLPack producer, got builtins\.float$"),
    # zero-size dimensions
    ("zero-S", {n: a[:, :, :0] for n, a in _arrays_ok().items()}, {}, ValueError,
     r"^q: every dimension must be >= 1, got shape \(2, 3, 0, 8\)$"),
    ("zero-B", {n: a[:0] for n, a in _arrays_ok().items()}, {}, ValueError,
     r"^q: every dimension must be >= 1, got shape \(0, 3, 5, 8\)$"),
    ("zero-DV", dict(v=np.zeros((B, NH, S, 0))), {}, ValueError,
     r"^v: every dimension must be >= 1, got shape \(2, 3, 5, 0\)$"),
    # options
    ("chunk-not-pow2", {}, dict(chunk_size=48), ValueError,
     r"^chunk_size: expected a power of two in \[16, 1024\], got 48$"),
    ("chunk-below-16", {}, dict(chunk_size=8), ValueError,
     r"^chunk_size: expected a power of two in \[16, 1024\], got 8$"),
    ("chunk-above-1024", {}, dict(chunk_size=2048), ValueError,
     r"^chunk_size: expected a power of two in \[16, 1024\], got 2048$"),
    ("chunk-float", {}, dict(chunk_size=64.0), TypeError,
     r"^chunk_size: expected None or an int, got 64\.0$"),
    ("chunk-bool", {}, dict(chunk_size=True), TypeError,
     r"^chunk_size: expected None or an int, got True$"),
    ("eps-negative", {}, dict(eps=-1e-6), ValueError, r"^eps: expected a finite number >= 0, got -1e-06$"),
    ("eps-nan", {}, dict(eps=float("nan")), ValueError, r"^eps: expected a finite number >= 0, got nan$"),
    ("eps-inf", {}, dict(eps=float("inf")), ValueError, r"^eps: expected a finite number >= 0, got inf$"),
    ("eps-str", {}, dict(eps="1e-6"), TypeError, r"^eps: expected a real number >= 0, got '1e-6'$"),
    ("gate-unknown", {}, dict(gate="tanh"), ValueError,
     r"^gate: expected one of \('exp', 'sig'\), got 'tanh'$"),
    ("exp-nonorm", {}, dict(gate="exp", normalize=False), ValueError,
     r"^normalize: normalize=False is only defined for gate='sig' .*got gate='exp', normalize=False$"),
    ("normalize-str", {}, dict(normalize="yes"), TypeError, r"^normalize: expected a bool, got 'yes'$"),
    ("scale-zero", {}, dict(scale=0.0), ValueError,
     r"^scale: expected None or a finite number > 0, got 0\.0$"),
    ("scale-negative", {}, dict(scale=-0.5), ValueError,
     r"^scale: expected None or a finite number > 0, got -0\.5$"),
    ("scale-str", {}, dict(scale="0.5"), TypeError,
     r"^scale: expected None or a positive real number, got '0\.5'$"),
    ("precision", {}, dict(precision="fp32"), ValueError,
     r"^precision: expected one of \('default', 'tf32'\), got 'fp32'$"),
    # initial state
    ("state-C-shape", {}, dict(initial_state=_state_ok()._replace(C=np.zeros((B, NH, DK, DV + 1)))),
     ValueError, r"^initial_state\.C: expected shape \(2, 3, 8, 4\) \(B, NH, DK, DV\), got \(2, 3, 8, 5\)$"),
    ("state-C-DK", {}, dict(initial_state=_state_ok()._replace(C=np.zeros((B, NH, DV, DK)))),
     ValueError, r"^initial_state\.C: expected shape \(2, 3, 8, 4\) \(B, NH, DK, DV\), got \(2, 3, 4, 8\)$"),
    ("state-n-shape", {}, dict(initial_state=_state_ok()._replace(n=np.zeros((B, NH, DV)))),
     ValueError, r"^initial_state\.n: expected shape \(2, 3, 8\) \(B, NH, DK\), got \(2, 3, 4\)$"),
    ("state-m-upstream-shape", {}, dict(initial_state=_state_ok()._replace(m=np.zeros((B, NH, 1)))),
     ValueError, r"^initial_state\.m: expected shape \(2, 3\) \(B, NH\), got \(2, 3, 1\)$"),
    ("state-m-missing-exp", {}, dict(initial_state=_state_ok()._replace(m=None)), ValueError,
     r"^initial_state\.m: required for gate='exp', got None$"),
    ("state-n-missing-normalize", {}, dict(gate="sig", initial_state=MLSTMState(np.zeros((B, NH, DK, DV)))),
     ValueError, r"^initial_state\.n: required when normalize=True, got None$"),
    ("state-C-int", {}, dict(initial_state=_state_ok()._replace(C=np.zeros((B, NH, DK, DV), dtype=np.int64))),
     TypeError, r"^initial_state\.C: expected a floating dtype \(float16, bfloat16, float32 or float64\), got int64$"),
    ("state-C-list", {}, dict(initial_state=_state_ok()._replace(C=[[0.0]])), TypeError,
     r"^initial_state\.C: expected a NumPy array, a CuPy array or a DLPack producer, got builtins\.list$"),
    ("state-array", {}, dict(initial_state=np.zeros((B, NH, DK, DV))), TypeError,
     r"^initial_state: expected an MLSTMState\(C, n, m\) or a \(C, n, m\) tuple, got ndarray$"),
    ("state-dict", {}, dict(initial_state={"C": np.zeros((B, NH, DK, DV))}), TypeError,
     r"^initial_state: expected an MLSTMState\(C, n, m\) or a \(C, n, m\) tuple, got dict$"),
]


@pytest.mark.parametrize("arrays, opts, exc, match",
                         [pytest.param(*case[1:], id=case[0]) for case in SEQUENCE_ERRORS])
@pytest.mark.parametrize("entry", ["mlstm_fwd", "mlstm", "mlstm_vjp"])
def test_sequence_validation_errors(entry, arrays, opts, exc, match):
    x = _arrays_ok()
    x.update(arrays)
    with pytest.raises(exc, match=match):
        getattr(tfla_cupy, entry)(**x, **opts)


@pytest.mark.parametrize("option", ["eps", "scale"])
def test_huge_int_option_message_names_argument(option):
    with pytest.raises(ValueError, match=rf"^{option}: expected "):
        _fwd(**{option: 10 ** 400})


def test_keep_states_must_be_bool():
    with pytest.raises(TypeError, match=r"^keep_states: expected a bool, got 'yes'$"):
        _fwd(keep_states="yes")


def test_state_of_wrong_length_message_says_length():
    with pytest.raises(TypeError, match=r"^initial_state: .*length 2"):
        _fwd(initial_state=tuple(_state_ok())[:2])


def test_state_of_wrong_length_is_rejected():
    match = r"^initial_state: expected an MLSTMState\(C, n, m\) or a \(C, n, m\) tuple"
    with pytest.raises(TypeError, match=match):
        _fwd(initial_state=tuple(_state_ok())[:2])


def _ctx():
    return _fwd()[2]


BACKWARD_ERRORS = [
    ("ctx-dict", lambda: tfla_cupy.mlstm_bwd({}, np.zeros((B, NH, S, DV))), TypeError,
     r"^ctx: expected the context returned by mlstm_fwd, got dict$"),
    ("ctx-tuple", lambda: tfla_cupy.mlstm_bwd(_fwd(), np.zeros((B, NH, S, DV))), TypeError,
     r"^ctx: expected the context returned by mlstm_fwd, got tuple$"),
    ("dh-DV", lambda: tfla_cupy.mlstm_bwd(_ctx(), np.zeros((B, NH, S, DV + 1))), ValueError,
     r"^dh: expected shape \(2, 3, 5, 4\) \(B, NH, S, DV\) of h, got \(2, 3, 5, 5\)$"),
    ("dh-S", lambda: tfla_cupy.mlstm_bwd(_ctx(), np.zeros((B, NH, S - 1, DV))), ValueError,
     r"^dh: expected shape \(2, 3, 5, 4\) \(B, NH, S, DV\) of h, got \(2, 3, 4, 4\)$"),
    ("dh-rank", lambda: tfla_cupy.mlstm_bwd(_ctx(), np.zeros((B, NH, S))), ValueError,
     r"^dh: expected shape \(2, 3, 5, 4\) \(B, NH, S, DV\) of h, got \(2, 3, 5\)$"),
    ("dh-int", lambda: tfla_cupy.mlstm_bwd(_ctx(), np.zeros((B, NH, S, DV), dtype=np.int32)), TypeError,
     r"^dh: expected a floating dtype \(float16, bfloat16, float32 or float64\), got int32$"),
    ("dh-list", lambda: tfla_cupy.mlstm_bwd(_ctx(), [0.0]), TypeError,
     r"^dh: expected a NumPy array, a CuPy array or a DLPack producer, got builtins\.list$"),
    ("d_state-C-shape",
     lambda: tfla_cupy.mlstm_bwd(_ctx(), np.zeros((B, NH, S, DV)), (np.zeros((B, NH, DK, 1)), None, None)),
     ValueError, r"^d_state\.C: expected shape \(2, 3, 8, 4\) \(B, NH, DK, DV\), got \(2, 3, 8, 1\)$"),
    ("d_state-array",
     lambda: tfla_cupy.mlstm_bwd(_ctx(), np.zeros((B, NH, S, DV)), np.zeros((B, NH, DK, DV))),
     TypeError, r"^d_state: expected an MLSTMState\(C, n, m\) or a \(C, n, m\) tuple, got ndarray$"),
    ("vjp-dh-shape", lambda: tfla_cupy.mlstm_vjp(**_arrays_ok())[1](np.zeros((B, NH, S, DK))), ValueError,
     r"^dh: expected shape \(2, 3, 5, 4\) \(B, NH, S, DV\) of h, got \(2, 3, 5, 8\)$"),
]


@pytest.mark.parametrize("call, exc, match",
                         [pytest.param(*case[1:], id=case[0]) for case in BACKWARD_ERRORS])
def test_backward_validation_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _step_ok():
    return {name: a[:, :, 0] for name, a in _arrays_ok().items()}


STEP_ERRORS = [
    ("q-rank", dict(q=np.zeros((B, NH, S, DK))), {}, ValueError,
     r"^q: expected a 3-d array \(B, NH, DK\), got shape \(2, 3, 5, 8\)$"),
    ("v-rank", dict(v=np.zeros((B, NH))), {}, ValueError,
     r"^v: expected a 3-d array \(B, NH, DV\), got shape \(2, 3\)$"),
    ("i-rank", dict(i=np.zeros((B, NH, 1))), {}, ValueError,
     r"^i: expected a 2-d array \(B, NH\), got shape \(2, 3, 1\)$"),
    ("k-DK", dict(k=np.zeros((B, NH, DK + 1))), {}, ValueError,
     r"^k: expected shape \(2, 3, 8\) \(B, NH, DK\) to match q, got \(2, 3, 9\)$"),
    ("v-NH", dict(v=np.zeros((B, NH + 1, DV))), {}, ValueError,
     r"^v: expected shape \(2, 3, 4\) \(B, NH, DV\) to match q's B, NH, got \(2, 4, 4\)$"),
    ("f-B", dict(f=np.zeros((1, NH))), {}, ValueError,
     r"^f: expected shape \(2, 3\) \(B, NH\) to match q, got \(1, 3\)$"),
    ("q-int", dict(q=np.zeros((B, NH, DK), dtype=np.int32)), {}, TypeError,
     r"^q: expected a floating dtype \(float16, bfloat16, float32 or float64\), got int32$"),
    ("k-dtype-mismatch", dict(k=np.zeros((B, NH, DK), dtype=np.float16)), {}, TypeError,
     r"^k: expected the dtype of q \(float64\), got float16$"),
    ("v-list", dict(v=[0.0]), {}, TypeError,
     r"^v: expected a NumPy array, a CuPy array or a DLPack producer, got builtins\.list$"),
    ("zero-NH", {n: a[:, :0] for n, a in _step_ok().items()}, {}, ValueError,
     r"^q: every dimension must be >= 1, got shape \(2, 0, 8\)$"),
    ("gate-unknown", {}, dict(gate="relu"), ValueError,
     r"^gate: expected one of \('exp', 'sig'\), got 'relu'$"),
    ("exp-nonorm", {}, dict(normalize=False), ValueError,
     r"^normalize: normalize=False is only defined for gate='sig'"),
    ("eps-negative-int", {}, dict(eps=-1), ValueError, r"^eps: expected a finite number >= 0, got -1$"),
    ("scale-nan", {}, dict(scale=float("nan")), ValueError,
     r"^scale: expected None or a finite number > 0, got nan$"),
    ("state-m-missing", {}, dict(state=_state_ok()._replace(m=None)), ValueError,
     r"^state\.m: required for gate='exp', got None$"),
    ("state-C-shape", {}, dict(state=_state_ok()._replace(C=np.zeros((B, NH, DK, DK)))), ValueError,
     r"^state\.C: expected shape \(2, 3, 8, 4\) \(B, NH, DK, DV\), got \(2, 3, 8, 8\)$"),
    ("state-type", {}, dict(state="zeros"), TypeError,
     r"^state: expected an MLSTMState\(C, n, m\) or a \(C, n, m\) tuple, got str$"),
]


@pytest.mark.parametrize("arrays, opts, exc, match",
                         [pytest.param(*case[1:], id=case[0]) for case in STEP_ERRORS])
def test_step_validation_errors(arrays, opts, exc, match):
    x = _step_ok()
    x.update(arrays)
    with pytest.raises(exc, match=match):
        tfla_cupy.mlstm_step(**x, **opts)


class FakeGPUArray(np.ndarray):
    """A NumPy array that the monkeypatched dispatch reports as a CuPy (GPU) array."""


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make _arrays.kind_of report FakeGPUArray instances as kind "cuda" (no GPU needed)."""
    kind_of = _arrays.kind_of
    monkeypatch.setattr(_arrays, "kind_of", lambda x: "cuda" if isinstance(x, FakeGPUArray) else kind_of(x))
    return lambda a: a.view(FakeGPUArray)


def test_mixed_host_and_gpu_inputs(fake_gpu):
    x = _arrays_ok()
    x["k"] = fake_gpu(x["k"])
    mix = r"^q, k, v, i, f: expected all host \(NumPy\) arrays or all GPU arrays, got a mix "
    with pytest.raises(TypeError, match=mix + r"\(q: numpy\.ndarray, k: .*FakeGPUArray, v: numpy\.ndarray"):
        tfla_cupy.mlstm(**x)
    with pytest.raises(TypeError, match=mix + r"\(q: numpy\.ndarray, .*f: .*FakeGPUArray\)$"):
        tfla_cupy.mlstm_step(**{n: fake_gpu(a) if n == "f" else a for n, a in _step_ok().items()})


def test_gpu_state_with_host_inputs(fake_gpu):
    state = _state_ok()._replace(C=fake_gpu(np.zeros((B, NH, DK, DV))))
    match = r"^initial_state\.C: is a GPU array but q, k, v, i, f are NumPy \(host\) arrays$"
    with pytest.raises(TypeError, match=match):
        _fwd(initial_state=state)


def test_gpu_dh_with_host_ctx(fake_gpu):
    with pytest.raises(TypeError, match=(r"^dh: is a GPU array but ctx comes from a forward on NumPy \(host\) "
                                         r"arrays; pass a NumPy \(host\) array$")):
        tfla_cupy.mlstm_bwd(_ctx(), fake_gpu(np.zeros((B, NH, S, DV))))


def test_gpu_dlpack_producer_without_cupy(monkeypatch):
    """A CUDA DLPack producer needs CuPy; without it the error says so and names the argument."""

    class CudaProducer:
        def __dlpack__(self, *args, **kwargs):
            raise AssertionError("must not be consumed")

        def __dlpack_device__(self):
            return (2, 0)   # kDLCUDA, device 0

    monkeypatch.setattr(_arrays, "cupy_module", lambda: None)
    x = _arrays_ok()
    x["v"] = CudaProducer()
    with pytest.raises(RuntimeError, match=r"^v: is a GPU array, which needs CuPy: pip install"):
        tfla_cupy.mlstm(**x)


def _gpu_available():
    try:
        import cupy
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available(),
                    reason="needs a CUDA GPU: CuPy arrays cannot be created without one")
def test_cupy_inputs_give_cupy_outputs(rng):
    import cupy
    x = {n: a.astype(np.float32) for n, a in random_inputs(rng, SHAPE).items()}
    h = tfla_cupy.mlstm(**{n: cupy.asarray(a) for n, a in x.items()})
    assert isinstance(h, cupy.ndarray) and h.dtype == np.float32
    assert rel_err(cupy.asnumpy(h), tfla_cupy.mlstm(**x)) <= 1e-5   # true fp32 (docs/math.md §12)


@pytest.mark.parametrize("gate,normalize", [("exp", True), ("sig", True), ("sig", False)])
def test_eps_zero_is_valid_and_matches_the_step_recurrence(gate, normalize):
    """ε = 0 is accepted (the denominator is bounded below by e^{−m} or 1) and the chunkwise
    NumPy path equals the step recurrence run token by token with ε = 0."""
    rng = np.random.default_rng(11)
    B, NH, S, DK, DV = 1, 2, 37, 8, 4
    q, k = rng.standard_normal((2, B, NH, S, DK))
    v = rng.standard_normal((B, NH, S, DV))
    i, f = rng.standard_normal((2, B, NH, S))
    h, last = tfla_cupy.mlstm(q, k, v, i, f, gate=gate, normalize=normalize, eps=0, return_state=True, chunk_size=16)
    assert np.all(np.isfinite(h))
    st, hs = None, []
    for t in range(S):
        ht, st = tfla_cupy.mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], st, gate=gate,
                                      normalize=normalize, eps=0.0)
        hs.append(ht)
    np.testing.assert_allclose(h, np.stack(hs, axis=2), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(last.C, st.C, rtol=1e-9, atol=1e-12)


def test_a_validated_signature_is_not_revalidated_but_its_options_are_typed(monkeypatch):
    """A repeated call reuses the Problem of its signature; an option of another type (1 for
    True) is a new signature and gets its error; so do arrays of another shape."""
    from tfla_cupy import _validate
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 1, 2, 9, 8))
    v = rng.standard_normal((1, 2, 9, 4))
    i, f = rng.standard_normal((2, 1, 2, 9))
    calls = []
    real = _validate._inputs
    monkeypatch.setattr(_validate, "_inputs", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(_validate, "_SEEN", {})
    h1 = tfla_cupy.mlstm(q, k, v, i, f, gate="sig")
    h2 = tfla_cupy.mlstm(q, k, v, i, f, gate="sig")
    assert len(calls) == 1 and np.array_equal(h1, h2)
    with pytest.raises(TypeError, match=r"^normalize: expected a bool, got 1$"):
        tfla_cupy.mlstm(q, k, v, i, f, gate="sig", normalize=1)
    with pytest.raises(ValueError, match=r"^v: expected shape \(1, 2, 9, 4\)"):
        tfla_cupy.mlstm(q, k, v[:, :, :8], i, f, gate="sig")
    assert len(calls) == 3
