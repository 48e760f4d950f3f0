"""API contract items: mlstm_vjp's explicit signature, the py.typed marker, and that the saved
backward context does not alias the inputs (an in-place edit after the forward leaves the
gradients unchanged). NumPy path; the GPU twin is in test_gpu_normalizer_grad.py."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

import tfla_cupy
from conftest import Shape, random_inputs, random_state, rel_err

SHAPE = Shape(1, 2, 20, 8, 8, 16)


def test_vjp_signature_is_explicit():
    params = inspect.signature(tfla_cupy.mlstm_vjp).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    fwd = inspect.signature(tfla_cupy.mlstm_fwd).parameters
    assert set(fwd) | {"return_state"} == set(params)
    assert {"normalizer_grad", "copy_inputs", "keep_states"} <= set(params)


def test_mistyped_vjp_keyword_is_an_error_of_mlstm_vjp(rng):
    x = random_inputs(rng, SHAPE)
    with pytest.raises(TypeError, match=r"mlstm_vjp\(\) got an unexpected keyword argument 'chunksize'"):
        tfla_cupy.mlstm_vjp(**x, chunksize=16)


def test_public_functions_have_type_hints():
    for fn in (tfla_cupy.mlstm, tfla_cupy.mlstm_fwd, tfla_cupy.mlstm_bwd, tfla_cupy.mlstm_vjp, tfla_cupy.mlstm_step):
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, fn.__name__
        for name, p in sig.parameters.items():
            assert p.annotation is not inspect.Parameter.empty, (fn.__name__, name)


def test_py_typed_marker_is_shipped():
    assert (Path(tfla_cupy.__file__).parent / "py.typed").is_file()
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"tfla_cupy" = ["py.typed"]' in text


@pytest.mark.parametrize("normalizer_grad", [False, True], ids=["custom", "normalizer-grad"])
@pytest.mark.parametrize("gate", ["exp", "sig"])
def test_in_place_edit_after_forward_does_not_change_gradients(rng, gate, normalizer_grad):
    x = random_inputs(rng, SHAPE)
    C0, n0, m0 = random_state(rng, SHAPE, gate)
    state = tfla_cupy.MLSTMState(C0, n0, m0)
    dh = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.S, SHAPE.DV))
    dC = rng.standard_normal(C0.shape)
    opts = dict(gate=gate, chunk_size=SHAPE.L, initial_state=state, normalizer_grad=normalizer_grad)
    _, _, ctx = tfla_cupy.mlstm_fwd(**x, **opts)
    want = tfla_cupy.mlstm_bwd(ctx, dh, (dC, None, None))

    fresh = {n: a.copy() for n, a in x.items()}
    fresh_state = tfla_cupy.MLSTMState(C0.copy(), n0.copy(), m0.copy())
    _, _, ctx2 = tfla_cupy.mlstm_fwd(**fresh, **{**opts, "initial_state": fresh_state})
    for a in (*fresh.values(), *fresh_state):   # float64: np.asarray would have aliased these
        a *= -3.0
        a += 1.0
    got = tfla_cupy.mlstm_bwd(ctx2, dh, (dC, None, None))
    for name in ("dq", "dk", "dv", "di", "df"):
        assert rel_err(getattr(got, name), getattr(want, name)) == 0, name
    assert rel_err(got.d_initial_state.C, want.d_initial_state.C) == 0
    assert rel_err(got.d_initial_state.n, want.d_initial_state.n) == 0
    assert np.max(np.abs(want.dq)) > 0


def test_copy_inputs_false_aliases_and_gives_the_same_gradients(rng):
    x = random_inputs(rng, SHAPE)
    dh = rng.standard_normal((SHAPE.B, SHAPE.NH, SHAPE.S, SHAPE.DV))
    _, _, ctx = tfla_cupy.mlstm_fwd(**x, chunk_size=SHAPE.L)
    _, _, ctx_alias = tfla_cupy.mlstm_fwd(**x, chunk_size=SHAPE.L, copy_inputs=False)
    assert not np.shares_memory(ctx.saved["inputs"][0], x["q"])
    assert np.shares_memory(ctx_alias.saved["inputs"][0], x["q"])     # no copy, as documented
    for a, b in zip(tfla_cupy.mlstm_bwd(ctx, dh)[:5], tfla_cupy.mlstm_bwd(ctx_alias, dh)[:5]):
        assert rel_err(b, a) == 0
    with pytest.raises(TypeError, match="copy_inputs: expected None or a bool"):
        tfla_cupy.mlstm_fwd(**x, copy_inputs="no")
