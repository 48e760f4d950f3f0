"""The warp-specialised Hopper forward (cuda_src/fwd_ws_sm90.cuh, TFLA_CUPY_FWD_WS=1) against the
float64 reference: the forward and the backward that consumes its N, M and last state and whose
chunk states its states mode recomputes; every gate variant, bf16 and f16, DV 128 / 256 / 512,
ragged chunks, initial states, several items per CTA, packed sequences with empty ones, the
(B, S, NH, D) layout, masked tokens, segments, kept states; its modes launched; agreement with the
fused forward; determinism; compute-sanitizer on ragged cases. Compute capability 9.0 only."""

import dataclasses
import textwrap

import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import config
from tfla_cupy._gpu.fwd import recompute_states
from gpu_utils import DTYPES, GATE_MODES, cp, gpu, launched_kernels, make_inputs, run_sanitized, seed_of
from test_gpu_varlen_layout import (_assert_within, _errors, _masked_tokens_match_reference,
                                    _packed_call_matches_reference, _run, _same_bits, _states)

pytestmark = gpu

L = config.FUSED_L
DK = config.FUSED_DK
WS = "fwd_ws_sm90_kernel"


@pytest.fixture
def ws(monkeypatch):
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("needs compute capability 9.0 (the sm90 family)")
    monkeypatch.setenv(config.FAMILY_ENV, "sm90")
    monkeypatch.setenv(config.FWD_WS_ENV, "1")


def _cases():
    out = []
    for dt in ("bf16", "f16"):
        for mode in GATE_MODES:
            out.append((1, 2, 300, 128, mode, dt, 3.0, True, True))     # ragged last chunk, states in and out
            out.append((2, 1, 1000, 256, mode, dt, -2.0, False, False))  # strong forgetting, two DV pairs
        out.append((1, 1, 1, 128, "exp", dt, 3.0, True, False))         # one token
        out.append((1, 1, 128, 128, "exp", dt, 3.0, False, True))       # exactly one chunk
        out.append((1, 1, 4109, 128, "exp", dt, 3.0, True, True))       # many chunks, ragged
    out.append((1, 1, 700, 512, "exp", "bf16", 0.0, True, True))        # four DV pairs
    out.append((4, 40, 260, 128, "exp", "bf16", 3.0, True, True))       # 160 items: several per CTA
    return [pytest.param(*c, id=f"B{c[0]}-NH{c[1]}-S{c[2]}-DV{c[3]}-{c[4]}-{c[5]}-f{c[6]:+g}-"
                              f"{'init' if c[7] else 'noinit'}-{'dlast' if c[8] else 'nodlast'}") for c in out]


def _check_launched(monkeypatch, host, gate, normalize, **kw):
    """Both modes of the kernel run for this call (the forward, and the backward's recompute)."""
    x = {n: cp.asarray(host[n]) for n in "qkvif"}

    def call():
        h, _, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), gate=gate, normalize=normalize, chunk_size=L, **kw)
        tfla_cupy.mlstm_bwd(ctx, cp.ones_like(h))

    names = launched_kernels(monkeypatch, call)
    ws_names = [n for n in names if WS in n]
    assert any("WsFull" in n for n in ws_names) and any("WsStates" in n for n in ws_names), names
    assert not any("fwd_fused_sm90_kernel" in n and "FusedSummary" not in n for n in names), names


@pytest.mark.parametrize("B,NH,S,DV,mode,dt,f_mean,init,d_last", _cases())
def test_ws_forward_and_backward_match_reference(ws, monkeypatch, B, NH, S, DV, mode, dt, f_mean, init, d_last):
    rng = np.random.default_rng(seed_of("ws", B, NH, S, DV, mode, dt, f_mean, init, d_last))
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], f_mean=f_mean)
    got, want = _run(host, ref, gate=gate, normalize=normalize, L=L, dt=dt, cu=None, init=init, d_last=d_last,
                     seed=seed_of("ws-run", S, mode))
    _assert_within(_errors(got, want, init=init), dt)
    if B == 1 and S == 300 and dt == "bf16":
        _check_launched(monkeypatch, host, gate, normalize)


