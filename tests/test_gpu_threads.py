"""Thread safety on the GPU: 16 threads on their own streams make first calls (forward,
backward, decode step) in fresh processes, on shapes none of which is compiled or planned yet
(an empty kernel cache for the first process; the later ones start with the compiled kernels on
disk but nothing loaded or planned in memory), and on one shape shared by all threads. Every
result must equal, bit for bit, the same call made serially (tests/_thread_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpu_utils import gpu

pytestmark = gpu

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_thread_worker.py")
THREADS = 16


def _run(mode, cache_dir):
    env = dict(os.environ, CUPY_CACHE_DIR=str(cache_dir))
    proc = subprocess.run([sys.executable, WORKER, mode, str(THREADS)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["errors"] == [], "\n".join(report["errors"])
    assert report["mismatches"] == [], report["mismatches"]
    assert report["calls"] == THREADS * 3
    return report


def test_first_calls_from_many_threads_distinct_shapes(tmp_path):
    for _ in range(3):  # fresh processes; the first compiles everything
        _run("distinct", tmp_path)


def test_first_calls_from_many_threads_one_shape(tmp_path):
    for _ in range(2):
        _run("shared", tmp_path)
