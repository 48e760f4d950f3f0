"""Many threads, each on its own non-blocking stream, calling the forward, the backward and the
decode step on first use (tests/test_gpu_threads.py starts it in fresh processes). Every
thread's results are compared bit for bit with the same calls made serially afterwards on the
null stream. Prints one JSON line: {"errors": [...], "mismatches": [...], "calls": n}.

    python tests/_thread_worker.py distinct|shared THREADS
"""

import json
import sys
import threading
import traceback

import ml_dtypes
import numpy as np

import cupy as cp
import tfla_cupy

BF16 = np.dtype(ml_dtypes.bfloat16)
ROUNDS = 3

#: (S, DK, DV, dtype, gate, normalize): none shares every kernel and shared-memory size with
#: another; several share an instantiation whose shared memory depends on DK or DV (the Hopper
#: backward's chunk kernel), which is what a first-call race on the kernel's attribute needs.
SHAPES = [
    (100, 32, 64, BF16, "exp", True), (333, 64, 128, BF16, "exp", True), (257, 128, 256, BF16, "exp", True),
    (77, 96, 160, BF16, "exp", True), (200, 64, 64, np.float16, "sig", True), (150, 128, 128, BF16, "sig", False),
    (64, 64, 256, BF16, "exp", True), (300, 192, 64, BF16, "exp", True), (129, 256, 128, BF16, "sig", True),
    (90, 48, 80, np.float32, "exp", True), (513, 64, 192, BF16, "exp", True), (45, 128, 64, np.float16, "exp", True),
    (260, 32, 32, BF16, "sig", True), (180, 64, 320, BF16, "exp", True), (99, 112, 144, np.float32, "sig", False),
    (140, 256, 256, BF16, "exp", True),
]


def inputs(seed, S, DK, DV, dtype, B=1, NH=3):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, B, NH, S, DK))
    v, dh = rng.standard_normal((2, B, NH, S, DV))
    i, f = rng.standard_normal((2, B, NH, S))
    f += 3.0
    C0 = rng.standard_normal((B, NH, DK, DV))
    n0, m0 = rng.standard_normal((B, NH, DK)), rng.standard_normal((B, NH))
    dC = rng.standard_normal((B, NH, DK, DV))
    seq = [a.astype(dtype) for a in (q, k, v)] + [i.astype(np.float32), f.astype(np.float32), dh.astype(dtype)]
    return seq, [a.astype(np.float32) for a in (C0, np.abs(n0), m0, dC)]


def run(case, seed):
    """The forward, backward and one decode step of one case; results as host arrays."""
    S, DK, DV, dtype, gate, normalize = case
    (q, k, v, i, f, dh), (C0, n0, m0, dC) = inputs(seed, S, DK, DV, dtype)
    q, k, v, i, f, dh, C0, n0, m0, dC = (cp.asarray(x) for x in (q, k, v, i, f, dh, C0, n0, m0, dC))
    n0 = n0 if normalize else None
    m0 = m0 if gate == "exp" else None
    state = tfla_cupy.MLSTMState(C0, n0, m0)
    h, last, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=gate, normalize=normalize, initial_state=state)
    g = tfla_cupy.mlstm_bwd(ctx, dh, (dC, None, None))
    hs, st = tfla_cupy.mlstm_step(q[:, :, -1], k[:, :, -1], v[:, :, -1], i[:, :, -1], f[:, :, -1], last,
                                  gate=gate, normalize=normalize)
    out = [h, *last, *g[:5], g.d_initial_state.C, hs, *st]
    return [None if x is None else cp.asnumpy(x) for x in out]


def main():
    mode, threads = sys.argv[1], int(sys.argv[2])
    cases = [(SHAPES[t % len(SHAPES)] if mode == "distinct" else SHAPES[2], 1000 + t) for t in range(threads)]
    results, errors = {}, []
    barrier = threading.Barrier(threads)

    def work(t):
        case, seed = cases[t]
        try:
            with cp.cuda.Stream(non_blocking=True) as s:
                barrier.wait()
                for r in range(ROUNDS):
                    results[(t, r)] = run(case, seed)
                s.synchronize()
        except Exception:
            errors.append(f"thread {t} {case[:3]}: {traceback.format_exc(limit=4)}")

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    cp.cuda.Device().synchronize()
    mismatches = []
    for t, (case, seed) in enumerate(cases):
        serial = run(case, seed)
        for r in range(ROUNDS):
            got = results.get((t, r))
            if got is None:
                continue
            for j, (a, b) in enumerate(zip(got, serial)):
                if (a is None) != (b is None) or (a is not None and not np.array_equal(a.view(np.uint8),
                                                                                        b.view(np.uint8))):
                    mismatches.append(f"thread {t} round {r} output {j} {case[:3]}")
    print(json.dumps({"errors": errors, "mismatches": mismatches, "calls": len(results)}))


if __name__ == "__main__":
    main()
