"""The tfla_cupy benchmark (docs/performance.md): constant tokens B·S = 65,536.

    python bench/bench.py                  # main shape, S = 8192, fw + fwbw, exp + sig, peers if present
    python bench/bench.py --sweep          # S = 512 … 65536 (B = 65536 / S)
    python bench/bench.py --shape second   # NH = 8, DK = 256, DV = 512
    python bench/bench.py --modes bw       # the backward alone (one forward first, untimed)
    python bench/bench.py --varlen         # 64 packed random-length sequences and (B, S, NH, D) vs B = 8
    python bench/bench.py --family sm80    # force a kernel family (KernelConfig.family)
    python bench/bench.py --S 65536 --segments 4   # force the fused forward's segment count
    python bench/bench.py --fwd-ws both    # the warp-specialised Hopper forward beside the fused one
    ncu --profile-from-start off python bench/bench.py --profile-once   # one fw + bw per variant, for a profiler
    python bench/bench.py --probe-cluster  # Hopper: the cost of exchanging 16–64 KB within a CTA pair

Timing (docs/performance.md §1): CUDA events, a 256 MB buffer zeroed before every call (L2
flush), 10 warm-ups, median of 30 calls. Each tfla_cupy row is first checked against the float64
reference on two heads of the same inputs (the reference on all 128 heads would take minutes on a
CPU). Peers (mlstm_kernels TFLA, flash-linear-attention chunk_simple_gla, PyTorch SDPA as the
attention baseline) run when importable. Results go to bench/results/<tag>.csv and .json (and a
PNG if matplotlib is present); the script prints where.

On a machine without a GPU this runs the NumPy reference on a small shape and says so; it
honours --variants, --modes, --chunk, --out and --tag there (results as cpu-demo.csv / .json)
and rejects the flags that need a GPU with an argparse error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import _common
import tfla_cupy
from tfla_cupy import _loader
from tfla_cupy._params import make_params
from tfla_cupy.config import FWD_WS_ENV, MAX_SEGMENTS, fused_ws_unsupported, pick_config
from tfla_cupy.reference import chunkwise

SHAPES = {"main": dict(NH=16, DK=128, DV=256), "second": dict(NH=8, DK=256, DV=512)}
TOKENS = 65536
MODES = ("fw", "fwbw", "bw")
VARIANTS = {"exp": ("exp", True), "sig": ("sig", False)}     # name -> (gate, normalize)
FAMILIES = ("auto", "sm80", "sm90")
COPY_BW = 3.0e12        # bytes/s: device copy rate; main() replaces it by the rate measured on the card it runs on
MMA_RATE = 800e12       # FLOP/s: bf16 matrix rate
CHECK_TOL = {"h": 3e-2, "grad": 3e-2, "df": 1e-1}
CPU_SHAPE = dict(B=1, NH=2, S=256, DK=32, DV=64)


@dataclass
class Row:
    impl: str
    variant: str
    mode: str
    B: int
    S: int
    NH: int
    DK: int
    DV: int
    L: int
    ms: float
    tflops: float
    gbps: float
    floor_ms: float
    x_floor: float
    peak_gb: float
    checked: str = ""
    notes: str = ""


# ------------------------------------------------------------------------------------------
# Models: FLOPs (docs/math.md §11.2) and the IO floor (docs/performance.md §3)
# ------------------------------------------------------------------------------------------


def causal_fraction(L, tile=64):
    nb = max(L // tile, 1)
    return (nb + 1) / (2 * nb)


def flops(mode, B, NH, S, DK, DV, L):
    rho = causal_fraction(L)
    fw = 4 * S * DK * DV + 2 * rho * S * L * (DK + DV)
    fwbw = 14 * S * DK * DV + 8 * rho * S * L * (DK + DV)
    return B * NH * {"fw": fw, "fwbw": fwbw, "bw": fwbw - fw}[mode]


def floor_bytes(mode, B, NH, S, DK, DV, e=2):
    per_tok = {
        "fw": e * (2 * DK + 2 * DV + 2) + 8,     # read q, k, v, i, f; write h and N, M (fp32)
        "fwbw": e * (6 * DK + 5 * DV + 6) + 16,  # read q, k, v, dh, i, f; write h, dq, dk, dv, di, df; N, M each way
        "bw": e * (4 * DK + 3 * DV + 4) + 8,     # read q, k, v, dh, i, f and N, M; write dq, dk, dv, di, df
    }[mode]
    return B * NH * S * per_tok


def floor_ms(mode, B, NH, S, DK, DV, L):
    return 1e3 * max(floor_bytes(mode, B, NH, S, DK, DV) / COPY_BW, flops(mode, B, NH, S, DK, DV, L) / MMA_RATE)


def cupy_peak_bytes(cp, fn):
    """Peak bytes allocated through CuPy's pool during fn() beyond what was live before."""
    from cupy.cuda import memory_hook

    class Peak(memory_hook.MemoryHook):
        name = "PeakHook"

        def __init__(self):
            self.live, self.peak, self.sizes = 0, 0, {}

        def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
            self.sizes[mem_ptr] = mem_size
            self.live += mem_size
            self.peak = max(self.peak, self.live)

        def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
            self.live -= self.sizes.pop(mem_ptr, mem_size)

    hook = Peak()
    with hook:
        fn()
        cp.cuda.Device().synchronize()
    return hook.peak


