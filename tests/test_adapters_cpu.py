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
    from tfla_cupy import _gpu, _numpy_path
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

    def step(p, arrays, state, out=None, indices=None, *, h_out=None):
        h, st = _numpy_path.step(np_problem(p), arrays, state)
        h_out[...], out.C[...] = h, st.C
        if out.n is not None:
            out.n[...] = st.n
        if out.m is not None:
            out.m[...] = st.m
        return h_out, out

    for name, fn in (("forward", forward), ("context", context), ("backward", backward), ("step", step)):
        monkeypatch.setattr(_gpu, name, fn)
    monkeypatch.setattr(tj, "_view", lambda b: None if b is None else np.asarray(b))
    monkeypatch.setattr(tj, "_on_xla_stream", lambda ctx, buf: contextlib.nullcontext())
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        yield jax, tj, cpu


B, NH, S, DK, DV = 1, 2, 40, 8, 16


def _inputs(rng, b=B):
    q, k = rng.standard_normal((2, b, NH, S, DK)).astype(np.float32)
    v = rng.standard_normal((b, NH, S, DV)).astype(np.float32)
    i = rng.standard_normal((b, NH, S)).astype(np.float32)
    f = (2 + rng.standard_normal((b, NH, S))).astype(np.float32)
    return q, k, v, i, f


def _state(rng, b=B):
    return tfla_cupy.MLSTMState(rng.standard_normal((b, NH, DK, DV)).astype(np.float32),
                                rng.standard_normal((b, NH, DK)).astype(np.float32),
                                rng.standard_normal((b, NH)).astype(np.float32))


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
        if normalizer_grad and gate == "exp":   # the ε·e^M term through the stabilizer (docs/math.md §6.6)
            assert rel_err(g[5].m, g_ref.d_initial_state.m) < 1e-5
        else:
            assert not np.any(np.asarray(g[5].m))   # the stabilizer is stop-gradient (or absent)
        if normalize:
            assert rel_err(g[5].n, g_ref.d_initial_state.n) < 1e-5
            assert bool(np.any(np.asarray(g[5].n))) == normalizer_grad


def test_jax_normalizer_grad_has_the_stabilizer_term(fake_gpu, rng):
    """At a large ε the ε·e^M term of normalizer_grad is far above rounding: the adapter's gate and
    initial-m gradients equal the API's (without the term di is ~1e-2 off)."""
    jax, tj, cpu = fake_gpu
    jnp = jax.numpy
    x, st = _inputs(rng), _state(rng)
    st = st._replace(m=st.m + 4)   # m_0 above the first tokens' ι: its gradient is not cut at token 1
    dh = rng.standard_normal((B, NH, S, DV)).astype(np.float32)
    opts = dict(chunk_size=16, normalizer_grad=True, eps=1e-2)
    _, _, ctx = tfla_cupy.mlstm_fwd(*x, initial_state=st, **opts)
    want = tfla_cupy.mlstm_bwd(ctx, dh)
    assert np.all(want.d_initial_state.m != 0)

    def loss(i, f, state):
        return jnp.sum(tj.mlstm(x[0], x[1], x[2], i, f, initial_state=state, **opts) * dh)

    gi, gf, gst = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x[3], x[4], st)
    assert rel_err(gi, want.di) < 1e-5 and rel_err(gf, want.df) < 1e-5
    assert rel_err(gst.m, want.d_initial_state.m) < 1e-5


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
# tfla_cupy.jax under jax.vmap: the mapped axis folded into B (fake GPU entry points as above)
# ------------------------------------------------------------------------------------------

E = 3   # the mapped axis
BV = 2  # B of each mapped call (> 1: a fold in the wrong order would mix rows)


@pytest.fixture
def pass_log(fake_gpu, monkeypatch):
    """The B of every forward / backward / step pass that reaches the (fake) GPU entry points."""
    from tfla_cupy import _gpu
    log = []
    for name, problem_of in (("forward", lambda a: a[0]), ("backward", lambda a: a[0].problem),
                             ("step", lambda a: a[0])):
        def logged(*a, _real=getattr(_gpu, name), _name=name, _problem_of=problem_of, **kw):
            log.append((_name, _problem_of(a).B))
            return _real(*a, **kw)
        monkeypatch.setattr(_gpu, name, logged)
    return log


