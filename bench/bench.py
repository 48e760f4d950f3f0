"""The tfla_cupy benchmark (docs/performance.md): constant tokens B·S = 65,536.

    python bench/bench.py                 # main shape, S = 8192, fw + fwbw, exp + sig, peers if present
    python bench/bench.py --sweep         # S = 512 … 65536 (B = 65536 / S)
    python bench/bench.py --shape second  # NH = 8, DK = 256, DV = 512
    python bench/bench.py --varlen        # 64 packed random-length sequences and (B, S, NH, D) vs B = 8

Timing: CUDA events, a 256 MB buffer zeroed before every call (L2 flush), 10 warm-ups, median of
30 calls. Each tfla_cupy row is first checked against the float64 reference on two heads of the
same inputs (the reference on all 128 heads would take minutes on a CPU). Peers (mlstm_kernels
TFLA, flash-linear-attention chunk_simple_gla, PyTorch SDPA as the attention baseline) run when
importable. Results go to bench/results/*.csv and .json (and a PNG if matplotlib is present).

On a machine without a GPU this runs the NumPy reference on a small shape and says so; it
honours --variants, --modes, --chunk, --out and --tag there (results as cpu-demo.csv / .json)
and rejects the flags that need a GPU (--shape, --sweep, --S, --peers) with an argparse error.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tfla_cupy  # noqa: E402
from tfla_cupy.reference import chunkwise  # noqa: E402

SHAPES = {"main": dict(NH=16, DK=128, DV=256), "second": dict(NH=8, DK=256, DV=512)}
TOKENS = 65536
COPY_BW = 3.0e12        # bytes/s: device copy rate; main() replaces it by the rate measured on the card it runs on
MMA_RATE = 800e12       # FLOP/s: measured bf16 matrix rate
CHECK_TOL = {"fw": 3e-2, "fwbw": 3e-2, "df": 1e-1}


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
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Models: FLOPs (docs/math.md §11.2) and the IO floor (docs/performance.md §3)
# ------------------------------------------------------------------------------------------


def causal_fraction(L, tile=64):
    nb = max(L // tile, 1)
    return (nb + 1) / (2 * nb)


def flops(mode, B, NH, S, DK, DV, L):
    rho = causal_fraction(L)
    per_head = 4 * S * DK * DV + 2 * rho * S * L * (DK + DV)
    if mode == "fwbw":
        per_head = 14 * S * DK * DV + 8 * rho * S * L * (DK + DV)
    return B * NH * per_head


def floor_bytes(mode, B, NH, S, DK, DV, e=2):
    if mode == "fw":   # read q, k, v, i, f; write h and N, M (fp32)
        per_tok = e * (2 * DK + 2 * DV + 2) + 8
    else:              # fw + bw: read q,k,v,dh,i,f; write h, dq,dk,dv,di,df; N, M once each way
        per_tok = e * (6 * DK + 5 * DV + 6) + 16
    return B * NH * S * per_tok


def floor_ms(mode, B, NH, S, DK, DV, L):
    return 1e3 * max(floor_bytes(mode, B, NH, S, DK, DV) / COPY_BW, flops(mode, B, NH, S, DK, DV, L) / MMA_RATE)


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------


class Timer:
    """Median CUDA-event time of fn() in ms, L2 flushed before every timed call; ``barrier`` (e.g.
    a collective across ranks) runs before every timed call too, untimed, followed by a stream sync."""

    def __init__(self, cp, warmup=10, repeat=30, barrier=None):
        self.cp, self.warmup, self.repeat, self.barrier = cp, warmup, repeat, barrier
        self.flush = cp.empty(256 * 2**20, dtype=cp.uint8)

    def __call__(self, fn):
        cp = self.cp
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeat):
            self.flush.fill(0)
            if self.barrier is not None:
                self.barrier()
                cp.cuda.get_current_stream().synchronize()
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b))
        return float(np.median(times))


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


def check_against_reference(cp, x, outs, gate, normalize, L, mode, heads=2):
    """Max relative error of the first `heads` heads of batch 0 against the float64 reference."""
    q, k, v, i, f = (cp.asnumpy(t[:1, :heads]).astype(np.float64) for t in x)
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    z = np.zeros
    h_ref, *_ = chunkwise.fwd(q, k, v, i, f, z((B, NH, DK, DV)), z((B, NH, DK)), z((B, NH)), gate=gate,
                              normalize=normalize, L=L, eps=1e-6, scale=DK ** -0.5)

    def err(a, ref):
        a = cp.asnumpy(a[:1, :heads]).astype(np.float64)
        return float(np.abs(a - ref).max() / np.abs(ref).max()) if np.all(np.isfinite(a)) else math.inf

    errs = {"h": err(outs[0], h_ref)}
    if mode == "fwbw":
        dh = np.ones_like(h_ref)
        g = chunkwise.bwd(q, k, v, i, f, z((B, NH, DK, DV)), z((B, NH, DK)), z((B, NH)), dh, None, gate=gate,
                          normalize=normalize, L=L, eps=1e-6, scale=DK ** -0.5)
        for name, got, ref in zip(("dq", "dk", "dv", "di", "df"), outs[1][:5], g[:5]):
            errs[name] = err(got, ref)
    ok = all(e <= (CHECK_TOL["df"] if n == "df" else CHECK_TOL[mode]) for n, e in errs.items())
    worst = max(errs, key=errs.get)
    return ("ok" if ok else "FAIL") + f" max {worst} {errs[worst]:.1e}", ok


def bench_tfla(cp, timer, variant, mode, B, NH, S, DK, DV, L, check=True):
    import ml_dtypes
    gate, normalize = {"exp": ("exp", True), "sig": ("sig", False)}[variant]
    x = make_inputs(cp, B, NH, S, DK, DV, ml_dtypes.bfloat16)
    dh = cp.ones((B, NH, S, DV), dtype=ml_dtypes.bfloat16)
    opts = dict(gate=gate, normalize=normalize, chunk_size=L)

    def fw():
        return tfla_cupy.mlstm(*x, **opts)

    def fwbw():
        # inputs stay unchanged until the backward, as with the peers' autograd: no private copies
        h, _, ctx = tfla_cupy.mlstm_fwd(*x, copy_inputs=False, **opts)
        return h, tfla_cupy.mlstm_bwd(ctx, dh)

    fn = fw if mode == "fw" else fwbw
    out = fn()
    checked, ok = ("", True)
    if check:
        outs = (out, None) if mode == "fw" else out
        checked, ok = check_against_reference(cp, x, outs, gate, normalize, L, mode)
    del out
    ms = timer(fn)
    peak = cupy_peak_bytes(cp, fn)
    return ms, peak, checked, ok


def bench_layouts(cp, timer, variant, mode, NH, DK, DV, L, n_seqs=64, seed=0):
    """The addressing-layer cases at B·S = 65,536: the equal-length B = 8 call (bhsd), the same
    tokens as `n_seqs` packed random-length sequences (cu_seqlens, B = 1), and the B = 8 call in
    the (B, S, NH, D) layout. Returns [(label, B, S, ms, peak bytes)]."""
    import ml_dtypes
    gate, normalize = {"exp": ("exp", True), "sig": ("sig", False)}[variant]
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
        opts = dict(gate=gate, normalize=normalize, chunk_size=L, **extra)
        dh = cp.ones(h_shape, dtype=bf)

        def fw():
            return tfla_cupy.mlstm(*x, **opts)

        def fwbw():
            h, _, ctx = tfla_cupy.mlstm_fwd(*x, **opts)
            return h, tfla_cupy.mlstm_bwd(ctx, dh)

        fn = fw if mode == "fw" else fwbw
        ms = timer(fn)
        out.append((label, B_, S_, ms, cupy_peak_bytes(cp, fn)))
    return out


# ------------------------------------------------------------------------------------------
# Peers (PyTorch / Triton), only if importable
# ------------------------------------------------------------------------------------------


# key: (row label, kind, module, function); kind "sdpa" needs no import
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
    """The importable peers among `wanted` (keys of PEERS)."""
    try:
        import torch
    except ImportError:
        return None, {}
    import importlib
    peers = {}
    for key in PEERS:
        if key not in wanted:
            continue
        label, kind, module, function = _PEER_TABLE[key]
        try:
            fn = getattr(importlib.import_module(module), function) if module else None
        except Exception as e:  # noqa: BLE001
            print(f"# peer {label} unavailable: {type(e).__name__}: {e}")
            continue
        peers[label] = (kind, fn)
    return torch, peers


def bench_peer(torch, timer, name, kind, fn, mode, B, NH, S, DK, DV, L):
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    if kind == "sdpa":
        NHa, d = 32, 128
        q, k, v = (torch.randn(B, NHa, S, d, device=dev, dtype=dt, generator=g, requires_grad=mode == "fwbw")
                   for _ in range(3))
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


CPU_SHAPE = dict(B=1, NH=2, S=256, DK=32, DV=64)


def cpu_demo(variants, modes, chunks, out=None, tag="bench"):
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
                gate, normalize = {"exp": ("exp", True), "sig": ("sig", False)}[variant]
                opts = dict(gate=gate, normalize=normalize, chunk_size=L)
                t = time.perf_counter()
                h, state, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, **opts)
                text = f"|h| max {np.abs(h).max():.3f}; last C norm {np.linalg.norm(state.C):.3f}"
                if mode == "fwbw":
                    g = tfla_cupy.mlstm_bwd(ctx, np.ones_like(h))
                    text += f"; |df| max {np.abs(g.df).max():.3f}"
                ms = (time.perf_counter() - t) * 1e3
                label = "fw+bw" if mode == "fwbw" else "fw"
                print(f"reference {label} {variant} L={L}: {ms:.1f} ms; {text}")
                nan = float("nan")
                rows.append(Row("numpy-reference", variant, mode, B, S, NH, DK, DV, L, ms, nan, nan, nan, nan, 0.0,
                                "", "float64 NumPy reference on the CPU (no CUDA GPU): wall-clock, no floor"))
    if out is not None:
        _save(rows, Path(out), "CPU (no CUDA GPU)", tag=tag)
    return rows


def measure_copy_rate(cp, nbytes=1 << 30, repeat=10):
    """Bytes read + written per second of a device-to-device copy on the current card (median)."""
    src = cp.zeros(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    times = []
    for _ in range(repeat + 2):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        cp.copyto(dst, src)
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    del src, dst
    cp.get_default_memory_pool().free_all_blocks()
    return 2 * nbytes / float(np.median(times[2:]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="main (default) or second; needs a GPU")
    ap.add_argument("--sweep", action="store_true", help="S = 512 … 65536 at B·S = 65536; needs a GPU")
    ap.add_argument("--S", type=int, nargs="+", help="sequence lengths (default 8192, or the sweep); needs a GPU")
    ap.add_argument("--chunk", type=int, nargs="+", default=[128], help="chunk sizes: powers of two 16 … 1024")
    ap.add_argument("--variants", default="exp,sig", help="comma-separated subset of exp,sig")
    ap.add_argument("--modes", default="fw,fwbw", help="comma-separated subset of fw,fwbw")
    ap.add_argument("--peers", default=None,
                    help=f"comma-separated subset of {','.join(PEERS)}, or '' (default: all importable; needs a GPU)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the check against the float64 reference")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default=None, help="file name prefix of the results (default: bench; cpu-demo without a GPU)")
    ap.add_argument("--varlen", action="store_true",
                    help="only the layout cases: 64 packed random-length sequences (cu_seqlens) and bshd vs "
                         "the equal-length B = 8 bhsd call, main chunk size")
    args = ap.parse_args(argv)
    variants = _subset(ap, "--variants", args.variants, ("exp", "sig"))
    modes = _subset(ap, "--modes", args.modes, ("fw", "fwbw"))
    peers_given = args.peers is not None
    wanted = set() if args.no_peers else set(_subset(ap, "--peers", args.peers, PEERS, empty_ok=True)
                                              if peers_given else PEERS)
    bad = [L for L in args.chunk if L < 16 or L > 1024 or L & (L - 1)]
    if bad:
        ap.error(f"argument --chunk: expected powers of two 16 … 1024, got {bad}")
    if args.S and min(args.S) < 1:
        ap.error(f"argument --S: expected sequence lengths >= 1, got {args.S}")
    if args.sweep and args.S:
        ap.error("argument --sweep: not allowed with --S (the sweep is its own list of S)")

    try:
        import cupy as cp
        has_gpu = cp.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    if not has_gpu:
        gpu_only = [flag for flag, given in (("--shape", args.shape is not None), ("--sweep", args.sweep),
                                             ("--S", bool(args.S)), ("--peers", peers_given and bool(wanted)))
                    if given]
        if gpu_only:
            ap.error(f"{', '.join(gpu_only)}: needs a CUDA GPU; without one the benchmark only runs the NumPy "
                     f"reference on a small shape ({', '.join(f'{k}={v}' for k, v in CPU_SHAPE.items())}), "
                     f"honouring --variants, --modes, --chunk, --out and --tag")
        cpu_demo(variants, modes, args.chunk, out=args.out, tag=args.tag or "cpu-demo")
        return 0

    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    card = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    print(f"# card: {card}, CC {dev.compute_capability}, {props['multiProcessorCount']} SMs; "
          f"CuPy {cp.__version__}; date {time.strftime('%Y-%m-%d')}")
    global COPY_BW
    COPY_BW = measure_copy_rate(cp)
    print(f"# device-to-device copy (read + write) measured now: {COPY_BW / 1e12:.2f} TB/s; floors use it")
    shape = SHAPES[args.shape or "main"]
    S_list = args.S or ([512 * 2**j for j in range(8)] if args.sweep else [8192])
    timer = Timer(cp)
    torch, peers = torch_peers(wanted) if wanted else (None, {})
    if os.environ.get("DISABLE_LLVM_OPT"):
        print(f"# DISABLE_LLVM_OPT={os.environ['DISABLE_LLVM_OPT']} (Triton: the TFLA exp peer needs it under Triton 3.6)")
    rows, failures = [], 0
    if args.varlen:
        for mode in args.modes.split(","):
            for variant in args.variants.split(","):
                res = bench_layouts(cp, timer, variant, mode, shape["NH"], shape["DK"], shape["DV"], args.chunk[0])
                base = res[0][3]
                for label, B, S, ms, peak in res:
                    rows.append(_row("tfla_cupy", variant, mode, B, S, shape, args.chunk[0], ms, peak, "",
                                     f"{label}, {ms / base:.3f}x bhsd B=8"))
                    _print(rows[-1])
                    print(f"#   {label}: {ms / base:.3f}x the bhsd B=8 call", flush=True)
                cp.get_default_memory_pool().free_all_blocks()
        _save(rows, Path(args.out), card, tag=args.tag + "-varlen")
        print("\n" + _table(rows))
        return 0
    for S in S_list:
        B = max(TOKENS // S, 1)
        for L in args.chunk:
            for mode in modes:
                for variant in variants:
                    ms, peak, checked, ok = bench_tfla(cp, timer, variant, mode, B, shape["NH"], S, shape["DK"],
                                                       shape["DV"], L, check=not args.no_check)
                    failures += not ok
                    rows.append(_row("tfla_cupy", variant, mode, B, S, shape, L, ms, peak, checked))
                    _print(rows[-1])
                for name, (kind, fn) in peers.items():
                    if kind in ("sdpa", "gla") and L != args.chunk[0]:
                        continue
                    try:
                        ms, peak = bench_peer(torch, timer, name, kind, fn, mode, B, shape["NH"], S, shape["DK"],
                                              shape["DV"], L)
                        rows.append(_row(name, kind, mode, B, S, shape, L, ms, peak, "",
                                         "attention baseline: NH 32, d 128" if kind == "sdpa" else ""))
                        _print(rows[-1])
                    except Exception as e:  # noqa: BLE001
                        print(f"# {name} {mode} S={S} L={L}: failed: {type(e).__name__}: {str(e)[:200]}")
                    if torch is not None:
                        torch.cuda.empty_cache()
                cp.get_default_memory_pool().free_all_blocks()
    _save(rows, Path(args.out), card, tag=args.tag or "bench")
    print("\n" + _table(rows))
    return 1 if failures else 0


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
          f"{r.tflops:6.1f} TFLOP/s {r.gbps:7.0f} GB/s  x{r.x_floor:5.2f} floor  peak {r.peak_gb:5.2f} GB  {r.checked}",
          flush=True)


def _table(rows):
    head = "| impl | variant | mode | S | L | ms | TFLOP/s | GB/s | ÷ floor | peak GB | check |\n|---|---|---|---|---|---|---|---|---|---|---|"
    body = [f"| {r.impl} | {r.variant} | {r.mode} | {r.S} | {r.L} | {r.ms:.3f} | {r.tflops:.1f} | {r.gbps:.0f} | "
            f"{r.x_floor:.2f} | {r.peak_gb:.2f} | {r.checked} |" for r in rows]
    return "\n".join([head] + body)


def _save(rows, out, card, tag="bench"):
    if not rows:
        return
    out.mkdir(parents=True, exist_ok=True)
    stamp = tag
    with open(out / f"{stamp}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[k for k in asdict(rows[0]) if k != "extra"])
        w.writeheader()
        for r in rows:
            d = asdict(r)
            d.pop("extra")
            w.writerow(d)
    meta = dict(card=card, date=time.strftime("%Y-%m-%d"), host=platform.node(), rows=[asdict(r) for r in rows])
    (out / f"{stamp}.json").write_text(json.dumps(meta, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # one colour per implementation and one line style per variant, the same in both panels
    keys = sorted({(r.impl, r.variant) for r in rows})
    impls = sorted({k[0] for k in keys})
    colour = {impl: plt.cm.tab10(j % 10) for j, impl in enumerate(impls)}
    style = {"exp": "-", "sig": "--"}
    for ax, mode in zip(axes, ("fw", "fwbw")):
        for key in keys:
            pts = sorted((r.S, r.ms) for r in rows if (r.impl, r.variant) == key and r.mode == mode)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour[key[0]],
                    linestyle=style.get(key[1], ":"), label=f"{key[0]} {key[1]}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("S (B·S = 65536)")
        ax.set_ylabel("ms")
        ax.set_title(f"{mode} — {card}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stamp}.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
