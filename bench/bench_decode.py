"""Decode benchmark: one token of the mLSTM at the xLSTM-7B head shape (docs/performance.md §2a).

    python bench/bench_decode.py                    # B = 1, 8, 64, 256; peer step kernel if importable
    python bench/bench_decode.py --B 64 --no-peers

NH 8, DK 256, DV 512, bf16 q/k/v, fp32 state, mLSTMexp. A step must read and write the state
C, n, m once: floor = 2 · state bytes / the device-to-device copy rate, measured in the same run
(bench/_common.py: cudaMemcpy of 1 GiB, read + write counted). Rows per B:

* ``mlstm_step``            the plain call: validation, new state buffers, launch
* ``mlstm_step in place``   ``out_state=state`` (no state allocation)
* ``StepPlan``              the pre-validated plan, state in place
* ``StepPlan, CUDA graph``  the plan's step captured once, replayed
* mlstm_kernels ``mlstm_recurrent_step__triton`` (the fused Triton step kernel), when importable

and then a host-time table of small calls (forward, forward + backward at B 1, NH 2, S 128, DK 64,
DV 64 against mlstm_kernels' chunkwise TFLA kernels), paced so that the launch queue never fills.

GPU time: CUDA events around one call after a 256 MB L2 flush, 10 warm-ups, median of 30 (the
protocol of bench/bench.py). Host time: 1000 back-to-back calls without synchronising, divided
by 1000 (B = 1 shows the launch path's cost). Every tfla_cupy row's h and C are checked against
the float64 reference step on batch row 0, heads 0–1, before timing; the peer's h too. Results
go to bench/results/decode.csv and .json (--out, --tag); the script prints where.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import _common
import tfla_cupy
from tfla_cupy import MLSTMState
from tfla_cupy.reference import recurrent

NH, DK, DV = 8, 256, 512
H_TOL, C_TOL = 3e-2, 1e-5     # bf16 h (rounded output); fp32 state


def state_bytes(B):
    return 4 * B * NH * (DK * DV + DK + 1)


def host_us(cp, fn, calls=1000):
    fn()
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e6
    cp.cuda.Device().synchronize()
    return host


def host_us_paced(cp, fn, calls=1000, every=50):
    """Host time per call of ``calls`` calls, synchronising after every ``every`` outside the
    timed spans: the launch queue never fills, so a call whose GPU work outlasts its host work
    is still measured by its host work."""
    fn()
    cp.cuda.Device().synchronize()
    total = 0.0
    for _ in range(calls // every):
        t = time.perf_counter()
        for _ in range(every):
            fn()
        total += time.perf_counter() - t
        cp.cuda.Device().synchronize()
    return total / (calls // every * every) * 1e6


#: the small problem of the host-time table: B 1, NH 2, S 128, DK 64, DV 64, bf16
SMALL = (1, 2, 128, 64, 64)


def small_rows(cp, peers):
    """Host time per call of a small problem, forward and forward + backward: tfla_cupy's mlstm /
    mlstm_fwd + mlstm_bwd and, when importable, the chunkwise TFLA kernels of mlstm_kernels with
    PyTorch autograd (host_us_paced). The decode rows above give the step's."""
    import ml_dtypes
    B, H, S, K, V = SMALL
    rng = cp.random.default_rng(1)
    x = [rng.standard_normal(sh, dtype=cp.float32).astype(ml_dtypes.bfloat16) for sh in ((B, H, S, K),) * 2 + ((B, H, S, V),)]
    g = [rng.standard_normal((B, H, S), dtype=cp.float32) for _ in range(2)]
    dh = rng.standard_normal((B, H, S, V), dtype=cp.float32).astype(ml_dtypes.bfloat16)

    def fw():
        return tfla_cupy.mlstm(*x, *g)

    def fwbw():
        _, _, ctx = tfla_cupy.mlstm_fwd(*x, *g)
        return tfla_cupy.mlstm_bwd(ctx, dh)

    rows = [dict(impl="tfla_cupy mlstm", call="fw", host_us=host_us_paced(cp, fw)),
            dict(impl="tfla_cupy mlstm_fwd + mlstm_bwd", call="fwbw", host_us=host_us_paced(cp, fwbw))]
    fn = peers and _common.import_peer("mlstm_kernels.torch.chunkwise.triton_xl_chunk", "mlstm_chunkwise__xl_chunk")
    if fn:
        import torch
        t = [torch.from_dlpack(a) for a in (*x, *g)]
        tg = [a.clone().requires_grad_(True) for a in t]

        def peer_fw():
            with torch.no_grad():
                return fn(*t, chunk_size=64)

        def peer_fwbw():
            out = fn(*tg, chunk_size=64)
            out.backward(torch.ones_like(out))

        rows += [dict(impl="mlstm_kernels TFLA (Triton)", call="fw", host_us=host_us_paced(cp, peer_fw)),
                 dict(impl="mlstm_kernels TFLA (Triton), autograd", call="fwbw", host_us=host_us_paced(cp, peer_fwbw))]
    return rows


