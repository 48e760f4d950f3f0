"""The GPU path's launch plan without a GPU: a fake CuPy (NumPy arrays with device pointers)
and a recording kernel loader. Checks what every kernel receives for the (B, S, NH, D) layout,
strided views and packed sequences: data pointers (no copies), element strides, chunk slots,
grids, and the shapes of what comes back."""

from __future__ import annotations

import types

import ml_dtypes
import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import _arrays, _loader
from tfla_cupy._gpu import decode as gpu_decode
from tfla_cupy._gpu import fwd as gpu_forward
from tfla_cupy._gpu import launch as gpu_launch
from tfla_cupy._gpu.operands import cdiv
from tfla_cupy._params import PARAMS_DTYPE, STEP_PARAMS_DTYPE


class FakeArray(np.ndarray):
    """A host array that looks like a CuPy array to the GPU path."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0], device_id=0)

    @property
    def device(self):
        return types.SimpleNamespace(id=0)


def _fake(a):
    return np.asarray(a).view(FakeArray)


class _Device:
    compute_capability = "80"  # the sm80 family; test_hopper_plan_* switch it to "90"

    def __init__(self, i=0):
        self.id = i

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fake_cupy():
    cp = types.SimpleNamespace()
    cp.ndarray = FakeArray
    cp.empty = lambda shape, dtype=np.float32: _fake(np.full(shape, 0, dtype=dtype))
    cp.zeros = lambda shape, dtype=np.float32: _fake(np.zeros(shape, dtype=dtype))
    cp.asarray = lambda a, dtype=None: a if isinstance(a, FakeArray) and dtype is None else _fake(np.asarray(a, dtype))
    cp.ascontiguousarray = lambda a: a if a.flags.c_contiguous else _fake(np.ascontiguousarray(a))
    cp.cuda = types.SimpleNamespace(Device=_Device)
    return cp


@pytest.fixture
def launches(monkeypatch):
    """Run the GPU path on fake arrays; returns the list of (kernel name, grid, block, params, smem)."""
    cp = _fake_cupy()
    log = []

    def get_kernel(name):
        def launch(grid, block, params, smem=0):
            args = params if isinstance(params, tuple) else (params,)  # Params first, then any others
            log.append((name, grid, block, args[0][0].copy(), smem))
        return launch

    kind_of = _arrays.kind_of
    monkeypatch.setattr(_arrays, "kind_of", lambda x: "cuda" if isinstance(x, FakeArray) else kind_of(x))
    monkeypatch.setattr(_arrays, "cupy_module", lambda: cp)
    monkeypatch.setattr(_loader, "get_kernel", get_kernel)
    monkeypatch.setattr(_loader, "device_limits", lambda device_id: (132, 232_448))
    monkeypatch.setattr(gpu_forward, "_PLANS", {})  # cached plans and geometries hold the kernels of their test
    monkeypatch.setattr(gpu_launch, "_GEOMETRIES", {})

    def kernel_on(device_id, name):  # the decode step launches CuPy functions with a raw record
        def fn(grid, block, args):
            log.append((name, grid[0], block[0], args[0].view(STEP_PARAMS_DTYPE)[0].copy(), 0))
        return types.SimpleNamespace(fn=fn)

    monkeypatch.setattr(_loader, "kernel_on", kernel_on)
    monkeypatch.setattr(gpu_decode, "_SEEN", {})
    decode_launch = gpu_decode.step_launch.__wrapped__
    monkeypatch.setattr(gpu_decode, "step_launch", decode_launch)
    return log


@pytest.fixture
def tensor_maps(monkeypatch):
    """Stand-in for the driver's tensor-map encoder: records what the fused forward asks for."""
    from tfla_cupy import _tma
    calls = []

    def fused_maps(tensors, S, NH, B):
        calls.append(([(x.data.ptr, strides) for x, strides in tensors], S, NH, B))
        return np.zeros(1, dtype=_tma.FUSED_MAPS_DTYPE)

    monkeypatch.setattr(_tma, "unavailable", lambda: None)
    monkeypatch.setattr(_tma, "fused_maps", fused_maps)
    return calls


def _by_kernel(log, part):
    found = [entry for entry in log if part in entry[0]]
    assert found, f"no {part} launch in {[e[0] for e in log]}"
    return found


def _strides(params, name):
    return tuple(int(x) for x in params[f"st_{name}"])


def test_fused_bshd_views_reach_the_kernels_in_place(launches):
    B, S, NH, DK, DV = 2, 100, 4, 16, 32
    W = 2 * DK + DV
    rng = np.random.default_rng(0)
    qkv = _fake(rng.standard_normal((B, S, NH, W)).astype(np.float32))
    g = _fake(rng.standard_normal((B, S, NH, 2)).astype(np.float32))
    q, k, v, i, f = qkv[..., :DK], qkv[..., DK:2 * DK], qkv[..., 2 * DK:], g[..., 0], g[..., 1]
    h, state, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, chunk_size=32, layout="bshd")
    assert h.shape == (B, S, NH, DV) and state.C.shape == (B, NH, DK, DV)
    _, _, _, p, _ = _by_kernel(launches, "fwd_h_kernel")[0]
    for name, x in zip("qkvif", (q, k, v, i, f)):
        assert int(p[name]) == x.data.ptr, f"{name} was copied"
    assert _strides(p, "q") == (S * NH * W, W, NH * W)  # (batch, head, token) in elements
    assert _strides(p, "v") == (S * NH * W, W, NH * W)
    assert _strides(p, "i") == (S * NH * 2, 2, NH * 2)
    assert _strides(p, "h") == (S * NH * DV, DV, NH * DV)
    assert _strides(p, "N") == (NH * S, S, 1)
    assert int(p["NSEQ"]) == B and int(p["NC"]) == 4 and int(p["NM"]) == 5 and int(p["seq_table"]) == 0
    dh = _fake(np.ones((B, S, NH, DV), np.float32))
    grads = tfla_cupy.mlstm_bwd(ctx, dh)
    for name, x, D in (("dq", q, DK), ("dk", k, DK), ("dv", v, DV)):
        got = getattr(grads, name)
        assert got.shape == x.shape and got.flags.c_contiguous, name
    assert grads.di.shape == (B, S, NH) and grads.df.shape == (B, S, NH)
    _, _, _, p, _ = _by_kernel(launches, "bwd_gates_kernel")[0]
    assert _strides(p, "df") == (S * NH, 1, NH) and _strides(p, "dh") == (S * NH * DV, DV, NH * DV)


