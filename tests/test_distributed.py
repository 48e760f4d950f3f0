"""tfla_cupy.distributed on the NumPy path and without GPUs: P virtual ranks against one call
(forward, backward, last states), the state-passing algebra, the summary packing, validation,
and the launcher with its id rendezvous (a stand-in payload; NCCL itself is tested on GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import MLSTMState
from tfla_cupy import distributed as dist
from tfla_cupy.distributed import _algebra, _api, _comm, _local, _rendezvous
from tfla_cupy.reference import chunkwise
from tfla_cupy.reference.gates import log_gates

from conftest import GATE_PARAMS, TOL_STATE_PASSING, Shape, random_inputs, rel_err

SHAPE = Shape(2, 2, 203, 8, 12)
#: Slice lengths: ragged, shorter and longer than a chunk, one of length 1, not chunk-aligned.
LENGTHS = {"P1": [203], "P2": [101, 102], "P4-ragged": [50, 17, 100, 36], "P5-tiny": [1, 64, 3, 128, 7],
           "P8-ones": [1] * 7 + [196]}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(rng, shape, gate, *, init, i_offset=0.0):
    x = random_inputs(rng, shape, i_offset=i_offset)
    state = None
    if init:
        m0 = rng.standard_normal((shape.B, shape.NH)) if gate == "exp" else None
        state = MLSTMState(rng.standard_normal((shape.B, shape.NH, shape.DK, shape.DV)),
                           rng.standard_normal((shape.B, shape.NH, shape.DK)), m0)
    return x, state


def _compare_states(got, want, tol):
    assert rel_err(got.C, want.C) <= tol
    for field in ("n", "m"):
        if getattr(want, field) is None:
            assert getattr(got, field) is None, field
        else:
            assert rel_err(getattr(got, field), getattr(want, field)) <= tol, field


@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
@pytest.mark.parametrize("init", [False, True], ids=["noinit", "init"])
@pytest.mark.parametrize("d_last", [False, True], ids=["nodlast", "dlast"])
@pytest.mark.parametrize("gate,normalize", GATE_PARAMS)
def test_virtual_ranks_equal_one_call(rng, gate, normalize, lengths, init, d_last):
    x, state = _inputs(rng, SHAPE, gate, init=init)
    opts = dict(gate=gate, normalize=normalize, initial_state=state, chunk_size=16)
    h, last, ctx = tfla_cupy.mlstm_fwd(*x.values(), **opts)
    hd, last_d, ctx_d = dist.virtual_mlstm_fwd(*x.values(), lengths=lengths, **opts)
    assert rel_err(hd, h) <= TOL_STATE_PASSING
    _compare_states(last_d, last, TOL_STATE_PASSING)

    dh = rng.standard_normal(h.shape)
    d_state = MLSTMState(rng.standard_normal(last.C.shape)) if d_last else None
    g = tfla_cupy.mlstm_bwd(ctx, dh, d_state)
    gd = dist.virtual_mlstm_bwd(ctx_d, dh, d_state)
    for name, got, want in zip(("dq", "dk", "dv", "di", "df"), gd[:5], g[:5]):
        assert got.shape == want.shape, name
        assert rel_err(got, want) <= TOL_STATE_PASSING, name
    if init:
        _compare_states(gd.d_initial_state, g.d_initial_state, TOL_STATE_PASSING)
    else:
        assert gd.d_initial_state is None


@pytest.mark.parametrize("gate,normalize", GATE_PARAMS)
def test_even_split_and_default_chunk_size(rng, gate, normalize):
    """ranks=P cuts near-equal slices; each slice picks its own default chunk size."""
    shape = Shape(1, 2, 300, 8, 8)
    x, _ = _inputs(rng, shape, gate, init=False)
    h, last = tfla_cupy.mlstm(*x.values(), gate=gate, normalize=normalize, return_state=True)
    hd, last_d, _ = dist.virtual_mlstm_fwd(*x.values(), ranks=3, gate=gate, normalize=normalize)
    assert rel_err(hd, h) <= TOL_STATE_PASSING
    _compare_states(last_d, last, TOL_STATE_PASSING)


def test_output_dtypes_follow_the_inputs(rng):
    x, _ = _inputs(rng, Shape(1, 1, 40, 8, 8), "exp", init=False)
    x = {n: a.astype(np.float32) for n, a in x.items()}
    h, last, ctx = dist.virtual_mlstm_fwd(*x.values(), ranks=2)
    g = dist.virtual_mlstm_bwd(ctx, np.ones_like(h))
    assert h.dtype == np.float32 and last.C.dtype == np.float64
    assert [a.dtype for a in g[:5]] == [np.float32] * 5


class _ThreadComm:
    """A communicator of P threads over host arrays: the per-process driver (the one NCCL runs)
    exercised on CPUs, each thread one rank."""

    def __init__(self, shared, rank):
        self.shared, self.rank, self.size = shared, rank, len(shared["slots"])

    def all_gather(self, x):
        sh = self.shared
        sh["slots"][self.rank] = np.array(x, copy=True)
        sh["barrier"].wait()
        out = np.stack(sh["slots"])
        sh["barrier"].wait()  # every rank has read before the next gather writes
        return out


def _run_ranks(P, fn):
    shared = {"slots": [None] * P, "barrier": threading.Barrier(P, timeout=120)}
    results, errors = [None] * P, []

    def body(r):
        try:
            results[r] = fn(_ThreadComm(shared, r))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("gate,normalize", GATE_PARAMS)
def test_per_process_driver_with_a_thread_communicator(rng, gate, normalize):
    """dist.mlstm_fwd / mlstm_bwd as each NCCL process calls them, with ranks as threads."""
    lengths = LENGTHS["P4-ragged"]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    x, state = _inputs(rng, SHAPE, gate, init=True)
    opts = dict(gate=gate, normalize=normalize, chunk_size=16)
    h, last, ctx = tfla_cupy.mlstm_fwd(*x.values(), initial_state=state, **opts)
    dh = rng.standard_normal(h.shape)
    d_last = MLSTMState(rng.standard_normal(last.C.shape))
    g = tfla_cupy.mlstm_bwd(ctx, dh, d_last)

    def rank(comm):
        sl = slice(bounds[comm.rank], bounds[comm.rank + 1])
        hr, st, c = dist.mlstm_fwd(*(a[:, :, sl] for a in x.values()), comm=comm,
                                   initial_state=state if comm.rank == 0 else None, **opts)
        gr = dist.mlstm_bwd(c, dh[:, :, sl], d_last if comm.rank == comm.size - 1 else None)
        return hr, st, gr

    out = _run_ranks(len(lengths), rank)
    assert rel_err(np.concatenate([o[0] for o in out], axis=2), h) <= TOL_STATE_PASSING
    _compare_states(out[-1][1], last, TOL_STATE_PASSING)
    for j, name in enumerate(("dq", "dk", "dv", "di", "df")):
        assert rel_err(np.concatenate([o[2][j] for o in out], axis=2), g[j]) <= TOL_STATE_PASSING, name
    _compare_states(out[0][2].d_initial_state, g.d_initial_state, TOL_STATE_PASSING)
    assert all(o[2].d_initial_state is None for o in out[1:])


def test_per_process_driver_rejects_an_initial_state_off_rank_0(rng):
    x, state = _inputs(rng, Shape(1, 1, 10, 8, 8), "exp", init=True)

    def rank(comm):
        return dist.mlstm_fwd(*(a[:, :, 5 * comm.rank:5 * comm.rank + 5] for a in x.values()), comm=comm,
                              initial_state=state)

    with pytest.raises(ValueError, match="initial_state: only rank 0 takes the initial state; rank 1 got one"):
        _run_ranks(2, rank)


# ------------------------------------------------------------------------------------------
# The algebra
# ------------------------------------------------------------------------------------------


def _slice_end(x, sl, gate, C0, n0, m0, L=16):
    log_i, log_f = log_gates(x["i"][..., sl], x["f"][..., sl], gate)
    C, n, m = chunkwise.fwd_states(x["k"][..., sl, :], x["v"][..., sl, :], log_i, log_f, C0, n0, m0, L=L,
                                   stabilized=gate == "exp")
    return C[..., -1, :, :], n[..., -1, :], m[..., -1]


@pytest.mark.parametrize("gate", ["exp", "sig"])
def test_combine_of_a_summary_is_the_state_after_the_slice(rng, gate):
    shape = Shape(2, 3, 90, 8, 8)
    x, _ = _inputs(rng, shape, gate, init=False)
    C0 = rng.standard_normal((2, 3, 8, 8))
    n0 = rng.standard_normal((2, 3, 8))
    m0 = rng.standard_normal((2, 3)) if gate == "exp" else np.zeros((2, 3))
    sl = slice(30, 90)
    C_s, n_s, m_s = _slice_end(x, sl, gate, np.zeros_like(C0), np.zeros_like(n0), np.full_like(m0, dist.EMPTY_M))
    G = log_gates(x["i"][..., sl], x["f"][..., sl], gate)[1].sum(-1)
    s = dist.Summary(C_s, n_s, m_s if gate == "exp" else None, G)
    got = dist.combine(MLSTMState(C0, n0, m0 if gate == "exp" else None), s, stabilized=gate == "exp")
    C, n, m = _slice_end(x, sl, gate, C0, n0, m0)
    assert rel_err(got.C, C) <= 1e-12 and rel_err(got.n, n) <= 1e-12
    if gate == "exp":
        assert rel_err(got.m, m) <= 1e-12


def test_the_empty_state_needs_minus_infinity_as_stabilizer(rng):
    """With strongly negative input gates the slice's own stabilizer lies far below G; a
    summary started from m = 0 instead of −∞ then gives a wrong incoming stabilizer (and so a
    different ε·e^M term downstream), while the EMPTY_M summary gives the exact one."""
    shape = Shape(1, 1, 40, 8, 8)
    x, _ = _inputs(rng, shape, "exp", init=False, i_offset=-30.0)
    zeros = np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 8))
    m_in = np.zeros((1, 1))
    sl = slice(20, 40)
    G = log_gates(x["i"][..., sl], x["f"][..., sl], "exp")[1].sum(-1)
    _, _, m_true = _slice_end(x, sl, "exp", *zeros, np.zeros((1, 1)) - 5.0)
    for m0, exact in ((dist.EMPTY_M, True), (0.0, False)):
        C_s, n_s, m_s = _slice_end(x, sl, "exp", *zeros, np.full((1, 1), m0))
        got = dist.combine(MLSTMState(*zeros, m_in - 5.0), dist.Summary(C_s, n_s, m_s, G), stabilized=True)
        assert (abs(got.m - m_true).max() <= 1e-12) == exact


def test_reverse_scan_of_state_gradients():
    a = [None, np.full((1, 1, 2, 2), 1.0), np.full((1, 1, 2, 2), 2.0), np.full((1, 1, 2, 2), 3.0)]
    D = [None, np.full((1, 1), 0.5), np.full((1, 1), 0.25), None]
    last = np.full((1, 1, 2, 2), 7.0)
    assert _algebra.slice_end_grad(a, D, 3, last) is last
    assert np.all(_algebra.slice_end_grad(a, D, 2, last) == 3.0)
    assert np.all(_algebra.slice_end_grad(a, D, 1, last) == 2.0 + 0.25 * 3.0)
    assert np.all(_algebra.slice_end_grad(a, D, 0, last) == 1.0 + 0.5 * (2.0 + 0.25 * 3.0))


@pytest.mark.parametrize("gate,normalize", GATE_PARAMS)
def test_summary_packing_round_trip(rng, gate, normalize):
    shape = Shape(2, 3, 20, 8, 16)
    x, _ = _inputs(rng, shape, gate, init=False)
    problem, arrays, _ = tfla_cupy._validate.inputs(*x.values(), gate=gate, normalize=normalize, eps=1e-6,
                                                    scale=None, chunk_size=16, initial_state=None)
    s = _local.summary(problem, arrays, None, empty=True)
    layout = _api._summary_layout(problem)
    buf = _api._pack(s, layout, np)
    assert buf.dtype == np.uint8 and buf.ndim == 1 and buf.size == _api._layout_bytes(layout)
    back = _api._unpack(buf, layout)
    for field in ("C", "n", "m", "G"):
        if getattr(s, field) is None:
            assert getattr(back, field) is None
        else:
            assert np.array_equal(getattr(back, field), getattr(s, field)), field


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def test_bad_slices_are_rejected(rng):
    x, _ = _inputs(rng, Shape(1, 1, 10, 8, 8), "exp", init=False)
    with pytest.raises(ValueError, match="lengths: expected positive ints summing to S = 10"):
        dist.virtual_mlstm_fwd(*x.values(), lengths=[5, 4])
    with pytest.raises(ValueError, match="lengths"):
        dist.virtual_mlstm_fwd(*x.values(), lengths=[11, -1])
    with pytest.raises(ValueError, match=r"ranks: expected an int in \[1, S = 10\]"):
        dist.virtual_mlstm_fwd(*x.values(), ranks=11)
    with pytest.raises(TypeError, match="exactly one of them"):
        dist.virtual_mlstm_fwd(*x.values())
    with pytest.raises(TypeError, match="exactly one of them"):
        dist.virtual_mlstm_fwd(*x.values(), ranks=2, lengths=[5, 5])


def test_bad_backward_arguments_are_rejected(rng):
    x, _ = _inputs(rng, Shape(1, 1, 10, 8, 8), "exp", init=False)
    h, _, ctx = dist.virtual_mlstm_fwd(*x.values(), ranks=2)
    with pytest.raises(ValueError, match=r"dh: expected shape \(1, 1, 10, 8\)"):
        dist.virtual_mlstm_bwd(ctx, h[:, :, :5])
    with pytest.raises(TypeError, match="ctx: expected the context returned by virtual_mlstm_fwd"):
        dist.virtual_mlstm_bwd(ctx.ranks[0], h)
    with pytest.raises(ValueError, match="d_state: only the last rank"):
        _api._backward_args(ctx.ranks[0], h[:, :, :5], MLSTMState(np.zeros((1, 1, 8, 8))))


def test_nccl_driver_rejects_host_arrays_and_other_ranks_initial_state(rng):
    x, _ = _inputs(rng, Shape(1, 1, 10, 8, 8), "exp", init=False)
    with pytest.raises(TypeError, match="comm: expected a communicator with rank, size and all_gather"):
        dist.mlstm_fwd(*x.values(), comm=object())
    with pytest.raises(TypeError, match="the NCCL path needs GPU arrays"):
        dist.mlstm_fwd(*x.values(), comm=dist.NcclComm(None, 0, 1, 0))


# ------------------------------------------------------------------------------------------
# The NCCL id, the rendezvous and the launcher (stand-in payload, no NCCL needed)
# ------------------------------------------------------------------------------------------


def test_unique_id_bytes_round_trip():
    uid = tuple((b - 256 if b > 127 else b) for b in range(0, 256, 2))  # signed C chars, as NCCL gives them
    data = _comm.encode_id(uid)
    assert len(data) == 128 and _comm.decode_id(data) == uid
    assert _comm.decode_id(data, signed=False) == tuple(b for b in range(0, 256, 2))


_WORKER = textwrap.dedent("""
    import os, sys
    from tfla_cupy.distributed import _comm, _rendezvous
    rank, size = int(os.environ["TFLA_RANK"]), int(os.environ["TFLA_WORLD_SIZE"])
    if sys.argv[1:] == ["fail"] and rank == 1:
        sys.exit(3)
    data = _rendezvous.share(lambda: b"id-from-rank-0:" + os.urandom(8).hex().encode(), rank=rank, world_size=size,
                             method=os.environ["TFLA_RENDEZVOUS"], addr=os.environ["TFLA_MASTER_ADDR"],
                             port=os.environ["TFLA_MASTER_PORT"], path=os.environ.get("TFLA_RENDEZVOUS_FILE"),
                             timeout=30)
    line = [rank, size, os.environ["TFLA_LOCAL_RANK"], os.environ["NCCL_NVLS_ENABLE"], data.decode(), *sys.argv[1:]]
    os.write(1, (" ".join(map(str, line)) + "\\n").encode())  # one write: lines of the ranks never interleave
