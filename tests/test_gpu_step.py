"""CUDA decode step (step_kernel, step_nm_kernel): against the float64 step reference and the
one-token mlstm for every gate and dtype; in place ≡ out of place; state slots; the StepPlan in a
captured CUDA graph ≡ eager; prefill → decode; errors of the GPU-only options."""

import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import MLSTMState
from tfla_cupy.reference import recurrent
from gpu_utils import DTYPES, FWD_TOL, GATE_MODES, cp, gpu, make_inputs, poisoned_allocations, rel_err, seed_of

pytestmark = gpu

STEP_DTYPES = ("f32", "f16", "bf16")
# (B, NH, DK, DV): the xLSTM-7B head, ragged DV slabs, the smallest dims, a wide batch, the largest dims
SHAPES = [(1, 8, 256, 512), (3, 2, 48, 96), (2, 1, 8, 8), (64, 2, 64, 136), (1, 1, 512, 1024)]


def _token(rng, B, NH, DK, DV, dt, init=True):
    """One token rounded to dt (gates fp32) and a random fp32 state; host copies and float64 refs."""
    host, ref = make_inputs(rng, B, NH, 1, DK, DV, DTYPES[dt], init=init)
    for n in "qkvif":
        host[n], ref[n] = host[n][:, :, 0], ref[n][:, :, 0]
    return host, ref


def _ref_step(ref, gate, normalize, rows=None):
    B, NH, DK = ref["q"].shape
    DV = ref["v"].shape[-1]
    C = ref.get("C0", np.zeros((B, NH, DK, DV)))
    n = ref.get("n0", np.zeros((B, NH, DK)))
    m = ref.get("m0", np.zeros((B, NH))) if gate == "exp" else np.zeros((B, NH))
    return recurrent.step(*(ref[x] for x in "qkvif"), C, n, m, gate=gate, normalize=normalize, eps=1e-6,
                          scale=DK ** -0.5)


def _state(x, gate, normalize):
    return MLSTMState(x["C0"], x["n0"] if normalize else None, x["m0"] if gate == "exp" else None)


def _copy(st):
    return MLSTMState(*(None if a is None else a.copy() for a in st))


def _assert_state(got, C, n, m, gate, normalize, tol):
    assert rel_err(got.C, C) <= tol
    if normalize:
        assert rel_err(got.n, n) <= tol
    if gate == "exp":
        assert rel_err(got.m, m) <= tol


@pytest.mark.parametrize("init", [True, False], ids=["init", "noinit"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-NH{}-DK{}-DV{}".format(*s))
@pytest.mark.parametrize("mode", list(GATE_MODES))
@pytest.mark.parametrize("dt", STEP_DTYPES)
def test_step_matches_reference_and_one_token_mlstm(dt, mode, shape, init):
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed_of("step", dt, mode, shape, init))
    host, ref = _token(rng, *shape, dt, init=init)
    h_ref, C, n, m = _ref_step(ref, gate, normalize)
    x = {k: cp.asarray(a) for k, a in host.items()}
    state = _state(x, gate, normalize) if init else None
    with poisoned_allocations():
        h, new = tfla_cupy.mlstm_step(*(x[k] for k in "qkvif"), state, gate=gate, normalize=normalize)
    assert h.dtype == DTYPES[dt] and new.C.dtype == np.float32
    assert rel_err(h, h_ref) <= FWD_TOL[dt]
    _assert_state(new, C, n, m, gate, normalize, FWD_TOL["f32"])
    h1, last = tfla_cupy.mlstm(*(x[k][:, :, None] for k in "qkvif"), gate=gate, normalize=normalize,
                               initial_state=state, return_state=True)
    # two GPU results, each within FWD_TOL of the float64 reference; the chunkwise state of a
    # 16-bit call goes through tensor-core products in that dtype, so its state is held to FWD_TOL[dt]
    assert rel_err(h, cp.asnumpy(h1[:, :, 0]).astype(np.float64)) <= 2 * FWD_TOL[dt]
    _assert_state(new, *(None if a is None else cp.asnumpy(a).astype(np.float64) for a in last), gate, normalize,
                  2 * FWD_TOL[dt])


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "B{}-NH{}-DK{}-DV{}".format(*s))
@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_in_place_equals_out_of_place_and_is_deterministic(mode, shape):
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed_of("inplace", mode, shape))
    host, _ = _token(rng, *shape, "bf16")
    x = {k: cp.asarray(a) for k, a in host.items()}
    args = [x[k] for k in "qkvif"]
    st = _state(x, gate, normalize)
    h_ref, new = tfla_cupy.mlstm_step(*args, st, gate=gate, normalize=normalize)
    h_again, again = tfla_cupy.mlstm_step(*args, st, gate=gate, normalize=normalize)
    assert bool(cp.all(h_again == h_ref)) and bool(cp.all(again.C == new.C))  # no atomics: bit-identical
    bufs = MLSTMState(*(None if a is None else cp.full_like(a, np.nan) for a in st))
    h_out, out = tfla_cupy.mlstm_step(*args, st, gate=gate, normalize=normalize, out_state=bufs)
    inplace = _copy(st)
    h_in, res = tfla_cupy.mlstm_step(*args, inplace, gate=gate, normalize=normalize, out_state=inplace)
    assert res.C is inplace.C and out.C is bufs.C
    for got in (out, res):
        for a, b in zip(got, new):
            assert (a is None) == (b is None) and (a is None or bool(cp.all(a == b)))
    assert bool(cp.all(h_out == h_ref)) and bool(cp.all(h_in == h_ref))


