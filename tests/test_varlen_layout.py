"""The (B, S, NH, D) layout and packed variable-length sequences (cu_seqlens) on the NumPy
path: against (B, NH, S, D) calls and against one call per sequence (float64 references on
fresh random inputs), and every validation error with its message."""

from __future__ import annotations

import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import MLSTMState
from tfla_cupy.reference import recurrent

from conftest import GATE_PARAMS, TOL_EXACT, TOL_SAME, Shape, random_inputs, random_state, ref_opts, rel_err

SEQ = ("q", "k", "v", "i", "f")


def _bshd(x):
    return np.ascontiguousarray(np.swapaxes(x, 1, 2))


def _state(rng, N, NH, DK, DV, gate):
    C, n, m = random_state(rng, Shape(N, NH, 1, DK, DV), gate)
    return MLSTMState(C, n, m)


def _lengths_case(rng, name, L):
    """Sequence lengths of a packed case: length 1, below / at / above the chunk size, ..."""
    if name == "mixed":
        return [1, L - 1, L, L + 1, 3, 2 * L + 5, 1, 1]
    if name == "one":
        return [2 * L + 3]
    if name == "many":
        return list(rng.integers(1, 2 * L, 40))
    raise ValueError(name)


def _split(x, cu):
    """Per-sequence slices of a packed (1, NH, S, ...) tensor."""
    return [x[:, :, a:b] for a, b in zip(cu[:-1], cu[1:])]


# ------------------------------------------------------------------------------------------
# bshd against bhsd
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_bshd_equals_bhsd_forward_backward(rng, gate, normalize):
    shape = Shape(2, 3, 37, 16, 24)
    x = random_inputs(rng, shape)
    state = _state(rng, 2, 3, 16, 24, gate)
    dh = rng.standard_normal((2, 3, 37, 24))
    dC = rng.standard_normal((2, 3, 16, 24))
    opts = dict(gate=gate, normalize=normalize, chunk_size=16, initial_state=state)
    h, last, ctx = tfla_cupy.mlstm_fwd(**x, **opts)
    g = tfla_cupy.mlstm_bwd(ctx, dh, MLSTMState(dC))
    xt = {n: _bshd(a) for n, a in x.items()}
    h2, last2, ctx2 = tfla_cupy.mlstm_fwd(**xt, **opts, layout="bshd")
    g2 = tfla_cupy.mlstm_bwd(ctx2, _bshd(dh), MLSTMState(dC))
    assert h2.shape == (2, 37, 3, 24)
    assert rel_err(h2, _bshd(h)) <= TOL_SAME
    for a, b in zip(last, last2):
        assert (a is None) == (b is None) and (a is None or rel_err(b, a) <= TOL_SAME)
    for name, a, b in zip(("dq", "dk", "dv", "di", "df"), g[:5], g2[:5]):
        assert b.shape == _bshd(a).shape, name
        assert rel_err(b, _bshd(a)) <= TOL_SAME, name
    assert rel_err(g2.d_initial_state.C, g.d_initial_state.C) <= TOL_SAME


def test_bshd_mlstm_and_vjp(rng):
    shape = Shape(1, 2, 20, 8, 8)
    x = random_inputs(rng, shape)
    xt = {n: _bshd(a) for n, a in x.items()}
    h = tfla_cupy.mlstm(**x)
    assert rel_err(tfla_cupy.mlstm(**xt, layout="bshd"), _bshd(h)) <= TOL_SAME
    h2, vjp = tfla_cupy.mlstm_vjp(**xt, layout="bshd")
    dh = rng.standard_normal(h2.shape)
    g = vjp(dh)
    _, vjp_ref = tfla_cupy.mlstm_vjp(**x)
    g_ref = vjp_ref(_bshd(dh))
    assert rel_err(g.df, _bshd(g_ref.df)) <= TOL_SAME and rel_err(g.dq, _bshd(g_ref.dq)) <= TOL_SAME


