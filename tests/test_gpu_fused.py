"""The Hopper forward (cuda_src/fwd_fused_sm90.cuh, family "sm90") against the float64 reference,
forward and the backward that consumes its N, M and last state: every gate variant, bf16 and
f16, ragged chunks, initial states, packed sequences, the (B, S, NH, D) layout, masked tokens;
the family choice and its override; determinism; compute-sanitizer on a ragged case.
Runs on compute capability 9.0 only (the sm80 family is what every other GPU test covers)."""

import textwrap

import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import _loader, config
from gpu_utils import (DTYPES, GATE_MODES, cp, gpu, launched_kernels, make_inputs, run_sanitized,
                       seed_of)
from test_gpu_varlen_layout import (_assert_within, _errors, _masked_tokens_match_reference,
                                    _packed_call_matches_reference, _run, _same_bits)

pytestmark = gpu

L = config.FUSED_L
DK = config.FUSED_DK


@pytest.fixture
def hopper(monkeypatch):
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("needs compute capability 9.0 (the sm90 family)")
    monkeypatch.setenv(config.FAMILY_ENV, "sm90")  # forced: a call it cannot cover is an error, not a fallback


def _cases():
    out = []
    for dt in ("bf16", "f16"):
        for mode in GATE_MODES:
            out.append((1, 2, 300, 64, mode, dt, 3.0, True, True))     # ragged last chunk, states in and out
            out.append((2, 1, 1000, 192, mode, dt, -2.0, False, False))  # strong forgetting, 3 DV blocks
        out.append((1, 1, 1, 64, "exp", dt, 3.0, True, False))         # one token
        out.append((1, 1, 128, 128, "exp", dt, 3.0, False, True))      # exactly one chunk
        out.append((1, 1, 4109, 64, "exp", dt, 3.0, True, True))       # many chunks, ragged
    return [pytest.param(*c, id=f"B{c[0]}-NH{c[1]}-S{c[2]}-DV{c[3]}-{c[4]}-{c[5]}-f{c[6]:+g}-"
                              f"{'init' if c[7] else 'noinit'}-{'dlast' if c[8] else 'nodlast'}") for c in out]


@pytest.mark.parametrize("B,NH,S,DV,mode,dt,f_mean,init,d_last", _cases())
def test_fused_forward_and_backward_match_reference(hopper, B, NH, S, DV, mode, dt, f_mean, init, d_last):
    rng = np.random.default_rng(seed_of("fused", B, NH, S, DV, mode, dt, f_mean, init, d_last))
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], f_mean=f_mean)
    got, want = _run(host, ref, gate=gate, normalize=normalize, L=L, dt=dt, cu=None, init=init, d_last=d_last,
                     seed=seed_of("fused-run", S, mode))
    _assert_within(_errors(got, want, init=init), dt)


@pytest.mark.parametrize("kind", ["mixed", "main"])
@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_fused_varlen_matches_per_sequence_reference(hopper, kind, mode):
    _packed_call_matches_reference("fused-varlen", kind, mode, 1, 128, L)


def test_fused_bshd_and_kept_states(hopper):
    rng = np.random.default_rng(seed_of("fused-bshd"))
    host, ref = make_inputs(rng, 2, 2, 500, DK, 128, DTYPES["bf16"])
    got, want = _run(host, ref, gate="exp", normalize=True, L=L, dt="bf16", cu=None, init=True, d_last=True,
                     layout="bshd", keep_states=True)
    _assert_within(_errors(got, want, init=True), "bf16")


def test_fused_masked_tokens_are_finite_and_match_reference(hopper):
    """ĩ = −∞ (token writes nothing) and f̃ = −∞ (reset) inside chunks and at chunk edges."""
    _masked_tokens_match_reference(seed_of("fused-masked"), 64, L)


