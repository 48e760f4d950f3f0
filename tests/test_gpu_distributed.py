"""tfla_cupy.distributed on the GPU: P virtual ranks on one GPU against the float64 reference of
the whole sequence (every dtype and gate, ragged slices, initial states, d_state), the two
rank-local passes, an NCCL communicator of world size 1, and NCCL over several GPUs (marker
multigpu; skipped with fewer than 2)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import tfla_cupy
from gpu_utils import (BWD_TOL, DF_TOL, DTYPES, FWD_TOL, GATE_MODES, HAS_GPU, case_id, cp, gpu, make_inputs,
                       poisoned_allocations, reference, rel_err, seed_of, to_gpu)
from tfla_cupy import distributed as dist
from tfla_cupy.distributed import _local
from tfla_cupy.reference import chunkwise
from tfla_cupy.reference.gates import log_gates

pytestmark = gpu
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def _nccl_available():
    if not HAS_GPU:
        return False
    from cupy.cuda import nccl
    return nccl.available


def _gpu_count():
    return cp.cuda.runtime.getDeviceCount() if HAS_GPU else 0


def _cases():
    out = []
    for dt in DTYPES:
        for mode in GATE_MODES:
            out.append((300, (100, 37, 163), 64, mode, dt, True, True))
    for mode in GATE_MODES:
        for dt in ("f32", "bf16"):
            out.append((300, (1, 130, 64, 105), 64, mode, dt, False, False))
            out.append((1000, (250, 250, 250, 250), 128, mode, dt, True, False))
    out.append((2000, (700, 300, 1000), 256, "exp", "bf16", True, True))
    return [pytest.param(*c, id=case_id(1, 2, c[0], 64, 128, c[2], c[3], c[4], "P" + "-".join(map(str, c[1])),
                                        "init" if c[5] else "noinit", "dlast" if c[6] else "nodlast"))
            for c in out]


@pytest.mark.parametrize("S,lengths,L,mode,dt,init,d_last", _cases())
def test_virtual_ranks_match_reference(S, lengths, L, mode, dt, init, d_last):
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed_of("virtual", S, lengths, L, mode, dt, init, d_last))
    host, ref = make_inputs(rng, 1, 2, S, 64, 128, DTYPES[dt], init=init)
    dh = rng.standard_normal((1, 2, S, 128)).astype(DTYPES[dt])
    dC = rng.standard_normal((1, 2, 64, 128)).astype(np.float32) if d_last else None
    want = reference(ref, gate=gate, normalize=normalize, L=L, dh=dh.astype(np.float64),
                     dC_last=None if dC is None else dC.astype(np.float64))
    x = to_gpu(host)
    state = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"]) if init else None
    with poisoned_allocations():
        h, last, ctx = dist.virtual_mlstm_fwd(*(x[n] for n in "qkvif"), lengths=lengths, gate=gate,
                                              normalize=normalize, initial_state=state, chunk_size=L,
                                              precision="tf32" if dt == "tf32" else "default")
        g = dist.virtual_mlstm_bwd(ctx, cp.asarray(dh), None if dC is None else tfla_cupy.MLSTMState(cp.asarray(dC)))
    assert h.dtype == DTYPES[dt] and last.C.dtype == np.float32
    errs = {"h": (rel_err(h, want["h"]), FWD_TOL[dt]), "C": (rel_err(last.C, want["C"]), FWD_TOL[dt])}
    if normalize:
        errs["n"] = (rel_err(last.n, want["n"]), FWD_TOL[dt])
    if gate == "exp":
        errs["m"] = (rel_err(last.m, want["m"]), FWD_TOL[dt])
    for j, name in enumerate(("dq", "dk", "dv", "di", "df")):
        errs[name] = (rel_err(g[j], want[name]), DF_TOL[dt] if name == "df" else BWD_TOL[dt])
    if init:
        errs["dC0"] = (rel_err(g.d_initial_state.C, want["dC0"]), BWD_TOL[dt])
    else:
        assert g.d_initial_state is None
    bad = {n: e for n, (e, tol) in errs.items() if not e <= tol}
    assert not bad, f"errors {errs}"


def test_virtual_ranks_match_one_gpu_call():
    """Same inputs, fp32: P = 3 virtual ranks and one call agree to fp32 rounding."""
    rng = np.random.default_rng(31)
    host, _ = make_inputs(rng, 2, 2, 500, 32, 64, np.float32, init=True)
    x = to_gpu(host)
    state = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"])
    dh = cp.asarray(rng.standard_normal((2, 2, 500, 64)).astype(np.float32))
    args = [x[n] for n in "qkvif"]
    h, last, ctx = tfla_cupy.mlstm_fwd(*args, initial_state=state, chunk_size=64)
    g = tfla_cupy.mlstm_bwd(ctx, dh, last)
    hd, last_d, ctx_d = dist.virtual_mlstm_fwd(*args, lengths=(123, 250, 127), initial_state=state, chunk_size=64)
    gd = dist.virtual_mlstm_bwd(ctx_d, dh, last_d)
    assert rel_err(hd, cp.asnumpy(h)) <= 1e-5
    for a, b in zip((last_d.C, last_d.n, last_d.m), (last.C, last.n, last.m)):
        assert rel_err(a, cp.asnumpy(b)) <= 1e-5
    for j in range(5):
        assert rel_err(gd[j], cp.asnumpy(g[j])) <= (3e-5 if j == 4 else 1e-5), j
    assert rel_err(gd.d_initial_state.C, cp.asnumpy(g.d_initial_state.C)) <= 1e-5


@pytest.mark.parametrize("mode", list(GATE_MODES))
@pytest.mark.parametrize("empty", [True, False], ids=["empty", "from-initial"])
def test_summary_pass_matches_reference(mode, empty):
    """The states-only pass: the slice-end state from the empty state (m = EMPTY_M) or from an
    initial state, and G = Σλ, against the reference's state pass."""
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed_of("summary", mode, empty))
    host, ref = make_inputs(rng, 2, 2, 777, 64, 128, np.float32, init=True)
    x = to_gpu(host)
    state = None if empty else tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"])
    problem, arrays, st = tfla_cupy._validate.inputs(*(x[n] for n in "qkvif"), gate=gate, normalize=normalize,
                                                     eps=1e-6, scale=None, chunk_size=128, initial_state=state)
    with poisoned_allocations():
        s = _local.summary(problem, arrays, st, empty=empty)
    log_i, log_f = log_gates(ref["i"], ref["f"], gate)
    zeros = np.zeros((2, 2, 64, 128)), np.zeros((2, 2, 64)), np.full((2, 2), dist.EMPTY_M)
    start = zeros if empty else (ref["C0"], ref["n0"], ref["m0"])
    C, n, m = chunkwise.fwd_states(ref["k"], ref["v"], log_i, log_f, *start, L=128, stabilized=gate == "exp")
    assert rel_err(s.C, C[..., -1, :, :]) <= 1e-5
    assert rel_err(s.G, log_f.sum(-1)) <= 1e-6 and s.G.dtype == np.float64
    if normalize:
        assert rel_err(s.n, n[..., -1, :]) <= 1e-5
    else:
        assert s.n is None
    if gate == "exp":
        assert rel_err(s.m, m[..., -1]) <= 1e-5 and s.m.dtype == np.float64
    else:
        assert s.m is None