@pytest.mark.parametrize("mode", list(GATE_MODES))
@pytest.mark.parametrize("dt", STEP_DTYPES)
def test_state_slots(dt, mode):
    """Selected pool rows equal the batched step on the gathered rows (bit for bit); rows not
    selected and −1 rows stay bit-identical; h of a −1 row is 0, of an out-of-range row NaN."""
    gate, normalize = GATE_MODES[mode]
    B, NH, DK, DV, P = 5, 2, 64, 96, 9
    rng = np.random.default_rng(seed_of("slots", dt, mode))
    host, _ = _token(rng, B, NH, DK, DV, dt)
    x = {k: cp.asarray(a) for k, a in host.items() if k in "qkvif"}
    pool = MLSTMState(cp.asarray(rng.standard_normal((P, NH, DK, DV)), dtype=np.float32),
                      cp.asarray(rng.standard_normal((P, NH, DK)), dtype=np.float32) if normalize else None,
                      cp.asarray(rng.standard_normal((P, NH)), dtype=np.float32) if gate == "exp" else None)
    before = _copy(pool)
    idx = np.array([6, -1, 0, 3, 42], dtype=np.int32)  # 42: out of range, only reachable with GPU indices
    used = idx[[0, 2, 3]]
    gathered = MLSTMState(*(None if a is None else a[cp.asarray(used)] for a in pool))
    h_b, new_b = tfla_cupy.mlstm_step(*(x[k][[0, 2, 3]] for k in "qkvif"), gathered, gate=gate, normalize=normalize)
    h, res = tfla_cupy.mlstm_step(*(x[k] for k in "qkvif"), pool, gate=gate, normalize=normalize,
                                  state_indices=cp.asarray(idx))
    assert res.C is pool.C
    h = cp.asnumpy(h).astype(np.float64)
    assert np.all(h[1] == 0) and np.all(np.isnan(h[4]))
    # the batched call picks its own DV slab width (fewer rows): equal up to rounding, not bits
    assert rel_err(h[[0, 2, 3]], cp.asnumpy(h_b).astype(np.float64)) <= FWD_TOL[dt]
    untouched = [r for r in range(P) if r not in used]
    for a, b, nb in zip(pool, before, new_b):
        if a is None:
            continue
        assert bool(cp.all(a[cp.asarray(untouched)] == b[cp.asarray(untouched)]))
        assert rel_err(a[cp.asarray(used)], cp.asnumpy(nb).astype(np.float64)) <= FWD_TOL["f32"]


