"""The Hopper backward kernels (cuda_src/bwd_chunks_sm90.cuh: dq, dk, dv on warpgroup MMA;
bwd_dstates_sm90.cuh: the reverse dC pass, by bulk tensor copies or, without tensor maps,
cp.async) against the float64 reference, at head dims the fused forward does not take (its forward is then
the sm80 family's, "auto" choosing per stage): every gate variant, bf16 and f16, DK and DV from
64 to 512, ragged chunks (rows past the end of a half chunk, a chunk shorter than half), initial
states, packed sequences, the (B, S, NH, D) layout, masked tokens; which kernels the backward
launches; bit-identical repeats; compute-sanitizer on ragged cases. The fused-forward tests
(test_gpu_fused.py, family forced to "sm90") run this backward too, at DK = 128.
Runs on compute capability 9.0 only."""

import textwrap

import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import _tma, config
from gpu_utils import (DTYPES, GATE_MODES, cp, gpu, launched_kernels, make_inputs, run_sanitized,
                       seed_of)
from test_gpu_varlen_layout import _assert_within, _errors, _lengths, _run, _same_bits

pytestmark = gpu

L = config.BWD_SM90_L
SM90 = "bwd_chunk_sm90_kernel"
DSTATES_SM90, DSTATES_SM80 = "bwd_dstates_sm90_kernel", "bwd_dstates_kernel"


@pytest.fixture
def hopper(monkeypatch):
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("needs compute capability 9.0 (the sm90 family)")
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)  # "auto": the backward takes sm90 wherever it covers


def _cases():
    out = []
    for dt in ("bf16", "f16"):
        for mode in GATE_MODES:
            out.append((1, 2, 300, 64, 192, mode, dt, 3.0, True, True))     # ragged (44 rows), states in and out
            out.append((2, 1, 1000, 256, 64, mode, dt, -2.0, False, False))  # strong forgetting, DK 256
        out.append((1, 1, 1, 64, 64, "exp", dt, 3.0, True, False))          # one token
        out.append((1, 1, 192, 64, 128, "exp", dt, 3.0, False, True))       # last chunk exactly half
        out.append((1, 1, 160, 192, 512, "exp", dt, 0.0, True, True))       # DV 512, 32-row ragged chunk
    return [pytest.param(*c, id=f"B{c[0]}-NH{c[1]}-S{c[2]}-DK{c[3]}-DV{c[4]}-{c[5]}-{c[6]}-f{c[7]:+g}-"
                              f"{'init' if c[8] else 'noinit'}-{'dlast' if c[9] else 'nodlast'}") for c in out]


@pytest.mark.parametrize("B,NH,S,DK,DV,mode,dt,f_mean,init,d_last", _cases())
def test_hopper_backward_matches_reference(hopper, monkeypatch, B, NH, S, DK, DV, mode, dt, f_mean, init, d_last):
    rng = np.random.default_rng(seed_of("bwd-sm90", B, NH, S, DK, DV, mode, dt, f_mean, init, d_last))
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], f_mean=f_mean)
    box = {}
    names = launched_kernels(monkeypatch, lambda: box.update(r=_run(
        host, ref, gate=gate, normalize=normalize, L=L, dt=dt, cu=None, init=init, d_last=d_last,
        seed=seed_of("bwd-sm90-run", S, mode))))
    assert sum(SM90 in n for n in names) == 3 and not any("bwd_dq_kernel" in n for n in names), names
    assert sum(DSTATES_SM90 in n and n.endswith("true>") for n in names) == 1, names  # bulk tensor copies
    assert not any(DSTATES_SM80 in n for n in names), names
    got, want = box["r"]
    _assert_within(_errors(got, want, init=init), dt)


@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_hopper_backward_varlen_matches_per_sequence_reference(hopper, mode):
    rng = np.random.default_rng(seed_of("bwd-sm90-varlen", mode))
    cu = np.concatenate([[0], np.cumsum(_lengths(rng, "mixed", L))])
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, 1, 2, int(cu[-1]), 64, 128, DTYPES["bf16"])
    got, want = _run(host, ref, gate=gate, normalize=normalize, L=L, dt="bf16", cu=cu, init=True, d_last=True,
                     seed=seed_of("bwd-sm90-varlen-run", mode))
    _assert_within(_errors(got, want, init=True), "bf16")


@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_hopper_dstates_without_tensor_maps_matches_reference(hopper, monkeypatch, mode):
    """Where q and dh take no tensor maps (here: cuda-bindings reported missing) the reverse dC pass
    reads its tiles by cp.async; packed sequences with ragged ends, initial states and d_state."""
    monkeypatch.setattr(_tma, "unavailable", lambda: "it needs NVIDIA's cuda-bindings package")
    rng = np.random.default_rng(seed_of("bwd-sm90-no-maps", mode))
    cu = np.concatenate([[0], np.cumsum(_lengths(rng, "mixed", L))])
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, 1, 2, int(cu[-1]), 128, 128, DTYPES["bf16"])
    box = {}
    names = launched_kernels(monkeypatch, lambda: box.update(r=_run(
        host, ref, gate=gate, normalize=normalize, L=L, dt="bf16", cu=cu, init=True, d_last=True,
        seed=seed_of("bwd-sm90-no-maps-run", mode))))
    assert sum(DSTATES_SM90 in n and n.endswith("false>") for n in names) == 1, names
    got, want = box["r"]
    _assert_within(_errors(got, want, init=True), "bf16")


def test_hopper_backward_bshd_and_kept_states(hopper):
    rng = np.random.default_rng(seed_of("bwd-sm90-bshd"))
    host, ref = make_inputs(rng, 2, 2, 500, 64, 128, DTYPES["bf16"])
    got, want = _run(host, ref, gate="exp", normalize=True, L=L, dt="bf16", cu=None, init=True, d_last=True,
                     layout="bshd", keep_states=True)
    _assert_within(_errors(got, want, init=True), "bf16")