@pytest.mark.parametrize("mode", list(GATE_MODES))
@pytest.mark.parametrize("keep_states", [False, True], ids=["recompute", "kept"])
@pytest.mark.parametrize("d_last", [False, True], ids=["nodlast", "dlast"])
def test_initial_state_grad_alone_matches_the_full_backward(mode, keep_states, d_last):
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed_of("dC0", mode, keep_states, d_last))
    host, _ = make_inputs(rng, 1, 2, 500, 64, 128, DTYPES["bf16"], init=True)
    x = to_gpu(host)
    state = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"])
    _, _, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), gate=gate, normalize=normalize, initial_state=state,
                                    chunk_size=64, keep_states=keep_states)
    dh = cp.asarray(rng.standard_normal((1, 2, 500, 128)).astype(DTYPES["bf16"]))
    dC = cp.asarray(rng.standard_normal((1, 2, 64, 128)).astype(np.float32)) if d_last else None
    with poisoned_allocations():
        dC0 = _local.initial_state_grad(ctx, dh, dC)
    full = tfla_cupy.mlstm_bwd(ctx, dh, None if dC is None else tfla_cupy.MLSTMState(dC))
    assert dC0.dtype == np.float32
    assert bool(cp.all(dC0 == full.d_initial_state.C))  # the same kernel on the same operands


