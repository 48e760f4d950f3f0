"""Helpers of the GPU tests: availability, poisoned allocations, rounded random inputs, the
float64 reference on the same rounded inputs, and the error metric and tolerances."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import zlib

import ml_dtypes
import numpy as np
import pytest

from tfla_cupy import _loader
from tfla_cupy.reference import chunkwise

try:
    import cupy as cp

    HAS_GPU = cp.cuda.is_available()
except Exception:  # CuPy missing or no driver
    cp, HAS_GPU = None, False

gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"f32": np.dtype(np.float32), "tf32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": BF16}

# Tolerances on max|out − ref| / max|ref| against the float64 reference evaluated on the same
# rounded inputs (docs/math.md §12: ~3× the measured upstream errors).
FWD_TOL = {"f32": 1e-5, "tf32": 2e-2, "f16": 5e-3, "bf16": 3e-2}
BWD_TOL = {"f32": 1e-5, "tf32": 2e-2, "f16": 5e-3, "bf16": 3e-2}
DF_TOL = {"f32": 3e-5, "tf32": 3e-2, "f16": 2e-2, "bf16": 1e-1}

GATE_MODES = {"exp": ("exp", True), "sig": ("sig", True), "signn": ("sig", False)}


def rel_err(out, ref):
    """max|out − ref| / max|ref| in float64; inf when out has a non-finite value."""
    out = np.asarray(cp.asnumpy(out) if cp is not None and isinstance(out, cp.ndarray) else out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not np.all(np.isfinite(out)):
        return np.inf
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


@contextlib.contextmanager
def poisoned_allocations():
    """Every CuPy allocation inside the block starts as all-ones bytes (NaN in fp32/fp16/bf16),
    so an output element or an intermediate that a kernel forgets to write shows up as NaN."""
    pool = cp.get_default_memory_pool()

    def alloc(size):
        mem = pool.malloc(size)
        if size:
            cp.cuda.runtime.memsetAsync(mem.ptr, 0xFF, size, cp.cuda.get_current_stream().ptr)
        return mem

    cp.cuda.set_allocator(alloc)
    try:
        yield
    finally:
        cp.cuda.set_allocator(pool.malloc)


def seed_of(*parts):
    """A seed that depends on the case only (Python's str hash changes between processes)."""
    return zlib.crc32(repr(parts).encode())


def case_id(B, NH, S, DK, DV, L, mode, dt, *extra):
    return "-".join([f"B{B}", f"NH{NH}", f"S{S}", f"DK{DK}", f"DV{DV}", f"L{L}", mode, dt, *extra])


def make_inputs(rng, B, NH, S, DK, DV, dtype, *, f_mean=3.0, i_range=None, init=False):
    """Random inputs rounded to ``dtype`` (q, k, v) and float32 (gates). Returns the float64
    copies of the rounded values (for the reference) and the host arrays (for the kernels)."""
    q, k = rng.standard_normal((2, B, NH, S, DK))
    v = rng.standard_normal((B, NH, S, DV))
    i = rng.uniform(*i_range, (B, NH, S)) if i_range else rng.standard_normal((B, NH, S))
    f = f_mean + rng.standard_normal((B, NH, S))
    host = dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype), i=i.astype(np.float32),
                f=f.astype(np.float32))
    if init:
        host["C0"] = (0.5 * rng.standard_normal((B, NH, DK, DV))).astype(np.float32)
        host["n0"] = rng.standard_normal((B, NH, DK)).astype(np.float32)
        host["m0"] = rng.standard_normal((B, NH)).astype(np.float32)
    ref = {n: x.astype(np.float64) for n, x in host.items()}
    return host, ref


def to_gpu(host):
    return {n: cp.asarray(x) for n, x in host.items()}


def reference(ref, *, gate, normalize, L, scale=None, eps=1e-6, dh=None, dC_last=None):
    """Forward (h, N, M, last C, n, m) and, if dh is given, the backward of the reference."""
    q, k, v, i, f = (ref[n] for n in "qkvif")
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    scale = DK ** -0.5 if scale is None else scale
    C0 = ref.get("C0", np.zeros((B, NH, DK, DV)))
    n0 = ref.get("n0", np.zeros((B, NH, DK)))
    m0 = ref.get("m0", np.zeros((B, NH))) if gate == "exp" else np.zeros((B, NH))
    h, N, M, (C, n, m) = chunkwise.fwd(q, k, v, i, f, C0, n0, m0, gate=gate, normalize=normalize, L=L,
                                       eps=eps, scale=scale)
    out = dict(h=h, N=N, M=M, C=C[..., -1, :, :], n=n[..., -1, :], m=m[..., -1], C_states=C, m_states=m)
    if dh is not None:
        dq, dk, dv, di, df, dC0 = chunkwise.bwd(q, k, v, i, f, C0, n0, m0, dh, dC_last, gate=gate,
                                                normalize=normalize, L=L, eps=eps, scale=scale)
        out.update(dq=dq, dk=dk, dv=dv, di=di, df=df, dC0=dC0)
    return out


__all__ = ["cp", "HAS_GPU", "gpu", "DTYPES", "FWD_TOL", "BWD_TOL", "DF_TOL", "GATE_MODES", "rel_err",
           "poisoned_allocations", "seed_of", "case_id", "make_inputs", "to_gpu", "reference"]


def launched_kernels(monkeypatch, call):
    """Kernel names that ``call`` launches (every kernel goes through _loader.get_kernel)."""
    names = []
    real = _loader.get_kernel
    monkeypatch.setattr(_loader, "get_kernel", lambda name: names.append(name) or real(name))
    call()
    return names


def run_sanitized(tool, script_text, tmp_path):
    """Run ``script_text`` (which prints SANITIZED-RUN-OK at its end) under compute-sanitizer's
    ``tool`` with the library under test importable; skips when compute-sanitizer is missing.
    Asserts a zero exit status, the end marker and the tool's clean summary (no errors; for
    racecheck also accepted: no hazards); returns the combined output."""
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        pytest.skip("compute-sanitizer not on PATH")
    script = tmp_path / "run.py"
    script.write_text(script_text)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_loader.source_dir().parent)] + sys.path))
    # --report-api-errors no: cuda-bindings probes the driver for every entry point it knows at
    # import (cuGetProcAddress on names this driver lacks); those failed lookups are not the
    # library's errors. Kernel memory, race and sync errors are reported as before.
    r = subprocess.run([exe, f"--tool={tool}", "--error-exitcode=99", "--report-api-errors", "no", sys.executable,
                        str(script)],
                       capture_output=True, text=True, env=env, timeout=540)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "SANITIZED-RUN-OK" in out, out[-4000:]
    clean = "ERROR SUMMARY: 0 errors" in out or (tool == "racecheck" and "RACECHECK SUMMARY: 0 hazards" in out)
    assert clean, out[-4000:]
    return out


def eager_then_graph(step):
    """``step()`` once eagerly (compiles, fills the memory pool), then captured in a CUDA graph on a
    non-blocking stream and replayed: returns (eager result, graph result)."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        eager = step()
        stream.synchronize()
        stream.begin_capture()
        captured = step()
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    return eager, captured
