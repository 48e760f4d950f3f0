"""The fused Hopper backward (cuda_src/bwd_walk_sm90.cuh: the reverse dC walk with dq, dk, dv and
the gate terms of every chunk, one cluster of DV / 64 CTAs per sequence and head) against the
float64 reference: every gate variant, bf16 and f16, DV = 64 … 512 (cluster sizes 1, 2, 4, 8),
ragged chunks, initial states and last-state gradients, packed sequences, the (B, S, NH, D)
layout with kept states, masked tokens; which kernels the backward launches; bit-identical
repeats; compute-sanitizer on ragged cases. TFLA_CUPY_BWD_WALK=1 takes the walk wherever it
covers the call (by default the per-stage kernels run). Runs on compute capability 9.0 only."""

import textwrap

import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import config
from gpu_utils import DTYPES, GATE_MODES, cp, gpu, launched_kernels, make_inputs, run_sanitized, seed_of
from test_gpu_varlen_layout import _assert_within, _errors, _lengths, _run, _same_bits

pytestmark = gpu

L = config.BWD_WALK_L
DK = config.BWD_WALK_DK
WALK = "bwd_walk_sm90_kernel"
PER_STAGE = ("bwd_chunk_sm90_kernel", "bwd_dstates_sm90_kernel", "bwd_dq_kernel", "bwd_dstates_kernel")


@pytest.fixture
def walk(monkeypatch):
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("needs compute capability 9.0 (the sm90 family)")
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    monkeypatch.setenv(config.BWD_WALK_ENV, "1")


def _assert_walk_only(names, parts):
    """One walk launch, a cluster of ``parts`` CTAs; none of the per-stage backward kernels."""
    walks = [n for n in names if WALK in n]
    assert len(walks) == 1 and walks[0].endswith(f", {parts}>"), names
    assert not any(k in n for n in names for k in PER_STAGE), names


def _cases():
    out = []
    for dt in ("bf16", "f16"):
        for mode in GATE_MODES:
            out.append((1, 2, 300, 256, mode, dt, 3.0, True, True))    # ragged (44 rows), cluster of 4
            out.append((2, 1, 700, 128, mode, dt, -2.0, False, False))  # strong forgetting, cluster of 2
        out.append((1, 1, 1, 64, "exp", dt, 3.0, True, False))         # one token, cluster of 1
        out.append((1, 1, 192, 64, "exp", dt, 3.0, False, True))       # last chunk exactly half
        out.append((1, 1, 160, 512, "exp", dt, 0.0, True, True))       # cluster of 8, 32-row ragged chunk
    return [pytest.param(*c, id=f"B{c[0]}-NH{c[1]}-S{c[2]}-DV{c[3]}-{c[4]}-{c[5]}-f{c[6]:+g}-"
                              f"{'init' if c[7] else 'noinit'}-{'dlast' if c[8] else 'nodlast'}") for c in out]


@pytest.mark.parametrize("B,NH,S,DV,mode,dt,f_mean,init,d_last", _cases())
def test_walk_matches_reference(walk, monkeypatch, B, NH, S, DV, mode, dt, f_mean, init, d_last):
    rng = np.random.default_rng(seed_of("bwd-walk", B, NH, S, DV, mode, dt, f_mean, init, d_last))
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], f_mean=f_mean)
    box = {}
    names = launched_kernels(monkeypatch, lambda: box.update(r=_run(
        host, ref, gate=gate, normalize=normalize, L=L, dt=dt, cu=None, init=init, d_last=d_last,
        seed=seed_of("bwd-walk-run", S, mode))))
    _assert_walk_only(names, DV // 64)
    got, want = box["r"]
    _assert_within(_errors(got, want, init=init), dt)


@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_walk_varlen_matches_per_sequence_reference(walk, mode):
    rng = np.random.default_rng(seed_of("bwd-walk-varlen", mode))
    cu = np.concatenate([[0], np.cumsum(_lengths(rng, "mixed", L))])
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, 1, 2, int(cu[-1]), DK, 256, DTYPES["bf16"])
    got, want = _run(host, ref, gate=gate, normalize=normalize, L=L, dt="bf16", cu=cu, init=True, d_last=True,
                     seed=seed_of("bwd-walk-varlen-run", mode))
    _assert_within(_errors(got, want, init=True), "bf16")


def test_walk_bshd_and_kept_states(walk):
    rng = np.random.default_rng(seed_of("bwd-walk-bshd"))
    host, ref = make_inputs(rng, 2, 2, 500, DK, 128, DTYPES["bf16"])
    got, want = _run(host, ref, gate="exp", normalize=True, L=L, dt="bf16", cu=None, init=True, d_last=True,
                     layout="bshd", keep_states=True)
    _assert_within(_errors(got, want, init=True), "bf16")


def test_walk_masked_tokens_are_finite_and_match_reference(walk):
    """ĩ = −∞ (token writes nothing) and f̃ = −∞ (reset) inside chunks, at half-chunk and chunk edges."""
    rng = np.random.default_rng(seed_of("bwd-walk-masked"))
    host, ref = make_inputs(rng, 1, 2, 700, DK, 128, DTYPES["bf16"])
    for name, cols in (("i", [0, 5, 63, 64, 127, 128, 129, 400, 699]), ("f", [3, 64, 255, 256, 500])):
        host[name][..., cols] = -np.inf
        ref[name][..., cols] = -np.inf
    got, want = _run(host, ref, gate="exp", normalize=True, L=L, dt="bf16", cu=None, init=True, d_last=True)
    g = got[2]
    for name in ("dq", "dk", "dv", "di", "df"):
        assert bool(cp.isfinite(getattr(g, name)).all()), name
    _assert_within(_errors(got, want, init=True), "bf16")


