"""tfla_cupy.jax on the GPU: jit ≡ eager ≡ the CuPy call (bit for bit: the same kernels on the same
buffers), grad ≡ mlstm_bwd, normalizer_grad against the float64 reference, the step, a jitted
training step of a tiny model whose loss goes down, and jax.vmap (the mapped axis folded into B)
against the loop over it, forward and grad."""

import numpy as np
import pytest

import tfla_cupy
from gpu_utils import BWD_TOL, DF_TOL, DTYPES, FWD_TOL, GATE_MODES, HAS_GPU, cp, gpu, make_inputs, rel_err, seed_of

jax = pytest.importorskip("jax")
jnp = jax.numpy


def _has_jax_gpu():
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


pytestmark = gpu + [pytest.mark.skipif(not (HAS_GPU and _has_jax_gpu()), reason="needs JAX with a CUDA GPU")]


def _tj():
    import tfla_cupy.jax as tj
    return tj


def _same(a, b, what):
    a, b = np.asarray(a), (cp.asnumpy(b) if isinstance(b, cp.ndarray) else np.asarray(b))
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    diff = np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))) if a.size else 0.0
    assert np.array_equal(a, b, equal_nan=True), f"{what}: max |diff| = {diff}"


CASES = [(1, 2, 200, 64, 128, 64, mode, dt, init) for mode in GATE_MODES for dt in ("f32", "bf16")
         for init in (False, True)] + [(2, 3, 37, 16, 32, 16, "exp", "f16", True)]


def _case_inputs(case):
    B, NH, S, DK, DV, L, mode, dt, init = case
    rng = np.random.default_rng(seed_of("jax", *case))
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], init=init)
    dh = rng.standard_normal((B, NH, S, DV)).astype(DTYPES[dt])
    dC = rng.standard_normal((B, NH, DK, DV)).astype(np.float32)
    return host, ref, dh, dC


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_jit_eager_and_cupy_agree(case):
    tj = _tj()
    B, NH, S, DK, DV, L, mode, dt, init = case
    gate, normalize = GATE_MODES[mode]
    host, ref, _, _ = _case_inputs(case)
    opts = dict(gate=gate, normalize=normalize, chunk_size=L)
    xc = {n: cp.asarray(a) for n, a in host.items()}
    stc = tfla_cupy.MLSTMState(xc["C0"], xc["n0"], xc["m0"]) if init else None
    h_cp, last_cp = tfla_cupy.mlstm(*(xc[n] for n in "qkvif"), initial_state=stc, return_state=True, **opts)
    xj = {n: jnp.asarray(a) for n, a in host.items()}
    stj = tfla_cupy.MLSTMState(xj["C0"], xj["n0"], xj["m0"]) if init else None
    args = [xj[n] for n in "qkvif"]
    h_e, last_e = tj.mlstm(*args, initial_state=stj, return_state=True, **opts)
    h_j, last_j = jax.jit(lambda *a: tj.mlstm(*a, initial_state=stj, return_state=True, **opts))(*args)
    for h in (h_e, h_j):
        _same(h, h_cp, "h")
    for last in (last_e, last_j):
        _same(last.C, last_cp.C, "C")
        for name in ("n", "m"):
            want = getattr(last_cp, name)
            assert (getattr(last, name) is None) == (want is None), name
            if want is not None:
                _same(getattr(last, name), want, name)
    assert rel_err(cp.asarray(np.asarray(h_j)), reference_h(ref, gate, normalize, L)) < FWD_TOL[dt]