def test_captured_graph_replay_equals_eager():
    """A StepPlan decode loop captured once in a CUDA graph, replayed per token (inputs copied into
    its buffers, state updated in place), equals eager mlstm_step calls bit for bit."""
    B, NH, DK, DV, T = 2, 4, 128, 256, 6
    rng = np.random.default_rng(11)
    host, _ = make_inputs(rng, B, NH, T, DK, DV, DTYPES["bf16"], init=True)
    seq = {k: cp.asarray(a) for k, a in host.items()}
    eager_state, eager_h = MLSTMState(seq["C0"], seq["n0"], seq["m0"]), []
    for t in range(T):
        h, eager_state = tfla_cupy.mlstm_step(*(seq[k][:, :, t] for k in "qkvif"), eager_state)
        eager_h.append(h)
    bufs = {k: cp.empty(seq[k][:, :, 0].shape, seq[k].dtype) for k in "qkvif"}
    state = MLSTMState(seq["C0"].copy(), seq["n0"].copy(), seq["m0"].copy())
    plan = tfla_cupy.mlstm_step_plan(*(bufs[k] for k in "qkvif"), state)
    h_out = cp.empty((B, NH, DV), seq["q"].dtype)
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()  # the eager steps and copies above ran on the null stream, which a
    with stream:                    # non-blocking stream does not wait for
        saved = _copy(state)
        plan(*(bufs[k] for k in "qkvif"), state, h=h_out)  # warm-up (compiles); then restore the state
        for a, b in zip(state, saved):
            a[...] = b
        stream.synchronize()
        stream.begin_capture()
        plan(*(bufs[k] for k in "qkvif"), state, h=h_out)
        graph = stream.end_capture()
        for t in range(T):
            for k in "qkvif":
                bufs[k][...] = seq[k][:, :, t]
            graph.launch(stream)
            assert bool(cp.all(h_out == eager_h[t]))
        stream.synchronize()
    for a, b in zip(state, eager_state):
        assert bool(cp.all(a == b))


@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_prefill_then_decode_equals_one_call(mode):
    gate, normalize = GATE_MODES[mode]
    B, NH, S, DK, DV, S0 = 2, 2, 40, 64, 128, 33
    rng = np.random.default_rng(seed_of("prefill", mode))
    host, _ = make_inputs(rng, B, NH, S, DK, DV, DTYPES["f32"])
    x = {k: cp.asarray(a) for k, a in host.items()}
    h_all = tfla_cupy.mlstm(*(x[k] for k in "qkvif"), gate=gate, normalize=normalize)
    _, st = tfla_cupy.mlstm(*(x[k][:, :, :S0] for k in "qkvif"), gate=gate, normalize=normalize, return_state=True)
    pool = MLSTMState(cp.zeros((4, NH, DK, DV), np.float32), cp.zeros((4, NH, DK), np.float32) if normalize else None,
                      cp.zeros((4, NH), np.float32) if gate == "exp" else None)
    slots = cp.asarray(np.array([3, 1], np.int32))
    for a, b in zip(pool, st):
        if a is not None:
            a[slots] = b
    tok = {k: cp.empty(x[k][:, :, 0].shape, x[k].dtype) for k in "qkvif"}
    plan = tfla_cupy.mlstm_step_plan(*(tok[k] for k in "qkvif"), st, gate=gate, normalize=normalize)
    pool_plan = tfla_cupy.mlstm_step_plan(*(tok[k] for k in "qkvif"), pool, gate=gate, normalize=normalize,
                                          state_indices=slots)
    for t in range(S0, S):
        for k in "qkvif":
            tok[k][...] = x[k][:, :, t]
        h, _ = plan(*(tok[k] for k in "qkvif"), st)
        # the chunkwise forward and the step, each within FWD_TOL of the float64 reference
        assert rel_err(h, cp.asnumpy(h_all[:, :, t]).astype(np.float64)) <= 2 * FWD_TOL["f32"]
        h_pool, _ = pool_plan(*(tok[k] for k in "qkvif"), pool, state_indices=slots)
        assert bool(cp.all(h_pool == h))