def test_fused_forward_is_deterministic(hopper):
    rng = np.random.default_rng(seed_of("fused-det"))
    host, _ = make_inputs(rng, 1, 4, 1000, DK, 256, DTYPES["bf16"])
    x = {n: cp.asarray(host[n]) for n in "qkvif"}
    runs = [tfla_cupy.mlstm(*(x[n] for n in "qkvif"), chunk_size=L, return_state=True) for _ in range(2)]
    (h1, s1), (h2, s2) = runs
    assert _same_bits(h1, h2) and _same_bits(s1.C, s2.C) and _same_bits(s1.n, s2.n)


def _segmented(n, dt="bf16"):
    """The heuristic's config with n segments forced."""
    import dataclasses
    mma = {"bf16": "MmaBF16", "f16": "MmaF16"}[dt]
    return dataclasses.replace(config.pick_config(mma, DK, 128, L), segments=n)


def _seg_cases():
    out = []
    for mode in GATE_MODES:
        out.append((1, 2, 2000, 128, mode, "bf16", 3.0, True, True, 2))   # 16 chunks, ragged, 2 segments
        out.append((2, 1, 2000, 64, mode, "f16", 0.0, False, False, 5))   # 4 chunks per segment
    out.append((1, 1, 1100, 192, "exp", "bf16", -2.0, True, True, 9))    # one chunk per segment, strong forgetting
    out.append((1, 1, 129, 64, "exp", "bf16", 3.0, False, True, 64))     # more segments asked than chunks
    return [pytest.param(*c, id=f"B{c[0]}-NH{c[1]}-S{c[2]}-DV{c[3]}-{c[4]}-{c[5]}-f{c[6]:+g}-"
                              f"{'init' if c[7] else 'noinit'}-{'dlast' if c[8] else 'nodlast'}-seg{c[9]}") for c in out]


@pytest.mark.parametrize("B,NH,S,DV,mode,dt,f_mean,init,d_last,nseg", _seg_cases())
def test_fused_segments_match_reference(hopper, B, NH, S, DV, mode, dt, f_mean, init, d_last, nseg):
    """Segments (pass 1 summaries, their fold, pass 2 from the incoming states) against the float64
    reference: h, the last state, and the backward from the forward's N, M."""
    rng = np.random.default_rng(seed_of("fused-seg", B, NH, S, DV, mode, dt, nseg))
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], f_mean=f_mean)
    got, want = _run(host, ref, gate=gate, normalize=normalize, L=L, dt=dt, cu=None, init=init, d_last=d_last,
                     seed=seed_of("fused-seg-run", S, mode, nseg), config=_segmented(nseg, dt))
    _assert_within(_errors(got, want, init=init), dt)


def test_fused_segments_masked_kept_states_and_deterministic(hopper):
    """Masked tokens and resets at segment edges, chunk states kept for the backward, and two runs
    bit for bit equal."""
    rng = np.random.default_rng(seed_of("fused-seg-masked"))
    host, ref = make_inputs(rng, 1, 2, 1500, DK, 128, DTYPES["bf16"])
    for name, cols in (("i", list(range(384, 520)) + [0, 1499]), ("f", [255, 256, 767, 768, 1024])):
        host[name][..., cols] = -np.inf
        ref[name][..., cols] = -np.inf
    cfg = _segmented(4)
    got, want = _run(host, ref, gate="exp", normalize=True, L=L, dt="bf16", cu=None, init=True, d_last=True,
                     keep_states=True, config=cfg)
    h, last, g = got
    assert bool(cp.isfinite(h).all()) and bool(cp.isfinite(last.C).all())
    _assert_within(_errors(got, want, init=True), "bf16")
    x = {n: cp.asarray(host[n]) for n in "qkvif"}
    runs = [tfla_cupy.mlstm(*(x[n] for n in "qkvif"), chunk_size=L, return_state=True, config=cfg) for _ in range(2)]
    (h1, s1), (h2, s2) = runs
    assert _same_bits(h1, h2) and _same_bits(s1.C, s2.C) and _same_bits(s1.m, s2.m)


