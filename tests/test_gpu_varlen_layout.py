"""CUDA path: packed variable-length sequences (cu_seqlens) and the (B, S, NH, D) layout,
forward and backward, against the float64 reference (the NumPy path, which runs the chunkwise
reference once per sequence) on the same rounded inputs; strided views read in place."""

import textwrap

import numpy as np
import pytest

import tfla_cupy
from gpu_utils import (BWD_TOL, DF_TOL, DTYPES, FWD_TOL, GATE_MODES, cp, eager_then_graph, gpu, make_inputs,
                       poisoned_allocations, rel_err, run_sanitized, seed_of, to_gpu)

pytestmark = gpu

GRADS = ("dq", "dk", "dv", "di", "df")


def _same_bits(a, b):
    """Bit-identical arrays (any dtype, bfloat16 included; views compared by value)."""
    a, b = (np.ascontiguousarray(cp.asnumpy(x)) for x in (a, b))
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _lengths(rng, kind, L):
    if kind == "mixed":  # length 1, below / at / above the chunk size, several chunks
        return [1, L - 1, L, L + 1, 3, 2 * L + 5, 1, 4 * L]
    if kind == "one":
        return [3 * L + 7]
    if kind == "many":  # 1000 short sequences (most shorter than a chunk)
        return [int(n) for n in rng.integers(1, 2 * L + 1, 1000)]
    if kind == "main":  # 64 random lengths summing to 8192
        cuts = np.sort(rng.choice(np.arange(1, 8192), 63, replace=False))
        return [int(n) for n in np.diff(np.concatenate([[0], cuts, [8192]]))]
    raise ValueError(kind)


def _states(rng, N, NH, DK, DV):
    C = (0.5 * rng.standard_normal((N, NH, DK, DV))).astype(np.float32)
    n = rng.standard_normal((N, NH, DK)).astype(np.float32)
    m = rng.standard_normal((N, NH)).astype(np.float32)
    return C, n, m


def _packed_call_matches_reference(name, kind, mode, NH, DV, L):
    """Packed sequences of a ``kind`` (_lengths) against the per-sequence float64 reference: every
    output and gradient of a bf16 call with initial states and a last-state gradient."""
    rng = np.random.default_rng(seed_of(name, kind, mode))
    cu = np.concatenate([[0], np.cumsum(_lengths(rng, kind, L))])
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, 1, NH, int(cu[-1]), 128, DV, DTYPES["bf16"])
    got, want = _run(host, ref, gate=gate, normalize=normalize, L=L, dt="bf16", cu=cu, init=True, d_last=True,
                     seed=seed_of(name + "-run", kind, mode))
    _assert_within(_errors(got, want, init=True), "bf16")


def _masked_tokens_match_reference(seed, DV, L, **run_kw):
    """ĩ = −∞ (a token writes nothing) and f̃ = −∞ (a reset) inside chunks and at chunk edges of a
    700-token call: h and the last state finite, everything within the bf16 bounds."""
    rng = np.random.default_rng(seed)
    host, ref = make_inputs(rng, 1, 2, 700, 128, DV, DTYPES["bf16"])
    for name, cols in (("i", [0, 5, 127, 128, 129, 400, 699]), ("f", [3, 255, 256, 500])):
        host[name][..., cols] = -np.inf
        ref[name][..., cols] = -np.inf
    got, want = _run(host, ref, gate="exp", normalize=True, L=L, dt="bf16", cu=None, init=True, d_last=True, **run_kw)
    h, last, g = got
    assert bool(cp.isfinite(h).all()) and bool(cp.isfinite(last.C).all())
    _assert_within(_errors(got, want, init=True), "bf16")