@pytest.mark.parametrize("kind", ["mixed", "main"])
@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_ws_varlen_matches_per_sequence_reference(ws, kind, mode):
    _packed_call_matches_reference("ws-varlen", kind, mode, 2, 256, L)


def _kept(monkeypatch, x, ws, **kw):
    """(h, last state, kept C_states, kept m_states) of a forward with keep_states, on the
    warp-specialised kernel (ws) or the fused one."""
    monkeypatch.setenv(config.FWD_WS_ENV, "1" if ws else "0")
    h, last, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), chunk_size=L, keep_states=True, **kw)
    return h, last, ctx.saved["C_states"], ctx.saved["m_states"]


def _close(a, b, tol, what):
    a, b = (cp.asnumpy(t.astype(cp.float32)).astype(np.float64) for t in (a, b))
    assert np.isfinite(a).all(), what
    assert np.max(np.abs(a - b)) <= tol * max(np.max(np.abs(b)), 1e-30), what


def test_ws_empty_sequences_of_a_device_cu_seqlens(ws, monkeypatch):
    """A device cu_seqlens is not read on the host, so it may hold empty sequences: their last state
    is the initial state bit for bit, nothing of theirs is written into a neighbour's chunk slots,
    and h, the last states and every kept chunk state agree with the fused forward's."""
    rng = np.random.default_rng(seed_of("ws-empty"))
    lengths, NH, DV = [0, 200, 0, 129, 300, 0], 2, 256
    S, N = sum(lengths), len(lengths)
    cu = cp.asarray(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    host, _ = make_inputs(rng, 1, NH, S, DK, DV, DTYPES["bf16"])
    x = {n: cp.asarray(host[n]) for n in "qkvif"}
    state = tfla_cupy.MLSTMState(*(cp.asarray(a) for a in _states(rng, N, NH, DK, DV)))
    got = _kept(monkeypatch, x, True, cu_seqlens=cu, initial_state=state)
    want = _kept(monkeypatch, x, False, cu_seqlens=cu, initial_state=state)
    for s in (0, 2, 5):
        assert _same_bits(got[1].C[s], state.C[s]) and _same_bits(got[1].n[s], state.n[s]), s
        assert _same_bits(got[1].m[s], state.m[s]), s
    _close(got[0], want[0], 2e-2, "h")
    _close(got[1].C, want[1].C, 1e-2, "C_last")
    # the chunk slots (7 per head: 2 + 2 + 3, packed from slot 0) and the m slots (a sequence's
    # chunks and its end: 7 + 6), written once each, as the fused forward does
    _close(got[2][:, :7], want[2][:, :7], 1e-2, "C_states")
    assert _same_bits(got[3][:, :13], want[3][:, :13])  # (the stabiliser chain: the same arithmetic)


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep_states"])
def test_ws_bshd_and_kept_states(ws, keep):
    """bshd; with keep_states the forward writes C^(c), n, m of every chunk (the first of an item
    from the registers, the others through the consumers' V blocks) and the backward reads them."""
    rng = np.random.default_rng(seed_of("ws-bshd", keep))
    host, ref = make_inputs(rng, 2, 2, 500, DK, 256, DTYPES["bf16"])
    got, want = _run(host, ref, gate="exp", normalize=True, L=L, dt="bf16", cu=None, init=True, d_last=True,
                     layout="bshd", keep_states=keep)
    _assert_within(_errors(got, want, init=True), "bf16")


def test_ws_kept_states_equal_the_recomputed_ones(ws):
    """The chunk states the forward keeps are the ones the states mode recomputes, bit for bit
    (the same kernel arithmetic), in packed sequences with an initial state and more items (2 DV
    pairs × 40 heads × 4 non-empty sequences) than SMs."""
    rng = np.random.default_rng(seed_of("ws-kept"))
    lengths, NH = [300, 129, 1000, 1], 40
    cu = cp.asarray(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    host, _ = make_inputs(rng, 1, NH, sum(lengths), DK, 256, DTYPES["bf16"])
    x = {n: cp.asarray(host[n]) for n in "qkvif"}
    N = len(lengths)
    state = tfla_cupy.MLSTMState(*(cp.asarray(a) for a in _states(rng, N, NH, DK, 256)))
    _, _, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), chunk_size=L, cu_seqlens=cu, keep_states=True,
                                    initial_state=state)
    kept_C, kept_m = ctx.saved["C_states"], ctx.saved["m_states"]
    C = cp.zeros(kept_C.shape, dtype=cp.uint16).view(kept_C.dtype)  # poison: 0xFFFF in every element
    C.view(cp.uint16)[...] = 0xFFFF
    m = cp.full(kept_m.shape, np.nan, dtype=kept_m.dtype)
    assert recompute_states(ctx.problem, cp.cuda.Device(), ctx.saved, C, m)
    got_C, want_C = (np.ascontiguousarray(cp.asnumpy(a.view(cp.uint16))) for a in (C, kept_C))
    got_m, want_m = cp.asnumpy(m), cp.asnumpy(kept_m)
    # the slots of real chunks (surplus slots of packed input are written by neither)
    real = ~np.all(got_C == 0xFFFF, axis=(2, 3))
    assert real.sum() == sum(-(-n // L) for n in lengths) * NH  # every chunk of every head, once
    assert np.array_equal(got_C[real], want_C[real])
    slot = np.isfinite(got_m)
    assert slot.any() and np.array_equal(got_m[slot].view(np.uint32), want_m[slot].view(np.uint32))


def test_ws_masked_tokens_are_finite_and_match_reference(ws):
    """ĩ = −∞ (token writes nothing) and f̃ = −∞ (reset) inside chunks and at chunk edges."""
    _masked_tokens_match_reference(seed_of("ws-masked"), 128, L)


def test_ws_segments_with_kept_states_agree_with_the_fused_forward(ws, monkeypatch):
    """keep_states with segments: each segment's first kept state comes from the fold of the
    segments before it (seg_C), the others through the consumers' V blocks; against the fused
    forward with the same segments."""
    rng = np.random.default_rng(seed_of("ws-seg-kept"))
    host, _ = make_inputs(rng, 1, 2, 2000, DK, 256, DTYPES["bf16"])
    x = {n: cp.asarray(host[n]) for n in "qkvif"}
    cfg = dataclasses.replace(config.pick_config("MmaBF16", DK, 256, L), segments=3)
    got = _kept(monkeypatch, x, True, config=cfg)
    want = _kept(monkeypatch, x, False, config=cfg)
    _close(got[0], want[0], 2e-2, "h")
    _close(got[1].C, want[1].C, 1e-2, "C_last")
    _close(got[2], want[2], 1e-2, "C_states")
    assert _same_bits(got[3], want[3])


def test_ws_segments_run_on_its_own_modes(ws, monkeypatch):
    """Segments on this kernel: its summary mode for pass 1 and its forward for pass 2, no fused
    kernel in between."""
    rng = np.random.default_rng(seed_of("ws-seg-modes"))
    host, _ = make_inputs(rng, 1, 2, 1000, DK, 128, DTYPES["bf16"])
    x = {n: cp.asarray(host[n]) for n in "qkvif"}
    cfg = dataclasses.replace(config.pick_config("MmaBF16", DK, 128, L), segments=3)
    names = launched_kernels(monkeypatch, lambda: tfla_cupy.mlstm(*(x[n] for n in "qkvif"), chunk_size=L, config=cfg))
    assert [n for n in names if WS in n] == [config.fused_ws_kernel("MmaBF16", "tfla::GateExp", mode)
                                              for mode in ("summary", "full")], names
    assert not any("fwd_fused_sm90_kernel" in n for n in names) and any("segment_combine" in n for n in names)


@pytest.mark.parametrize("nseg", [2, 5])
def test_ws_segments_match_reference(ws, nseg):
    """Segments: this kernel's summary pass, the fold, then every segment from its incoming state."""
    rng = np.random.default_rng(seed_of("ws-seg", nseg))
    host, ref = make_inputs(rng, 1, 2, 2000, DK, 128, DTYPES["bf16"])
    cfg = dataclasses.replace(config.pick_config("MmaBF16", DK, 128, L), segments=nseg)
    got, want = _run(host, ref, gate="exp", normalize=True, L=L, dt="bf16", cu=None, init=True, d_last=True,
                     seed=seed_of("ws-seg-run", nseg), config=cfg)
    _assert_within(_errors(got, want, init=True), "bf16")


def test_ws_agrees_with_the_fused_forward_and_is_deterministic(ws, monkeypatch):
    """Two runs bit for bit equal; against the fused forward within the rounding of the operands
    each kernel rounds differently (ā ⊙ K here, ā ⊙ V there)."""
    rng = np.random.default_rng(seed_of("ws-det"))
    host, _ = make_inputs(rng, 1, 4, 1000, DK, 256, DTYPES["bf16"])
    x = {n: cp.asarray(host[n]) for n in "qkvif"}
    runs = [tfla_cupy.mlstm(*(x[n] for n in "qkvif"), chunk_size=L, return_state=True) for _ in range(2)]
    (h1, s1), (h2, s2) = runs
    assert _same_bits(h1, h2) and _same_bits(s1.C, s2.C) and _same_bits(s1.n, s2.n) and _same_bits(s1.m, s2.m)
    monkeypatch.setenv(config.FWD_WS_ENV, "0")
    h0, s0 = tfla_cupy.mlstm(*(x[n] for n in "qkvif"), chunk_size=L, return_state=True)
    scale = float(cp.abs(h0.astype(cp.float32)).max())
    assert float(cp.abs(h1.astype(cp.float32) - h0.astype(cp.float32)).max()) <= 2e-2 * scale
    assert float(cp.abs(s1.C - s0.C).max()) <= 1e-2 * float(cp.abs(s0.C).max())
    assert _same_bits(s1.m, s0.m)  # the stabiliser chain is the same arithmetic


def test_ws_uncovered_calls_fall_back(ws, monkeypatch):
    """DV = 192 (not a multiple of 128) runs on the fused forward, not an error."""
    rng = np.random.default_rng(seed_of("ws-fallback"))
    host, _ = make_inputs(rng, 1, 1, 300, DK, 192, DTYPES["bf16"])
    x = {n: cp.asarray(host[n]) for n in "qkvif"}
    names = launched_kernels(monkeypatch, lambda: tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), chunk_size=L))
    assert not any(WS in n for n in names) and any("fwd_fused_sm90_kernel" in n for n in names), names