def inputs(cp, B, seed=0):
    import ml_dtypes
    rng = cp.random.default_rng(seed)
    tok = dict(q=rng.standard_normal((B, NH, DK), dtype=cp.float32).astype(ml_dtypes.bfloat16),
               k=rng.standard_normal((B, NH, DK), dtype=cp.float32).astype(ml_dtypes.bfloat16),
               v=rng.standard_normal((B, NH, DV), dtype=cp.float32).astype(ml_dtypes.bfloat16),
               i=rng.standard_normal((B, NH), dtype=cp.float32),
               f=3.0 + rng.standard_normal((B, NH), dtype=cp.float32))
    state = MLSTMState(0.1 * rng.standard_normal((B, NH, DK, DV), dtype=cp.float32),
                       rng.standard_normal((B, NH, DK), dtype=cp.float32),
                       rng.standard_normal((B, NH), dtype=cp.float32))
    return tok, state


def reference(cp, tok, state, heads=2):
    """The float64 step on batch row 0, heads [0, heads): (h, C)."""
    f64 = lambda a: cp.asnumpy(a[:1, :heads]).astype(np.float64)  # noqa: E731
    h, C, _, _ = recurrent.step(*(f64(tok[n]) for n in "qkvif"), f64(state.C), f64(state.n), f64(state.m),
                                gate="exp", normalize=True, eps=1e-6, scale=DK ** -0.5)
    return h, C


def rel(cp, a, ref, heads=2):
    a = (cp.asnumpy(a[:1, :heads]) if not isinstance(a, np.ndarray) else a).astype(np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max()) if np.all(np.isfinite(a)) else float("inf")


def check(cp, tok, state, run):
    """run(state) -> (h, new C); checked against the reference on a copy of the state."""
    st = MLSTMState(*(a.copy() for a in state))
    h_ref, C_ref = reference(cp, tok, st)
    h, C = run(st)
    eh, eC = rel(cp, h, h_ref), rel(cp, C, C_ref)
    ok = eh <= H_TOL and eC <= C_TOL
    return ok, f"{'ok' if ok else 'FAIL'} h {eh:.1e} C {eC:.1e}"


def tfla_rows(cp, timer, B):
    tok, state = inputs(cp, B)
    args = [tok[n] for n in "qkvif"]
    rows = []

    def plain():
        return tfla_cupy.mlstm_step(*args, state)

    def in_place():
        return tfla_cupy.mlstm_step(*args, state, out_state=state)

    plan = tfla_cupy.mlstm_step_plan(*args, state)

    def planned():
        return plan(*args, state)

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        planned()
        stream.synchronize()
        stream.begin_capture()
        planned()
        graph = stream.end_capture()

    def graphed():
        graph.launch(stream)

    checks = {
        "mlstm_step": lambda st: (lambda h, s: (h, s.C))(*tfla_cupy.mlstm_step(*args, st)),
        "mlstm_step in place": lambda st: (lambda h, s: (h, s.C))(*tfla_cupy.mlstm_step(*args, st, out_state=st)),
        "StepPlan": lambda st: (lambda h, s: (h, s.C))(*plan(*args, st)),
    }
    for name, fn in (("mlstm_step", plain), ("mlstm_step in place", in_place), ("StepPlan", planned)):
        ok, note = check(cp, tok, state, checks[name])
        rows.append(dict(impl=name, ms=timer(fn), host_us=host_us(cp, fn), check=note, ok=ok))
    # the graph replays the plan on `state` in place: check one replay against the reference
    before = MLSTMState(*(a.copy() for a in state))
    h_ref, C_ref = reference(cp, tok, before)
    with stream:
        graph.launch(stream)
    stream.synchronize()
    eh, eC = rel(cp, plan._h, h_ref), rel(cp, state.C, C_ref)
    ok = eh <= H_TOL and eC <= C_TOL
    with stream:
        ms = timer(graphed)
    rows.append(dict(impl="StepPlan, CUDA graph", ms=ms, host_us=host_us(cp, graphed),
                     check=f"{'ok' if ok else 'FAIL'} h {eh:.1e} C {eC:.1e}", ok=ok))
    return rows