# ------------------------------------------------------------------------------------------
# cu_seqlens against one call per sequence
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mixed", "one", "many"])
@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "state"])
@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_varlen_equals_per_sequence_calls(rng, gate, normalize, with_state, case):
    L, NH, DK, DV = 16, 2, 8, 12
    lengths = _lengths_case(rng, case, L)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    N, S = len(lengths), int(cu[-1])
    x = random_inputs(rng, Shape(1, NH, S, DK, DV))
    state = _state(rng, N, NH, DK, DV, gate) if with_state else None
    dh = rng.standard_normal((1, NH, S, DV))
    dC = rng.standard_normal((N, NH, DK, DV))
    opts = dict(gate=gate, normalize=normalize, chunk_size=L)
    h, last, ctx = tfla_cupy.mlstm_fwd(**x, **opts, initial_state=state, cu_seqlens=cu)
    g = tfla_cupy.mlstm_bwd(ctx, dh, MLSTMState(dC))
    assert h.shape == (1, NH, S, DV) and last.C.shape == (N, NH, DK, DV)
    pieces = {n: _split(a, cu) for n, a in x.items()}
    dh_j = _split(dh, cu)
    for j in range(N):
        st = None if state is None else MLSTMState(*(None if a is None else a[j:j + 1] for a in state))
        hj, lj, cj = tfla_cupy.mlstm_fwd(**{n: pieces[n][j] for n in SEQ}, **opts, initial_state=st)
        gj = tfla_cupy.mlstm_bwd(cj, dh_j[j], MLSTMState(dC[j:j + 1]))
        a, b = cu[j], cu[j + 1]
        assert rel_err(h[:, :, a:b], hj) <= TOL_SAME
        for got, ref in zip(last, lj):
            assert (got is None) == (ref is None) and (got is None or rel_err(got[j:j + 1], ref) <= TOL_SAME)
        for name, got, ref in zip(("dq", "dk", "dv", "di", "df"), g[:5], gj[:5]):
            assert rel_err(got[:, :, a:b], ref) <= TOL_SAME, (name, j)
        if with_state:
            assert rel_err(g.d_initial_state.C[j:j + 1], gj.d_initial_state.C) <= TOL_SAME
    if with_state:
        assert g.d_initial_state.C.shape == (N, NH, DK, DV)
    else:
        assert g.d_initial_state is None


@pytest.mark.parametrize("gate, normalize", GATE_PARAMS)
def test_varlen_equals_step_recurrence(rng, gate, normalize):
    """Independent of the chunkwise code: every sequence against the step recurrence from its
    own initial state (no state crosses a boundary)."""
    L, NH, DK, DV = 16, 2, 8, 8
    lengths = [5, 1, 33, 16]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    S, N = int(cu[-1]), len(lengths)
    x = random_inputs(rng, Shape(1, NH, S, DK, DV))
    state = _state(rng, N, NH, DK, DV, gate)
    h, last = tfla_cupy.mlstm(**x, gate=gate, normalize=normalize, chunk_size=L, initial_state=state,
                              return_state=True, cu_seqlens=cu)
    opts = ref_opts(Shape(1, NH, S, DK, DV), gate, normalize)
    for j, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        hj, C, n, m = recurrent.fwd_recurrent(**{k: v[:, :, a:b] for k, v in x.items()}, C0=state.C[j:j + 1],
                                              n0=state.n[j:j + 1],
                                              m0=state.m[j:j + 1] if gate == "exp" else np.zeros((1, NH)), **opts)
        assert rel_err(h[:, :, a:b], hj) <= TOL_EXACT
        assert rel_err(last.C[j:j + 1], C) <= TOL_EXACT


def test_varlen_bshd_and_int64_offsets(rng):
    L, NH, DK, DV = 16, 2, 8, 8
    cu = np.array([0, 3, 20, 21, 50], dtype=np.int64)
    x = random_inputs(rng, Shape(1, NH, 50, DK, DV))
    h, ctx_last, ctx = tfla_cupy.mlstm_fwd(**x, chunk_size=L, cu_seqlens=cu)
    xt = {n: _bshd(a) for n, a in x.items()}
    h2, last2, ctx2 = tfla_cupy.mlstm_fwd(**xt, chunk_size=L, cu_seqlens=cu.astype(np.int32), layout="bshd")
    assert rel_err(h2, _bshd(h)) <= TOL_SAME and rel_err(last2.C, ctx_last.C) <= TOL_SAME
    dh = rng.standard_normal(h.shape)
    g, g2 = tfla_cupy.mlstm_bwd(ctx, dh), tfla_cupy.mlstm_bwd(ctx2, _bshd(dh))
    assert rel_err(g2.df, _bshd(g.df)) <= TOL_SAME and rel_err(g2.dv, _bshd(g.dv)) <= TOL_SAME


def test_single_sequence_varlen_equals_plain_call(rng):
    x = random_inputs(rng, Shape(1, 2, 40, 8, 8))
    h = tfla_cupy.mlstm(**x, chunk_size=16)
    assert rel_err(tfla_cupy.mlstm(**x, chunk_size=16, cu_seqlens=np.array([0, 40])), h) <= TOL_SAME


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------

B1, NH, S, DK, DV = 1, 2, 10, 8, 4


def _ok(layout="bhsd", B=B1):
    shape = (B, NH, S) if layout == "bhsd" else (B, S, NH)
    return dict(q=np.zeros(shape + (DK,)), k=np.zeros(shape + (DK,)), v=np.zeros(shape + (DV,)),
                i=np.zeros(shape), f=np.zeros(shape))


