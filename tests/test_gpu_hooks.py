"""The internal hooks the framework adapters use: the GPU forward, backward and step write into
preallocated outputs (the adapters' own buffers), bit-identical to the allocating calls, and a
context rebuilt from kept N, M, C_last gives the same gradients."""

import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import MLSTMState
from tfla_cupy import _gpu, _validate
from gpu_utils import DTYPES, GATE_MODES, cp, gpu, make_inputs, seed_of

pytestmark = gpu


@pytest.mark.parametrize("mode", list(GATE_MODES))
@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_preallocated_outputs(mode, dt):
    gate, normalize = GATE_MODES[mode]
    B, NH, S, DK, DV, L = 1, 2, 150, 32, 64, 64
    rng = np.random.default_rng(seed_of("hooks", mode, dt))
    host, _ = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], init=True)
    x = {n: cp.asarray(a) for n, a in host.items()}
    st = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"])
    dh = cp.asarray(rng.standard_normal((B, NH, S, DV)).astype(DTYPES[dt]))
    dC = cp.asarray(rng.standard_normal((B, NH, DK, DV)).astype(np.float32))
    problem, arrays, state = _validate.inputs(*(x[n] for n in "qkvif"), gate=gate, normalize=normalize, eps=1e-6,
                                              scale=None, chunk_size=L, initial_state=st)
    h0, last0, ctx0 = _gpu.forward(problem, arrays, state)
    g0 = _gpu.backward(ctx0, dh, dC)

    f32 = np.float32
    out = dict(h=cp.empty((B, NH, S, DV), DTYPES[dt]), C_last=cp.full((B, NH, DK, DV), np.nan, f32))
    if problem.has_n:
        out.update(N=cp.full((B, NH, S), np.nan, f32), n_last=cp.full((B, NH, DK), np.nan, f32))
    if problem.has_m:
        out.update(M=cp.full((B, NH, S), np.nan, f32), m_last=cp.full((B, NH), np.nan, f32))
    h1, last1, _ = _gpu.forward(problem, arrays, state, out=out, copy_saved=False)
    assert h1 is out["h"] and last1.C is out["C_last"]
    assert cp.array_equal(h1, h0) and cp.array_equal(last1.C, last0.C)
    for name in ("n", "m"):
        if getattr(last0, name) is not None:
            assert cp.array_equal(getattr(last1, name), getattr(last0, name))

    ctx = _gpu.context(problem, arrays, state, out.get("N"), out.get("M"), out["C_last"])
    gout = dict(dq=cp.full_like(x["q"], 0), dk=cp.full_like(x["k"], 0), dv=cp.full_like(x["v"], 0),
                di=cp.full((B, NH, S), np.nan, f32), df=cp.full((B, NH, S), np.nan, f32),
                dC0=cp.full((B, NH, DK, DV), np.nan, f32))
    g1 = _gpu.backward(ctx, dh, dC, out=gout)
    for name, a, b in zip(("dq", "dk", "dv", "di", "df"), g1[:5], g0[:5]):
        assert a is gout[name], name
        assert cp.array_equal(a, b), name
    assert cp.array_equal(g1.d_initial_state.C, g0.d_initial_state.C)

    sx = {n: x[n][:, :, 0] for n in "qkvif"}
    sp, sarr, sst, _, _ = _validate.step_inputs(*(sx[n] for n in "qkvif"), st, gate=gate, normalize=normalize,
                                                eps=1e-6, scale=None)
    hs0, ss0 = _gpu.step(sp, sarr, sst)
    h_out = cp.empty_like(hs0)
    s_out = MLSTMState(cp.empty_like(ss0.C), None if ss0.n is None else cp.empty_like(ss0.n),
                       None if ss0.m is None else cp.empty_like(ss0.m))
    hs1, ss1 = _gpu.step(sp, sarr, sst, s_out, h_out=h_out)
    assert hs1 is h_out and ss1.C is s_out.C
    assert cp.array_equal(hs1, hs0) and cp.array_equal(ss1.C, ss0.C)