def test_hopper_backward_masked_tokens_are_finite_and_match_reference(hopper):
    """ĩ = −∞ (token writes nothing) and f̃ = −∞ (reset) inside chunks, at half-chunk and chunk edges."""
    rng = np.random.default_rng(seed_of("bwd-sm90-masked"))
    host, ref = make_inputs(rng, 1, 2, 700, 64, 64, DTYPES["bf16"])
    for name, cols in (("i", [0, 5, 63, 64, 127, 128, 129, 400, 699]), ("f", [3, 64, 255, 256, 500])):
        host[name][..., cols] = -np.inf
        ref[name][..., cols] = -np.inf
    got, want = _run(host, ref, gate="exp", normalize=True, L=L, dt="bf16", cu=None, init=True, d_last=True)
    g = got[2]
    for name in ("dq", "dk", "dv", "di", "df"):
        assert bool(cp.isfinite(getattr(g, name)).all()), name
    _assert_within(_errors(got, want, init=True), "bf16")


def test_hopper_backward_is_bit_identical_on_repeat(hopper):
    rng = np.random.default_rng(seed_of("bwd-sm90-det"))
    host, _ = make_inputs(rng, 1, 4, 1000, 128, 256, DTYPES["bf16"])
    x = {n: cp.asarray(host[n]) for n in "qkvif"}
    dh = cp.asarray(rng.standard_normal((1, 4, 1000, 256)).astype(DTYPES["bf16"]))
    _, _, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), chunk_size=L)
    g1, g2 = (tfla_cupy.mlstm_bwd(ctx, dh) for _ in range(2))
    for name in ("dq", "dk", "dv", "di", "df"):
        assert _same_bits(getattr(g1, name), getattr(g2, name)), name


def test_backward_family_choice(hopper, monkeypatch):
    """auto: sm90 where covered (16-bit, L = 128, DK and DV multiples of 64), sm80 otherwise;
    TFLA_CUPY_FAMILY=sm80 forces the sm80 kernels."""
    rng = np.random.default_rng(2)

    def backward(DK, DV, L_, dtype="bf16"):
        host, _ = make_inputs(rng, 1, 2, 200, DK, DV, DTYPES[dtype])
        x = {n: cp.asarray(host[n]) for n in "qkvif"}
        _, _, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), chunk_size=L_)
        dh = cp.asarray(rng.standard_normal((1, 2, 200, DV)).astype(DTYPES[dtype]))
        return lambda: tfla_cupy.mlstm_bwd(ctx, dh)

    def families(call):
        names = launched_kernels(monkeypatch, call)
        hopper_ = any(SM90 in n for n in names)
        assert any(DSTATES_SM90 in n for n in names) == hopper_ != any(DSTATES_SM80 in n for n in names), names
        return hopper_, any("bwd_dq_kernel" in n for n in names)

    assert families(backward(64, 128, L)) == (True, False)
    assert families(backward(64, 128, 64)) == (False, True)     # chunk size 64
    assert families(backward(64, 96, L)) == (False, True)       # DV not a multiple of 64
    assert families(backward(64, 128, L, "f32")) == (False, True)
    monkeypatch.setenv(config.FAMILY_ENV, "sm80")
    assert families(backward(64, 128, L)) == (False, True)


_SANITIZED = textwrap.dedent("""
    import ml_dtypes, numpy as np, cupy as cp, tfla_cupy
    rng = np.random.default_rng(0)
    bf = ml_dtypes.bfloat16
    def inputs(S, DK, DV):
        q = cp.asarray(rng.standard_normal((1, 1, S, DK)).astype(bf))
        k = cp.asarray(rng.standard_normal((1, 1, S, DK)).astype(bf))
        v = cp.asarray(rng.standard_normal((1, 1, S, DV)).astype(bf))
        i = cp.asarray(rng.standard_normal((1, 1, S)).astype(np.float32))
        f = cp.asarray((3 + rng.standard_normal((1, 1, S))).astype(np.float32))
        return q, k, v, i, f
    # ragged: 72 rows (the second half chunk has 8) and 40 rows (no second half); the second case
    # with an initial state and a last-state gradient (the reverse dC pass reads dC_last, writes dC0)
    for S, DK, DV, init in ((200, 128, 64, False), (168, 64, 128, True)):
        x = inputs(S, DK, DV)
        for gate, norm in (("exp", True), ("sig", False)):
            C0 = cp.asarray(rng.standard_normal((1, 1, DK, DV)).astype(np.float32)) if init else None
            st = None if C0 is None else (C0, cp.zeros((1, 1, DK), np.float32), cp.zeros((1, 1), np.float32))
            h, last, ctx = tfla_cupy.mlstm_fwd(*x, gate=gate, normalize=norm, chunk_size=128, initial_state=st)
            dC = cp.asarray(rng.standard_normal((1, 1, DK, DV)).astype(np.float32)) if init else None
            g = tfla_cupy.mlstm_bwd(ctx, cp.asarray(rng.standard_normal(h.shape).astype(bf)),
                                    None if dC is None else (dC, None, None))
    # the reverse dC pass by cp.async (no tensor maps)
    from tfla_cupy import _tma
    _tma.unavailable = lambda: "no tensor maps"
    g = tfla_cupy.mlstm_bwd(ctx, cp.asarray(rng.standard_normal(h.shape).astype(bf)), (dC, None, None))
    cp.cuda.Device().synchronize()
    print("SANITIZED-RUN-OK")
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_hopper_backward(hopper, tmp_path, tool):
    run_sanitized(tool, _SANITIZED, tmp_path)  # asserts the clean summary
