"""What the three benchmarks of bench/ share: the GPU probe, the card line, the timing method
(docs/performance.md §1), the copy-rate probe behind every floor (§3), optional peers, Markdown
tables and result files.

The scripts import it as a sibling (``import _common``): Python puts a script's own folder first
on sys.path, so ``python bench/bench.py`` finds it from any working directory.
"""

from __future__ import annotations

import csv
import importlib
import json
import platform
import time
from pathlib import Path

import numpy as np

#: Where the scripts write their results unless --out says otherwise (ignored by git).
RESULTS = Path(__file__).resolve().parent / "results"

#: Bytes zeroed before every timed call so that L2 holds nothing useful (larger than any L2).
FLUSH_BYTES = 256 * 2**20


def gpu():
    """The cupy module when CuPy imports and sees a CUDA GPU, else None."""
    try:
        import cupy as cp
        return cp if cp.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no CuPy, no driver or no device: the same answer
        return None


def card(cp) -> str:
    """The current device's name."""
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def card_line(cp) -> str:
    """``# card: <name>, CC <cc>, <n> SMs; CuPy <version>; date <yyyy-mm-dd>``."""
    dev = cp.cuda.Device()
    sms = dev.attributes["MultiProcessorCount"]
    return (f"# card: {card(cp)}, CC {dev.compute_capability}, {sms} SMs; CuPy {cp.__version__}; "
            f"date {time.strftime('%Y-%m-%d')}")


class Timer:
    """Median CUDA-event time of ``fn()`` in ms: ``warmup`` untimed calls, then ``repeat`` timed
    ones, each after zeroing a 256 MB buffer (L2 flushed). ``barrier`` (e.g. a collective across
    ranks) runs before every timed call too, untimed, followed by a stream synchronisation."""

    def __init__(self, cp, warmup=10, repeat=30, barrier=None):
        self.cp, self.warmup, self.repeat, self.barrier = cp, warmup, repeat, barrier
        self.flush = cp.empty(FLUSH_BYTES, dtype=cp.uint8)

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
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop))
        return float(np.median(times))


def copy_rate(cp, nbytes=2**30) -> float:
    """Bytes read + written per second by a device-to-device copy (cudaMemcpyAsync) of ``nbytes``
    on the current card: the median of 10 timed copies after 2 warm-ups, L2 flushed before each
    (the floors of docs/performance.md §3 use it)."""
    src = cp.ones(nbytes, dtype=cp.uint8)
    dst = cp.empty_like(src)
    ms = Timer(cp, warmup=2, repeat=10)(lambda: dst.data.copy_from_device_async(src.data, nbytes))
    del src, dst
    cp.get_default_memory_pool().free_all_blocks()
    return 2 * nbytes / (ms * 1e-3)


def import_peer(module: str, function: str):
    """``module.function`` when it imports, else None after printing why (peers are optional:
    PyTorch, Triton and their kernels are never dependencies of tfla_cupy)."""
    try:
        return getattr(importlib.import_module(module), function)
    except Exception as e:  # noqa: BLE001 - a peer that fails to import for any reason is skipped
        print(f"# peer {module}.{function} unavailable: {type(e).__name__}: {str(e)[:200]}")
        return None


def markdown_table(header, rows) -> str:
    """A Markdown table: ``header`` a sequence of column names, ``rows`` sequences of cells
    (floats are printed as given: format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(rows, out, tag, card_name, **meta):
    """``<out>/<tag>.csv`` (one line per row dict) and ``<out>/<tag>.json`` (card, date, host,
    ``meta`` and the rows); prints where they went. Returns the two paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    csv_path, json_path = out / f"{tag}.csv", out / f"{tag}.json"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    doc = dict(card=card_name, date=time.strftime("%Y-%m-%d"), host=platform.node(), **meta, rows=rows)
    json_path.write_text(json.dumps(doc, indent=1))
    print(f"# wrote {csv_path} and {json_path.name}")
    return csv_path, json_path
