"""The framework adapters without a GPU: clear import errors where the framework is absent, no
framework imported by ``import tfla_cupy``, and (where JAX is installed) the plumbing of
tfla_cupy.jax — custom_vjp, residuals, the augmented column of normalizer_grad, state
gradients, the step — on JAX's CPU backend with the GPU path's entry points replaced by the
float64 NumPy path, against tfla_cupy's NumPy API."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import tfla_cupy
from conftest import rel_err


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("framework, extra", [("jax", "jax"), ("torch", "torch")])
def test_adapter_without_framework_is_a_clear_import_error(framework, extra):
    r = _python(f"import sys; sys.modules[{framework!r}] = None\n"
                f"try:\n    import tfla_cupy.{framework}\nexcept ImportError as e:\n    print('ERR', e)\n")
    assert r.returncode == 0, r.stderr
    assert f"ERR tfla_cupy.{framework} needs" in r.stdout and f"pip install 'tfla-cupy[{extra}]'" in r.stdout


def test_core_imports_no_framework():
    r = _python("import sys, tfla_cupy; print(sorted({'jax', 'torch'} & set(sys.modules)))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------
# tfla_cupy.jax on JAX's CPU backend, GPU entry points replaced by the NumPy path
# ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    jax = pytest.importorskip("jax")
    from tfla_cupy import _cuda_path, _numpy_path
    from tfla_cupy import jax as tj
    from tfla_cupy._types import MLSTMContext

    def np_problem(p):
        return dataclasses.replace(p, kind="numpy")

    def forward(p, arrays, state, *, out=None, copy_saved=True):
        h, last, ctx = _numpy_path.forward(np_problem(p), arrays, state)
        out["h"][...], out["C_last"][...] = h, last.C
        if p.has_n:
            out["N"][...], out["n_last"][...] = ctx.saved["N"], last.n
        if p.has_m:
            out["M"][...], out["m_last"][...] = ctx.saved["M"], last.m

    def context(p, arrays, state, N, M, C_last):
        assert N is not None or not p.has_n
        return MLSTMContext("cuda", p, dict(arrays=[a.copy() for a in arrays], state=state))

    def backward(mctx, dh, dC_last, *, out=None):
        p = mctx.problem
        _, _, ctx = _numpy_path.forward(np_problem(p), mctx.saved["arrays"], mctx.saved["state"])
        g = _numpy_path.backward(ctx, dh, dC_last)
        for name in ("dq", "dk", "dv", "di", "df"):
            out[name][...] = getattr(g, name)
        if "dC0" in out:
            out["dC0"][...] = g.d_initial_state.C

    def step(p, arrays, state, *, out=None):
        h, st = _numpy_path.step(np_problem(p), arrays, state)
        out["h"][...], out["C"][...] = h, st.C
        if "n" in out:
            out["n"][...] = st.n
        if "m" in out:
            out["m"][...] = st.m

    for name, fn in (("forward", forward), ("context", context), ("backward", backward), ("step", step)):
        monkeypatch.setattr(_cuda_path, name, fn)
    monkeypatch.setattr(tj, "_view", lambda b: None if b is None else np.asarray(b))
    monkeypatch.setattr(tj, "_on_xla_stream", lambda ctx, buf: contextlib.nullcontext())
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        yield jax, tj, cpu


B, NH, S, DK, DV = 1, 2, 40, 8, 16


def _inputs(rng):
    q, k = rng.standard_normal((2, B, NH, S, DK)).astype(np.float32)
    v = rng.standard_normal((B, NH, S, DV)).astype(np.float32)
    i = rng.standard_normal((B, NH, S)).astype(np.float32)
    f = (2 + rng.standard_normal((B, NH, S))).astype(np.float32)
    return q, k, v, i, f


def _state(rng):
    return tfla_cupy.MLSTMState(rng.standard_normal((B, NH, DK, DV)).astype(np.float32),
                                rng.standard_normal((B, NH, DK)).astype(np.float32),
                                rng.standard_normal((B, NH)).astype(np.float32))


@pytest.mark.parametrize("normalizer_grad", [False, True], ids=["custom", "normalizer-grad"])
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("gate, normalize", [("exp", True), ("sig", True), ("sig", False)])
def test_jax_plumbing(fake_gpu, rng, gate, normalize, with_state, normalizer_grad):
    jax, tj, cpu = fake_gpu
    jnp = jax.numpy
    x = _inputs(rng)
    st = _state(rng) if with_state else None
    opts = dict(gate=gate, normalize=normalize, chunk_size=16, normalizer_grad=normalizer_grad)
    dh = rng.standard_normal((B, NH, S, DV)).astype(np.float32)
    dC = rng.standard_normal((B, NH, DK, DV)).astype(np.float32)
    dn = rng.standard_normal((B, NH, DK)).astype(np.float32)
    h_ref, last_ref, ctx = tfla_cupy.mlstm_fwd(*x, initial_state=st, **opts)
    g_ref = tfla_cupy.mlstm_bwd(ctx, dh, (dC, dn if normalize else None, None))

    jx = [jax.device_put(a, cpu) for a in x]
    jst = None if st is None else tfla_cupy.MLSTMState(*(jax.device_put(a, cpu) for a in st))

    def loss(q, k, v, i, f, state):
        h, last = tj.mlstm(q, k, v, i, f, initial_state=state, return_state=True, **opts)
        out = jnp.sum(h * dh) + jnp.sum(last.C * dC)
        return out + jnp.sum(last.n * dn) if normalize else out

    h_jit = jax.jit(lambda *a: tj.mlstm(*a, initial_state=jst, **opts))(*jx)
    assert rel_err(h_jit, h_ref) < 1e-6
    h_eager, last = tj.mlstm(*jx, initial_state=jst, return_state=True, **opts)
    assert rel_err(h_eager, h_ref) < 1e-6 and rel_err(last.C, last_ref.C) < 1e-6
    argnums = (0, 1, 2, 3, 4, 5) if with_state else (0, 1, 2, 3, 4)
    g = jax.jit(jax.grad(loss, argnums=argnums))(*jx, jst)
    for got, want, name in zip(g, g_ref, "qkvif"):
        assert rel_err(got, want) < 1e-5, name
    if with_state:
        assert rel_err(g[5].C, g_ref.d_initial_state.C) < 1e-5
        assert not np.any(np.asarray(g[5].m))   # the stabilizer is stop-gradient (or absent)
        if normalize:
            assert rel_err(g[5].n, g_ref.d_initial_state.n) < 1e-5
            assert bool(np.any(np.asarray(g[5].n))) == normalizer_grad


def test_jax_step_plumbing(fake_gpu, rng):
    jax, tj, cpu = fake_gpu
    jnp = jax.numpy
    q, k, v, i, f = (a[:, :, 0] for a in _inputs(rng))
    st = _state(rng)
    h_ref, st_ref = tfla_cupy.mlstm_step(q, k, v, i, f, st)
    h, new = jax.jit(tj.mlstm_step)(q, k, v, i, f, st)
    assert rel_err(h, h_ref) < 1e-6 and rel_err(new.C, st_ref.C) < 1e-6 and rel_err(new.m, st_ref.m) < 1e-6

    def loss(q, state):
        h, s2 = tj.mlstm_step(q, k, v, i, f, state)
        return jnp.sum(h ** 2) + jnp.sum(s2.C)

    gq, gst = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, st)
    h1, last1, ctx = tfla_cupy.mlstm_fwd(*(a[:, :, None] for a in (q, k, v, i, f)), initial_state=st)
    g1 = tfla_cupy.mlstm_bwd(ctx, 2 * h1, (np.ones_like(last1.C), None, None))
    assert rel_err(gq, g1.dq[:, :, 0]) < 1e-5
    assert rel_err(gst.C, g1.d_initial_state.C) < 1e-5


def test_jax_validation(fake_gpu, rng):
    jax, tj, cpu = fake_gpu
    q, k, v, i, f = _inputs(rng)
    with pytest.raises(ValueError, match=r"k: expected shape"):
        tj.mlstm(q, k[:, :, :3], v, i, f)
    with pytest.raises(ValueError, match="gate"):
        tj.mlstm(q, k, v, i, f, gate="tanh")
    with pytest.raises(TypeError, match="q: expected a floating dtype"):
        tj.mlstm(q.astype(np.int32), k.astype(np.int32), v.astype(np.int32), i, f)
    with pytest.raises(ValueError, match="v: the GPU path needs DV to be a multiple of 8"):
        tj.mlstm(q, k, v[..., :5], i, f)
    with pytest.raises(ValueError, match=r"initial_state.n: required"):
        tj.mlstm(q, k, v, i, f, initial_state=(np.zeros((B, NH, DK, DV), np.float32), None, np.zeros((B, NH))))


# ------------------------------------------------------------------------------------------
# tfla_cupy.torch on CPU tensors (the float64 NumPy path), where PyTorch is installed
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalizer_grad", [False, True], ids=["custom", "normalizer-grad"])
@pytest.mark.parametrize("gate, normalize", [("exp", True), ("sig", True), ("sig", False)])
def test_torch_autograd_on_cpu(rng, gate, normalize, normalizer_grad):
    torch = pytest.importorskip("torch")
    import tfla_cupy.torch as tt
    x = [a.astype(np.float64) for a in _inputs(rng)]
    st = tfla_cupy.MLSTMState(*(a.astype(np.float64) for a in _state(rng)))
    dh = rng.standard_normal((B, NH, S, DV))
    dC, dn = rng.standard_normal((B, NH, DK, DV)), rng.standard_normal((B, NH, DK))
    opts = dict(gate=gate, normalize=normalize, chunk_size=16, normalizer_grad=normalizer_grad)
    h_ref, last_ref, ctx = tfla_cupy.mlstm_fwd(*x, initial_state=st, **opts)
    want = tfla_cupy.mlstm_bwd(ctx, dh, (dC, dn if normalize else None, None))

    xt = [torch.tensor(a, requires_grad=True) for a in x]
    stt = tfla_cupy.MLSTMState(*(torch.tensor(a, requires_grad=True) for a in st))
    h, last = tt.mlstm(*xt, initial_state=stt, return_state=True, **opts)
    assert rel_err(h.detach().numpy(), h_ref) < 1e-14
    assert (last.n is None) == (not normalize) and (last.m is None) == (gate != "exp")
    loss = (h * torch.tensor(dh)).sum() + (last.C * torch.tensor(dC)).sum()
    if normalize:
        loss = loss + (last.n * torch.tensor(dn)).sum()
    loss.backward()
    for t, w, name in zip(xt, want[:5], "qkvif"):
        assert rel_err(t.grad.numpy(), w) < 1e-12, name
    assert rel_err(stt.C.grad.numpy(), want.d_initial_state.C) < 1e-12
    if normalize:
        assert rel_err(stt.n.grad.numpy(), want.d_initial_state.n) < 1e-12
        assert bool(torch.any(stt.n.grad != 0)) == normalizer_grad


def test_torch_in_place_edit_is_reported_on_cpu(rng):
    torch = pytest.importorskip("torch")
    import tfla_cupy.torch as tt
    q, k, v, i, f = (torch.tensor(a.astype(np.float64), requires_grad=True) for a in _inputs(rng))
    h = tt.mlstm(q, k, v, i, f, chunk_size=16)
    with torch.no_grad():
        k.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()
