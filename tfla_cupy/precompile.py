"""Compile every kernel instantiation into CuPy's on-disk cache, in parallel.

    python -m tfla_cupy.precompile [--jobs N] [--dtype bf16,f16,f32,tf32]

Useful once per machine (first calls then skip NVRTC) and on test machines. Needs a GPU: the
cache is keyed by the device architecture. The cache directory is CuPy's (CUPY_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

from . import config

_SHORT = {"bf16": "MmaBF16", "f16": "MmaF16", "f32": "MmaF32", "tf32": "MmaTF32"}


def _compile(name):
    from . import _loader
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--dtype", default="bf16,f16,f32,tf32", help="comma-separated subset of bf16,f16,f32,tf32")
    args = ap.parse_args(argv)
    groups = config.all_instantiations()
    names = [n for d in args.dtype.split(",") for n in groups[_SHORT[d.strip()]]]
    seconds = precompile(names, args.jobs)
    print(f"tfla_cupy: compiled {len(set(names))} kernels in {seconds:.1f} s")


if __name__ == "__main__":
    main()
