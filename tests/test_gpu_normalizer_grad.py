"""GPU path: normalizer_grad=True against the float64 NumPy normalizer_grad on the same rounded
inputs, the DV limit of the augmented column, and that an in-place edit of the inputs after the
forward does not change the gradients (the context holds private copies)."""

import numpy as np
import pytest

import tfla_cupy
from gpu_utils import BWD_TOL, DF_TOL, DTYPES, GATE_MODES, cp, gpu, make_inputs, rel_err, seed_of

pytestmark = gpu


def _both(host, ref, *, gate, normalize, L, dt, init, rng):
    B, NH, S, DV = host["v"].shape
    DK = host["q"].shape[-1]
    dh = rng.standard_normal((B, NH, S, DV)).astype(DTYPES[dt])
    dC = rng.standard_normal((B, NH, DK, DV)).astype(np.float32)
    dn = rng.standard_normal((B, NH, DK)).astype(np.float32)
    opts = dict(gate=gate, normalize=normalize, chunk_size=L, normalizer_grad=True)
    st_ref = tfla_cupy.MLSTMState(ref["C0"], ref["n0"], ref["m0"]) if init else None
    h_ref, last_ref, ctx_ref = tfla_cupy.mlstm_fwd(*(ref[n] for n in "qkvif"), initial_state=st_ref, **opts)
    g_ref = tfla_cupy.mlstm_bwd(ctx_ref, dh.astype(np.float64), (dC.astype(np.float64), dn.astype(np.float64), None))
    x = {n: cp.asarray(a) for n, a in host.items()}
    st = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"]) if init else None
    h, last, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), initial_state=st, **opts)
    g = tfla_cupy.mlstm_bwd(ctx, cp.asarray(dh), (cp.asarray(dC), cp.asarray(dn), None))
    return (h, last, g), (h_ref, last_ref, g_ref)


CASES = [(1, 2, 300, 64, 64, 64, mode, dt, init) for mode in ("exp", "sig") for dt in ("f32", "bf16")
         for init in (False, True)] + [(2, 1, 37, 16, 24, 16, "exp", "f16", True), (1, 1, 200, 32, 1016, 64, "sig", "bf16", True)]


@pytest.mark.parametrize("B,NH,S,DK,DV,L,mode,dt,init", CASES)
def test_normalizer_grad_matches_reference(B, NH, S, DK, DV, L, mode, dt, init):
    rng = np.random.default_rng(seed_of("normgrad", B, NH, S, DK, DV, L, mode, dt, init))
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], f_mean=1.0, init=init)
    (h, last, g), (h_ref, last_ref, g_ref) = _both(host, ref, gate=gate, normalize=normalize, L=L, dt=dt,
                                                   init=init, rng=rng)
    assert h.shape == h_ref.shape and h.flags.c_contiguous
    assert rel_err(h, h_ref) < BWD_TOL[dt]
    assert rel_err(last.C, last_ref.C) < BWD_TOL[dt] and rel_err(last.n, last_ref.n) < BWD_TOL[dt]
    for name in ("dq", "dk", "dv", "di"):
        assert rel_err(getattr(g, name), getattr(g_ref, name)) < BWD_TOL[dt], name
    assert rel_err(g.df, g_ref.df) < DF_TOL[dt]
    if init:
        assert rel_err(g.d_initial_state.C, g_ref.d_initial_state.C) < BWD_TOL[dt]
        assert rel_err(g.d_initial_state.n, g_ref.d_initial_state.n) < BWD_TOL[dt]
        assert float(cp.abs(g.d_initial_state.n).max()) > 0


def test_normalizer_grad_dv_limit():
    x = {n: cp.zeros(s, cp.float32) for n, s in (("q", (1, 1, 16, 8)), ("k", (1, 1, 16, 8)), ("v", (1, 1, 16, 1024)),
                                                  ("i", (1, 1, 16)), ("f", (1, 1, 16)))}
    with pytest.raises(ValueError, match=r"v: normalizer_grad=True on the GPU path needs DV \+ 8 <= 1024"):
        tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), normalizer_grad=True)