def reference_h(ref, gate, normalize, L):
    st = tfla_cupy.MLSTMState(ref["C0"], ref["n0"], ref["m0"]) if "C0" in ref else None
    return tfla_cupy.mlstm(*(ref[n] for n in "qkvif"), gate=gate, normalize=normalize, initial_state=st, chunk_size=L)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_grad_equals_mlstm_bwd(case):
    tj = _tj()
    B, NH, S, DK, DV, L, mode, dt, init = case
    gate, normalize = GATE_MODES[mode]
    host, ref, dh, dC = _case_inputs(case)
    opts = dict(gate=gate, normalize=normalize, chunk_size=L)
    xc = {n: cp.asarray(a) for n, a in host.items()}
    stc = tfla_cupy.MLSTMState(xc["C0"], xc["n0"], xc["m0"]) if init else None
    _, _, ctx = tfla_cupy.mlstm_fwd(*(xc[n] for n in "qkvif"), initial_state=stc, **opts)
    want = tfla_cupy.mlstm_bwd(ctx, cp.asarray(dh), (cp.asarray(dC), None, None))

    xj = {n: jnp.asarray(a) for n, a in host.items()}
    dhj, dCj = jnp.asarray(dh), jnp.asarray(dC)

    def loss(q, k, v, i, f, state):
        h, last = tj.mlstm(q, k, v, i, f, initial_state=state, return_state=True, **opts)
        return jnp.sum((h * dhj).astype(jnp.float32)) + jnp.sum(last.C * dCj)

    stj = tfla_cupy.MLSTMState(xj["C0"], xj["n0"], xj["m0"]) if init else None
    argnums = (0, 1, 2, 3, 4, 5) if init else (0, 1, 2, 3, 4)
    g = jax.jit(jax.grad(loss, argnums=argnums))(*(xj[n] for n in "qkvif"), stj)
    for got, w, name in zip(g, want, ("dq", "dk", "dv", "di", "df")):
        _same(got, w, name)
    if init:
        _same(g[5].C, want.d_initial_state.C, "dC0")


@pytest.mark.parametrize("mode", ["exp", "sig"])
@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_normalizer_grad_matches_reference(mode, dt):
    tj = _tj()
    gate, normalize = GATE_MODES[mode]
    B, NH, S, DK, DV, L = 1, 2, 300, 32, 64, 64
    rng = np.random.default_rng(seed_of("jax-normgrad", mode, dt))
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], f_mean=1.0, init=True)
    dh = rng.standard_normal((B, NH, S, DV)).astype(DTYPES[dt])
    dC = rng.standard_normal((B, NH, DK, DV)).astype(np.float32)
    dn = rng.standard_normal((B, NH, DK)).astype(np.float32)
    opts = dict(gate=gate, normalize=normalize, chunk_size=L, normalizer_grad=True)
    st_ref = tfla_cupy.MLSTMState(ref["C0"], ref["n0"], ref["m0"])
    _, _, ctx = tfla_cupy.mlstm_fwd(*(ref[n] for n in "qkvif"), initial_state=st_ref, **opts)
    want = tfla_cupy.mlstm_bwd(ctx, dh.astype(np.float64), (dC.astype(np.float64), dn.astype(np.float64), None))

    xj = {n: jnp.asarray(a) for n, a in host.items()}
    dhj, dCj, dnj = jnp.asarray(dh), jnp.asarray(dC), jnp.asarray(dn)

    def loss(q, k, v, i, f, state):
        h, last = tj.mlstm(q, k, v, i, f, initial_state=state, return_state=True, **opts)
        return jnp.sum((h * dhj).astype(jnp.float32)) + jnp.sum(last.C * dCj) + jnp.sum(last.n * dnj)

    stj = tfla_cupy.MLSTMState(xj["C0"], xj["n0"], xj["m0"])
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))(*(xj[n] for n in "qkvif"), stj)
    for got, w, name in zip(g, want, ("dq", "dk", "dv", "di", "df")):
        tol = DF_TOL[dt] if name == "df" else BWD_TOL[dt]
        assert rel_err(np.asarray(got), w) < tol, name
    assert rel_err(np.asarray(g[5].C), want.d_initial_state.C) < BWD_TOL[dt]
    assert rel_err(np.asarray(g[5].n), want.d_initial_state.n) < BWD_TOL[dt]


@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_step_jit_equals_cupy_step(mode):
    tj = _tj()
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed_of("jax-step", mode))
    host, _ = make_inputs(rng, 2, 3, 1, 32, 64, DTYPES["bf16"], init=True)
    x = {n: (a[:, :, 0] if n in "qkvif" else a) for n, a in host.items()}
    xc = {n: cp.asarray(a) for n, a in x.items()}
    h_cp, st_cp = tfla_cupy.mlstm_step(*(xc[n] for n in "qkvif"), (xc["C0"], xc["n0"], xc["m0"]), gate=gate,
                                       normalize=normalize)
    xj = {n: jnp.asarray(a) for n, a in x.items()}
    h_j, st_j = jax.jit(lambda *a: tj.mlstm_step(*a, gate=gate, normalize=normalize))(
        *(xj[n] for n in "qkvif"), (xj["C0"], xj["n0"], xj["m0"]))
    _same(h_j, h_cp, "h")
    _same(st_j.C, st_cp.C, "C")

    def loss(q, state):
        h, new = tj.mlstm_step(q, xj["k"], xj["v"], xj["i"], xj["f"], state, gate=gate, normalize=normalize)
        return jnp.sum(h.astype(jnp.float32) ** 2) + jnp.sum(new.C)

    gq, _ = jax.jit(jax.grad(loss, argnums=(0, 1)))(xj["q"], tfla_cupy.MLSTMState(xj["C0"], xj["n0"], xj["m0"]))
    assert gq.shape == xj["q"].shape and bool(jnp.all(jnp.isfinite(gq.astype(jnp.float32))))
    assert float(jnp.max(jnp.abs(gq.astype(jnp.float32)))) > 0