def _stacked(rng, n):
    return [np.stack(t) for t in zip(*(_inputs(rng, BV) for _ in range(n)))]


def _assert_tree_close(got, want, tol, what):
    jax = pytest.importorskip("jax")
    g, w = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(g) == len(w), what
    for j, (a, b) in enumerate(zip(g, w)):
        assert rel_err(a, b) < tol, (what, j)


@pytest.mark.parametrize("gate, normalize, normalizer_grad", [("exp", True, False), ("exp", True, True),
                                                              ("sig", False, False)],
                         ids=["exp", "exp-normalizer-grad", "sig-nonorm"])
def test_jax_vmap_equals_the_loop(fake_gpu, pass_log, rng, gate, normalize, normalizer_grad):
    """vmap over an ensemble axis (q, k, i and the initial state mapped; v and f shared) equals the
    loop over it, forward and grad, and runs each pass once with E·B rows."""
    jax, tj, cpu = fake_gpu
    jnp = jax.numpy
    q, k, _, i, _ = (jnp.asarray(a) for a in _stacked(rng, E))
    _, _, v, _, f = (jnp.asarray(a) for a in _inputs(rng, BV))
    st = tfla_cupy.MLSTMState(*(jnp.asarray(np.stack(a)) for a in zip(*(_state(rng, BV) for _ in range(E)))))
    w = jnp.asarray(rng.standard_normal((E, BV, NH, S, DV)).astype(np.float32))
    wC = jnp.asarray(rng.standard_normal((E, BV, NH, DK, DV)).astype(np.float32))
    opts = dict(gate=gate, normalize=normalize, chunk_size=16, normalizer_grad=normalizer_grad)

    def one(q, k, v, i, f, state):
        return tj.mlstm(q, k, v, i, f, initial_state=state, return_state=True, **opts)

    axes = (0, 0, None, 0, None, 0)
    h, last = jax.jit(jax.vmap(one, in_axes=axes))(q, k, v, i, f, st)
    assert pass_log == [("forward", E * BV)]
    one_jit = jax.jit(one)
    loop = [one_jit(q[e], k[e], v, i[e], f, jax.tree_util.tree_map(lambda a: a[e], st)) for e in range(E)]
    assert rel_err(h, np.stack([o[0] for o in loop])) < 1e-6
    assert rel_err(last.C, np.stack([o[1].C for o in loop])) < 1e-6
    for name in ("n", "m"):
        want = getattr(loop[0][1], name)
        assert (getattr(last, name) is None) == (want is None), name
        if want is not None:
            assert rel_err(getattr(last, name), np.stack([getattr(o[1], name) for o in loop])) < 1e-6

    def loss(h, last, w, wC):
        return jnp.sum(h * w) + jnp.sum(last.C * wC)

    def loss_vmapped(*args):
        h, last = jax.vmap(one, in_axes=axes)(*args)
        return loss(h, last, w, wC)

    pass_log.clear()
    g = jax.jit(jax.grad(loss_vmapped, argnums=(0, 1, 2, 3, 4, 5)))(q, k, v, i, f, st)
    assert ("forward", E * BV) in pass_log and ("backward", E * BV) in pass_log
    assert all(b == E * BV for _, b in pass_log), pass_log

    def loss_one(e, *args):
        h, last = one(*args)
        return loss(h, last, w[e], wC[e])

    grad_one = jax.jit(jax.grad(loss_one, argnums=(1, 2, 3, 4, 5, 6)))
    per = [grad_one(e, q[e], k[e], v, i[e], f, jax.tree_util.tree_map(lambda a: a[e], st)) for e in range(E)]
    for j, name in enumerate("qkvif"):
        want = sum(p[j] for p in per) if axes[j] is None else np.stack([p[j] for p in per])
        assert rel_err(g[j], want) < 1e-5, name
    _assert_tree_close(g[5], jax.tree_util.tree_map(lambda *a: np.stack(a), *(p[5] for p in per)), 1e-5,
                       "d initial_state")