# ------------------------------------------------------------------------------------------
# tfla_cupy rows
# ------------------------------------------------------------------------------------------


def make_inputs(cp, B, NH, S, DK, DV, dtype, seed=0):
    rng = cp.random.default_rng(seed)
    q = rng.standard_normal((B, NH, S, DK), dtype=cp.float32).astype(dtype)
    k = rng.standard_normal((B, NH, S, DK), dtype=cp.float32).astype(dtype)
    v = rng.standard_normal((B, NH, S, DV), dtype=cp.float32).astype(dtype)
    i = rng.standard_normal((B, NH, S), dtype=cp.float32).astype(dtype)
    f = rng.standard_normal((B, NH, S), dtype=cp.float32).astype(dtype)
    return q, k, v, i, f


def kernel_config(family, segments, DK, DV, L):
    """A KernelConfig with the heuristic's bf16 tiles and the given family / segment count, or
    None (the library's own choice) when neither is given."""
    if family is None and segments is None:
        return None
    base = pick_config("MmaBF16", DK, DV, L)   # the benchmark's inputs are bf16
    return dataclasses.replace(base, family=family or "auto", segments=segments or 0)


def make_call(x, dh, mode, **opts):
    """The timed call of `mode` on inputs x: fw → h; fwbw → (h, grads); bw → grads of a forward
    made here, once. tfla_cupy's inputs stay unchanged until the backward, as with the peers'
    autograd: no private copies (copy_inputs=False)."""
    if mode == "fw":
        return lambda: tfla_cupy.mlstm(*x, **opts)
    if mode == "fwbw":
        def fwbw():
            h, _, ctx = tfla_cupy.mlstm_fwd(*x, copy_inputs=False, **opts)
            return h, tfla_cupy.mlstm_bwd(ctx, dh)
        return fwbw
    _, _, ctx = tfla_cupy.mlstm_fwd(*x, copy_inputs=False, **opts)
    return lambda: tfla_cupy.mlstm_bwd(ctx, dh)


def check_against_reference(cp, x, out, gate, normalize, L, mode, heads=2):
    """("ok …" or "FAIL …", ok): the worst relative error of the first `heads` heads of batch 0
    against the float64 reference; `out` is what make_call's function returned."""
    q, k, v, i, f = (cp.asnumpy(t[:1, :heads]).astype(np.float64) for t in x)
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    zeros = (np.zeros((B, NH, DK, DV)), np.zeros((B, NH, DK)), np.zeros((B, NH)))
    opts = dict(gate=gate, normalize=normalize, L=L, eps=1e-6, scale=DK ** -0.5)
    h_ref, *_ = chunkwise.fwd(q, k, v, i, f, *zeros, **opts)

    def err(a, ref):
        a = cp.asnumpy(a[:1, :heads]).astype(np.float64)
        return float(np.abs(a - ref).max() / np.abs(ref).max()) if np.all(np.isfinite(a)) else math.inf

    h, grads = {"fw": (out, None), "fwbw": out, "bw": (None, out)}[mode]
    errs = {} if h is None else {"h": err(h, h_ref)}
    if grads is not None:
        ref = chunkwise.bwd(q, k, v, i, f, *zeros, np.ones_like(h_ref), None, **opts)
        errs.update({name: err(got, want) for name, got, want in zip(("dq", "dk", "dv", "di", "df"), grads[:5], ref[:5])})
    tol = {n: CHECK_TOL["h" if n == "h" else "df" if n == "df" else "grad"] for n in errs}
    ok = all(errs[n] <= tol[n] for n in errs)
    worst = max(errs, key=errs.get)
    return ("ok" if ok else "FAIL") + f" max {worst} {errs[worst]:.1e}", ok


