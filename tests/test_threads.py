"""Thread safety of the loader's caches, without a GPU: the memo publishes one complete entry
per key, and a kernel's dynamic shared-memory limit is never below what a launch asks for, even
when threads with different shapes race on one instantiation (docs/architecture.md: threads)."""

from __future__ import annotations

import threading
import time

from tfla_cupy import _loader


def _together(n, target):
    barrier = threading.Barrier(n)
    errors = []

    def run(j):
        barrier.wait()
        try:
            target(j)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    pool = [threading.Thread(target=run, args=(j,)) for j in range(n)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert errors == []


def test_once_builds_each_key_once_and_shares_it():
    built = []

    def build(key):
        built.append(key)
        time.sleep(0.02)  # a slow build: other threads arrive while it runs
        return object()

    memo = _loader._Once(build)
    got = [None] * 16
    _together(16, lambda j: got.__setitem__(j, memo(j % 2)))
    assert sorted(built) == [0, 1]
    assert all(g is got[j % 2] for j, g in enumerate(got))


class _FakeFunction:
    """Stands for a CuPy Function: setting the attribute is slow (a window for a race), and a
    launch records whether it asked for more shared memory than the attribute allows."""

    def __init__(self):
        self._limit = 0
        self.violations = []
        self.launches = 0

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._limit

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        time.sleep(0.005)
        self._limit = value

    def __call__(self, grid, block, args, shared_mem=0):
        self.launches += 1
        if shared_mem > self._limit:
            self.violations.append((shared_mem, self._limit))


def test_kernel_shared_memory_limit_never_below_a_launch():
    for _ in range(5):
        fn = _FakeFunction()
        kernel = _loader.Kernel(fn)
        sizes = [48_000 + 8_000 * (j % 8) for j in range(16)]
        _together(16, lambda j: kernel(1, 128, (), sizes[j]))
        assert fn.launches == 16
        assert fn.violations == []
        assert fn.max_dynamic_shared_size_bytes == max(sizes) == kernel.smem_limit