def test_jax_vmap_moves_a_later_axis_and_nests(fake_gpu, pass_log, rng):
    """A mapped axis in position 1 (moved to the front, then folded) and two nested vmaps (both
    folded: one pass with E·2·B rows) equal the loop."""
    jax, tj, cpu = fake_gpu
    jnp = jax.numpy
    x = [np.stack(a, axis=1) for a in zip(*(_stacked(rng, 2) for _ in range(E)))]   # (2, E, B, ...)
    xj = [jnp.asarray(a) for a in x]

    @jax.jit
    def one(q, k, v, i, f):
        return tj.mlstm(q, k, v, i, f, chunk_size=16)

    def loss(q, *rest):
        return jnp.sum(one(q, *rest) ** 2)

    both = jax.vmap(jax.vmap(one), in_axes=1, out_axes=1)        # the outer map over axis 1 (E)
    h = both(*xj)
    assert h.shape == (2, E, BV, NH, S, DV)
    assert pass_log == [("forward", E * 2 * BV)]
    pass_log.clear()
    gq = jax.grad(lambda q: jnp.sum(both(q, *xj[1:]) ** 2))(xj[0])
    assert ("backward", E * 2 * BV) in pass_log

    grad_one = jax.jit(jax.grad(loss))
    for r in range(2):
        for e in range(E):
            x = [a[r, e] for a in xj]
            assert rel_err(h[r, e], one(*x)) < 1e-6
            assert rel_err(gq[r, e], grad_one(*x)) < 1e-5


def test_jax_vmap_of_the_step(fake_gpu, pass_log, rng):
    jax, tj, cpu = fake_gpu
    jnp = jax.numpy
    x = [jnp.asarray(a[:, :, :, 0]) for a in _stacked(rng, E)]
    st = tfla_cupy.MLSTMState(*(jnp.asarray(np.stack(a)) for a in zip(*(_state(rng, BV) for _ in range(E)))))
    h, new = jax.jit(jax.vmap(tj.mlstm_step))(*x, st)
    assert pass_log == [("step", E * BV)]
    step = jax.jit(tj.mlstm_step)
    for e in range(E):
        h_e, new_e = step(*(a[e] for a in x), jax.tree_util.tree_map(lambda a: a[e], st))
        assert rel_err(h[e], h_e) < 1e-6 and rel_err(new.C[e], new_e.C) < 1e-6 and rel_err(new.m[e], new_e.m) < 1e-6


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


# ------------------------------------------------------------------------------------------
# tfla_cupy.torch: the custom operators under torch.compile, and opcheck (CPU tensors)
# ------------------------------------------------------------------------------------------

TORCH_CASES = [  # gate, normalize, normalizer_grad, initial state, return_state, dtype
    pytest.param("exp", True, False, True, True, np.float64, id="exp-state"),
    pytest.param("exp", True, True, True, True, np.float32, id="exp-normalizer-grad-f32"),
    pytest.param("sig", False, False, False, False, np.float64, id="sig-nonorm-h-only"),
]


def _torch_problem(rng, dtype, with_state):
    x = [a.astype(dtype) for a in _inputs(rng)]
    st = tfla_cupy.MLSTMState(*(a.astype(dtype) for a in _state(rng))) if with_state else None
    w = dict(h=rng.standard_normal((B, NH, S, DV)), C=rng.standard_normal((B, NH, DK, DV)),
             n=rng.standard_normal((B, NH, DK)))
    return x, st, w


def _torch_loss_fn(tt, torch, w, *, gate, normalize, normalizer_grad, return_state):
    W = {name: torch.tensor(a) for name, a in w.items()}

    def fn(q, k, v, i, f, C0, n0, m0):
        state = None if C0 is None else tfla_cupy.MLSTMState(C0, n0, m0)
        out = tt.mlstm(q, k, v, i, f, initial_state=state, return_state=return_state, gate=gate, normalize=normalize,
                       chunk_size=16, normalizer_grad=normalizer_grad)
        h, last = out if return_state else (out, None)
        loss = (h * W["h"]).sum()
        if last is not None:
            loss = loss + (last.C * W["C"]).sum()
            if last.n is not None:
                loss = loss + (last.n * W["n"]).sum()
        return h, loss

    return fn