def _run(host, ref, *, gate, normalize, L, dt, cu, init, d_last, layout="bhsd", seed=0, keep_states=False,
         cu_dtype=np.int32, config=None):
    """GPU forward + backward and the float64 reference of the same call. Inputs are (1, NH, S, ·);
    layout="bshd" transposes them (and dh) first. ``config``: a KernelConfig for the GPU call."""
    rng = np.random.default_rng(seed)
    _, NH, S, DV = host["v"].shape
    DK = host["q"].shape[-1]
    B = host["q"].shape[0]
    NS = B if cu is None else len(cu) - 1
    dh = rng.standard_normal((B, NH, S, DV)).astype(DTYPES[dt])
    dC = rng.standard_normal((NS, NH, DK, DV)).astype(np.float32) if d_last else None
    st = _states(rng, NS, NH, DK, DV) if init else None
    tr = (lambda a: np.ascontiguousarray(np.swapaxes(a, 1, 2))) if layout == "bshd" else (lambda a: a)
    opts = dict(gate=gate, normalize=normalize, chunk_size=L, layout=layout)
    # float64 reference on the rounded inputs
    r = {n: tr(ref[n]) for n in "qkvif"}
    ref_state = None if st is None else tfla_cupy.MLSTMState(*(a.astype(np.float64) for a in st))
    h_ref, last_ref, ctx_ref = tfla_cupy.mlstm_fwd(*(r[n] for n in "qkvif"), **opts, initial_state=ref_state,
                                                   cu_seqlens=cu)
    g_ref = tfla_cupy.mlstm_bwd(ctx_ref, tr(dh).astype(np.float64),
                                None if dC is None else tfla_cupy.MLSTMState(dC.astype(np.float64)))
    # GPU
    x = {n: cp.asarray(tr(host[n])) for n in "qkvif"}
    state = None if st is None else tfla_cupy.MLSTMState(*(cp.asarray(a) for a in st))
    cu_gpu = None if cu is None else cp.asarray(np.asarray(cu, dtype=cu_dtype))
    with poisoned_allocations():
        h, last, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), **opts, initial_state=state, cu_seqlens=cu_gpu,
                                           keep_states=keep_states, config=config)
        g = tfla_cupy.mlstm_bwd(ctx, cp.asarray(tr(dh)), None if dC is None else tfla_cupy.MLSTMState(cp.asarray(dC)))
    return (h, last, g), (h_ref, last_ref, g_ref)


def _errors(got, want, *, init):
    (h, last, g), (h_ref, last_ref, g_ref) = got, want
    errs = {"h": rel_err(h, h_ref), "C": rel_err(last.C, last_ref.C)}
    for name, a, b in (("n", last.n, last_ref.n), ("m", last.m, last_ref.m)):
        assert (a is None) == (b is None), name
        if a is not None:
            errs[name] = rel_err(a, b)
    for name, a, b in zip(GRADS, g[:5], g_ref[:5]):
        assert a.shape == b.shape, name
        errs[name] = rel_err(a, b)
    if init:
        errs["dC0"] = rel_err(g.d_initial_state.C, g_ref.d_initial_state.C)
    else:
        assert g.d_initial_state is None
    return errs


def _assert_within(errs, dt):
    tol = {k: (FWD_TOL[dt] if k in ("h", "C", "n", "m") else DF_TOL[dt] if k == "df" else BWD_TOL[dt]) for k in errs}
    bad = {k: e for k, e in errs.items() if not e <= tol[k]}
    assert not bad, f"errors {bad} above {tol}"


def _varlen_cases():
    out = []
    for dt in ("f32", "bf16"):
        for mode in GATE_MODES:
            out.append(("mixed", 64, 2, 32, 64, mode, dt, True, True))
        out.append(("mixed", 64, 2, 32, 64, "exp", dt, False, False))
        out.append(("one", 64, 1, 64, 128, "exp", dt, True, True))
        out.append(("many", 16, 1, 32, 32, "exp", dt, True, True))
        out.append(("mixed", 16, 2, 48, 96, "sig", dt, True, False))
    out.append(("main", 128, 1, 128, 256, "exp", "bf16", True, True))
    out.append(("mixed", 128, 1, 256, 512, "exp", "f32", False, True))  # DK > 128: contraction in blocks
    return [pytest.param(*c, id="-".join([c[0], f"L{c[1]}", f"NH{c[2]}", f"DK{c[3]}", f"DV{c[4]}", c[5], c[6],
                                          "init" if c[7] else "noinit", "dlast" if c[8] else "nodlast"]))
            for c in out]


@pytest.mark.parametrize("kind,L,NH,DK,DV,mode,dt,init,d_last", _varlen_cases())
def test_varlen_matches_per_sequence_reference(kind, L, NH, DK, DV, mode, dt, init, d_last):
    rng = np.random.default_rng(seed_of("varlen", kind, L, NH, DK, DV, mode, dt, init, d_last))
    lengths = _lengths(rng, kind, L)
    cu = np.concatenate([[0], np.cumsum(lengths)])
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, 1, NH, int(cu[-1]), DK, DV, DTYPES[dt])
    got, want = _run(host, ref, gate=gate, normalize=normalize, L=L, dt=dt, cu=cu, init=init, d_last=d_last,
                     seed=seed_of(kind, mode, dt))
    _assert_within(_errors(got, want, init=init), dt)


