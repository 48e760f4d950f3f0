"""Compile every kernel instantiation into CuPy's on-disk cache, in parallel.

    python -m tfla_cupy.precompile [--jobs N] [--dtype bf16,f16,f32,tf32] [--family all|sm80|sm90]

Useful once per machine (first calls then skip NVRTC) and on test machines. Needs a GPU: the
cache is keyed by the device architecture; without one it says so in one line and exits with
status 1 (to check that the kernels compile without a GPU, run ``pytest -m nvrtc_matrix tests``).
The cache directory is CuPy's (CUPY_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from . import _arrays, _loader, config

_SHORT = {"bf16": "MmaBF16", "f16": "MmaF16", "f32": "MmaF32", "tf32": "MmaTF32"}


def _compile(name):
    _loader.get_kernel(name)
    return name


def precompile(names=None, jobs=None):
    """Compile ``names`` (default: every instantiation) with ``jobs`` processes; returns seconds."""
    if names is None:
        names = [n for group in config.all_instantiations().values() for n in group]
    names = sorted(set(names))
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # children must not inherit a CUDA context
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count(), mp_context=ctx) as pool:
        for _ in pool.map(_compile, names):
            pass
    return time.perf_counter() - start


def selected(dtypes, family="all"):
    """The instantiations of the compute policies ``dtypes`` (short names), of one ``family``
    ("sm90": the Hopper kernels; "sm80": all others) with the shared stages, or all of them."""
    groups = config.all_instantiations()
    names = [n for d in dtypes for n in groups[_SHORT[d]]]
    if family == "all":
        return names
    hopper = [n for n in names if "sm90" in n] if family == "sm90" else [n for n in names if "sm90" not in n]
    return sorted(set(hopper) | set(config.stage_kernels()))


def _dtypes(text):
    """argparse type of --dtype: a comma-separated, non-empty subset of _SHORT."""
    parts = [d.strip() for d in text.split(",")]
    bad = [d for d in parts if d not in _SHORT]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(_SHORT)}, got {text!r}")
    return parts


def _positive(text):
    """argparse type of --jobs: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def gpu_problem():
    """Why this machine cannot fill the kernel cache (None when it can)."""
    cp = _arrays.cupy_module()
    if cp is None:
        return "CuPy is not installed (pip install \".[cuda12]\")"
    try:
        if not cp.cuda.is_available():
            return "no CUDA GPU found"
    except Exception as e:   # a broken driver or runtime: report it in one line
        return f"CUDA is not usable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tfla_cupy.precompile", description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=_positive, default=None, help="compiler processes (default: one per CPU)")
    ap.add_argument("--dtype", type=_dtypes, default="bf16,f16,f32,tf32",
                    help="comma-separated subset of bf16,f16,f32,tf32 (default: all)")
    ap.add_argument("--family", choices=("all", "sm80", "sm90"), default="all",
                    help="only one family's kernels, with the stages both share: sm90 (the Hopper kernels) or "
                         "sm80 (default: all)")
    args = ap.parse_args(argv)
    problem = gpu_problem()
    if problem is not None:
        print(f"tfla_cupy.precompile: {problem}; the kernel cache is per GPU architecture, nothing was compiled "
              f"(to compile without a GPU: pytest -m nvrtc_matrix tests)", file=sys.stderr)
        return 1
    names = selected(args.dtype, args.family)
    seconds = precompile(names, args.jobs)
    print(f"tfla_cupy: compiled {len(set(names))} kernels in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