def bench_tfla(cp, timer, variant, mode, B, NH, S, DK, DV, L, check=True, config=None):
    import ml_dtypes
    gate, normalize = VARIANTS[variant]
    x = make_inputs(cp, B, NH, S, DK, DV, ml_dtypes.bfloat16)
    dh = cp.ones((B, NH, S, DV), dtype=ml_dtypes.bfloat16)
    fn = make_call(x, dh, mode, gate=gate, normalize=normalize, chunk_size=L, config=config)
    out = fn()
    checked, ok = check_against_reference(cp, x, out, gate, normalize, L, mode) if check else ("", True)
    del out
    ms = timer(fn)
    peak = cupy_peak_bytes(cp, fn)
    return ms, peak, checked, ok


def bench_layouts(cp, timer, variant, mode, NH, DK, DV, L, n_seqs=64, seed=0, config=None):
    """The addressing-layer cases at B·S = 65,536: the equal-length B = 8 call (bhsd), the same
    tokens as `n_seqs` packed random-length sequences (cu_seqlens, B = 1), and the B = 8 call in
    the (B, S, NH, D) layout. Returns [(label, B, S, ms, peak bytes)]."""
    import ml_dtypes
    gate, normalize = VARIANTS[variant]
    bf = ml_dtypes.bfloat16
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, TOKENS), n_seqs - 1, replace=False))
    cu = cp.asarray(np.concatenate([[0], cuts, [TOKENS]]), dtype=cp.int32)
    B, S = 8, TOKENS // 8
    cases = [("bhsd B=8", B, S, make_inputs(cp, B, NH, S, DK, DV, bf, seed), {}, (B, NH, S, DV)),
             (f"varlen {n_seqs} seqs", 1, TOKENS, make_inputs(cp, 1, NH, TOKENS, DK, DV, bf, seed),
              dict(cu_seqlens=cu), (1, NH, TOKENS, DV))]
    bshd = tuple(cp.ascontiguousarray(t.swapaxes(1, 2)) for t in cases[0][3])
    cases.append(("bshd B=8", B, S, bshd, dict(layout="bshd"), (B, S, NH, DV)))
    out = []
    for label, B_, S_, x, extra, h_shape in cases:
        dh = cp.ones(h_shape, dtype=bf)
        fn = make_call(x, dh, mode, gate=gate, normalize=normalize, chunk_size=L, config=config, **extra)
        ms = timer(fn)
        out.append((label, B_, S_, ms, cupy_peak_bytes(cp, fn)))
    return out