def test_auto_segments_long_single_sequence(hopper, monkeypatch):
    """B = 1 with few heads: "auto" cuts the sequence into segments (pass 1 and the fold run), and
    the result equals the unsegmented forward within rounding."""
    rng = np.random.default_rng(seed_of("fused-seg-auto"))
    host, _ = make_inputs(rng, 1, 2, 128 * 40 + 17, DK, 64, DTYPES["bf16"])
    x = {n: cp.asarray(host[n]) for n in "qkvif"}
    names = launched_kernels(monkeypatch, lambda: tfla_cupy.mlstm(*(x[n] for n in "qkvif"), chunk_size=L))
    summary = config.fused_fwd_kernel("MmaBF16", "tfla::GateExp", mode="summary")
    assert any("segment_combine_kernel" in n for n in names) and summary in names, names
    h_seg, s_seg = tfla_cupy.mlstm(*(x[n] for n in "qkvif"), chunk_size=L, return_state=True)
    h_one, s_one = tfla_cupy.mlstm(*(x[n] for n in "qkvif"), chunk_size=L, return_state=True, config=_segmented(1))
    dh = float(cp.abs(h_seg.astype(cp.float32) - h_one.astype(cp.float32)).max())
    scale = float(cp.abs(h_one.astype(cp.float32)).max())
    assert dh <= 2e-2 * scale, (dh, scale)
    assert float(cp.abs(s_seg.C - s_one.C).max()) <= 1e-3 * float(cp.abs(s_one.C).max())


def test_family_choice_and_override(monkeypatch):
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("needs compute capability 9.0")
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    rng = np.random.default_rng(1)

    def call(DKx, **kw):  # 2 · 66 heads, one DV block: one fused CTA per SM of an H200 (132)
        host, _ = make_inputs(rng, 2, 66, 200, DKx, 64, DTYPES["bf16"])
        x = {n: cp.asarray(host[n]) for n in "qkvif"}
        return lambda: tfla_cupy.mlstm(*(x[n] for n in "qkvif"), chunk_size=L, **kw)

    fused = "fwd_fused_sm90_kernel"
    if _loader.device_limits(cp.cuda.Device().id)[0] > 132:
        pytest.skip("the auto case needs at most 132 SMs (one fused CTA per SM)")
    assert any(fused in n for n in launched_kernels(monkeypatch, call(DK)))            # auto: covered -> sm90
    assert not any(fused in n for n in launched_kernels(monkeypatch, call(64)))        # auto: DK 64 -> sm80
    monkeypatch.setenv(config.FAMILY_ENV, "sm80")
    names = launched_kernels(monkeypatch, call(DK))
    assert not any(fused in n for n in names) and any("fwd_h_kernel" in n for n in names)
    monkeypatch.setenv(config.FAMILY_ENV, "sm90")
    with pytest.raises(ValueError, match=r"TFLA_CUPY_FAMILY: 'sm90' does not cover this call: .*DK = 128, got 64"):
        call(64)()


_SANITIZED = textwrap.dedent("""
    import dataclasses, ml_dtypes, numpy as np, cupy as cp, tfla_cupy
    rng = np.random.default_rng(0)
    bf = ml_dtypes.bfloat16
    q = cp.asarray(rng.standard_normal((1, 1, 200, 128)).astype(bf))
    k = cp.asarray(rng.standard_normal((1, 1, 200, 128)).astype(bf))
    v = cp.asarray(rng.standard_normal((1, 1, 200, 64)).astype(bf))
    i = cp.asarray(rng.standard_normal((1, 1, 200)).astype(np.float32))
    f = cp.asarray((3 + rng.standard_normal((1, 1, 200))).astype(np.float32))
    seg = dataclasses.replace(tfla_cupy.config.pick_config("MmaBF16", 128, 64, 128), segments=2)
    for gate, norm in (("exp", True), ("sig", False)):
        for cfg in (None, seg):  # one sequence in one walk, and in two segments (pass 1, fold, pass 2)
            h, last = tfla_cupy.mlstm(q, k, v, i, f, gate=gate, normalize=norm, chunk_size=128, return_state=True,
                                      config=cfg)
    cp.cuda.Device().synchronize()
    print("SANITIZED-RUN-OK")
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_fused(hopper, tmp_path, tool):
    run_sanitized(tool, _SANITIZED, tmp_path)  # asserts the clean summary
