"""The one loader: the only code that compiles CUDA sources.

* The translation unit ``cuda_src/tfla.cu`` and every header it includes are expanded into
  one source string, so CuPy's on-disk cache (which hashes the source string and options, not
  files reached through ``-I``) sees every byte of every file: a changed header can never reuse
  a stale binary.
* Kernels are template instantiations named by :func:`kernel_name`; each is compiled through
  ``cupy.RawModule(name_expressions=...)`` on first use and memoised per device.
* On compute capability 9.0 the code is built for ``sm_90a`` (NVRTC keeps the ``a`` target);
  elsewhere CuPy's default ``sm_XX``.
* :func:`compile_for_arch` compiles through NVRTC directly for an explicit architecture, with
  the same source and options and no GPU: CI uses it to build every instantiation for sm_80,
  sm_90 and sm_90a.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
from pathlib import Path

import numpy as np

from . import _arrays

#: Options of every compilation (CuPy appends -arch and -ftz=true on the GPU path; the
#: direct NVRTC path appends the same), and then those of NVRTC_OPTIONS_ENV if set.
OPTIONS = ("-std=c++17", "-DNDEBUG")
#: Environment variable of extra NVRTC options for every compilation of a process (whitespace
#: separated, read when a kernel is compiled: set it before the first call): "-lineinfo" for a
#: profiler's source view, "-DTFLA_WAIT_LIMIT=<polls>" to make a stuck mbarrier wait trap with its
#: block and thread printed instead of hanging (cuda_src/tma.cuh). For development, not production.
NVRTC_OPTIONS_ENV = "TFLA_CUPY_NVRTC_OPTIONS"


def options() -> tuple:
    """OPTIONS and the extra options of the environment (NVRTC_OPTIONS_ENV)."""
    return OPTIONS + tuple(os.environ.get(NVRTC_OPTIONS_ENV, "").split())

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def source_dir() -> Path:
    """cuda_src/: inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "cuda_src", here.parent / "cuda_src"):
        if (candidate / "tfla.cu").is_file():
            return candidate
    raise FileNotFoundError(f"tfla_cupy: cuda_src/tfla.cu not found next to {here}")


def _expand(path: Path, seen: set) -> str:
    out = []
    for line in path.read_text().splitlines(keepends=True):
        m = _INCLUDE.match(line)
        if m:
            dep = path.parent / m.group(1)
            if dep not in seen:
                seen.add(dep)
                out.append(f"// ---- {m.group(1)} ----\n")
                out.append(_expand(dep, seen))
            continue
        if line.strip() == "#pragma once":
            continue
        out.append(line)
    return "".join(out)


@functools.lru_cache(maxsize=None)
def source() -> str:
    """The whole translation unit, every header inlined, tagged with its hash."""
    text = _expand(source_dir() / "tfla.cu", set())
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"// tfla_cupy source fingerprint {digest}\n" + text


def source_files():
    """Every .cu / .cuh file the translation unit is made of."""
    return sorted(p for p in source_dir().iterdir() if p.suffix in (".cu", ".cuh"))


def kernel_name(kernel: str, *template_args: str) -> str:
    """C++ name of one instantiation, e.g. ``tfla::fwd_h_kernel<tfla::MmaBF16, ...>``."""
    return f"tfla::{kernel}<{', '.join(template_args)}>"


class CompileError(RuntimeError):
    """NVRTC rejected the sources; the message carries the log."""


# ------------------------------------------------------------------------------------------
# GPU path: RawModule per instantiation, memoised per device
# ------------------------------------------------------------------------------------------


def _arch_options(cc: str):
    return ("-arch=sm_90a",) if cc == "90" else ()


class _Once:
    """A memo that builds each key once and publishes it only when it is complete: the first
    caller of a key builds it under that key's own lock (other keys build in parallel), later
    callers of the same key wait for it and get the same object. functools.lru_cache lets two
    threads build one key twice and hand them different objects."""

    def __init__(self, build):
        self._build = build
        self._done = {}
        self._locks = {}
        self._lock = threading.Lock()

    def __call__(self, *key):
        try:
            return self._done[key]
        except KeyError:
            pass
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._done:
                self._done[key] = self._build(*key)
        return self._done[key]


