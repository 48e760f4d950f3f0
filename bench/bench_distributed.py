"""Sequence-parallel benchmark (docs/distributed.md §5): weak and strong scaling of
tfla_cupy.distributed, mLSTMexp, B 1, NH 16, DK 128, DV 256, bf16.

    # P real ranks over NCCL, one process per GPU (P = 1, 2, 4, 8 as available):
    python -m tfla_cupy.distributed.run --nproc P bench/bench_distributed.py
    # one GPU: the one-GPU rows and the costs sequence parallelism adds per rank, measured
    # with virtual ranks, and the rank times they imply for P GPUs (communication excluded):
    python bench/bench_distributed.py --virtual

Weak scaling: 65,536 tokens per rank (S = 65,536·P); efficiency = T(1 GPU, 65,536) / T(P ranks).
Strong scaling: S = 262,144 over P ranks; efficiency = T(1 GPU, S) / (P · T(P ranks)).
"fw" is mlstm_fwd, "fwbw" mlstm_fwd + mlstm_bwd (dh random). Timing: CUDA events, L2
flushed before each call, 5 warm-ups, median of 20; with NCCL the ranks start each call
together (an all-gather barrier) and the slowest rank's median is reported.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import _common
import tfla_cupy
from _common import Timer
from tfla_cupy import distributed as dist
from tfla_cupy.distributed import _algebra, _api, _local

NH, DK, DV, L = 16, 128, 256, 128
WEAK_TOKENS = 65536
STRONG_S = 262144
WARMUP, REPEAT = 5, 20


def _inputs(cp, S, seed=0):
    import ml_dtypes
    rng = cp.random.default_rng(seed)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    q, k = (rng.standard_normal((1, NH, S, DK), dtype=cp.float32).astype(bf16) for _ in range(2))
    v = rng.standard_normal((1, NH, S, DV), dtype=cp.float32).astype(bf16)
    i = rng.standard_normal((1, NH, S), dtype=cp.float32)
    f = 3.0 + rng.standard_normal((1, NH, S), dtype=cp.float32)
    dh = rng.standard_normal((1, NH, S, DV), dtype=cp.float32).astype(bf16)
    return (q, k, v, i, f), dh


def _one_gpu(cp, timer, S):
    x, dh = _inputs(cp, S)

    def fw():
        return tfla_cupy.mlstm_fwd(*x, chunk_size=L)

    def fwbw():
        _, _, ctx = tfla_cupy.mlstm_fwd(*x, chunk_size=L, copy_inputs=False)
        return tfla_cupy.mlstm_bwd(ctx, dh)

    return {"fw": timer(fw), "fwbw": timer(fwbw)}


def _virtual_overheads(cp, timer, S, P):
    """Per-rank costs that sequence parallelism adds, for a slice of S tokens and P ranks:
    the summary pass, the fold of P − 1 summaries (the last rank's, the longest), the dC0-only
    pass and the reverse scan of P − 1 state gradients."""
    x, dh = _inputs(cp, S)
    problem, arrays, _ = tfla_cupy._validate.inputs(*x, gate="exp", normalize=True, eps=1e-6, scale=None,
                                                    chunk_size=L, initial_state=None)
    s = _local.summary(problem, arrays, None, empty=True)
    summaries = [s] * P
    _, _, ctx = tfla_cupy.mlstm_fwd(*x, chunk_size=L, initial_state=tfla_cupy.MLSTMState(
        s.C, s.n, s.m.astype(np.float32)))
    chain = _algebra.stabilizer_chain(summaries, stabilized=True)
    D = _algebra.decays(summaries, chain, stabilized=True)
    a = [s.C] * P
    out = {
        "summary": timer(lambda: _local.summary(problem, arrays, None, empty=True)),
        "combine": timer(lambda: _algebra.incoming_state(summaries, P - 1, stabilized=True)) if P > 1 else 0.0,
        "dC0_only": timer(lambda: _local.initial_state_grad(ctx, dh, None)),
        "scan": timer(lambda: _algebra.slice_end_grad(a, D, 0, None)) if P > 2 else 0.0,
    }
    layout = _api._summary_layout(problem)
    out["summary_MB"] = _api._layout_bytes(layout) / 1e6
    return out


def _rows_virtual(cp):
    timer = Timer(cp, warmup=WARMUP, repeat=REPEAT)
    base = _one_gpu(cp, timer, WEAK_TOKENS)
    rows = []
    for P in (1, 2, 4, 8):
        o = _virtual_overheads(cp, timer, WEAK_TOKENS, P)
        fw = base["fw"] + (o["summary"] + o["combine"] if P > 1 else 0.0)
        fwbw = base["fwbw"] + (o["summary"] + o["combine"] + o["dC0_only"] + o["scan"] if P > 1 else 0.0)
        for mode, t1, tp in (("fw", base["fw"], fw), ("fwbw", base["fwbw"], fwbw)):
            rows.append(dict(kind="weak-virtual", P=P, S=WEAK_TOKENS * P, mode=mode, ms=tp, one_gpu_ms=t1,
                             efficiency=t1 / tp, summary_ms=o["summary"], combine_ms=o["combine"],
                             dC0_only_ms=o["dC0_only"] if mode == "fwbw" else 0.0,
                             scan_ms=o["scan"] if mode == "fwbw" else 0.0, summary_MB=o["summary_MB"]))
    big = _one_gpu(cp, timer, STRONG_S)
    for P in (1, 2, 4, 8):
        part = _one_gpu(cp, timer, STRONG_S // P)
        o = _virtual_overheads(cp, timer, STRONG_S // P, P)
        fw = part["fw"] + (o["summary"] + o["combine"] if P > 1 else 0.0)
        fwbw = part["fwbw"] + (o["summary"] + o["combine"] + o["dC0_only"] + o["scan"] if P > 1 else 0.0)
        for mode, t1, tp in (("fw", big["fw"], fw), ("fwbw", big["fwbw"], fwbw)):
            rows.append(dict(kind="strong-virtual", P=P, S=STRONG_S, mode=mode, ms=tp, one_gpu_ms=t1,
                             efficiency=t1 / (P * tp), summary_ms=o["summary"], combine_ms=o["combine"],
                             dC0_only_ms=o["dC0_only"] if mode == "fwbw" else 0.0,
                             scan_ms=o["scan"] if mode == "fwbw" else 0.0, summary_MB=o["summary_MB"]))
    return rows


def _rows_nccl(cp, comm, one_gpu):
    """weak and strong rows measured over NCCL; one_gpu: the single-GPU times (rank 0 measured
    them before the communicator existed; every rank has them)."""
    P, r = comm.size, comm.rank
    token = cp.zeros(1, cp.float32)
    timer = Timer(cp, warmup=WARMUP, repeat=REPEAT, barrier=lambda: comm.all_gather(token))
    rows = []
    for kind, S in (("weak-nccl", WEAK_TOKENS * P), ("strong-nccl", STRONG_S)):
        n = S // P
        x, dh = _inputs(cp, n, seed=r)

        def fw():
            return dist.mlstm_fwd(*x, comm=comm, chunk_size=L)

        def fwbw():
            _, _, ctx = dist.mlstm_fwd(*x, comm=comm, chunk_size=L)
            return dist.mlstm_bwd(ctx, dh)

        for mode, fn in (("fw", fw), ("fwbw", fwbw)):
            t = timer(fn)
            slowest = float(cp.asnumpy(comm.all_gather(cp.asarray([t], cp.float32))).max())
            t1 = one_gpu[(kind, mode)]
            eff = t1 / slowest if kind == "weak-nccl" else t1 / (P * slowest)
            rows.append(dict(kind=kind, P=P, S=S, mode=mode, ms=slowest, one_gpu_ms=t1, efficiency=eff))
    return rows


def _print(rows, card):
    print(f"# {card}; NH {NH}, DK {DK}, DV {DV}, bf16, chunk {L}, mLSTMexp")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print(_common.markdown_table(keys, [[f"{row[k]:.3f}" if isinstance(row.get(k), float) else row.get(k, "")
                                         for k in keys] for row in rows]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--virtual", action="store_true", help="one GPU: one-GPU rows and per-rank overheads")
    ap.add_argument("--out", default=str(_common.RESULTS), help="folder of the result files (default bench/results)")
    a = ap.parse_args(argv)
    cp = _common.gpu()
    if cp is None:
        print("# no CUDA GPU found: bench_distributed.py needs one; the algebra runs on NumPy in "
              "tests/test_distributed.py")
        return 0
    card = _common.card(cp)
    if a.virtual or "TFLA_RANK" not in os.environ:
        rows = _rows_virtual(cp)
        _print(rows, card)
        _common.write_results(rows, a.out, "distributed-virtual", card)
        return 0
    local = int(os.environ.get("TFLA_LOCAL_RANK", "0"))
    cp.cuda.Device(local).use()
    # every rank measures the one-GPU baseline on its own GPU (no broadcast needed)
    timer = Timer(cp, warmup=WARMUP, repeat=REPEAT)
    base, big = _one_gpu(cp, timer, WEAK_TOKENS), _one_gpu(cp, timer, STRONG_S)
    one = {("weak-nccl", m): base[m] for m in base} | {("strong-nccl", m): big[m] for m in big}
    cp.get_default_memory_pool().free_all_blocks()
    comm = dist.init()
    rows = _rows_nccl(cp, comm, one)
    if comm.rank == 0:
        _print(rows, f"{comm.size} × {card}")
        _common.write_results(rows, a.out, f"distributed-nccl-P{comm.size}", f"{comm.size} × {card}")
    comm.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
