"""Array-module dispatch: NumPy arrays run the float64 reference, GPU arrays the CUDA kernels.

CuPy is imported lazily so that the NumPy path works without it. Any DLPack producer
(PyTorch, JAX, ...) is accepted: CUDA-resident ones become CuPy arrays zero-copy, host ones
NumPy arrays.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOATING = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64))

_DLPACK_CPU = 1
_DLPACK_CUDA = (2, 3, 13)   # kDLCUDA, kDLCUDAHost, kDLCUDAManaged


@functools.lru_cache(maxsize=None)
def cupy_module():
    """The cupy module, or None when CuPy is not installed."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def is_floating(dtype):
    return np.dtype(dtype) in FLOATING


def dtype_name(dtype):
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype == BFLOAT16 else dtype.name


def kind_of(x):
    """'numpy', 'cuda', 'dlpack-cpu', 'dlpack-cuda' or None for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    cp = cupy_module()
    if cp is not None and isinstance(x, cp.ndarray):
        return "cuda"
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        try:
            device_type = int(x.__dlpack_device__()[0])
        except Exception:
            return None
        if device_type == _DLPACK_CPU:
            return "dlpack-cpu"
        if device_type in _DLPACK_CUDA:
            return "dlpack-cuda"
    return None


def _convert(name, x, kind):
    if kind == "dlpack-cpu":
        return np.from_dlpack(x), "numpy"
    if kind == "dlpack-cuda":
        cp = cupy_module()
        if cp is None:
            raise RuntimeError(f"{name}: is a GPU array, which needs CuPy: pip install 'tfla-cupy[cuda12]'")
        return cp.from_dlpack(x), "cuda"
    return x, kind


def _describe(x):
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def to_common_module(named):
    """Convert every array of ``named`` to one module; mixed host/GPU inputs are an error.

    Returns a dict of converted arrays plus ``_kind`` ("numpy" or "cuda").
    """
    out, kinds = {}, {}
    for name, x in named.items():
        kind = kind_of(x)
        if kind is None:
            raise TypeError(f"{name}: expected a NumPy array, a CuPy array or a DLPack producer, got {_describe(x)}")
        out[name], kinds[name] = _convert(name, x, kind)
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{n}: {_describe(named[n])}" for n in named)
        raise TypeError("q, k, v, i, f: expected all host (NumPy) arrays or all GPU arrays, got a mix ("
                        + listing + ")")
    out["_kind"] = next(iter(kinds.values()))
    return out


def to_module(name, x, kind, *, ctx_kind=False):
    """Convert ``x`` to the module of ``kind`` or raise if it lives on the other side."""
    k = kind_of(x)
    if k is None:
        raise TypeError(f"{name}: expected a NumPy array, a CuPy array or a DLPack producer, got {_describe(x)}")
    x, k = _convert(name, x, k)
    if k != kind:
        where = {"numpy": "a NumPy (host) array", "cuda": "a GPU array"}
        if ctx_kind:
            raise TypeError(f"{name}: is {where[k]} but ctx comes from a forward on "
                            f"{where[kind].replace('a ', '', 1)}s; pass {where[kind]}")
        raise TypeError(f"{name}: is {where[k]} but q, k, v, i, f are {where[kind].replace('a ', '', 1)}s")
    return x