class Kernel:
    """A compiled kernel with its dynamic shared-memory opt-in.

    Thread safety: one Kernel exists per (device, name) (the _Once memo below), and its
    shared-memory limit only grows, under a lock, the driver attribute first: a launch that
    reads ``smem_limit >= smem`` is allowed ``smem`` bytes. (A kernel whose shared memory
    depends on the shape, such as the Hopper backward's, used to be lowered by one thread
    between another thread's raise and its launch: CUDA_ERROR_INVALID_VALUE.)"""

    __slots__ = ("fn", "smem_limit", "_lock")

    def __init__(self, fn):
        self.fn = fn
        self.smem_limit = 0
        self._lock = threading.Lock()

    def _raise_limit(self, smem):
        with self._lock:
            if smem > self.smem_limit:
                self.fn.max_dynamic_shared_size_bytes = smem
                self.smem_limit = smem

    def __call__(self, grid: int, block: int, params, smem: int = 0):
        """``params``: the kernel's one argument (a Params record), or a tuple of its arguments.
        Record arguments travel as raw bytes: CuPy reads a NumPy argument's __array_interface__,
        whose field description costs ~0.1 ms per launch for a record of ~80 fields."""
        if smem > self.smem_limit:
            self._raise_limit(smem)
        args = params if isinstance(params, tuple) else (params,)
        self.fn((grid,), (block,), tuple(_raw(a) for a in args), shared_mem=smem)


@functools.lru_cache(maxsize=None)
def raw_dtype(itemsize):
    return np.dtype(f"V{itemsize}")


def _raw(a):
    """A structured one-element NumPy array as the same bytes with a plain void dtype. Read
    through the buffer protocol: a dtype-changing view() of a record of ~80 fields runs NumPy's
    Python-level field check (numpy/_core/_internal.py _view_is_safe), ~7 µs per launch in a
    profile on an H100 host (NumPy 2.5, 2026-12-07)."""
    return np.frombuffer(a, raw_dtype(a.dtype.itemsize)) if isinstance(a, np.ndarray) and a.dtype.names else a


def _build_kernel(device_id: int, name: str, opts: tuple) -> Kernel:
    cp = _arrays.cupy_module()
    cc = cp.cuda.Device(device_id).compute_capability
    module = cp.RawModule(code=source(), options=opts + _arch_options(cc), name_expressions=(name,))
    try:
        return Kernel(module.get_function(name))
    except cp.cuda.compiler.CompileException as e:
        raise CompileError(f"NVRTC failed to compile {name} for compute capability {cc}:\n{e}") from None


_kernels = _Once(_build_kernel)


def kernel_on(device_id: int, name: str) -> Kernel:
    """The Kernel ``name`` on a device, compiled once per process, device and options (thread-safe)."""
    return _kernels(device_id, name, options())


def get_kernel(name: str) -> Kernel:
    """The kernel ``name`` for the current device (compiled on first use; thread-safe)."""
    cp = _arrays.cupy_module()
    return kernel_on(cp.cuda.Device().id, name)


@functools.lru_cache(maxsize=None)
def device_limits(device_id: int):
    """(multiprocessors, max opt-in shared memory per block) of a device."""
    cp = _arrays.cupy_module()
    attrs = cp.cuda.Device(device_id).attributes
    return attrs["MultiProcessorCount"], attrs["MaxSharedMemoryPerBlockOptin"]


# ------------------------------------------------------------------------------------------
# No-GPU path: NVRTC directly, explicit architecture
# ------------------------------------------------------------------------------------------


def compile_for_arch(names, arch: str, *, extra_source: str = "", verbose_ptxas: bool = True):
    """Compile the instantiations ``names`` for ``arch`` (e.g. "sm_80", "sm_90a") without a GPU.

    Returns ``(log, lowered)``: the NVRTC/ptxas log (register, spill and shared-memory report
    with ``verbose_ptxas``) and the mangled names. Raises :class:`CompileError` on failure.
    """
    from cupy_backends.cuda.libs import nvrtc

    src = source() + extra_source
    opts = list(options()) + [f"-arch={arch}", "-ftz=true"]
    if verbose_ptxas:
        opts.append("-Xptxas=-v")
    prog = nvrtc.createProgram(src, "tfla.cu", [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError:
            raise CompileError(f"NVRTC failed for {arch}:\n{nvrtc.getProgramLog(prog)}") from None
        log = nvrtc.getProgramLog(prog)
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
        nvrtc.getCUBIN(prog)
        return log, lowered
    finally:
        nvrtc.destroyProgram(prog)