@pytest.mark.parametrize("cu_dtype", [np.int32, np.int64], ids=["int32", "int64"])
def test_varlen_bshd_keep_states_and_int64_offsets(cu_dtype):
    rng = np.random.default_rng(seed_of("varlen-bshd", np.dtype(cu_dtype).name))
    cu = np.concatenate([[0], np.cumsum([70, 1, 64, 200, 9])])
    host, ref = make_inputs(rng, 1, 3, int(cu[-1]), 64, 64, DTYPES["bf16"])
    got, want = _run(host, ref, gate="exp", normalize=True, L=64, dt="bf16", cu=cu, init=True, d_last=True,
                     layout="bshd", keep_states=True, cu_dtype=cu_dtype)
    assert got[0].shape == (1, int(cu[-1]), 3, 64)
    _assert_within(_errors(got, want, init=True), "bf16")


def test_varlen_numpy_offsets_on_the_gpu_path():
    rng = np.random.default_rng(21)
    cu = np.array([0, 5, 100, 101, 230])
    host, ref = make_inputs(rng, 1, 2, 230, 32, 32, np.float32)
    x = to_gpu(host)
    h = tfla_cupy.mlstm(*(x[n] for n in "qkvif"), chunk_size=32, cu_seqlens=cu)
    h_ref = tfla_cupy.mlstm(*(ref[n] for n in "qkvif"), chunk_size=32, cu_seqlens=cu)
    assert rel_err(h, h_ref) <= FWD_TOL["f32"]


# ------------------------------------------------------------------------------------------
# bshd and strided views
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_bshd_matches_reference_and_equals_bhsd(mode, dt):
    """bshd changes the addressing only: the same arithmetic in the same order, so the results
    are bit-identical to the bhsd call (transposed), and within tolerance of the reference."""
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed_of("bshd", mode, dt))
    host, ref = make_inputs(rng, 2, 3, 333, 64, 96, DTYPES[dt])
    got, want = _run(host, ref, gate=gate, normalize=normalize, L=64, dt=dt, cu=None, init=True, d_last=True,
                     layout="bshd", seed=5)
    _assert_within(_errors(got, want, init=True), dt)
    plain, _ = _run(host, ref, gate=gate, normalize=normalize, L=64, dt=dt, cu=None, init=True, d_last=True,
                    layout="bhsd", seed=5)
    (h, last, g), (h0, last0, g0) = got, plain
    assert _same_bits(h, h0.swapaxes(1, 2)), "h"
    assert _same_bits(last.C, last0.C), "C"
    for name, a, b in zip(GRADS, g[:5], g0[:5]):
        assert _same_bits(a, b.swapaxes(1, 2)), name


def test_fused_bshd_views_are_read_in_place():
    """q, k, v as column slices of one fused (B, S, NH, 2·DK + DV) projection and i, f as slices
    of a (B, S, NH, 2) buffer: the kernels receive the callers' data pointers (no copies)."""
    rng = np.random.default_rng(8)
    B, S, NH, DK, DV = 2, 300, 4, 64, 128
    bf = DTYPES["bf16"]
    qkv = cp.asarray(rng.standard_normal((B, S, NH, 2 * DK + DV)).astype(bf))
    gates = cp.asarray(np.stack([rng.standard_normal((B, S, NH)), 3 + rng.standard_normal((B, S, NH))],
                                axis=-1).astype(np.float32))
    q, k, v = qkv[..., :DK], qkv[..., DK:2 * DK], qkv[..., 2 * DK:]
    i, f = gates[..., 0], gates[..., 1]
    assert not q.flags.c_contiguous and not i.flags.c_contiguous
    h, _, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, chunk_size=64, layout="bshd")
    for name, x in zip("qkvif", (q, k, v, i, f)):
        assert ctx.saved[name].data.ptr == x.data.ptr, f"{name} was copied"
    dh = cp.asarray(rng.standard_normal((B, S, NH, DV)).astype(bf))
    g = tfla_cupy.mlstm_bwd(ctx, dh)
    contiguous = [cp.ascontiguousarray(a) for a in (q, k, v, i, f)]
    h2, _, ctx2 = tfla_cupy.mlstm_fwd(*contiguous, chunk_size=64, layout="bshd")
    g2 = tfla_cupy.mlstm_bwd(ctx2, dh)
    assert _same_bits(h, h2)
    for name, a, b in zip(GRADS, g[:5], g2[:5]):
        assert a.flags.c_contiguous and _same_bits(a, b), name
    ref = tfla_cupy.mlstm(*(cp.asnumpy(a).astype(np.float64) for a in contiguous), chunk_size=64, layout="bshd")
    assert rel_err(h, ref) <= FWD_TOL["bf16"]


