"""One rank of the NCCL tests (tests/test_gpu_distributed.py), started by
``python -m tfla_cupy.distributed.run --nproc N tests/_dist_worker.py``: every rank builds the
same random problem, runs its slice through tfla_cupy.distributed over NCCL and checks it
against the float64 reference of the whole sequence. Exits 1 if any check fails."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_utils import BWD_TOL, DF_TOL, DTYPES, FWD_TOL, GATE_MODES, cp, make_inputs, reference, rel_err, seed_of  # noqa: E402

import tfla_cupy  # noqa: E402
from tfla_cupy import distributed as dist  # noqa: E402

#: Ragged slice lengths, one per rank (cycled): shorter and longer than the chunk, not aligned.
LENGTHS = (61, 130, 7, 200, 64, 1, 99, 128)


def check_case(comm, mode, dt, L=64, DK=32, DV=64):
    P, r = comm.size, comm.rank
    gate, normalize = GATE_MODES[mode]
    lengths = [LENGTHS[j % len(LENGTHS)] for j in range(P)]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    S = int(bounds[-1])
    rng = np.random.default_rng(seed_of("dist", P, mode, dt))
    host, ref = make_inputs(rng, 1, 2, S, DK, DV, DTYPES[dt], init=True)
    dh = rng.standard_normal((1, 2, S, DV)).astype(DTYPES[dt])
    dC = rng.standard_normal((1, 2, DK, DV)).astype(np.float32)
    want = reference(ref, gate=gate, normalize=normalize, L=L, dh=dh.astype(np.float64), dC_last=dC.astype(np.float64))
    sl = slice(int(bounds[r]), int(bounds[r + 1]))
    x = {n: cp.asarray(host[n][:, :, sl]) for n in "qkvif"}
    state = tfla_cupy.MLSTMState(*(cp.asarray(host[n]) for n in ("C0", "n0", "m0"))) if r == 0 else None
    h, last, ctx = dist.mlstm_fwd(*(x[n] for n in "qkvif"), comm=comm, gate=gate, normalize=normalize,
                                  initial_state=state, chunk_size=L)
    d_state = tfla_cupy.MLSTMState(cp.asarray(dC)) if r == P - 1 else None
    g = dist.mlstm_bwd(ctx, cp.asarray(dh[:, :, sl]), d_state)
    errs = {"h": (rel_err(h, want["h"][:, :, sl]), FWD_TOL[dt])}
    for j, name in enumerate(("dq", "dk", "dv", "di", "df")):
        errs[name] = (rel_err(g[j], want[name][:, :, sl]), DF_TOL[dt] if name == "df" else BWD_TOL[dt])
    if r == P - 1:
        errs["C"] = (rel_err(last.C, want["C"]), FWD_TOL[dt])
        if gate == "exp":
            errs["m"] = (rel_err(last.m, want["m"]), FWD_TOL[dt])
    if r == 0:
        errs["dC0"] = (rel_err(g.d_initial_state.C, want["dC0"]), BWD_TOL[dt])
    elif g.d_initial_state is not None:
        errs["d_initial_state"] = (1.0, 0.0)  # must be None off rank 0
    return {n: e for n, (e, tol) in errs.items() if not e <= tol}, errs


def main():
    comm = dist.init()
    failed = 0
    for mode in GATE_MODES:
        for dt in ("f32", "bf16"):
            bad, errs = check_case(comm, mode, dt)
            if bad:
                failed += 1
                print(f"rank {comm.rank}/{comm.size} {mode} {dt} FAILED {bad} (all: {errs})", flush=True)
    print(f"rank {comm.rank}/{comm.size} {'ok' if not failed else 'FAILED'}", flush=True)
    comm.destroy()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