def test_walk_is_bit_identical_on_repeat_and_close_to_the_per_stage_kernels(walk, monkeypatch):
    """Two walks give the same bits (the cluster sums have a fixed order); the per-stage Hopper
    kernels (TFLA_CUPY_BWD_WALK=0) give the same gradients within the bf16 bound of each other."""
    rng = np.random.default_rng(seed_of("bwd-walk-det"))
    host, _ = make_inputs(rng, 1, 4, 1000, DK, 256, DTYPES["bf16"])
    x = {n: cp.asarray(host[n]) for n in "qkvif"}
    dh = cp.asarray(rng.standard_normal((1, 4, 1000, 256)).astype(DTYPES["bf16"]))
    _, _, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), chunk_size=L)
    g1, g2 = (tfla_cupy.mlstm_bwd(ctx, dh) for _ in range(2))
    for name in ("dq", "dk", "dv", "di", "df"):
        assert _same_bits(getattr(g1, name), getattr(g2, name)), name
    monkeypatch.setenv(config.BWD_WALK_ENV, "0")
    g3 = tfla_cupy.mlstm_bwd(ctx, dh)
    for name in ("dq", "dk", "dv", "di", "df"):
        a, b = (cp.asnumpy(getattr(g, name)).astype(np.float64) for g in (g1, g3))
        assert np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b)), name


def test_walk_empty_sequences_of_a_device_cu_seqlens(walk, monkeypatch):
    """A device cu_seqlens is not read on the host, so it may hold empty sequences: their walk has
    no chunk (d_initial_state.C is the d_state given, bit for bit) and every other gradient equals
    the per-stage kernels' within the bf16 bound of each other."""
    rng = np.random.default_rng(seed_of("bwd-walk-empty"))
    lengths, NH, DV = [0, 200, 0, 129], 2, 128
    S, N = sum(lengths), len(lengths)
    cu = cp.asarray(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    host, _ = make_inputs(rng, 1, NH, S, DK, DV, DTYPES["bf16"])
    x = {n: cp.asarray(host[n]) for n in "qkvif"}
    state = tfla_cupy.MLSTMState(cp.asarray((0.5 * rng.standard_normal((N, NH, DK, DV))).astype(np.float32)),
                                 cp.asarray(rng.standard_normal((N, NH, DK)).astype(np.float32)),
                                 cp.asarray(rng.standard_normal((N, NH)).astype(np.float32)))
    dC = cp.asarray(rng.standard_normal((N, NH, DK, DV)).astype(np.float32))
    dh = cp.asarray(rng.standard_normal((1, NH, S, DV)).astype(DTYPES["bf16"]))
    _, _, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), chunk_size=L, cu_seqlens=cu, initial_state=state)
    g_walk = tfla_cupy.mlstm_bwd(ctx, dh, tfla_cupy.MLSTMState(dC))
    monkeypatch.setenv(config.BWD_WALK_ENV, "0")
    g_stage = tfla_cupy.mlstm_bwd(ctx, dh, tfla_cupy.MLSTMState(dC))
    for s in (0, 2):
        assert _same_bits(g_walk.d_initial_state.C[s], dC[s]), s
    for name in ("dq", "dk", "dv", "di", "df"):
        a, b = (cp.asnumpy(getattr(g, name)).astype(np.float64) for g in (g_walk, g_stage))
        assert np.isfinite(a).all() and np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b)), name
    a, b = (cp.asnumpy(g.d_initial_state.C) for g in (g_walk, g_stage))
    assert np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b))

_SANITIZED = textwrap.dedent("""
    import os
    os.environ["TFLA_CUPY_BWD_WALK"] = "1"
    import ml_dtypes, numpy as np, cupy as cp, tfla_cupy
    rng = np.random.default_rng(0)
    bf = ml_dtypes.bfloat16
    def inputs(S, DV):
        q = cp.asarray(rng.standard_normal((1, 1, S, 128)).astype(bf))
        k = cp.asarray(rng.standard_normal((1, 1, S, 128)).astype(bf))
        v = cp.asarray(rng.standard_normal((1, 1, S, DV)).astype(bf))
        i = cp.asarray(rng.standard_normal((1, 1, S)).astype(np.float32))
        f = cp.asarray((3 + rng.standard_normal((1, 1, S))).astype(np.float32))
        return q, k, v, i, f
    # ragged: 72 rows (the second half chunk has 8) with a cluster of 2, 40 rows (no second half) with a
    # cluster of 4, an initial state and a last-state gradient (the walk reads dC_last, writes dC0)
    for S, DV, init in ((200, 128, False), (168, 256, True)):
        x = inputs(S, DV)
        for gate, norm in (("exp", True), ("sig", False)):
            C0 = cp.asarray(rng.standard_normal((1, 1, 128, DV)).astype(np.float32)) if init else None
            st = None if C0 is None else (C0, cp.zeros((1, 1, 128), np.float32), cp.zeros((1, 1), np.float32))
            h, last, ctx = tfla_cupy.mlstm_fwd(*x, gate=gate, normalize=norm, chunk_size=128, initial_state=st)
            dC = cp.asarray(rng.standard_normal((1, 1, 128, DV)).astype(np.float32)) if init else None
            g = tfla_cupy.mlstm_bwd(ctx, cp.asarray(rng.standard_normal(h.shape).astype(bf)),
                                    None if dC is None else (dC, None, None))
    cp.cuda.Device().synchronize()
    print("SANITIZED-RUN-OK")
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_walk(walk, tmp_path, tool):
    run_sanitized(tool, _SANITIZED, tmp_path)  # asserts the clean summary