def peer_step():
    """The fused Triton step kernel of mlstm_kernels, or None."""
    return _common.import_peer("mlstm_kernels.torch.recurrent.triton_step", "mlstm_recurrent_step__triton")


def peer_row(cp, timer, B, fn):
    import torch
    tok, state = inputs(cp, B)
    t = {n: torch.from_dlpack(a) for n, a in tok.items()}
    i, f = t["i"][..., None], t["f"][..., None]
    C, n, m = torch.from_dlpack(state.C), torch.from_dlpack(state.n), torch.from_dlpack(state.m)[..., None]

    def run():
        with torch.no_grad():
            return fn(t["q"], t["k"], t["v"], i, f, C, n, m, eps=1e-6)

    h_ref, C_ref = reference(cp, tok, state)
    h, (C_new, _, _) = run()
    torch.cuda.synchronize()
    eh = rel(cp, cp.from_dlpack(h.float()), h_ref)
    eC = rel(cp, cp.from_dlpack(C_new.float()), C_ref)
    ok = eh <= H_TOL and eC <= C_TOL
    row = dict(impl="mlstm_kernels Triton step", ms=timer(run), host_us=host_us(cp, run),
               check=f"{'ok' if ok else 'FAIL'} h {eh:.1e} C {eC:.1e}", ok=ok)
    del t, C, n, m
    torch.cuda.empty_cache()
    return row


def table(rows, rate):
    body = []
    for r in rows:
        by = 2 * state_bytes(r["B"])
        floor = by / rate * 1e3
        gbps = by / (r["ms"] * 1e-3) / 1e9
        body.append((r["B"], r["impl"], f"{r['ms']:.4f}", f"{gbps:,.0f}", f"{100 * gbps * 1e9 / rate:.0f} %",
                     f"{floor:.4f}", f"{r['ms'] / floor:.2f}", f"{r['host_us']:.1f}", r["check"]))
    return _common.markdown_table(("B", "impl", "ms", "GB/s (state)", "% of copy rate", "floor ms", "÷ floor",
                                   "host µs/call", "check"), body)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, nargs="*", default=[1, 8, 64, 256])
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--out", default=str(_common.RESULTS), help="folder of the result files (default bench/results)")
    ap.add_argument("--tag", default="decode", help="file name prefix of the results")
    args = ap.parse_args(argv)
    if any(B < 1 for B in args.B):
        ap.error(f"argument --B: expected batch sizes >= 1, got {args.B}")
    cp = _common.gpu()
    if cp is None:
        print("# no CUDA GPU found: the decode benchmark needs one (the NumPy path is the float64 reference; "
              "examples/generate.py runs it)")
        return 0
    timer = _common.Timer(cp)
    rate = _common.copy_rate(cp)
    print(_common.card_line(cp))
    print(f"# decode step NH {NH} DK {DK} DV {DV}, bf16 q/k/v, fp32 state, exp gate; "
          f"D2D copy rate {rate / 1e12:.2f} TB/s (read + write)")
    peer = None if args.no_peers else peer_step()
    rows, failures = [], 0
    for B in args.B:
        for r in tfla_rows(cp, timer, B):
            rows.append(dict(B=B, **r))
            print(rows[-1], flush=True)
        if peer is not None:
            try:
                rows.append(dict(B=B, **peer_row(cp, timer, B, peer)))
                print(rows[-1], flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"# peer B={B}: failed: {type(e).__name__}: {str(e)[:200]}")
        failures += sum(not r["ok"] for r in rows if r["B"] == B and not r["impl"].startswith("mlstm_kernels"))
        cp.get_default_memory_pool().free_all_blocks()
    print("\n" + table(rows, rate))
    small = small_rows(cp, not args.no_peers)
    print(f"\n# small calls (B, NH, S, DK, DV = {SMALL}, bf16): host time per call, paced")
    print(_common.markdown_table(("impl", "call", "host µs/call"), [(r["impl"], r["call"], f"{r['host_us']:.1f}")
                                                                    for r in small]))
    _common.write_results(rows + [dict(B=SMALL[0], **r) for r in small], args.out, args.tag, _common.card(cp),
                          copy_rate=rate)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