def test_gpu_decode_option_errors():
    B, NH, DK, DV, P = 2, 2, 16, 32, 4
    z = lambda *s, dt=np.float32: cp.zeros(s, dtype=dt)  # noqa: E731
    tok = [z(B, NH, DK), z(B, NH, DK), z(B, NH, DV), z(B, NH), z(B, NH)]
    pool = MLSTMState(z(P, NH, DK, DV), z(P, NH, DK), z(P, NH))
    with pytest.raises(TypeError, match=r"^state_indices: expected dtype int32, got int64$"):
        tfla_cupy.mlstm_step(*tok, pool, state_indices=cp.zeros(B, np.int64))
    with pytest.raises(ValueError, match=r"^state_indices: expected shape \(2,\) \(B,\) to match q, got \(3\)$"):
        tfla_cupy.mlstm_step(*tok, pool, state_indices=cp.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"^state_indices: expected values in \[-1, 4\)"):
        tfla_cupy.mlstm_step(*tok, pool, state_indices=np.array([0, 4], np.int32))
    with pytest.raises(ValueError, match=r"^state\.C: the GPU path writes this buffer in place and needs it "
                                         r"C-contiguous"):
        big = z(P, NH, DK, 2 * DV)
        tfla_cupy.mlstm_step(*tok, pool._replace(C=big[..., :DV]), state_indices=cp.zeros(B, np.int32))
    st = MLSTMState(z(B, NH, DK, DV), z(B, NH, DK), z(B, NH))
    with pytest.raises(TypeError, match=r"^out_state\.C: the GPU path keeps states in float32, got float16$"):
        tfla_cupy.mlstm_step(*tok, st, out_state=st._replace(C=z(B, NH, DK, DV, dt=np.float16)))
    flat = z(2 * B * NH * DK * DV + 4)
    shifted = MLSTMState(flat[1:1 + B * NH * DK * DV].reshape(B, NH, DK, DV), st.n, st.m)
    with pytest.raises(ValueError, match=r"^out_state\.C: the GPU path needs a 16-byte aligned buffer"):
        tfla_cupy.mlstm_step(*tok, st, out_state=shifted)
    overlap = MLSTMState(flat[:B * NH * DK * DV].reshape(B, NH, DK, DV), st.n, st.m)
    partial = MLSTMState(flat[8:8 + B * NH * DK * DV].reshape(B, NH, DK, DV), st.n, st.m)
    with pytest.raises(ValueError, match=r"^out_state\.C: overlaps state\.C without being the same buffer"):
        tfla_cupy.mlstm_step(*tok, overlap, out_state=partial)
    with pytest.raises(TypeError, match=r"^f: a GPU StepPlan reads float32 gates"):
        tfla_cupy.mlstm_step_plan(*tok[:4], z(B, NH, dt=np.float16), st)
    plan = tfla_cupy.mlstm_step_plan(*tok, st)
    with pytest.raises(ValueError, match=r"^q: this StepPlan takes a C-contiguous, 16-byte aligned \(2, 2, 16\) "
                                         r"float32 array, got shape \(2, 2, 8\)"):
        plan(z(B, NH, 8), *tok[1:], st)


def test_generate_example_graph_decode_agrees_with_the_sequence_model():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("generate", Path(__file__).parent.parent / "examples" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    res = generate.generate(cp, batch=3, prompt=20, new_tokens=12, verbose=True)
    assert res["graph"], "the decode step was not captured in a CUDA graph"
    assert res["max_rel_diff"] <= 1e-3


def test_forward_out_state_on_the_gpu():
    B, NH, S, DK, DV = 2, 2, 70, 32, 64
    rng = np.random.default_rng(5)
    host, _ = make_inputs(rng, B, NH, S, DK, DV, DTYPES["bf16"], init=True)
    x = {k: cp.asarray(a) for k, a in host.items()}
    init = MLSTMState(x["C0"], x["n0"], x["m0"])
    h, last = tfla_cupy.mlstm(*(x[k] for k in "qkvif"), initial_state=init, return_state=True)
    bufs = MLSTMState(cp.full((B, NH, DK, DV), np.nan, np.float32), cp.full((B, NH, DK), np.nan, np.float32),
                      cp.full((B, NH), np.nan, np.float32))
    h2, got = tfla_cupy.mlstm(*(x[k] for k in "qkvif"), initial_state=init, return_state=True, out_state=bufs)
    assert got.C is bufs.C and bool(cp.all(h2 == h))
    for a, b in zip(got, last):
        assert bool(cp.all(a == b))
    with pytest.raises(ValueError, match=r"^out_state\.C: overlaps initial_state\.C"):
        tfla_cupy.mlstm(*(x[k] for k in "qkvif"), initial_state=init, out_state=init)
