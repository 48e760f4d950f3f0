"""CUDA forward (fwd_states + fwd_h) against the float64 reference on the same rounded inputs."""

import numpy as np
import pytest

import tfla_cupy
from gpu_utils import (DTYPES, FWD_TOL, GATE_MODES, case_id, cp, gpu, make_inputs, poisoned_allocations,
                       reference, rel_err, seed_of, to_gpu)

pytestmark = gpu


def _cases():
    out = []
    # every dtype × gate mode on three shapes (ragged, long ragged with strong forgetting, tiny)
    for dt in DTYPES:
        for mode in GATE_MODES:
            out.append((1, 2, 100, 48, 96, 64, mode, dt, 3.0, None, True))
            out.append((1, 2, 1000, 64, 128, 128, mode, dt, -2.0, None, False))
            out.append((2, 1, 7, 16, 16, 16, mode, dt, 3.0, None, True))
    # sequence lengths
    for S in (1, 7, 64, 100, 128, 1000, 4109):
        for dt in ("f32", "bf16"):
            out.append((1, 1, S, 64, 128, 64, "exp", dt, 3.0, None, S % 2 == 1))
    # chunk sizes, both forgetting regimes (anchored in-chunk sums keep fp32 at 1e-5 for L = 512)
    for L in (16, 64, 128, 256, 512):
        for dt, mode, fm in (("f32", "exp", -2.0), ("bf16", "sig", 3.0), ("f16", "exp", 3.0)):
            out.append((1, 1, 1000, 64, 128, L, mode, dt, fm, None, True))
    # head dims, including DK > 128 (contraction streamed in blocks) and DV > 128
    for DK, DV in ((16, 16), (48, 96), (64, 128), (128, 256), (256, 512)):
        for dt in ("f32", "bf16"):
            out.append((1, 1, 300, DK, DV, 128, "exp", dt, 3.0, None, True))
    # extreme input gates
    for mode in GATE_MODES:
        out.append((1, 2, 500, 32, 64, 128, mode, "f32", 0.0, (-30.0, 30.0), True))
    return [pytest.param(*c, id=case_id(*c[:8], f"f{c[8]:+g}", "i30" if c[9] else "in", "init" if c[10] else "noinit"))
            for c in out]


# ĩ ∈ [−30, 30] makes the normalizer ill-conditioned (one key dominates and |q·k| can be near 0):
# evaluating the float64 reference itself in float32 is off by 4e-5 .. 2e-3 on such inputs
# (5e-6 with ĩ ~ N(0, 1); measured on 8 seeds). The kernel's double-precision gate sums keep true
# fp32 at 3e-5 .. 5e-5 there (H100, 2026-11-25), so that case is held to 2e-4, not 1e-5.
EXTREME_GATE_TOL = {"f32": 2e-4}


@pytest.mark.parametrize("B,NH,S,DK,DV,L,mode,dt,f_mean,i_range,init", _cases())
def test_forward_matches_reference(B, NH, S, DK, DV, L, mode, dt, f_mean, i_range, init):
    rng = np.random.default_rng(seed_of(B, NH, S, DK, DV, L, mode, dt, f_mean, init))
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], f_mean=f_mean, i_range=i_range, init=init)
    want = reference(ref, gate=gate, normalize=normalize, L=L)
    x = to_gpu(host)
    state = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"]) if init else None
    with poisoned_allocations():
        h, last = tfla_cupy.mlstm(x["q"], x["k"], x["v"], x["i"], x["f"], gate=gate, normalize=normalize,
                                  initial_state=state, return_state=True, chunk_size=L,
                                  precision="tf32" if dt == "tf32" else "default")
    assert h.dtype == DTYPES[dt] and last.C.dtype == np.float32
    tol = EXTREME_GATE_TOL.get(dt, FWD_TOL[dt]) if i_range else FWD_TOL[dt]
    errs = {"h": rel_err(h, want["h"]), "C": rel_err(last.C, want["C"])}
    if normalize:
        errs["n"] = rel_err(last.n, want["n"])
    else:
        assert last.n is None
    if gate == "exp":
        errs["m"] = rel_err(last.m, want["m"])
    else:
        assert last.m is None
    assert all(e <= tol for e in errs.values()), f"errors {errs} above {tol}"


def test_kept_states_and_normalizer_match_reference():
    """The intermediate stages: boundary states C^(c), m^(c) and the per-step N, M."""
    rng = np.random.default_rng(7)
    host, ref = make_inputs(rng, 1, 2, 333, 32, 64, np.float32, init=True)
    want = reference(ref, gate="exp", normalize=True, L=64)
    x = to_gpu(host)
    with poisoned_allocations():
        h, _, ctx = tfla_cupy.mlstm_fwd(x["q"], x["k"], x["v"], x["i"], x["f"], chunk_size=64, keep_states=True,
                                        initial_state=tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"]))
    s = ctx.saved
    NC = -(-333 // 64)
    assert rel_err(s["C_states"].reshape(1, 2, NC, 32, 64), want["C_states"][..., :NC, :, :]) <= 1e-5
    assert rel_err(s["m_states"].reshape(1, 2, NC + 1), want["m_states"]) <= 1e-5
    assert rel_err(s["N"], want["N"]) <= 1e-5
    assert rel_err(s["M"], want["M"]) <= 1e-5


def test_bfloat16_gates_and_noncontiguous_inputs():
    """Gates in bf16 are read as fp32 (one conversion); a transposed (non-contiguous) q view is
    read through its strides."""
    rng = np.random.default_rng(3)
    host, ref = make_inputs(rng, 1, 2, 200, 64, 64, DTYPES["bf16"])
    i_bf, f_bf = host["i"].astype(DTYPES["bf16"]), host["f"].astype(DTYPES["bf16"])
    ref["i"], ref["f"] = i_bf.astype(np.float64), f_bf.astype(np.float64)
    want = reference(ref, gate="exp", normalize=True, L=64)
    q_t = cp.asarray(np.ascontiguousarray(np.swapaxes(host["q"], 1, 2))).swapaxes(1, 2)  # strided view
    assert not q_t.flags.c_contiguous
    h = tfla_cupy.mlstm(q_t, cp.asarray(host["k"]), cp.asarray(host["v"]), cp.asarray(i_bf), cp.asarray(f_bf),
                        chunk_size=64)
    assert rel_err(h, want["h"]) <= FWD_TOL["bf16"]


@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_step_matches_reference(mode):
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(11)
    host, ref = make_inputs(rng, 2, 3, 5, 40, 136, np.float32, init=True)
    x = to_gpu(host)
    state = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"])
    ref_state = tfla_cupy.MLSTMState(ref["C0"], ref["n0"], ref["m0"])
    for t in range(5):
        args = [x[n][:, :, t] for n in "qkvif"]
        with poisoned_allocations():
            h, state = tfla_cupy.mlstm_step(*args, state, gate=gate, normalize=normalize)
        h_ref, ref_state = tfla_cupy.mlstm_step(*[ref[n][:, :, t] for n in "qkvif"], ref_state, gate=gate,
                                                normalize=normalize)
        assert rel_err(h, h_ref) <= 1e-5
        assert rel_err(state.C, ref_state.C) <= 1e-5
        if normalize:
            assert rel_err(state.n, ref_state.n) <= 1e-5
        if gate == "exp":
            assert rel_err(state.m, ref_state.m) <= 1e-5