@pytest.mark.parametrize("gate, normalize, normalizer_grad, with_state, return_state, dtype", TORCH_CASES)
def test_torch_compile_equals_eager_and_the_reference(rng, gate, normalize, normalizer_grad, with_state, return_state,
                                                      dtype):
    """torch.compile(fullgraph=True) of a function around tt.mlstm: the custom operators trace
    (fake implementations, the autograd formula) and give eager's values and gradients, which
    are the float64 API's. The aot_eager backend here (Dynamo and AOTAutograd, no code
    generation); Inductor in the slow test below."""
    torch = pytest.importorskip("torch")
    import tfla_cupy.torch as tt
    torch._dynamo.reset()
    x, st, w = _torch_problem(rng, dtype, with_state)
    fn = _torch_loss_fn(tt, torch, w, gate=gate, normalize=normalize, normalizer_grad=normalizer_grad,
                        return_state=return_state)
    h_ref, _, ctx = tfla_cupy.mlstm_fwd(*x, initial_state=st, gate=gate, normalize=normalize, chunk_size=16,
                                        normalizer_grad=normalizer_grad)
    d_state = (w["C"], w["n"] if normalize else None, None) if return_state else None
    want = tfla_cupy.mlstm_bwd(ctx, w["h"], d_state)

    def run(f):
        xt = [torch.tensor(a, requires_grad=True) for a in x]
        stt = [None] * 3 if st is None else [None if a is None else torch.tensor(a, requires_grad=True) for a in st]
        h, loss = f(*xt, *stt)
        leaves = xt + [t for t in stt[:3 if normalizer_grad else 2] if t is not None]
        return h, torch.autograd.grad(loss, leaves)

    h_e, g_e = run(fn)
    h_c, g_c = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    tol = 1e-12 if dtype == np.float64 else 1e-6
    assert h_c.dtype == h_e.dtype == torch.tensor(x[0]).dtype
    assert torch.equal(h_c, h_e) and rel_err(h_e.detach(), h_ref) < tol
    refs = list(want[:5]) + list((want.d_initial_state or [])[:3 if normalizer_grad else 2])
    assert len(g_e) == len(refs)
    for got, eager, ref, name in zip(g_c, g_e, refs, ["dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0"]):
        assert got.dtype == eager.dtype
        assert rel_err(got, eager) < 1e-12, name
        assert rel_err(eager, ref) < tol, name


@pytest.mark.slow
def test_torch_compile_with_inductor_on_cpu(rng):
    """The default backend (Inductor: C++ code for the operations around the custom operators; the
    first compile takes ~25 s on two cores, hence slow)."""
    torch = pytest.importorskip("torch")
    import tfla_cupy.torch as tt
    torch._dynamo.reset()
    x, st, w = _torch_problem(rng, np.float64, True)
    fn = _torch_loss_fn(tt, torch, w, gate="exp", normalize=True, normalizer_grad=True, return_state=True)

    def run(f):
        xt = [torch.tensor(a, requires_grad=True) for a in x + list(st)]
        h, loss = f(*xt)
        return h, torch.autograd.grad(loss, xt[:7])

    (h_e, g_e), (h_c, g_c) = run(fn), run(torch.compile(fn, fullgraph=True))
    assert rel_err(h_c.detach(), h_e.detach()) < 1e-12
    for got, eager in zip(g_c, g_e):
        assert rel_err(got, eager) < 1e-12


def test_torch_compile_raises_the_library_errors(rng):
    torch = pytest.importorskip("torch")
    import tfla_cupy.torch as tt
    torch._dynamo.reset()
    q, k, v, i, f = (torch.tensor(a) for a in _inputs(rng))
    with pytest.raises(Exception, match=r"k: expected shape"):
        torch.compile(lambda *a: tt.mlstm(*a), fullgraph=True, backend="aot_eager")(q, k[:, :, :3], v, i, f)
    with pytest.raises(ValueError, match="gate"):
        tt.mlstm(q, k, v, i, f, gate="tanh")
    with pytest.raises(TypeError, match="normalize: expected a bool"):
        tt.mlstm(q, k, v, i, f, normalize=1)