def test_jitted_training_step_decreases_loss():
    tj = _tj()
    losses = train_tiny_model(tj, jax, steps=60)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses      # 0.41 with the float64 path in place of the kernels


def train_tiny_model(tj, jax, *, steps, lr=0.05, dtype=np.float32):
    """One mLSTM layer (projections, mLSTM, read-out) fitted by SGD to a teacher of the same shape."""
    jnp = jax.numpy
    B, S, E, NH, DK, DV = 2, 64, 32, 2, 16, 16
    rng = np.random.default_rng(seed_of("jax-train"))

    def init():
        def w(*shape):
            return jnp.asarray((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype))
        return dict(Wq=w(E, NH * DK), Wk=w(E, NH * DK), Wv=w(E, NH * DV), Wi=w(E, NH), Wf=w(E, NH),
                    bf=jnp.full((NH,), 3.0, dtype), Wo=w(NH * DV, E))

    def model(p, x):
        def heads(t, d):
            return t.reshape(B, S, NH, d).transpose(0, 2, 1, 3)
        q, k, v = heads(x @ p["Wq"], DK), heads(x @ p["Wk"], DK), heads(x @ p["Wv"], DV)
        i = (x @ p["Wi"]).transpose(0, 2, 1)
        f = (x @ p["Wf"] + p["bf"]).transpose(0, 2, 1)
        h = tj.mlstm(q, k, v, i, f, chunk_size=16)
        return h.transpose(0, 2, 1, 3).reshape(B, S, NH * DV) @ p["Wo"]

    x = jnp.asarray(rng.standard_normal((B, S, E)).astype(dtype))
    y = model(init(), x)     # the teacher
    params = init()

    def loss_fn(p):
        return jnp.mean((model(p, x) - y) ** 2)

    @jax.jit
    def step(p):
        loss, g = jax.value_and_grad(loss_fn)(p)
        return loss, jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)

    losses = []
    for _ in range(steps):
        loss, params = step(params)
        losses.append(float(loss))
    return losses


# ------------------------------------------------------------------------------------------
# jax.vmap: the mapped axis folded into B
# ------------------------------------------------------------------------------------------

VMAP_CASES = [("exp", "f32", False), ("exp", "bf16", True), ("signn", "f32", False)]