def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TFLA_") or name.startswith(("OMPI_COMM_WORLD", "PMI_", "PMIX_")):
            monkeypatch.delenv(name)


@pytest.mark.skipif(not _nccl_available(), reason="needs NCCL (cupy.cuda.nccl)")
@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_nccl_world_size_1(monkeypatch, mode):
    """A real NCCL communicator of one rank: the all-gathers run, the result is one call's."""
    _clean_env(monkeypatch)
    comm = dist.init()
    try:
        assert (comm.rank, comm.size) == (0, 1)
        gate, normalize = GATE_MODES[mode]
        rng = np.random.default_rng(seed_of("nccl1", mode))
        host, ref = make_inputs(rng, 1, 2, 300, 64, 128, DTYPES["bf16"], init=True)
        dh = rng.standard_normal((1, 2, 300, 128)).astype(DTYPES["bf16"])
        dC = rng.standard_normal((1, 2, 64, 128)).astype(np.float32)
        want = reference(ref, gate=gate, normalize=normalize, L=64, dh=dh.astype(np.float64),
                         dC_last=dC.astype(np.float64))
        x = to_gpu(host)
        h, last, ctx = dist.mlstm_fwd(*(x[n] for n in "qkvif"), comm=comm, gate=gate, normalize=normalize,
                                      initial_state=tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"]), chunk_size=64)
        g = dist.mlstm_bwd(ctx, cp.asarray(dh), tfla_cupy.MLSTMState(cp.asarray(dC)))
        assert rel_err(h, want["h"]) <= FWD_TOL["bf16"]
        assert rel_err(last.C, want["C"]) <= FWD_TOL["bf16"]
        for j, name in enumerate(("dq", "dk", "dv", "di", "df")):
            assert rel_err(g[j], want[name]) <= (DF_TOL if name == "df" else BWD_TOL)["bf16"], name
        assert rel_err(g.d_initial_state.C, want["dC0"]) <= BWD_TOL["bf16"]
        gathered = comm.all_gather(cp.arange(5, dtype=cp.float32))
        assert gathered.shape == (1, 5) and bool(cp.all(gathered[0] == cp.arange(5)))
    finally:
        comm.destroy()


def _launch_worker(nproc, *extra):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "tfla_cupy.distributed.run", "--nproc", str(nproc), *extra,
                           "--timeout", "120", os.path.join(TESTS, "_dist_worker.py")],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not _nccl_available(), reason="needs NCCL (cupy.cuda.nccl)")
@pytest.mark.parametrize("rendezvous", ["tcp", "env"])
def test_nccl_world_size_1_through_the_launcher(rendezvous):
    """The launcher's environment, one rank; with "env" the id comes from the launcher process."""
    out = _launch_worker(1, "--rendezvous", rendezvous)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 0/1 ok" in out.stdout


@pytest.mark.multigpu
@pytest.mark.skipif(_gpu_count() < 2 or not _nccl_available(), reason="needs 2 or more GPUs and NCCL")
@pytest.mark.parametrize("rendezvous", ["tcp", "file", "env"])
def test_nccl_ranks_match_reference(rendezvous):
    """One process per GPU (up to 8) over NCCL, ragged slices, every gate, fp32 and bf16."""
    nproc = min(_gpu_count(), 8)
    out = _launch_worker(nproc, "--rendezvous", rendezvous)
    assert out.returncode == 0, out.stdout + out.stderr
    for r in range(nproc):
        assert f"rank {r}/{nproc} ok" in out.stdout, out.stdout
