"""ε = 0 on the GPU: the denominator max(|n·q|, e^{−m}) + ε stays >= e^{−m} (exp) or 1 (sig),
so the kernels need no ε; forward, backward and the decode step against the float64 reference
with ε = 0, on both kernel families where they apply."""

import numpy as np
import pytest

import tfla_cupy
from gpu_utils import (BWD_TOL, DF_TOL, DTYPES, FWD_TOL, GATE_MODES, cp, gpu, make_inputs, poisoned_allocations,
                       reference, rel_err, seed_of, to_gpu)

pytestmark = gpu


@pytest.mark.parametrize("DK,DV", [(64, 128), (128, 256)])   # the sm80 family, and the sm90 kernels on Hopper
@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_eps_zero_forward_backward(mode, dt, DK, DV):
    gate, normalize = GATE_MODES[mode]
    B, NH, S, L = 1, 2, 300, 128
    rng = np.random.default_rng(seed_of("eps0", mode, dt, DK))
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], init=True)
    dh = rng.standard_normal((B, NH, S, DV)).astype(DTYPES[dt])
    want = reference(ref, gate=gate, normalize=normalize, L=L, eps=0.0, dh=dh.astype(np.float64))
    x = to_gpu(host)
    state = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"])
    with poisoned_allocations():
        h, last, ctx = tfla_cupy.mlstm_fwd(x["q"], x["k"], x["v"], x["i"], x["f"], gate=gate, normalize=normalize,
                                           initial_state=state, chunk_size=L, eps=0.0)
        g = tfla_cupy.mlstm_bwd(ctx, cp.asarray(dh))
    assert rel_err(h, want["h"]) < FWD_TOL[dt]
    for name in ("dq", "dk", "dv"):
        assert rel_err(getattr(g, name), want[name]) < BWD_TOL[dt], name
    for name in ("di", "df"):
        assert rel_err(getattr(g, name), want[name]) < DF_TOL[dt], name


@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_eps_zero_step(mode):
    gate, normalize = GATE_MODES[mode]
    B, NH, DK, DV = 3, 2, 64, 128
    rng = np.random.default_rng(seed_of("eps0-step", mode))
    host, ref = make_inputs(rng, B, NH, 1, DK, DV, np.float32, init=True)
    tok = {n: host[n][:, :, 0] for n in "qkvif"}
    st = tfla_cupy.MLSTMState(*(cp.asarray(host[n]) for n in ("C0", "n0", "m0")))
    h, _ = tfla_cupy.mlstm_step(*(cp.asarray(tok[n]) for n in "qkvif"), st, gate=gate, normalize=normalize, eps=0)
    want, _ = tfla_cupy.mlstm_step(*(tok[n].astype(np.float64) for n in "qkvif"),
                                   tuple(ref[n] for n in ("C0", "n0", "m0")), gate=gate, normalize=normalize, eps=0)
    assert rel_err(h, want) < FWD_TOL["f32"]