_SANITIZED = textwrap.dedent("""
    import dataclasses, os, ml_dtypes, numpy as np, cupy as cp, tfla_cupy
    os.environ["TFLA_CUPY_FWD_WS"] = "1"
    rng = np.random.default_rng(0)
    bf = ml_dtypes.bfloat16
    S = 300
    q = cp.asarray(rng.standard_normal((1, 2, S, 128)).astype(bf))
    k = cp.asarray(rng.standard_normal((1, 2, S, 128)).astype(bf))
    v = cp.asarray(rng.standard_normal((1, 2, S, 256)).astype(bf))
    i = cp.asarray(rng.standard_normal((1, 2, S)).astype(np.float32))
    f = cp.asarray((3 + rng.standard_normal((1, 2, S))).astype(np.float32))
    seg = dataclasses.replace(tfla_cupy.config.pick_config("MmaBF16", 128, 256, 128), segments=2)
    for gate, norm in (("exp", True), ("sig", False)):
        for cfg in (None, seg):  # one walk per item, and segments (its summary pass, the fold, its forward)
            h, last, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=gate, normalize=norm, chunk_size=128, config=cfg)
            tfla_cupy.mlstm_bwd(ctx, cp.ones_like(h))  # the states mode recomputes the chunk states
    cp.cuda.Device().synchronize()
    print("SANITIZED-RUN-OK")
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_ws(ws, tmp_path, tool):
    run_sanitized(tool, _SANITIZED, tmp_path)  # asserts the clean summary
