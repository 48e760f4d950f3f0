"""Special gate values on the CUDA kernels against the NumPy path (docs/math.md §1.2): masked tokens
(ĩ = −∞), kept state (f̃ = +∞), resets (f̃ = −∞), left padding, and a differential fuzz test.

The reference is the float64 chunkwise form on the same rounded inputs (gpu_utils.reference),
which follows the same log-gate floors as the kernels."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tfla_cupy
from gpu_utils import (BWD_TOL, DF_TOL, DTYPES, FWD_TOL, GATE_MODES, cp, gpu, make_inputs, poisoned_allocations,
                       reference, rel_err, seed_of, to_gpu)

pytestmark = gpu
INF = np.inf
B, NH, S, DK, DV, L = 2, 2, 200, 32, 64, 64


def _apply(case, i, f, rng):
    """Write the special values of `case` into the gate arrays (in place)."""
    if case == "i_first":
        i[..., 0] = -INF
    elif case == "i_last":
        i[..., -1] = -INF
    elif case == "i_boundary":
        i[..., L - 1:L + 1] = -INF
    elif case == "i_chunk":
        i[..., L:2 * L] = -INF
    elif case == "i_sequence":
        i[0, 1, :] = -INF
    elif case == "f_reset_first":
        f[..., 0] = -INF
    elif case == "f_reset_mid":
        f[..., 100] = -INF
    elif case == "f_reset_boundary":
        f[..., L] = -INF
    elif case == "reset_masked":
        f[..., 70] = -INF
        i[..., 70:80] = -INF
    elif case == "f_keep":
        f[..., 10:50] = INF
    elif case == "sprinkled":
        i[rng.random(i.shape) < 0.05] = -INF
        f[rng.random(f.shape) < 0.02] = -INF
        f[rng.random(f.shape) < 0.05] = INF
    else:
        raise AssertionError(case)


CASES = ["i_first", "i_last", "i_boundary", "i_chunk", "i_sequence", "f_reset_first", "f_reset_mid",
         "f_reset_boundary", "reset_masked", "f_keep", "sprinkled"]


def _check(errs, tols):
    bad = {k: (e, tols[k]) for k, e in errs.items() if not e <= tols[k]}
    assert not bad, f"errors above tolerance: {bad}"


@pytest.mark.parametrize("init", [False, True], ids=["noinit", "init"])
@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("mode", list(GATE_MODES))
@pytest.mark.parametrize("case", CASES)
def test_special_values_forward_backward(case, mode, dt, init):
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed_of("special", case, mode, dt, init))
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], init=init)
    _apply(case, host["i"], host["f"], rng)
    ref["i"], ref["f"] = host["i"].astype(np.float64), host["f"].astype(np.float64)
    dh = rng.standard_normal((B, NH, S, DV)).astype(DTYPES[dt])
    dC = rng.standard_normal((B, NH, DK, DV)).astype(np.float32)
    want = reference(ref, gate=gate, normalize=normalize, L=L, dh=dh.astype(np.float64),
                     dC_last=dC.astype(np.float64))
    x = to_gpu(host)
    state = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"]) if init else None
    with poisoned_allocations():
        h, last, ctx = tfla_cupy.mlstm_fwd(x["q"], x["k"], x["v"], x["i"], x["f"], gate=gate, normalize=normalize,
                                           initial_state=state, chunk_size=L)
        g = tfla_cupy.mlstm_bwd(ctx, cp.asarray(dh), tfla_cupy.MLSTMState(cp.asarray(dC)))
    errs = {"h": rel_err(h, want["h"]), "C": rel_err(last.C, want["C"])}
    tols = {"h": FWD_TOL[dt], "C": FWD_TOL[dt]}
    for name in ("dq", "dk", "dv", "di", "df"):
        errs[name] = rel_err(getattr(g, name), want[name])
        tols[name] = DF_TOL[dt] if name == "df" else BWD_TOL[dt]
    if init:
        errs["dC0"], tols["dC0"] = rel_err(g.d_initial_state.C, want["dC0"]), BWD_TOL[dt]
    _check(errs, tols)
    # the defined zeros: masked tokens get di = 0, resets df = 0 (exactly)
    di, df = cp.asnumpy(g.di), cp.asnumpy(g.df)
    assert np.all(di[np.isneginf(host["i"])] == 0.0)
    assert np.all(df[np.isneginf(host["f"])] == 0.0)


@pytest.mark.parametrize("mode", list(GATE_MODES))
@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_left_padding_equals_unpadded_call(mode, dt):
    gate, normalize = GATE_MODES[mode]
    pad = 37
    rng = np.random.default_rng(seed_of("leftpad", mode, dt))
    host, _ = make_inputs(rng, 2, NH, S + pad, DK, DV, DTYPES[dt])
    host["i"][1, :, :pad], host["f"][1, :, :pad] = -INF, INF
    x = to_gpu(host)
    h, last = tfla_cupy.mlstm(x["q"], x["k"], x["v"], x["i"], x["f"], gate=gate, normalize=normalize,
                              chunk_size=L, return_state=True)
    y = {n: a[1:, :, pad:] for n, a in x.items()}
    h0, last0 = tfla_cupy.mlstm(y["q"], y["k"], y["v"], y["i"], y["f"], gate=gate, normalize=normalize,
                                chunk_size=L, return_state=True)
    assert rel_err(h[1:, :, pad:], cp.asnumpy(h0).astype(np.float64)) <= FWD_TOL[dt]
    assert rel_err(last.C[1:], cp.asnumpy(last0.C).astype(np.float64)) <= FWD_TOL[dt]


@pytest.mark.parametrize("mode", list(GATE_MODES))
@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_reset_equals_separate_calls(mode, dt):
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed_of("reset", mode, dt))
    host, _ = make_inputs(rng, 1, NH, S, DK, DV, DTYPES[dt], init=True)
    at = 90
    host["f"][..., at] = -INF
    x = to_gpu(host)
    state = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"])
    h, last = tfla_cupy.mlstm(x["q"], x["k"], x["v"], x["i"], x["f"], gate=gate, normalize=normalize,
                              chunk_size=L, return_state=True, initial_state=state)
    y = {n: x[n][:, :, at:] for n in "qkvif"}
    h2, last2 = tfla_cupy.mlstm(y["q"], y["k"], y["v"], y["i"], y["f"], gate=gate, normalize=normalize,
                                chunk_size=L, return_state=True)
    assert rel_err(h[:, :, at:], cp.asnumpy(h2).astype(np.float64)) <= FWD_TOL[dt]
    assert rel_err(last.C, cp.asnumpy(last2.C).astype(np.float64)) <= FWD_TOL[dt]


@pytest.mark.parametrize("mode", list(GATE_MODES))
@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_step_with_special_values(mode, dt):
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed_of("step", mode, dt))
    T = 8
    host, ref = make_inputs(rng, 2, 3, T, 40, 136, DTYPES[dt], init=True)
    host["i"][:, :, 1] = -INF
    host["f"][:, :, 3] = -INF
    host["i"][0, :, 3] = -INF  # a masked reset
    host["f"][:, :, 5] = INF
    ref["i"], ref["f"] = host["i"].astype(np.float64), host["f"].astype(np.float64)
    x = to_gpu(host)
    state = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"])
    ref_state = tfla_cupy.MLSTMState(ref["C0"], ref["n0"], ref["m0"])
    for t in range(T):
        h, state = tfla_cupy.mlstm_step(*[x[n][:, :, t] for n in "qkvif"], state, gate=gate, normalize=normalize)
        h_ref, ref_state = tfla_cupy.mlstm_step(*[ref[n][:, :, t] for n in "qkvif"], ref_state, gate=gate,
                                                normalize=normalize)
        assert rel_err(h, h_ref) <= FWD_TOL[dt], t
        assert rel_err(state.C, ref_state.C) <= 1e-5, t


@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_undefined_values_stay_confined(mode):
    """NaN / ĩ = +∞: non-finite from the affected token on in that head only, as on the NumPy path."""
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed_of("nan", mode))
    host, ref = make_inputs(rng, 1, 3, S, DK, DV, np.float32)
    host["f"][0, 0, 77] = np.nan
    host["i"][0, 1, 150] = np.nan if gate == "sig" else INF
    ref["i"], ref["f"] = host["i"].astype(np.float64), host["f"].astype(np.float64)
    want = reference(ref, gate=gate, normalize=normalize, L=L)
    x = to_gpu(host)
    h, last = tfla_cupy.mlstm(x["q"], x["k"], x["v"], x["i"], x["f"], gate=gate, normalize=normalize,
                              chunk_size=L, return_state=True)
    h = cp.asnumpy(h)
    assert np.array_equal(np.isfinite(h), np.isfinite(want["h"]))
    assert rel_err(h[0, 2], want["h"][0, 2]) <= FWD_TOL["f32"]
    assert rel_err(h[0, 0, :77], want["h"][0, 0, :77]) <= FWD_TOL["f32"]
    assert rel_err(h[0, 1, :150], want["h"][0, 1, :150]) <= FWD_TOL["f32"]
    C = cp.asnumpy(last.C)
    assert not np.isfinite(C[0, :2]).any() and np.isfinite(C[0, 2]).all()


# ------------------------------------------------------------------------------------------
# Differential fuzz: random shapes, chunk sizes, variants, dtypes and sprinkled special values.
# ------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), nh=st.integers(1, 3), s=st.integers(1, 400), dk=st.sampled_from([16, 32, 48, 64]),
       dv=st.sampled_from([16, 64, 96]), chunk=st.sampled_from([16, 32, 64, 128, 256]),
       mode=st.sampled_from(list(GATE_MODES)), dt=st.sampled_from(["f32", "bf16", "f16"]),
       p_i=st.floats(0.0, 0.3), p_reset=st.floats(0.0, 0.1), p_keep=st.floats(0.0, 0.3),
       undefined=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_fuzz_gpu_against_numpy_path(b, nh, s, dk, dv, chunk, mode, dt, p_i, p_reset, p_keep, undefined, seed):
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed)
    host, ref = make_inputs(rng, b, nh, s, dk, dv, DTYPES[dt], init=bool(seed & 1))
    i, f = host["i"], host["f"]
    i[rng.random(i.shape) < p_i] = -INF
    f[rng.random(f.shape) < p_reset] = -INF
    f[rng.random(f.shape) < p_keep] = INF
    bad_head = None
    if undefined:  # one NaN in one (batch, head): the rest must be unaffected
        bad_head = (int(rng.integers(b)), int(rng.integers(nh)))
        f[bad_head + (int(rng.integers(s)),)] = np.nan
    ref["i"], ref["f"] = i.astype(np.float64), f.astype(np.float64)
    dh = rng.standard_normal((b, nh, s, dv)).astype(DTYPES[dt])
    want = reference(ref, gate=gate, normalize=normalize, L=chunk, dh=dh.astype(np.float64))
    x = to_gpu(host)
    state = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"]) if "C0" in x else None
    h, last, ctx = tfla_cupy.mlstm_fwd(x["q"], x["k"], x["v"], x["i"], x["f"], gate=gate, normalize=normalize,
                                       initial_state=state, chunk_size=chunk)
    g = tfla_cupy.mlstm_bwd(ctx, cp.asarray(dh))
    h = cp.asnumpy(h).astype(np.float64)
    assert np.array_equal(np.isfinite(h), np.isfinite(want["h"])), "non-finite pattern of h differs"
    keep = np.ones((b, nh), dtype=bool)
    if bad_head is not None:
        keep[bad_head] = False
        assert not np.isfinite(cp.asnumpy(last.C)[bad_head]).all()
    if not keep.any():  # the only head holds the undefined value: its non-finite pattern is all there is
        return
    errs = {"h": rel_err(h[keep], want["h"][keep]), "C": rel_err(cp.asnumpy(last.C)[keep], want["C"][keep])}
    tols = {"h": FWD_TOL[dt], "C": FWD_TOL[dt]}
    for name in ("dq", "dk", "dv", "di"):
        errs[name] = rel_err(cp.asnumpy(getattr(g, name))[keep], want[name][keep])
        tols[name] = BWD_TOL[dt]
    # df is a reverse sum of differences q·dq − k·dk: its rounding scales with those terms, and its
    # exact value can be ~0 (S = 1 without an initial state: no pair of tokens straddles the gate),
    # so its error is measured against max(|df|, |q·dq|, |k·dk|) of the reference
    terms = [np.abs(np.einsum("...tk,...tk->...t", ref[a], want[b]))[keep] for a, b in (("q", "dq"), ("k", "dk"))]
    df_ref = want["df"][keep]
    df_scale = max(np.max(np.abs(df_ref), initial=0.0), *(np.max(t, initial=0.0) for t in terms), 1e-30)
    df_out = cp.asnumpy(g.df).astype(np.float64)[keep]
    errs["df"] = np.inf if not np.isfinite(df_out).all() else float(np.max(np.abs(df_out - df_ref), initial=0.0) / df_scale)
    tols["df"] = DF_TOL[dt]
    _check(errs, tols)