VARLEN_ERRORS = [
    ("layout-unknown", {}, dict(layout="bsnd"), ValueError, r"^layout: expected one of \('bhsd', 'bshd'\), got 'bsnd'$"),
    ("layout-int", {}, dict(layout=1), ValueError, r"^layout: expected one of \('bhsd', 'bshd'\), got 1$"),
    ("bshd-shape-mismatch", dict(k=np.zeros((B1, NH, S, DK))), dict(layout="bshd"), ValueError,
     r"^k: expected shape \(1, 10, 2, 8\) \(B, S, NH, DK\) to match q, got \(1, 2, 10, 8\)$"),
    ("bshd-gate-shape", {"i": np.zeros((B1, NH, S))}, dict(layout="bshd"), ValueError,
     r"^i: expected shape \(1, 10, 2\) \(B, S, NH\) to match q, got \(1, 2, 10\)$"),
    ("cu-2d", {}, dict(cu_seqlens=np.array([[0, 10]])), ValueError,
     r"^cu_seqlens: expected a 1-d array of N \+ 1 offsets, got shape \(1, 2\)$"),
    ("cu-float", {}, dict(cu_seqlens=np.array([0.0, 10.0])), TypeError,
     r"^cu_seqlens: expected dtype int32 or int64, got float64$"),
    ("cu-int16", {}, dict(cu_seqlens=np.array([0, 10], dtype=np.int16)), TypeError,
     r"^cu_seqlens: expected dtype int32 or int64, got int16$"),
    ("cu-str", {}, dict(cu_seqlens="0,10"), TypeError,
     r"^cu_seqlens: expected None or a 1-d int32 / int64 NumPy or CuPy array, got str$"),
    ("cu-short", {}, dict(cu_seqlens=np.array([0])), ValueError,
     r"^cu_seqlens: expected N \+ 1 >= 2 offsets \(at least one sequence\), got 1$"),
    ("cu-start", {}, dict(cu_seqlens=np.array([1, 10])), ValueError,
     r"^cu_seqlens: expected cu_seqlens\[0\] == 0, got 1$"),
    ("cu-not-increasing", {}, dict(cu_seqlens=np.array([0, 4, 4, 10])), ValueError,
     r"^cu_seqlens: expected strictly increasing offsets, got cu_seqlens\[1\] = 4 and cu_seqlens\[2\] = 4$"),
    ("cu-decreasing", {}, dict(cu_seqlens=np.array([0, 6, 3, 10])), ValueError,
     r"^cu_seqlens: expected strictly increasing offsets, got cu_seqlens\[1\] = 6 and cu_seqlens\[2\] = 3$"),
    ("cu-end", {}, dict(cu_seqlens=np.array([0, 4, 9])), ValueError,
     r"^cu_seqlens: expected cu_seqlens\[-1\] == S = 10 \(the packed length\), got 9$"),
    ("cu-B2", _ok(B=2), dict(cu_seqlens=np.array([0, 10])), ValueError,
     r"^cu_seqlens: packed sequences need B = 1 .*got B = 2$"),
    ("cu-state-batch", {}, dict(cu_seqlens=np.array([0, 4, 10]),
                                initial_state=MLSTMState(np.zeros((1, NH, DK, DV)), np.zeros((1, NH, DK)),
                                                         np.zeros((1, NH)))), ValueError,
     r"^initial_state\.C: expected shape \(2, 2, 8, 4\) \(N, NH, DK, DV\) \(one state per cu_seqlens sequence\), "
     r"got \(1, 2, 8, 4\)$"),
]


@pytest.mark.parametrize("arrays, opts, exc, match",
                         [pytest.param(*case[1:], id=case[0]) for case in VARLEN_ERRORS])
@pytest.mark.parametrize("entry", ["mlstm_fwd", "mlstm", "mlstm_vjp"])
def test_layout_and_cu_seqlens_validation_errors(entry, arrays, opts, exc, match):
    x = _ok(opts.get("layout", "bhsd") if opts.get("layout") in ("bhsd", "bshd") else "bhsd")
    x.update(arrays)
    with pytest.raises(exc, match=match):
        getattr(tfla_cupy, entry)(**x, **opts)


def test_backward_validation_in_bshd_and_varlen():
    _, _, ctx = tfla_cupy.mlstm_fwd(**_ok("bshd"), layout="bshd")
    with pytest.raises(ValueError, match=r"^dh: expected shape \(1, 10, 2, 4\) \(B, S, NH, DV\) of h, "
                                         r"got \(1, 2, 10, 4\)$"):
        tfla_cupy.mlstm_bwd(ctx, np.zeros((1, NH, S, DV)))
    _, _, ctx = tfla_cupy.mlstm_fwd(**_ok(), cu_seqlens=np.array([0, 3, 10]))
    with pytest.raises(ValueError, match=r"^d_state\.C: expected shape \(2, 2, 8, 4\) \(N, NH, DK, DV\)"):
        tfla_cupy.mlstm_bwd(ctx, np.zeros((1, NH, S, DV)), MLSTMState(np.zeros((1, NH, DK, DV))))