def probe_cluster(cp, rounds=200):
    """The cost of one exchange between the two CTAs of a thread-block cluster (cluster_probe_kernel,
    cuda_src/wgmma_probes.cuh), every SM busy: cycles per round for the cluster barrier alone, for
    remote stores and for one bulk copy of 16 … 64 KB per CTA, and the bytes per cycle and per SM
    beyond the barrier. The bytes of the last round are checked. Returns False if any check failed."""
    sms = _loader.device_limits(cp.cuda.Device().id)[0]
    ctas = 2 * (sms // 2)
    print(f"# cluster exchange probe: {ctas} CTAs in pairs, {rounds} rounds, cycles per round (median over CTAs)")
    print(f"{'KB':>4} {'barrier':>8} {'stores':>8} {'bulk':>8} {'stores B/clk':>13} {'bulk B/clk':>11}")
    ok = True
    for kb in (16, 32, 48, 64):
        nbytes = kb * 1024
        per_round = []
        for mode in (0, 1, 2):
            out = cp.zeros(ctas * nbytes // 4, cp.uint32)
            cycles = cp.zeros(ctas, cp.float32)
            kernel = _loader.get_kernel(f"tfla::cluster_probe_kernel<{mode}>")
            for _ in range(2):  # the first launch warms up
                kernel(ctas, 128, make_params(h=out, N=cycles, S=nbytes, NC=rounds), 2 * 64 * 1024)
            per_round.append(float(cp.median(cycles)) / rounds)
            if mode:
                words = np.arange(nbytes // 4, dtype=np.uint64)
                got = cp.asnumpy(out).reshape(ctas, -1)
                for b in range(ctas):
                    want = ((((b % 2) ^ 1) << 28) + ((rounds - 1) << 16) + words) % 2**32
                    ok &= bool(np.array_equal(got[b], want.astype(np.uint32)))
        base, stores, bulk = per_round
        print(f"{kb:>4} {base:>8.0f} {stores:>8.0f} {bulk:>8.0f} {nbytes / max(stores - base, 1):>13.1f} "
              f"{nbytes / max(bulk - base, 1):>11.1f}")
    print("# bytes received: " + ("checked" if ok else "WRONG"))
    return ok


def profile_once(cp, variants, B, NH, S, DK, DV, L, config=None):
    """One warmed-up forward + backward per variant between cudaProfilerStart / Stop, nothing
    timed: for ``ncu --profile-from-start off`` or ``nsys profile --capture-range=cudaProfilerApi``."""
    import ml_dtypes
    x = make_inputs(cp, B, NH, S, DK, DV, ml_dtypes.bfloat16)
    dh = cp.ones((B, NH, S, DV), dtype=ml_dtypes.bfloat16)
    for variant in variants:
        gate, normalize = VARIANTS[variant]
        fn = make_call(x, dh, "fwbw", gate=gate, normalize=normalize, chunk_size=L, config=config)
        fn()                                    # compiles and warms up outside the profiled range
        cp.cuda.Device().synchronize()
        cp.cuda.profiler.start()
        fn()
        cp.cuda.Device().synchronize()
        cp.cuda.profiler.stop()
        print(f"# profiled one fw + bw: {variant}, B={B} NH={NH} S={S} DK={DK} DV={DV} L={L}", flush=True)


# ------------------------------------------------------------------------------------------
# Peers (PyTorch / Triton), only if importable
# ------------------------------------------------------------------------------------------


# key: (row label, kind, module, function); kind "sdpa" needs no import beyond torch
_PEER_TABLE = {
    "tfla_exp": ("mlstm_kernels TFLA exp", "exp", "mlstm_kernels.torch.chunkwise.triton_xl_chunk",
                 "mlstm_chunkwise__xl_chunk"),
    "tfla_sig": ("mlstm_kernels TFLA sig", "sig", "mlstm_kernels.torch.chunkwise.triton_xl_chunk_siging",
                 "mlstm_siging_chunkwise__xl_chunk"),
    "fla": ("fla chunk_simple_gla", "gla", "fla.ops.simple_gla", "chunk_simple_gla"),
    "sdpa": ("torch SDPA causal (NH32 d128)", "sdpa", None, None),
}
PEERS = tuple(_PEER_TABLE)


def torch_peers(wanted):
    """(torch, {label: (kind, fn)}) for the importable peers among `wanted` (keys of PEERS)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - without PyTorch there are no peers
        print(f"# peers unavailable: PyTorch does not import ({type(e).__name__}: {e})")
        return None, {}
    peers = {}
    for key in PEERS:
        if key not in wanted:
            continue
        label, kind, module, function = _PEER_TABLE[key]
        fn = _common.import_peer(module, function) if module else None
        if module is None or fn is not None:
            peers[label] = (kind, fn)
    return torch, peers


def bench_peer(torch, timer, kind, fn, mode, B, NH, S, DK, DV, L):
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    if kind == "sdpa":
        NHa, d = 32, 128
        q, k, v = (torch.randn(B, NHa, S, d, device=dev, dtype=dt, generator=g) for _ in range(3))
        call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        args = (q, k, v)
    elif kind == "gla":
        q = torch.randn(B, S, NH, DK, device=dev, dtype=dt, generator=g)
        k = torch.randn(B, S, NH, DK, device=dev, dtype=dt, generator=g)
        v = torch.randn(B, S, NH, DV, device=dev, dtype=dt, generator=g)
        gg = torch.nn.functional.logsigmoid(torch.randn(B, S, NH, device=dev, dtype=torch.float32, generator=g))
        call = lambda: fn(q, k, v, g=gg)[0]  # noqa: E731
        args = (q, k, v)
    else:
        q = torch.randn(B, NH, S, DK, device=dev, dtype=dt, generator=g)
        k = torch.randn(B, NH, S, DK, device=dev, dtype=dt, generator=g)
        v = torch.randn(B, NH, S, DV, device=dev, dtype=dt, generator=g)
        i = torch.randn(B, NH, S, device=dev, dtype=torch.float32, generator=g)
        f = torch.randn(B, NH, S, device=dev, dtype=torch.float32, generator=g)
        kw = dict(chunk_size=L) if kind == "exp" else dict(chunk_size=L, normalize=False)
        call = lambda: fn(q, k, v, i, f, **kw)  # noqa: E731
        args = (q, k, v, i, f)
    if mode == "fwbw":
        for a in args:
            a.requires_grad_(True)

        def run():
            out = call()
            out.backward(torch.ones_like(out))
    else:
        def run():
            with torch.no_grad():
                call()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return timer(run), peak


# ------------------------------------------------------------------------------------------
# Without a GPU
# ------------------------------------------------------------------------------------------


def cpu_demo(variants, modes, chunks, out, tag="cpu-demo"):
    """No GPU: the NumPy reference on a small shape, for each requested variant, mode and chunk
    size (wall-clock ms of the float64 reference: a smoke run, not a benchmark)."""
    rng = np.random.default_rng(0)
    B, NH, S, DK, DV = (CPU_SHAPE[k] for k in ("B", "NH", "S", "DK", "DV"))
    q, k = rng.standard_normal((2, B, NH, S, DK))
    v = rng.standard_normal((B, NH, S, DV))
    i, f = rng.standard_normal((2, B, NH, S))
    print(f"# no CUDA GPU found: running the float64 NumPy reference on a small shape "
          f"(B={B}, NH={NH}, S={S}, DK={DK}, DV={DV}) instead of the CUDA kernels")
    rows = []
    for L in chunks:
        for mode in modes:
            for variant in variants:
                gate, normalize = VARIANTS[variant]
                t0 = time.perf_counter()
                h, state, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=gate, normalize=normalize, chunk_size=L)
                t1 = time.perf_counter()
                text = f"|h| max {np.abs(h).max():.3f}; last C norm {np.linalg.norm(state.C):.3f}"
                if mode != "fw":
                    g = tfla_cupy.mlstm_bwd(ctx, np.ones_like(h))
                    text += f"; |df| max {np.abs(g.df).max():.3f}"
                ms = (time.perf_counter() - (t1 if mode == "bw" else t0)) * 1e3
                label = {"fw": "fw", "fwbw": "fw+bw", "bw": "bw"}[mode]
                print(f"reference {label} {variant} L={L}: {ms:.1f} ms; {text}")
                nan = float("nan")
                rows.append(Row("numpy-reference", variant, mode, B, S, NH, DK, DV, L, ms, nan, nan, nan, nan, 0.0,
                                "", "float64 NumPy reference on the CPU (no CUDA GPU): wall-clock, no floor"))
    _common.write_results([asdict(r) for r in rows], out, tag, "CPU (no CUDA GPU)")
    return rows


# ------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="main (default) or second; needs a GPU")
    ap.add_argument("--sweep", action="store_true", help="S = 512 … 65536 at B·S = 65536; needs a GPU")
    ap.add_argument("--S", type=int, nargs="+", help="sequence lengths (default 8192, or the sweep); needs a GPU")
    ap.add_argument("--chunk", type=int, nargs="+", default=[128], help="chunk sizes: powers of two 16 … 1024")
    ap.add_argument("--variants", default="exp,sig", help="comma-separated subset of exp,sig")
    ap.add_argument("--modes", default="fw,fwbw",
                    help="comma-separated subset of fw,fwbw,bw (bw: the backward alone; peers run fw and fwbw)")
    ap.add_argument("--peers", default=None,
                    help=f"comma-separated subset of {','.join(PEERS)}, or '' (default: all importable; needs a GPU)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the check against the float64 reference")
    ap.add_argument("--family", choices=FAMILIES, default=None,
                    help="kernel family of every tfla_cupy call (KernelConfig.family); needs a GPU")
    ap.add_argument("--segments", type=int, default=None,
                    help="segments per sequence of the fused Hopper forward (KernelConfig.segments: 1 = none, "
                         "0 = the heuristic); needs a GPU")
    ap.add_argument("--fwd-ws", choices=("0", "1", "both"), default=None,
                    help="the warp-specialised Hopper forward (TFLA_CUPY_FWD_WS) for every tfla_cupy call: 0, 1, "
                         "or both, side by side (rows 'tfla_cupy' and 'tfla_cupy ws'); default: the environment "
                         "decides; needs a GPU")
    ap.add_argument("--varlen", action="store_true",
                    help="only the layout cases: 64 packed random-length sequences (cu_seqlens) and bshd vs "
                         "the equal-length B = 8 bhsd call, first chunk size; needs a GPU")
    ap.add_argument("--profile-once", action="store_true",
                    help="no timing: one warmed-up fw + bw per variant at the first S and chunk size between "
                         "cudaProfilerStart / Stop, for a profiler; needs a GPU")
    ap.add_argument("--probe-cluster", action="store_true",
                    help="no mLSTM: the cost of exchanging 16–64 KB between the two CTAs of a thread-block cluster "
                         "(remote stores, a bulk copy) with every SM busy; needs a GPU of compute capability 9.0")
    ap.add_argument("--out", default=str(_common.RESULTS), help="folder of the result files (default bench/results)")
    ap.add_argument("--tag", default=None,
                    help="file name prefix of the results (default: bench, bench-varlen; cpu-demo without a GPU)")
    args = ap.parse_args(argv)
    args.variants = _subset(ap, "--variants", args.variants, tuple(VARIANTS))
    args.modes = _subset(ap, "--modes", args.modes, MODES)
    args.peers_given = args.peers is not None
    args.wanted = set() if args.no_peers else set(_subset(ap, "--peers", args.peers, PEERS, empty_ok=True)
                                                   if args.peers_given else PEERS)
    bad = [L for L in args.chunk if L < 16 or L > 1024 or L & (L - 1)]
    if bad:
        ap.error(f"argument --chunk: expected powers of two 16 … 1024, got {bad}")
    if args.S and min(args.S) < 1:
        ap.error(f"argument --S: expected sequence lengths >= 1, got {args.S}")
    if args.sweep and args.S:
        ap.error("argument --sweep: not allowed with --S (the sweep is its own list of S)")
    if args.segments is not None and not 0 <= args.segments <= MAX_SEGMENTS:
        ap.error(f"argument --segments: expected an integer in [0, {MAX_SEGMENTS}], "
                 f"got {args.segments}")
    if args.profile_once and (args.varlen or args.sweep):
        ap.error("argument --profile-once: not allowed with --varlen or --sweep (it runs one shape)")
    if args.fwd_ws == "both" and (args.varlen or args.profile_once):
        ap.error("argument --fwd-ws: 'both' is not allowed with --varlen or --profile-once (give 0 or 1)")
    return ap, args


def main(argv=None):
    """The benchmark; TFLA_CUPY_FWD_WS is as before when it returns (--fwd-ws sets it per row)."""
    before = os.environ.get(FWD_WS_ENV)
    try:
        return _main(argv)
    finally:
        if before is None:
            os.environ.pop(FWD_WS_ENV, None)
        else:
            os.environ[FWD_WS_ENV] = before


def _main(argv=None):
    ap, args = parse_args(argv)
    cp = _common.gpu()
    if cp is None:
        given = (("--shape", args.shape is not None), ("--sweep", args.sweep), ("--S", bool(args.S)),
                 ("--peers", args.peers_given and bool(args.wanted)), ("--family", args.family is not None),
                 ("--segments", args.segments is not None), ("--varlen", args.varlen),
                 ("--profile-once", args.profile_once), ("--probe-cluster", args.probe_cluster),
                 ("--fwd-ws", args.fwd_ws is not None))
        gpu_only = [flag for flag, on in given if on]
        if gpu_only:
            ap.error(f"{', '.join(gpu_only)}: needs a CUDA GPU; without one the benchmark only runs the NumPy "
                     f"reference on a small shape ({', '.join(f'{k}={v}' for k, v in CPU_SHAPE.items())}), "
                     f"honouring --variants, --modes, --chunk, --out and --tag")
        cpu_demo(args.variants, args.modes, args.chunk, args.out, tag=args.tag or "cpu-demo")
        return 0

    card = _common.card(cp)
    print(_common.card_line(cp))
    if args.probe_cluster:
        if cp.cuda.Device().compute_capability != "90":
            ap.error("argument --probe-cluster: needs a GPU of compute capability 9.0")
        return 0 if probe_cluster(cp) else 1
    if args.family == "sm90" and cp.cuda.Device().compute_capability != "90":
        ap.error("argument --family: sm90 needs a GPU of compute capability 9.0")
    shape = SHAPES[args.shape or "main"]
    NH, DK, DV = shape["NH"], shape["DK"], shape["DV"]
    S_list = args.S or ([512 * 2**j for j in range(8)] if args.sweep else [8192])

    def config(L):
        return kernel_config(args.family, args.segments, DK, DV, L)

    if args.family or args.segments is not None:
        print(f"# tfla_cupy calls with KernelConfig(family={args.family or 'auto'!r}, segments={args.segments or 0})")
    # the warp-specialised forward: one setting for every call, or both side by side
    ws_runs = {None: [None], "0": ["0"], "1": ["1"], "both": ["0", "1"]}[args.fwd_ws]
    if args.fwd_ws is not None:
        _set_env(FWD_WS_ENV, ws_runs[0])
        print(f"# {FWD_WS_ENV}={' and '.join(ws_runs)} for the tfla_cupy calls")
    if args.profile_once:
        S, L = S_list[0], args.chunk[0]
        profile_once(cp, args.variants, max(TOKENS // S, 1), NH, S, DK, DV, L, config(L))
        return 0

    global COPY_BW
    COPY_BW = _common.copy_rate(cp)
    print(f"# device-to-device copy (read + write) measured now: {COPY_BW / 1e12:.2f} TB/s; floors use it")
    timer = _common.Timer(cp)
    rows, failures = [], 0
    if args.varlen:
        L = args.chunk[0]
        for mode in args.modes:
            for variant in args.variants:
                res = bench_layouts(cp, timer, variant, mode, NH, DK, DV, L, config=config(L))
                base = res[0][3]
                for label, B, S, ms, peak in res:
                    rows.append(_row("tfla_cupy", variant, mode, B, S, shape, L, ms, peak, "",
                                     f"{label}, {ms / base:.3f}x bhsd B=8"))
                    _print(rows[-1])
                cp.get_default_memory_pool().free_all_blocks()
        _save(rows, args.out, args.tag or "bench-varlen", card)
        return 0

    card_cc = cp.cuda.Device().compute_capability
    torch, peers = torch_peers(args.wanted) if args.wanted else (None, {})
    if os.environ.get("DISABLE_LLVM_OPT"):
        print(f"# DISABLE_LLVM_OPT={os.environ['DISABLE_LLVM_OPT']} (Triton: the TFLA exp peer needs it under Triton 3.6)")
    for S in S_list:
        B = max(TOKENS // S, 1)
        for L in args.chunk:
            for mode in args.modes:
                # the warp-specialised forward runs where TFLA_CUPY_FWD_WS is 1 and it covers the call
                covered = (card_cc == "90" and args.family != "sm80"
                           and fused_ws_unsupported("MmaBF16", DK, DV, L) is None)
                for variant, ws in ((v, w) for v in args.variants for w in ws_runs):
                    _set_env(FWD_WS_ENV, ws)
                    ws_active = os.environ.get(FWD_WS_ENV) == "1" and covered
                    if ws == "1" and not covered and args.fwd_ws == "both":
                        print(f"# tfla_cupy ws {variant} {mode} S={S} L={L}: the warp-specialised forward does not "
                              f"cover this call (the row above is what runs)")
                        continue
                    impl = "tfla_cupy ws" if ws_active else "tfla_cupy"
                    try:
                        ms, peak, checked, ok = bench_tfla(cp, timer, variant, mode, B, NH, S, DK, DV, L,
                                                           check=not args.no_check, config=config(L))
                    except ValueError as e:   # e.g. a forced family that does not cover the shape
                        print(f"# {impl} {variant} {mode} S={S} L={L}: {e}")
                        failures += 1
                        continue
                    failures += not ok
                    rows.append(_row(impl, variant, mode, B, S, shape, L, ms, peak, checked))
                    _print(rows[-1])
                for name, (kind, fn) in peers.items():
                    if mode == "bw" or (kind in ("sdpa", "gla") and L != args.chunk[0]):
                        continue
                    try:
                        ms, peak = bench_peer(torch, timer, kind, fn, mode, B, NH, S, DK, DV, L)
                        rows.append(_row(name, kind, mode, B, S, shape, L, ms, peak, "",
                                         "attention baseline: NH 32, d 128" if kind == "sdpa" else ""))
                        _print(rows[-1])
                    except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                        print(f"# {name} {mode} S={S} L={L}: failed: {type(e).__name__}: {str(e)[:200]}")
                    if torch is not None:
                        torch.cuda.empty_cache()
                cp.get_default_memory_pool().free_all_blocks()
    _save(rows, args.out, args.tag or "bench", card)
    return 1 if failures else 0


def _set_env(name, value):
    """Set the environment variable ``name`` to ``value``, or leave it as it is for None."""
    if value is not None:
        os.environ[name] = value


def _subset(ap, flag, text, allowed, empty_ok=False):
    """The comma-separated list ``text`` as a list, or an argparse error naming ``flag``."""
    items = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in items if w not in allowed]
    if bad or (not items and not empty_ok):
        ap.error(f"argument {flag}: expected a comma-separated {'' if empty_ok else 'non-empty '}subset of "
                 f"{','.join(allowed)}, got {text!r}")
    return items


def _row(impl, variant, mode, B, S, shape, L, ms, peak, checked, notes=""):
    NH, DK, DV = shape["NH"], shape["DK"], shape["DV"]
    fl = flops(mode, B, NH, S, DK, DV, L)
    by = floor_bytes(mode, B, NH, S, DK, DV)
    fms = floor_ms(mode, B, NH, S, DK, DV, L)
    return Row(impl, variant, mode, B, S, NH, DK, DV, L, ms, fl / ms / 1e9, by / ms / 1e6, fms, ms / fms,
               peak / 1e9, checked, notes)


def _print(r):
    print(f"{r.impl:34s} {r.variant:4s} {r.mode:5s} B={r.B:<4d} S={r.S:<6d} L={r.L:<4d} {r.ms:8.3f} ms "
          f"{r.tflops:6.1f} TFLOP/s {r.gbps:7.0f} GB/s  x{r.x_floor:5.2f} floor  peak {r.peak_gb:5.2f} GB  "
          f"{r.checked}{'  ' + r.notes if r.notes else ''}", flush=True)


def _save(rows, out, tag, card):
    """The Markdown table on stdout, the result files, and a PNG of time against S when
    matplotlib is present."""
    if not rows:
        return
    print("\n" + _common.markdown_table(
        ("impl", "variant", "mode", "B", "S", "L", "ms", "TFLOP/s", "GB/s", "÷ floor", "peak GB", "check", "notes"),
        [(r.impl, r.variant, r.mode, r.B, r.S, r.L, f"{r.ms:.3f}", f"{r.tflops:.1f}", f"{r.gbps:.0f}",
          f"{r.x_floor:.2f}", f"{r.peak_gb:.2f}", r.checked, r.notes) for r in rows]))
    _common.write_results([asdict(r) for r in rows], out, tag, card, copy_rate=COPY_BW, mma_rate=MMA_RATE)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(MODES), figsize=(15, 4))
    # one colour per implementation and one line style per variant, the same in every panel
    keys = sorted({(r.impl, r.variant) for r in rows})
    colour = {impl: plt.cm.tab10(j % 10) for j, impl in enumerate(sorted({k[0] for k in keys}))}
    style = {"exp": "-", "sig": "--"}
    for ax, mode in zip(axes, MODES):
        for key in keys:
            pts = sorted((r.S, r.ms) for r in rows if (r.impl, r.variant) == key and r.mode == mode)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour[key[0]],
                        linestyle=style.get(key[1], ":"), label=f"{key[0]} {key[1]}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("S (B·S = 65536)")
        ax.set_ylabel("ms")
        ax.set_title(f"{mode} — {card}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    png = Path(out) / f"{tag}.png"
    fig.savefig(png, dpi=110)
    print(f"# wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