@pytest.mark.parametrize("normalizer_grad", [False, True])
@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_in_place_edit_after_forward_does_not_change_gradients(dt, normalizer_grad):
    rng = np.random.default_rng(seed_of("alias", dt, normalizer_grad))
    host, _ = make_inputs(rng, 1, 2, 200, 32, 64, DTYPES[dt], init=True)
    dh = cp.asarray(rng.standard_normal((1, 2, 200, 64)).astype(DTYPES[dt]))
    dC = cp.asarray(rng.standard_normal((1, 2, 32, 64)).astype(np.float32))
    names = ("q", "k", "v", "i", "f", "C0", "n0", "m0")

    def run(edit):
        x = {n: cp.asarray(host[n]) for n in names}   # fresh device arrays, C-contiguous, kernel dtypes
        st = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"])
        _, _, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), initial_state=st, chunk_size=64,
                                        normalizer_grad=normalizer_grad, copy_inputs=True)
        if edit:   # overwrite every input's bytes (0x3F..: finite in every dtype), stream-ordered
            for a in x.values():
                cp.cuda.runtime.memsetAsync(a.data.ptr, 0x3F, a.nbytes, cp.cuda.get_current_stream().ptr)
        return tfla_cupy.mlstm_bwd(ctx, dh, (dC, None, None))

    want, got = run(False), run(True)
    for a, b in zip(want[:5], got[:5]):
        assert cp.array_equal(a, b)
    assert cp.array_equal(want.d_initial_state.C, got.d_initial_state.C)


@pytest.mark.parametrize("L", [64, 128])
def test_stabilizer_gradient_at_large_eps(L):
    """ε = 1e-3 and a stabilizer well above 0 (input gates around 3, initial m around 3): the ε·e^{M}
    term through the running maximum (§6.6) moves di and df far beyond the fp32 tolerance, and the
    GPU path's di, df and d_initial_state.m match the float64 NumPy path's; S = 300 is ragged."""
    rng = np.random.default_rng(seed_of("normgrad-eps", L))
    B, NH, S, DK, DV = 1, 2, 300, 64, 64
    host, _ = make_inputs(rng, B, NH, S, DK, DV, np.float32, f_mean=1.0, init=True)
    host["i"] += np.float32(3.0)
    host["m0"] += np.float32(3.0)
    host["q"] *= np.float32(0.1)
    host["i"][..., 0] = -5.0    # the first token attains no maximum: the m-gradient reaches m_0
    ref = {n: a.astype(np.float64) for n, a in host.items()}
    dh = rng.standard_normal((B, NH, S, DV)).astype(np.float32)
    opts = dict(chunk_size=L, eps=1e-3, normalizer_grad=True)
    st_ref = tfla_cupy.MLSTMState(ref["C0"], ref["n0"], ref["m0"])
    _, _, ctx_ref = tfla_cupy.mlstm_fwd(*(ref[n] for n in "qkvif"), initial_state=st_ref, **opts)
    g_ref = tfla_cupy.mlstm_bwd(ctx_ref, dh.astype(np.float64))
    x = {n: cp.asarray(a) for n, a in host.items()}
    _, _, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), initial_state=tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"]),
                                    **opts)
    g = tfla_cupy.mlstm_bwd(ctx, cp.asarray(dh))
    # the part that flows through the stabilizers, from the NumPy path itself
    from tfla_cupy import _normgrad
    s = ctx_ref.saved
    e = -(dh * s["h"][..., :DV]).sum(-1) * 1e-3 / s["hN"]
    ddi, ddf, dm0 = _normgrad.stabilizer_grads(np, ref["i"], ref["f"], ref["m0"], e)
    assert rel_err(ddf, np.zeros_like(ddf)) > 0 and np.max(np.abs(ddf)) > 10 * DF_TOL["f32"] * np.max(np.abs(g_ref.df))
    assert rel_err(g.di, g_ref.di) < BWD_TOL["f32"]
    assert rel_err(g.df, g_ref.df) < DF_TOL["f32"]
    assert rel_err(g.d_initial_state.m, g_ref.d_initial_state.m) < BWD_TOL["f32"]
    assert np.max(np.abs(g_ref.d_initial_state.m)) > 0 and rel_err(g_ref.d_initial_state.m, dm0) < 1e-12