def test_strided_bhsd_view_read_in_place_and_misaligned_view_copied():
    rng = np.random.default_rng(9)
    host, ref = make_inputs(rng, 1, 2, 150, 32, 32, np.float32)
    wide = cp.zeros((1, 2, 150, 48), np.float32)
    wide[..., 8:40] = cp.asarray(host["q"])
    q_view = wide[..., 8:40]  # row stride 48 floats, 32-byte offset: read in place
    shifted = cp.zeros((1, 2, 150, 48), np.float32)
    shifted[..., 1:33] = cp.asarray(host["k"])
    k_view = shifted[..., 1:33]  # 4-byte offset: not 16-byte aligned, copied once
    x = to_gpu(host)
    h, _, ctx = tfla_cupy.mlstm_fwd(q_view, k_view, x["v"], x["i"], x["f"], chunk_size=32)
    assert ctx.saved["q"].data.ptr == q_view.data.ptr
    assert ctx.saved["k"].data.ptr != k_view.data.ptr and ctx.saved["k"].flags.c_contiguous
    want = tfla_cupy.mlstm(*(ref[n] for n in "qkvif"), chunk_size=32)
    assert rel_err(h, want) <= FWD_TOL["f32"]


def test_varlen_with_cupy_offsets_captures_in_a_cuda_graph():
    """With a CuPy cu_seqlens nothing synchronises the host: forward + backward capture."""
    rng = np.random.default_rng(10)
    cu = cp.asarray(np.array([0, 17, 18, 200, 256]), dtype=cp.int64)
    host, _ = make_inputs(rng, 1, 2, 256, 32, 64, np.float32)
    x = to_gpu(host)
    dh = cp.ones((1, 2, 256, 64), np.float32)

    def step():
        h, _, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), chunk_size=32, cu_seqlens=cu)
        return h, tfla_cupy.mlstm_bwd(ctx, dh)
    (h_eager, g_eager), (h_graph, g_graph) = eager_then_graph(step)
    assert _same_bits(h_graph, h_eager) and _same_bits(g_graph.df, g_eager.df)


def test_gpu_varlen_validation_errors():
    z = lambda *s, dt=np.float32: cp.zeros(s, dtype=dt)  # noqa: E731
    args = (z(1, 1, 10, 8), z(1, 1, 10, 8), z(1, 1, 10, 8), z(1, 1, 10), z(1, 1, 10))
    with pytest.raises(TypeError, match=r"^cu_seqlens: expected dtype int32 or int64, got float32$"):
        tfla_cupy.mlstm(*args, cu_seqlens=cp.asarray([0.0, 10.0], dtype=cp.float32))
    with pytest.raises(ValueError, match=r"^cu_seqlens: expected a 1-d array"):
        tfla_cupy.mlstm(*args, cu_seqlens=cp.zeros((2, 2), cp.int32))
    with pytest.raises(ValueError, match=r"^initial_state\.C: expected shape \(2, 1, 8, 8\) \(N, NH, DK, DV\)"):
        tfla_cupy.mlstm(*args, cu_seqlens=cp.asarray([0, 3, 10], dtype=cp.int32),
                        initial_state=(z(1, 1, 8, 8), z(1, 1, 8), z(1, 1)))


# ------------------------------------------------------------------------------------------
# memcheck: packed and bshd inputs, and a garbage CuPy cu_seqlens the host does not read
# ------------------------------------------------------------------------------------------

_SANITIZED = textwrap.dedent("""
    import numpy as np, cupy as cp, tfla_cupy
    rng = np.random.default_rng(0)
    S = 150
    q, k = (cp.asarray(rng.standard_normal((1, S, 2, 24)).astype(np.float32)) for _ in range(2))
    v = cp.asarray(rng.standard_normal((1, S, 2, 40)).astype(np.float32))
    i, f = (cp.asarray(rng.standard_normal((1, S, 2)).astype(np.float32)) for _ in range(2))
    for cu in ([0, 1, 33, 64, 65, 150], [0, 150], [0, 90, 40, 400, 150], [-5, 7, 7, 3, 1000], [0, 150, 0, 150]):
        cu = cp.asarray(np.array(cu), dtype=cp.int32)
        N = len(cu) - 1
        st = tfla_cupy.MLSTMState(cp.zeros((N, 2, 24, 40), np.float32), cp.zeros((N, 2, 24), np.float32),
                                  cp.zeros((N, 2), np.float32))
        h, last, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, chunk_size=32, layout="bshd", cu_seqlens=cu,
                                           initial_state=st)
        g = tfla_cupy.mlstm_bwd(ctx, cp.ones_like(h), last)
    cp.cuda.Device().synchronize()
    print("SANITIZED-RUN-OK")
""")


def test_compute_sanitizer_memcheck_varlen_bshd(tmp_path):
    run_sanitized("memcheck", _SANITIZED, tmp_path)  # asserts the clean summary