def test_misaligned_view_is_copied_once(launches):
    rng = np.random.default_rng(1)
    buf = _fake(rng.standard_normal((1, 2, 50, 17)).astype(np.float32))
    q = buf[..., 1:]  # 4-byte offset: not 16-byte aligned
    k = _fake(rng.standard_normal((1, 2, 50, 16)).astype(np.float32))
    v = _fake(rng.standard_normal((1, 2, 50, 16)).astype(np.float32))
    i, f = (_fake(rng.standard_normal((1, 2, 50)).astype(np.float32)) for _ in range(2))
    tfla_cupy.mlstm(q, k, v, i, f, chunk_size=16)
    _, _, _, p, _ = _by_kernel(launches, "fwd_h_kernel")[0]
    assert int(p["q"]) != q.data.ptr and int(p["k"]) == k.data.ptr
    assert _strides(p, "q") == (2 * 50 * 16, 50 * 16, 16)


@pytest.mark.parametrize("cu_dtype", [np.int32, np.int64])
def test_varlen_grids_and_chunk_slots(launches, cu_dtype):
    NH, DK, DV, L = 3, 16, 32, 16
    lengths = [1, 15, 16, 17, 40]
    S, N = sum(lengths), len(lengths)
    cu = _fake(np.concatenate([[0], np.cumsum(lengths)]).astype(cu_dtype))
    rng = np.random.default_rng(2)
    x = [_fake(rng.standard_normal((1, NH, S, d)).astype(np.float32)) for d in (DK, DK, DV)]
    x += [_fake(rng.standard_normal((1, NH, S)).astype(np.float32)) for _ in range(2)]
    st = [_fake(np.zeros(s, np.float32)) for s in ((N, NH, DK, DV), (N, NH, DK), (N, NH))]
    h, last, ctx = tfla_cupy.mlstm_fwd(*x, chunk_size=L, cu_seqlens=cu, initial_state=tuple(st))
    assert h.shape == (1, NH, S, DV) and last.C.shape == (N, NH, DK, DV) and last.m.shape == (N, NH)
    NC = S // L + N  # the host-known bound on the chunk slots
    name, grid, block, p, _ = _by_kernel(launches, "seq_table_kernel")[0]
    assert name.endswith({np.int32: "<int>", np.int64: "<long long>"}[cu_dtype])
    assert (grid, block) == (1, 1024) and int(p["cu_seqlens"]) == cu.data.ptr
    assert int(p["NC"]) == NC and int(p["NSEQ"]) == N
    table = ctx.saved["seq_table"]
    assert table.shape == (2 * (N + 1) + NC,) and table.dtype == np.int32
    assert launches[0][0] == name  # the table is built first
    _, grid, _, p, _ = _by_kernel(launches, "chunk_gates_kernel")[0]
    assert grid == NC * NH and int(p["seq_table"]) == table.data.ptr
    _, grid, _, p, _ = _by_kernel(launches, "fwd_states_kernel")[0]
    assert grid == 1 * 1 * N * NH  # one DK block, one DV block per (sequence, head)
    assert int(p["NM"]) == NC + N and int(p["S"]) == S
    _, grid, block, p, _ = _by_kernel(launches, "fwd_h_kernel")[0]
    assert grid == 1 * 1 * NC * NH  # DV block × row tiles (L = 16: one) × chunk slots × heads
    assert ctx.saved["C_last"].shape == (N, NH, DK, DV)
    grads = tfla_cupy.mlstm_bwd(ctx, _fake(np.ones((1, NH, S, DV), np.float32)),
                                tfla_cupy.MLSTMState(_fake(np.zeros((N, NH, DK, DV), np.float32))))
    assert grads.d_initial_state.C.shape == (N, NH, DK, DV)
    _, grid, block, p, _ = _by_kernel(launches, "bwd_gates_kernel")[0]
    assert grid == -(-NC * NH // 8) and block == 256 and int(p["seq_table"]) == table.data.ptr  # a warp per chunk slot
    _, grid, _, p, _ = _by_kernel(launches, "bwd_dstates_kernel")[0]
    assert grid == N * NH


def test_every_launch_gets_the_geometry(launches):
    rng = np.random.default_rng(3)
    x = [_fake(rng.standard_normal((2, 2, 40, 16)).astype(np.float32)) for _ in range(3)]
    x += [_fake(rng.standard_normal((2, 2, 40)).astype(np.float32)) for _ in range(2)]
    _, _, ctx = tfla_cupy.mlstm_fwd(*x, chunk_size=16)
    tfla_cupy.mlstm_bwd(ctx, _fake(np.ones((2, 2, 40, 16), np.float32)))
    assert {e[0].split("<")[0] for e in launches} == {
        "tfla::chunk_gates_kernel", "tfla::fwd_states_kernel", "tfla::fwd_h_kernel", "tfla::bwd_dq_kernel",
        "tfla::bwd_dstates_kernel", "tfla::bwd_dk_kernel", "tfla::bwd_dv_kernel", "tfla::bwd_gates_kernel"}
    for name, grid, block, p, smem in launches:
        assert p.dtype == PARAMS_DTYPE
        assert (int(p["NH"]), int(p["NSEQ"]), int(p["NC"]), int(p["NM"]), int(p["S"])) == (2, 2, 3, 4, 40), name
        assert _strides(p, "i") == (80, 40, 1) and int(p["i"]) == x[3].data.ptr, name
        if int(p["q"]):  # every kernel but stage 0 reads q
            assert _strides(p, "q") == (2 * 40 * 16, 40 * 16, 16) and int(p["q"]) == x[0].data.ptr, name
        assert cdiv(40, 16) == int(p["NC"])


def test_hopper_plan_fused_forward_in_place_then_hopper_backward(launches, tensor_maps, monkeypatch):
    """On compute capability 9.0 a covered call (16-bit, L = 128, DK = 128, DV % 64 == 0) runs the
    fused forward — one CTA per (DV block, sequence, head), its thread count and shared memory
    from config.FUSED_FWD, bshd views in place, no chunk states unless kept — and the backward
    recomputes the states (unless kept) with the fused kernel's states mode (two CTAs per SM), takes
    dq, dk, dv from the Hopper chunk kernel (one CTA per half chunk, chunk slot and head, owning
    every output column; the gate terms: W from dq, pair sums from dk; the weights from one gate record
    per chunk, written first by bwd_terms_sm90) and dC from the Hopper reverse pass (one CTA per
    64 × 64 block of dC, sequence and head, its tiles by tensor maps of q and dh in place)."""
    from tfla_cupy import config
    from tfla_cupy._arrays import BFLOAT16
    monkeypatch.setattr(_Device, "compute_capability", "90")
    monkeypatch.setattr(_loader, "device_limits", lambda device_id: (16, 232_448))  # 30 CTAs fill 16 SMs
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    monkeypatch.delenv(config.BWD_WALK_ENV, raising=False)  # (DV = 192: the fused backward does not cover it)
    lengths = [1, 127, 128, 129, 300]
    S, N, NH, DK, DV = sum(lengths), len(lengths), 2, 128, 192
    cu = _fake(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    rng = np.random.default_rng(4)
    q, k = (_fake(rng.standard_normal((1, S, NH, DK)).astype(BFLOAT16)) for _ in range(2))
    v = _fake(rng.standard_normal((1, S, NH, DV)).astype(BFLOAT16))
    i, f = (_fake(rng.standard_normal((1, S, NH)).astype(np.float32)) for _ in range(2))
    contexts = {}
    for keep in (False, True):
        launches.clear()
        h, last, ctx = contexts[keep] = tfla_cupy.mlstm_fwd(q, k, v, i, f, chunk_size=128, cu_seqlens=cu,
                                                            layout="bshd", keep_states=keep)
        names = [e[0] for e in launches]
        assert not any("fwd_h_kernel" in n or "fwd_states_kernel" in n for n in names), names
        name, grid, block, p, smem = _by_kernel(launches, "fwd_fused_sm90_kernel")[0]
        assert name == config.fused_fwd_kernel("MmaBF16", "tfla::GateExp")
        # persistent: min(items, SMs) CTAs, items = DV blocks × sequences × heads (30 on 16 SMs)
        assert (grid, block, smem) == (min((DV // 64) * N * NH, 16), config.FUSED_THREADS, config.FUSED_SMEM_BYTES)
        for nm, x in zip("qkvif", (q, k, v, i, f)):
            assert int(p[nm]) == x.data.ptr, f"{nm} was copied"
        assert _strides(p, "q") == (S * NH * DK, DK, NH * DK)
        # its tensor maps: q, k, v in place, their (batch, head, token) strides, the sequence geometry
        assert tensor_maps[-1] == ([(q.data.ptr, (S * NH * DK, DK, NH * DK)), (k.data.ptr, (S * NH * DK, DK, NH * DK)),
                                    (v.data.ptr, (S * NH * DV, DV, NH * DV))], S, NH, 1)
        assert "tfla::fused_terms_kernel" in {n.split("<")[0] for n in names}
        assert int(p["gate_terms"]) != 0
        assert (int(p["C_states"]) != 0) == keep and (int(p["m_states"]) != 0) == keep
        # stage 0b computes stage 0's vectors itself: no stage 0, no gate arrays
        assert "tfla::chunk_gates_kernel" not in {n.split("<")[0] for n in names}
        assert int(p["gate_a"]) == 0 and int(p["N"]) != 0 and int(p["M"]) != 0
        assert h.shape == (1, S, NH, DV) and last.C.shape == (N, NH, DK, DV)
    for repeat in range(2):  # the backward runs stage 0 once and keeps the vectors in the context
        launches.clear()
        tfla_cupy.mlstm_bwd(ctx, _fake(np.ones((1, S, NH, DV), BFLOAT16)))
        names = [e[0].split("<")[0] for e in launches]
        assert "tfla::fwd_fused_sm90_kernel" not in names  # (the context kept its states: no recompute)
        assert not {"tfla::bwd_dq_kernel", "tfla::bwd_dk_kernel", "tfla::bwd_dv_kernel"} & set(names), names
        assert names.count("tfla::chunk_gates_kernel") == (1 if repeat == 0 else 0), names
        sm90 = _by_kernel(launches, "bwd_chunk_sm90_kernel")
        assert [e[0] for e in sm90] == [config.bwd_chunk_sm90_kernel("MmaBF16", "tfla::GateExp", role)
                                        for role in ("RoleDQ", "RoleDK", "RoleDV")]
        NC = int(sm90[0][3]["NC"])
        # the gate record: one CTA per chunk slot writes it before dq; dq, dk and dv read the same one
        (tname, tgrid, tblock, tp, tsmem), = _by_kernel(launches, "bwd_terms_sm90_kernel")
        assert tname == config.bwd_terms_sm90_kernel("tfla::GateExp")
        assert (tgrid, tblock, tsmem) == (NC * NH, config.BWD_SM90_THREADS, 0)  # (B = 1, packed)
        assert [e[0] for e in launches].index(tname) < [e[0] for e in launches].index(sm90[0][0])
        assert int(tp["gate_a"]) != 0 and int(tp["m_states"]) == int(sm90[0][3]["m_states"])
        for (name, grid, block, p, smem), DX in zip(sm90, (DV, DV, DK)):
            assert (grid, block, smem) == (2 * NC * NH, config.BWD_SM90_THREADS, config.bwd_sm90_smem_bytes(DX)), name
            assert int(p["gate_a"]) != 0 and int(p["seq_table"]) != 0
            assert int(p["gate_terms"]) == int(tp["gate_terms"]) != 0, name
        gates = _by_kernel(launches, "bwd_gates_kernel")[0][3]
        # one part each: q·dq from dq, the keys' pair sums and E from dk
        assert (int(gates["q_parts"]), int(gates["k_parts"])) == (1, 1)
        # B_c: one part per warp of each 64 × 64 dC block, written by the reverse dC pass the kernel reads
        assert int(gates["state_parts"]) == (DK // 64) * (DV // 64) * config.BWD_DSTATES_SM90_THREADS // 32
        assert _by_kernel(launches, "bwd_gates_kernel")[0][1] == -(-NC * NH // 8)  # a warp per chunk slot (B = 1, packed)
        assert not any("tfla::bwd_dstates_kernel" in n for n in names), names
        (name, grid, block, p, smem), = _by_kernel(launches, "bwd_dstates_sm90_kernel")
        assert name == config.bwd_dstates_sm90_kernel("MmaBF16", "tfla::GateExp", True)
        assert (grid, block, smem) == ((DK // 64) * (DV // 64) * N * NH, config.BWD_DSTATES_SM90_THREADS,
                                       config.BWD_DSTATES_SM90_SMEM_BYTES)
        assert int(p["dC_states"]) == int(_by_kernel(launches, "bwd_chunk_sm90_kernel")[1][3]["dC_states"]) != 0
        assert int(p["state_terms"]) == int(gates["state_terms"]) != 0 and int(p["C_states"]) != 0
        qm, _, dhm = tensor_maps[-1][0]
        assert qm == (q.data.ptr, (S * NH * DK, DK, NH * DK)) and dhm[1] == (S * NH * DV, DV, NH * DV)
    # without kept states the backward recomputes them with the fused kernel in "states" mode (stage
    # 0b first), into the C_states and m_states its dq kernel then reads
    launches.clear()
    tfla_cupy.mlstm_bwd(contexts[False][2], _fake(np.ones((1, S, NH, DV), BFLOAT16)))
    names = [e[0] for e in launches]
    assert not any("fwd_states_kernel" in n for n in names), names
    (name, grid, block, p, smem), = _by_kernel(launches, "fwd_fused_sm90_kernel")
    assert name == config.fused_fwd_kernel("MmaBF16", "tfla::GateExp", mode="states")
    assert (grid, block, smem) == (min((DV // 64) * N * NH, config.FUSED_STATES_CTAS_PER_SM * 16), config.FUSED_THREADS,
                                   config.FUSED_STATES_SMEM_BYTES)
    assert names.index(name) > names.index(config.fused_terms_kernel("tfla::GateExp"))
    assert (int(p["h"]), int(p["N"]), int(p["M"])) == (0, 0, 0) and int(p["gate_terms"]) != 0
    dq = _by_kernel(launches, "bwd_chunk_sm90_kernel")[0][3]
    assert int(p["C_states"]) == int(dq["C_states"]) != 0 and int(p["m_states"]) == int(dq["m_states"]) != 0



def _packed_hopper_call(launches, monkeypatch, sms, envs, DV=256, keep=False):
    """A packed bshd call (five sequences, two heads) on a Hopper device of ``sms`` SMs with the
    environment variables ``envs`` ({name: value, None: unset}): its forward, then its backward;
    returns (forward launches, backward launches, (sequences, NH, DK, DV))."""
    from tfla_cupy import config
    from tfla_cupy._arrays import BFLOAT16
    monkeypatch.setattr(_Device, "compute_capability", "90")
    monkeypatch.setattr(_loader, "device_limits", lambda device_id: (sms, 232_448))
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    for name, value in envs.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    lengths = [1, 127, 128, 129, 300]
    S, N, NH, DK = sum(lengths), len(lengths), 2, 128
    cu = _fake(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    rng = np.random.default_rng(5)
    q, k = (_fake(rng.standard_normal((1, S, NH, DK)).astype(BFLOAT16)) for _ in range(2))
    v = _fake(rng.standard_normal((1, S, NH, DV)).astype(BFLOAT16))
    i, f = (_fake(rng.standard_normal((1, S, NH)).astype(np.float32)) for _ in range(2))
    launches.clear()
    _, _, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, chunk_size=128, cu_seqlens=cu, layout="bshd", keep_states=keep)
    fwd = list(launches)
    launches.clear()
    tfla_cupy.mlstm_bwd(ctx, _fake(np.ones((1, S, NH, DV), BFLOAT16)))
    return fwd, list(launches), (N, NH, DK, DV)


def _walk_backward(launches, monkeypatch, sms, env):
    """A packed bshd call with DV = 256 on a Hopper device of ``sms`` SMs, its backward run with
    TFLA_CUPY_BWD_WALK = ``env`` (None: unset); returns (launch names, the call's sizes)."""
    from tfla_cupy import config
    _, bwd, sizes = _packed_hopper_call(launches, monkeypatch, sms, {config.BWD_WALK_ENV: env, config.FWD_WS_ENV: None})
    return [e[0] for e in bwd], sizes


def test_hopper_plan_fused_backward_walk(launches, tensor_maps, monkeypatch):
    """With TFLA_CUPY_BWD_WALK=1, where the fused backward covers a Hopper call (16-bit, L = 128,
    DK = 128, DV = 64 · parts with parts in 1, 2, 4, 8), the backward is the states recompute, the
    walk's gate-record pre-pass, one bwd_walk_sm90 launch — a cluster of DV / 64 CTAs per sequence and head, its threads and shared
    memory from config.BWD_WALK_SM90, reading the recomputed states — and the gate kernel, which
    adds one term part per value block and the walk's B_c parts; none of the per-stage kernels."""
    from tfla_cupy import config
    names, (N, NH, DK, DV) = _walk_backward(launches, monkeypatch, 16, "1")
    families = {n.split("<")[0] for n in names}
    assert not families & {"tfla::bwd_chunk_sm90_kernel", "tfla::bwd_dstates_sm90_kernel", "tfla::bwd_dq_kernel",
                           "tfla::bwd_dstates_kernel"}, names
    (name, grid, block, p, smem), = _by_kernel(launches, "bwd_walk_sm90_kernel")
    parts = DV // 64
    assert name == config.bwd_walk_sm90_kernel("MmaBF16", "tfla::GateExp", parts)
    assert (grid, block, smem) == (parts * N * NH, config.BWD_WALK_THREADS, config.BWD_WALK_SMEM_BYTES)
    rec = _by_kernel(launches, "fwd_fused_sm90_kernel")[0][3]
    assert int(p["C_states"]) == int(rec["C_states"]) != 0 and int(p["m_states"]) == int(rec["m_states"]) != 0
    # its pre-pass: one CTA per chunk slot writes the gate records the walk reads (in gate_terms)
    (tname, tgrid, tblock, tp, tsmem), = _by_kernel(launches, "walk_terms_kernel")
    assert tname == config.walk_terms_kernel("tfla::GateExp") and names.index(tname) < names.index(name)
    assert (tgrid, tblock, tsmem) == (int(p["NC"]) * NH, config.BWD_WALK_THREADS, 0)  # (B = 1, packed)
    assert int(tp["gate_terms"]) == int(p["gate_terms"]) != 0 and int(tp["m_states"]) == int(p["m_states"])
    assert int(p["dC_states"]) == 0 and int(p["gate_g"]) != 0 and int(p["seq_table"]) != 0
    assert all(int(p[nm]) != 0 for nm in ("dq", "dk", "dv", "q_terms", "k_terms", "state_terms"))
    gates = _by_kernel(launches, "bwd_gates_kernel")[0][3]
    assert int(gates["q_parts"]) == int(gates["k_parts"]) == int(p["q_parts"]) == int(p["k_parts"]) == parts
    assert int(gates["state_parts"]) == int(p["state_parts"]) == (DK // 64) * parts * 4
    for nm in ("q_terms", "k_terms", "state_terms"):
        assert int(gates[nm]) == int(p[nm]), nm
    assert names.index(name) < names.index(_by_kernel(launches, "bwd_gates_kernel")[0][0])


@pytest.mark.parametrize("sms,env,walk", [(16, "0", False), (16, None, False), (16, "auto", False),
                                          (132, "1", True)], ids=["off", "default", "auto", "on"])
def test_hopper_plan_walk_choice(launches, tensor_maps, monkeypatch, sms, env, walk):
    """TFLA_CUPY_BWD_WALK = "0", unset or "auto" keep the per-stage Hopper kernels (the walk's first
    version is slower); "1" takes the walk wherever it covers the call, whatever the grid."""
    names, _ = _walk_backward(launches, monkeypatch, sms, env)
    families = {n.split("<")[0] for n in names}
    assert ("tfla::bwd_walk_sm90_kernel" in families) == walk, names
    assert ("tfla::bwd_chunk_sm90_kernel" in families) == (not walk), names


def test_walk_env_value_is_checked(launches, tensor_maps, monkeypatch):
    from tfla_cupy import config
    with pytest.raises(ValueError, match=f"{config.BWD_WALK_ENV}: expected '0', '1' or 'auto', got 'yes'"):
        _walk_backward(launches, monkeypatch, 16, "yes")

def _bf16_call_inputs(rng, B, NH, S, DV, DK=128):
    """q, k, v (bf16, bhsd) and i, f (float32) as fake device arrays."""
    from tfla_cupy._arrays import BFLOAT16
    q, k = (_fake(rng.standard_normal((B, NH, S, DK)).astype(BFLOAT16)) for _ in range(2))
    v = _fake(rng.standard_normal((B, NH, S, DV)).astype(BFLOAT16))
    i, f = (_fake(rng.standard_normal((B, NH, S)).astype(np.float32)) for _ in range(2))
    return q, k, v, i, f


def _assert_two_pass_forward(launches, x):
    tfla_cupy.mlstm(*x, chunk_size=128)
    names = {e[0].split("<")[0] for e in launches}
    assert "tfla::fwd_fused_sm90_kernel" not in names and "tfla::fwd_h_kernel" in names


def test_hopper_plan_small_packed_grid_uses_the_sm80_forward(launches, tensor_maps, monkeypatch):
    """Packed sequences are not cut into segments: with fewer fused CTAs than a quarter of the SMs
    (4 sequences × 2 heads × 1 DV block = 8 for 132) "auto" keeps the two-pass forward."""
    from tfla_cupy import config
    monkeypatch.setattr(_Device, "compute_capability", "90")
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    q, k, v, i, f = _bf16_call_inputs(np.random.default_rng(5), 1, 2, 300, 64)
    cu = _fake(np.array([0, 50, 100, 200, 300], np.int32))
    tfla_cupy.mlstm(q, k, v, i, f, chunk_size=128, cu_seqlens=cu)
    names = {e[0].split("<")[0] for e in launches}
    assert "tfla::fwd_fused_sm90_kernel" not in names and "tfla::fwd_h_kernel" in names


def test_hopper_plan_without_cuda_bindings_uses_the_sm80_forward(launches, monkeypatch):
    """No tensor-map encoder (cuda-bindings missing): "auto" keeps the two-pass forward, and a
    forced sm90 says why."""
    import dataclasses

    from tfla_cupy import _tma, config
    monkeypatch.setattr(_Device, "compute_capability", "90")
    monkeypatch.setattr(_loader, "device_limits", lambda device_id: (16, 232_448))
    monkeypatch.setattr(_tma, "unavailable", lambda: "it needs NVIDIA's cuda-bindings package")
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    x = _bf16_call_inputs(np.random.default_rng(6), 2, 8, 256, 128)
    _assert_two_pass_forward(launches, x)
    forced = dataclasses.replace(config.pick_config("MmaBF16", 128, 128, 128), family="sm90")
    with pytest.raises(ValueError, match=r"'sm90' does not cover this call: it needs NVIDIA's cuda-bindings"):
        tfla_cupy.mlstm(*x, chunk_size=128, config=forced)


def test_repeated_signature_reuses_the_plan_with_each_calls_pointers(launches, tensor_maps, monkeypatch):
    """A second call of the same signature takes the cached plan (same launches) but binds its own
    arrays; another signature (here the family override) gets a plan of its own."""
    from tfla_cupy import config
    monkeypatch.setattr(_Device, "compute_capability", "90")
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    rng = np.random.default_rng(7)
    calls = []
    for _ in range(2):
        x = _bf16_call_inputs(rng, B=2, NH=32, S=200, DV=128)
        launches.clear()
        h = tfla_cupy.mlstm(*x, chunk_size=128)
        calls.append((x, h, [(e[0], e[1], e[2], e[4]) for e in launches], _by_kernel(launches, "fwd_fused")[0][3]))
    assert len(gpu_forward._PLANS) == 1
    (x0, h0, l0, p0), (x1, h1, l1, p1) = calls
    assert l0 == l1
    for nm, a0, a1 in zip("qkvif", x0, x1):
        assert int(p0[nm]) == a0.data.ptr and int(p1[nm]) == a1.data.ptr
    assert int(p0["h"]) == h0.data.ptr and int(p1["h"]) == h1.data.ptr
    assert tensor_maps[0][0][0][0] == x0[0].data.ptr and tensor_maps[1][0][0][0] == x1[0].data.ptr
    monkeypatch.setenv(config.FAMILY_ENV, "sm80")
    launches.clear()
    tfla_cupy.mlstm(*x1, chunk_size=128)
    assert len(gpu_forward._PLANS) == 2
    assert "tfla::fwd_h_kernel" in {e[0].split("<")[0] for e in launches}


def test_hopper_plan_segments_for_a_long_single_sequence(launches, tensor_maps, monkeypatch):
    """B = 1, two heads, one DV block: 2 walks of 41 chunks cannot fill 132 SMs, so the fused
    forward runs in segments: stage 0b, pass 1 (summary kernel, segments 0 .. n − 2), the fold
    (one CTA per head), pass 2 (every segment) — all on one Params record with the segment buffers."""
    from tfla_cupy import config
    monkeypatch.setattr(_Device, "compute_capability", "90")
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    x = _bf16_call_inputs(np.random.default_rng(3), B=1, NH=2, S=128 * 40 + 17, DV=64)
    h, last = tfla_cupy.mlstm(*x, chunk_size=128, return_state=True)
    n, per = config.pick_segments(2, 41, 132)
    assert n > 1
    kinds = [e[0].split("<")[0] for e in launches]
    assert kinds == ["tfla::fused_terms_kernel", "tfla::fwd_fused_sm90_kernel", "tfla::segment_combine_kernel",
                     "tfla::fwd_fused_sm90_kernel"], kinds
    (_, g1, _, p1, _), (_, g2, b2, p2, _), (_, g3, _, p3, _) = launches[1:]
    assert launches[1][0] == config.fused_fwd_kernel("MmaBF16", "tfla::GateExp", mode="summary")
    assert launches[3][0] == config.fused_fwd_kernel("MmaBF16", "tfla::GateExp")
    assert g1 == 2 * (n - 1) and g2 == 2 and b2 == config.SEG_COMBINE_THREADS and g3 == 2 * n
    for rec in (p1, p2, p3):
        assert int(rec["seg_chunks"]) == per and int(rec["nseg"]) == n
        assert all(int(rec[f]) != 0 for f in ("seg_C", "seg_n", "seg_m", "gate_terms"))
    assert all(np.array_equal(p1[f], p3[f]) for f in PARAMS_DTYPE.names)  # one record for all three
    # a forced single segment (or a covered call with enough walks) launches none of it
    launches.clear()
    import dataclasses
    one = dataclasses.replace(config.pick_config("MmaBF16", 128, 64, 128), segments=1)
    tfla_cupy.mlstm(*x, chunk_size=128, config=one)
    assert [e[0].split("<")[0] for e in launches] == ["tfla::fused_terms_kernel", "tfla::fwd_fused_sm90_kernel"]
    assert launches[1][1] == 2 and int(launches[1][3]["seg_C"]) == 0 and int(launches[1][3]["nseg"]) == 1


def test_plan_signature_separates_strides_and_kept_states(launches, tensor_maps, monkeypatch):
    """The plan cache must not hand one call's strides or state buffers to another: a strided view
    of the same shape, and keep_states, each get a plan of their own whose record says so."""
    from tfla_cupy import config
    monkeypatch.setattr(_Device, "compute_capability", "90")
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    rng = np.random.default_rng(11)
    B, NH, S, DV = 2, 32, 200, 128
    x = _bf16_call_inputs(rng, B=B, NH=NH, S=S, DV=DV)
    tfla_cupy.mlstm(*x, chunk_size=128)
    dense = _by_kernel(launches, "fwd_fused")[0][3]
    from tfla_cupy._arrays import BFLOAT16
    wide = _fake(rng.standard_normal((B, NH, S, 2 * 128)).astype(BFLOAT16))
    q_view = wide[..., :128]  # same shape as q, token stride 256
    launches.clear()
    tfla_cupy.mlstm(q_view, *x[1:], chunk_size=128)
    strided = _by_kernel(launches, "fwd_fused")[0][3]
    assert len(gpu_forward._PLANS) == 2
    assert _strides(dense, "q") == (NH * S * 128, S * 128, 128)
    assert _strides(strided, "q") == (NH * S * 256, S * 256, 256) and int(strided["q"]) == q_view.data.ptr
    launches.clear()
    _, _, ctx = tfla_cupy.mlstm_fwd(*x, chunk_size=128, keep_states=True)
    kept = _by_kernel(launches, "fwd_fused")[0][3]
    assert len(gpu_forward._PLANS) == 3
    assert int(kept["C_states"]) != 0 and int(kept["m_states"]) != 0  # the walk writes the chunk states
    assert int(dense["C_states"]) == 0 and int(dense["m_states"]) == 0


def test_plain_step_with_a_seen_signature_skips_validation(launches, monkeypatch):
    """The second mlstm_step of a signature takes the quick path (no validation) and launches the
    same kernel with the same record but for its new output pointers; a misaligned operand, an
    out_state that partly overlaps the state and a new shape take the validated path, which
    copies, refuses or plans them."""
    from tfla_cupy import _validate
    rng = np.random.default_rng(5)
    B, NH, DK, DV = 2, 3, 16, 32
    bf16 = np.dtype(ml_dtypes.bfloat16)
    q, k = (_fake(rng.standard_normal((B, NH, DK)).astype(bf16)) for _ in range(2))
    v = _fake(rng.standard_normal((B, NH, DV)).astype(bf16))
    i, f = (_fake(rng.standard_normal((B, NH)).astype(np.float32)) for _ in range(2))
    st = tfla_cupy.MLSTMState(_fake(np.zeros((B, NH, DK, DV), np.float32)), _fake(np.zeros((B, NH, DK), np.float32)),
                              _fake(np.zeros((B, NH), np.float32)))
    validated = []
    real = _validate.step_inputs
    monkeypatch.setattr(_validate, "step_inputs", lambda *a, **kw: validated.append(1) or real(*a, **kw))
    h1, s1 = tfla_cupy.mlstm_step(q, k, v, i, f, st)
    h2, s2 = tfla_cupy.mlstm_step(q, k, v, i, f, st)
    assert len(validated) == 1 and len(launches) == 2
    (n1, g1, b1, r1, _), (n2, g2, b2, r2, _) = launches
    assert (n1, g1, b1) == (n2, g2, b2) and "step_kernel" in n1
    outs = ("h", "C_last", "n_last", "m_last")
    for name in STEP_PARAMS_DTYPE.names:
        if name not in outs:
            assert r1[name] == r2[name], name
    assert [int(r2[n]) for n in outs] == [x.data.ptr for x in (h2, *s2)]
    assert len({x.data.ptr for x in (h1, *s1, h2, *s2)}) == 8   # new buffers each call
    # a misaligned gate (a view one float in): validated again, and copied to an aligned operand
    buf = _fake(np.zeros(B * NH + 1, np.float32))
    i_off = buf[1:].reshape(B, NH)
    i_off[...] = i
    tfla_cupy.mlstm_step(q, k, v, i_off, f, st)
    assert len(validated) == 2 and int(launches[-1][3]["i"]) % 16 == 0 and int(launches[-1][3]["i"]) != i_off.data.ptr
    # in place twice: the second is quick, and a partial overlap is refused on the quick path too
    tfla_cupy.mlstm_step(q, k, v, i, f, st, out_state=st)
    tfla_cupy.mlstm_step(q, k, v, i, f, st, out_state=st)
    assert len(validated) == 3 and launches[-1][0] == launches[-3][0] and "step_nm_kernel" in launches[-1][0]
    big = _fake(np.zeros(B * NH * DK * DV + 4, np.float32))
    other = tfla_cupy.MLSTMState(big[4:].reshape(st.C.shape), st.n, st.m)
    st2 = tfla_cupy.MLSTMState(big[:-4].reshape(st.C.shape), st.n, st.m)
    with pytest.raises(ValueError, match=r"^out_state.C: overlaps state.C without being the same buffer"):
        tfla_cupy.mlstm_step(q, k, v, i, f, st2, out_state=other)


def _ws_call(launches, monkeypatch, env, DV=256, keep=False, sms=16):
    """A packed bshd Hopper call with TFLA_CUPY_FWD_WS = ``env`` (None: unset): its forward, then
    its backward; returns (forward launches, backward launches, sizes)."""
    from tfla_cupy import config
    return _packed_hopper_call(launches, monkeypatch, sms, {config.FWD_WS_ENV: env, config.BWD_WALK_ENV: None}, DV,
                               keep)


def test_hopper_plan_ws_forward_and_recompute(launches, tensor_maps, monkeypatch):
    """With TFLA_CUPY_FWD_WS=1 a covered call (DV % 128 == 0, no kept states) runs the
    warp-specialised forward — one CTA of 512 threads per (pair of DV blocks, sequence, head) on a
    persistent grid, its shared memory from config.FUSED_WS — after stage 0b, and the backward
    recomputes the chunk states with its states mode into the buffers dq then reads."""
    from tfla_cupy import config
    fwd, bwd, (N, NH, DK, DV) = _ws_call(launches, monkeypatch, "1")
    assert [e[0].split("<")[0] for e in fwd] == ["tfla::seq_table_kernel", "tfla::fused_terms_kernel",
                                                  "tfla::fwd_ws_sm90_kernel"]
    name, grid, block, p, smem = fwd[-1]
    assert name == config.fused_ws_kernel("MmaBF16", "tfla::GateExp")
    assert (grid, block, smem) == (min((DV // 128) * N * NH, 16), config.FUSED_WS_THREADS, config.FUSED_WS_SMEM_BYTES)
    assert int(p["gate_terms"]) == int(fwd[1][3]["gate_terms"]) != 0 and int(p["C_states"]) == 0
    assert int(p["h"]) != 0 and int(p["N"]) != 0 and int(p["M"]) != 0
    (name, grid, block, p, smem), = _by_kernel(bwd, "fwd_ws_sm90_kernel")
    assert name == config.fused_ws_kernel("MmaBF16", "tfla::GateExp", mode="states")
    assert (grid, block, smem) == (min((DV // 128) * N * NH, 16), config.FUSED_WS_THREADS, config.FUSED_WS_SMEM_BYTES)
    assert (int(p["h"]), int(p["N"]), int(p["M"]), int(p["n_states"])) == (0, 0, 0, 0)
    dq = _by_kernel(bwd, "bwd_chunk_sm90_kernel")[0][3]
    assert int(p["C_states"]) == int(dq["C_states"]) != 0 and int(p["m_states"]) == int(dq["m_states"]) != 0
    assert not any("fwd_fused_sm90_kernel" in e[0] for e in fwd + bwd)


@pytest.mark.parametrize("env,DV,keep,ws", [("1", 256, False, True), (None, 256, False, False), ("0", 256, False, False),
                                            ("auto", 256, False, False), ("1", 192, False, False),
                                            ("1", 256, True, True)],
                         ids=["on", "default", "off", "auto", "DV192", "keep_states"])
def test_hopper_plan_ws_choice(launches, tensor_maps, monkeypatch, env, DV, keep, ws):
    """Only "1" takes the warp-specialised forward, and only where it covers the call (DV a
    multiple of 128); otherwise the fused forward runs (never an error). With keep_states it writes
    the chunk states itself and the backward recomputes nothing."""
    fwd, bwd, _ = _ws_call(launches, monkeypatch, env, DV=DV, keep=keep)
    families = {e[0].split("<")[0] for e in fwd}
    assert ("tfla::fwd_ws_sm90_kernel" in families) == ws, families
    assert ("tfla::fwd_fused_sm90_kernel" in families) == (not ws), families
    recompute = {e[0].split("<")[0] for e in bwd} & {"tfla::fwd_ws_sm90_kernel", "tfla::fwd_fused_sm90_kernel"}
    assert recompute == (set() if keep else {"tfla::fwd_ws_sm90_kernel" if ws else "tfla::fwd_fused_sm90_kernel"})
    if keep:
        p = fwd[-1][3]
        dq = _by_kernel(bwd, "bwd_chunk_sm90_kernel")[0][3]
        assert int(p["C_states"]) == int(dq["C_states"]) != 0 and int(p["m_states"]) == int(dq["m_states"]) != 0
        assert int(p["n_states"]) != 0


def test_ws_env_value_is_checked(launches, tensor_maps, monkeypatch):
    from tfla_cupy import config
    with pytest.raises(ValueError, match=f"{config.FWD_WS_ENV}: expected '0', '1' or 'auto', got 'on'"):
        _ws_call(launches, monkeypatch, "on")


def test_hopper_plan_ws_segments(launches, tensor_maps, monkeypatch):
    """A long single sequence on the warp-specialised forward: stage 0b, its summary mode over
    segments 0 .. n − 2, the fold, its forward over every segment — items of pairs of DV blocks."""
    from tfla_cupy import config
    monkeypatch.setattr(_Device, "compute_capability", "90")
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    monkeypatch.setenv(config.FWD_WS_ENV, "1")
    x = _bf16_call_inputs(np.random.default_rng(3), B=1, NH=2, S=128 * 40 + 17, DV=128)
    tfla_cupy.mlstm(*x, chunk_size=128)
    n, per = config.pick_segments(2, 41, 132)
    assert n > 1
    kinds = [e[0].split("<")[0] for e in launches]
    assert kinds == ["tfla::fused_terms_kernel", "tfla::fwd_ws_sm90_kernel", "tfla::segment_combine_kernel",
                     "tfla::fwd_ws_sm90_kernel"], kinds
    assert launches[1][0] == config.fused_ws_kernel("MmaBF16", "tfla::GateExp", mode="summary")
    assert launches[3][0] == config.fused_ws_kernel("MmaBF16", "tfla::GateExp")
    assert launches[1][1] == min(2 * (n - 1), 132)  # DV / 128 pairs × heads × (segments − 1), or every SM
    assert launches[3][1] == min(2 * n, 132)        # DV / 128 pairs × heads × segments
    assert all(int(launches[i][3][f]) != 0 for i in (1, 3) for f in ("seg_C", "seg_n", "seg_m"))
    assert all(int(e[3]["nseg"]) == n and int(e[3]["seg_chunks"]) == per for e in launches)


def test_ws_recompute_follows_the_forward_not_the_environment(launches, tensor_maps, monkeypatch):
    """The backward's recompute takes the kernel the forward took, whatever TFLA_CUPY_FWD_WS says
    by then (the two kernels round ā ⊙ K and ā ⊙ V differently)."""
    from tfla_cupy import config
    from tfla_cupy._arrays import BFLOAT16
    monkeypatch.setattr(_Device, "compute_capability", "90")
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    x = _bf16_call_inputs(np.random.default_rng(8), B=2, NH=4, S=300, DV=256)
    dh = _fake(np.ones((2, 4, 300, 256), BFLOAT16))
    for fwd_env, bwd_env, kernel in (("1", "0", "fwd_ws_sm90_kernel"), ("0", "1", "fwd_fused_sm90_kernel")):
        monkeypatch.setenv(config.FWD_WS_ENV, fwd_env)
        _, _, ctx = tfla_cupy.mlstm_fwd(*x, chunk_size=128)
        monkeypatch.setenv(config.FWD_WS_ENV, bwd_env)
        launches.clear()
        tfla_cupy.mlstm_bwd(ctx, dh)
        (name, *_), = [e for e in launches if "sm90_kernel<" in e[0] and "fwd_" in e[0]]
        assert kernel in name and "States" in name, name