@pytest.mark.parametrize("mode, dt, exact", VMAP_CASES, ids=lambda c: str(c))
def test_vmap_equals_the_loop_forward_and_grad(monkeypatch, mode, dt, exact):
    """vmap over an ensemble axis of size E (q, k, v, i and the initial state mapped, f shared)
    equals the loop over it, forward and jax.grad, each pass launched once for E·B rows; both
    against the float64 reference. The fold may change the forward's segment count (it depends on
    the number of CTAs), so vmap and loop agree to rounding, not bit for bit."""
    tj = _tj()
    from tfla_cupy import _gpu
    gate, normalize = GATE_MODES[mode]
    E, B, NH, S, DK, DV, L = 3, 2, 2, 130, 32, 64, 64
    rng = np.random.default_rng(seed_of("jax-vmap", mode, dt, exact))
    cases = [make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], init=True) for _ in range(E)]
    stack = {n: np.stack([c[0][n] for c in cases]) for n in cases[0][0]}
    stack["f"] = cases[0][0]["f"]                                       # shared: not mapped
    dh = rng.standard_normal((E, B, NH, S, DV)).astype(DTYPES[dt])
    dC = rng.standard_normal((E, B, NH, DK, DV)).astype(np.float32)
    opts = dict(gate=gate, normalize=normalize, chunk_size=L, normalizer_grad=exact)
    passes = []
    for name in ("forward", "backward"):
        real = getattr(_gpu, name)
        monkeypatch.setattr(_gpu, name, lambda *a, _real=real, _name=name, **kw: passes.append(
            (_name, (a[0] if _name == "forward" else a[0].problem).B)) or _real(*a, **kw))

    xj = {n: jnp.asarray(a) for n, a in stack.items()}
    dhj, dCj = jnp.asarray(dh), jnp.asarray(dC)
    axes = (0, 0, 0, 0, None, 0)

    def one(q, k, v, i, f, state):
        return tj.mlstm(q, k, v, i, f, initial_state=state, return_state=True, **opts)

    def args_of(x):
        return [x[n] for n in "qkvif"] + [tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"])]

    def at(e):
        return [a if ax is None else jax.tree_util.tree_map(lambda t: t[e], a) for a, ax in zip(args_of(xj), axes)]

    h, last = jax.jit(jax.vmap(one, in_axes=axes))(*args_of(xj))
    jax.block_until_ready(h)
    assert passes == [("forward", E * B)]
    one_jit = jax.jit(one)
    for e in range(E):
        h_e, last_e = one_jit(*at(e))
        assert rel_err(np.asarray(h[e]), np.asarray(h_e)) < FWD_TOL[dt]
        assert rel_err(np.asarray(last.C[e]), np.asarray(last_e.C)) < FWD_TOL[dt]
        ref = cases[e][1]
        st = tfla_cupy.MLSTMState(ref["C0"], ref["n0"], ref["m0"])
        ref = dict(ref, f=cases[0][1]["f"])
        h_ref = tfla_cupy.mlstm(*(ref[n] for n in "qkvif"), initial_state=st, gate=gate, normalize=normalize,
                                chunk_size=L)
        assert rel_err(np.asarray(h[e]), h_ref) < FWD_TOL[dt]

    def loss(h, last, dh, dC):
        return jnp.sum((h * dh).astype(jnp.float32)) + jnp.sum(last.C * dC)

    passes.clear()
    g = jax.jit(jax.grad(lambda *a: loss(*jax.vmap(one, in_axes=axes)(*a), dhj, dCj), argnums=tuple(range(6))))(
        *args_of(xj))
    jax.block_until_ready(g)
    assert ("backward", E * B) in passes and all(b == E * B for _, b in passes), passes
    grad_one = jax.jit(jax.grad(lambda e, *a: loss(*one(*a), dhj[e], dCj[e]), argnums=tuple(range(1, 7))))
    per = [grad_one(e, *at(e)) for e in range(E)]
    for j, name in enumerate(("dq", "dk", "dv", "di", "df")):
        want = sum(np.asarray(p[j], np.float64) for p in per) if axes[j] is None else np.stack(
            [np.asarray(p[j]) for p in per])
        assert rel_err(np.asarray(g[j]), want) < (DF_TOL if name == "df" else BWD_TOL)[dt], name
    want_C0 = np.stack([np.asarray(p[5].C) for p in per])
    assert rel_err(np.asarray(g[5].C), want_C0) < BWD_TOL[dt]


def test_vmap_of_the_step_equals_the_loop():
    tj = _tj()
    E = 3
    rng = np.random.default_rng(seed_of("jax-vmap-step"))
    cases = [make_inputs(rng, 2, 3, 1, 32, 64, DTYPES["bf16"], init=True)[0] for _ in range(E)]
    x = {n: jnp.asarray(np.stack([(c[n][:, :, 0] if n in "qkvif" else c[n]) for c in cases])) for n in cases[0]}
    args = [x[n] for n in "qkvif"] + [tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"])]
    h, new = jax.jit(jax.vmap(tj.mlstm_step))(*args)
    step = jax.jit(tj.mlstm_step)
    for e in range(E):
        h_e, new_e = step(*jax.tree_util.tree_map(lambda t: t[e], args))
        # the step kernel's slab width follows B·NH (config.step_lanes): equal up to rounding
        assert rel_err(np.asarray(h[e]), np.asarray(h_e)) < FWD_TOL["bf16"]
        assert rel_err(np.asarray(new.C[e]), np.asarray(new_e.C)) < FWD_TOL["f32"]
        assert rel_err(np.asarray(new.m[e]), np.asarray(new_e.m)) < FWD_TOL["f32"]