def test_torch_opcheck(rng):
    """torch.library.opcheck on the three operators: schema (no mutation, no aliasing), autograd
    registration, fake implementations against the real outputs, AOT dispatch with dynamic shapes."""
    torch = pytest.importorskip("torch")
    import tfla_cupy.torch  # noqa: F401  (registers the operators)
    ops = torch.ops.tfla_cupy
    x, st, w = _torch_problem(rng, np.float64, True)
    xt = [torch.tensor(a, requires_grad=True) for a in x]
    stt = [torch.tensor(a, requires_grad=True) for a in st]
    for gate, normalize, exact, state in (("exp", True, True, stt), ("sig", False, False, [None] * 3)):
        n0 = state[1] if normalize else None
        m0 = state[2] if gate == "exp" else None
        opts = (gate, normalize, 16, 1e-6, None, "default", "", exact)
        args = (*xt, state[0], n0, m0, *opts)
        torch.library.opcheck(ops.mlstm_fwd.default, args)
        with torch.no_grad():
            h, C, n, m, N, M, C_inner, sign = ops.mlstm_fwd(*args)
        present = [N if normalize else None, M if gate == "exp" else None, C, h if exact else None,
                   sign if exact else None]
        inputs = [None if t is None else t.detach() for t in (*xt, state[0], n0, m0)]
        torch.library.opcheck(ops.mlstm_bwd.default, (*inputs, *present, torch.tensor(w["h"]), torch.tensor(w["C"]),
                                                      None, *opts))
    step = [t.detach()[:, :, 0] for t in xt]
    torch.library.opcheck(ops.mlstm_step.default, (*step, *(t.detach() for t in stt), "exp", True, 1e-6, None))


def test_torch_step_on_cpu_and_compiled(rng):
    torch = pytest.importorskip("torch")
    import tfla_cupy.torch as tt
    torch._dynamo.reset()
    q, k, v, i, f = (a[:, :, 0] for a in _inputs(rng))
    st = _state(rng)
    for gate, normalize in (("exp", True), ("sig", False)):
        h_ref, new_ref = tfla_cupy.mlstm_step(q, k, v, i, f, st, gate=gate, normalize=normalize)
        args = [torch.tensor(a) for a in (q, k, v, i, f)] + [tfla_cupy.MLSTMState(*(torch.tensor(a) for a in st))]
        fn = lambda *a: tt.mlstm_step(*a, gate=gate, normalize=normalize)   # noqa: E731
        for h, new in (fn(*args), torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)):
            assert rel_err(h, h_ref) < 1e-6 and rel_err(new.C, new_ref.C) < 1e-12
            assert (new.n is None) == (not normalize) and (new.m is None) == (gate != "exp")
            assert not h.requires_grad


def test_torch_kernel_config_crosses_the_operator_boundary(rng, monkeypatch):
    """A KernelConfig reaches the library call through its string key, eagerly and compiled (the
    NumPy path accepts and ignores it); anything else is the library's TypeError."""
    torch = pytest.importorskip("torch")
    import tfla_cupy.torch as tt
    from tfla_cupy import api
    from tfla_cupy.config import pick_config
    torch._dynamo.reset()
    cfg = pick_config("MmaF32", DK, DV, 16)
    x = [torch.tensor(a) for a in _inputs(rng)]
    want = tfla_cupy.mlstm(*(t.numpy() for t in x), chunk_size=16)
    seen = []
    real = api._forward
    monkeypatch.setattr(api, "_forward", lambda *a, **kw: seen.append(kw["config"]) or real(*a, **kw))
    fn = lambda *a: tt.mlstm(*a, chunk_size=16, config=cfg)   # noqa: E731
    for h in (fn(*x), torch.compile(fn, fullgraph=True, backend="aot_eager")(*x)):
        assert rel_err(h, want) < 1e-6
    assert len(seen) == 2 and all(c is cfg for c in seen)
    with pytest.raises(TypeError, match="config: expected None or a tfla_cupy.KernelConfig"):
        tt.mlstm(*x, config="default")