""")


def _launch(tmp_path, *args):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NCCL_NVLS_ENABLE", None)
    return subprocess.run([sys.executable, "-m", "tfla_cupy.distributed.run", *args, str(script), "x", "--y"],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tcp", "file"])
def test_launcher_shares_one_id_with_every_rank(tmp_path, method):
    out = _launch(tmp_path, "--nproc", "3", "--rendezvous", method, "--timeout", "30")
    assert out.returncode == 0, out.stderr
    lines = sorted(out.stdout.split("\n")[:-1])
    assert len(lines) == 3, out.stdout
    ids = {line.split()[4] for line in lines}
    assert len(ids) == 1 and next(iter(ids)).startswith("id-from-rank-0:"), out.stdout
    for r, line in enumerate(lines):
        rank, size, local, nvls, _, *rest = line.split()
        assert (rank, size, local, nvls, rest) == (str(r), "3", str(r), "0", ["x", "--y"])


@pytest.mark.slow
def test_launcher_stops_everything_when_a_rank_fails(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "tfla_cupy.distributed.run", "--nproc", "3", "--timeout", "60",
                          str(script), "fail"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3


@pytest.mark.slow
def test_launcher_rejects_bad_arguments(tmp_path):
    for args, msg in ((["--nproc", "0"], "--nproc: expected >= 1"),
                      (["--nproc", "2", "--nnodes", "2"], "--master-port: required"),
                      (["--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--master-port", "1"], "--node-rank"),
                      (["--nproc", "1", "--nnodes", "2", "--master-port", "9", "--rendezvous", "env"],
                       "--rendezvous env")):
        out = _launch(tmp_path, *args)
        assert out.returncode == 2 and msg in out.stderr, (args, out.stderr)


def test_rendezvous_env_and_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("TFLA_TEST_ID", b"\x00\xff\x10".hex())
    assert _rendezvous.share(lambda: b"unused", rank=1, world_size=2, method="env", env_var="TFLA_TEST_ID") \
        == b"\x00\xff\x10"
    assert _rendezvous.share(lambda: b"alone", rank=0, world_size=1, method="tcp") == b"alone"
    with pytest.raises(ValueError, match="method: expected one of"):
        _rendezvous.share(lambda: b"", rank=0, world_size=2, method="smoke")
    with pytest.raises(ValueError, match="port: the tcp rendezvous needs a port"):
        _rendezvous.share(lambda: b"", rank=1, world_size=2, method="tcp")
    with pytest.raises(TimeoutError, match="did not appear"):
        _rendezvous.share(lambda: b"", rank=1, world_size=2, method="file", path=str(tmp_path / "none"),
                          timeout=0.1)


def test_topology_from_the_environment(monkeypatch):
    for name in ("TFLA_RANK", "TFLA_WORLD_SIZE", "TFLA_LOCAL_RANK", "TFLA_RENDEZVOUS", "OMPI_COMM_WORLD_RANK",
                 "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "PMIX_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert _comm._topology() == (0, 1, 0, "tcp")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert _comm._topology() == (3, 4, 1, "mpi")
    monkeypatch.setenv("TFLA_RANK", "2")
    monkeypatch.setenv("TFLA_WORLD_SIZE", "8")
    monkeypatch.setenv("TFLA_LOCAL_RANK", "2")
    monkeypatch.setenv("TFLA_RENDEZVOUS", "file")
    assert _comm._topology() == (2, 8, 2, "file")
    monkeypatch.setenv("TFLA_RANK", "two")
    with pytest.raises(ValueError, match="TFLA_RANK: expected an integer"):
        _comm._topology()


@pytest.mark.parametrize("empty_m,exact", [(dist.EMPTY_M, True), (0.0, False)], ids=["minus-inf", "zero"])
def test_weak_input_gates_need_the_empty_stabilizer_end_to_end(rng, monkeypatch, empty_m, exact):
    """Input gates far below the forget decay (ĩ ~ −8) and a large ε make the ε·e^M term
    visible in h: with m = −∞ for the empty state the ranks reproduce one call; with m = 0
    the incoming stabilizers, hence M and h, are off."""
    monkeypatch.setattr(_local, "EMPTY_M", empty_m)
    shape = Shape(1, 2, 160, 8, 8)
    x = random_inputs(rng, shape, i_offset=-8.0)
    opts = dict(chunk_size=16, eps=0.5)
    h, last = tfla_cupy.mlstm(*x.values(), return_state=True, **opts)
    hd, last_d, _ = dist.virtual_mlstm_fwd(*x.values(), lengths=[40, 40, 80], **opts)
    assert (rel_err(hd, h) <= TOL_STATE_PASSING and rel_err(last_d.m, last.m) <= TOL_STATE_PASSING) == exact
