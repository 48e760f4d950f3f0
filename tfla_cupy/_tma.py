"""Tensor maps for the Hopper kernels' bulk tensor copies.

The driver encodes them (``cuTensorMapEncodeTiled``, through NVIDIA's cuda-bindings package, the
``cuda12`` / ``cuda13`` extras); the kernels receive them by value, in a ``tfla::FusedMaps``
(cuda_src/tma.cuh), so a launch needs no device memory and stays capturable in a CUDA
graph.

A sequence tensor (q, k or v, any of the layouts, packed sequences included) is described as a
4-D map: dimension 0 is the feature (contiguous), dimensions 1..3 are token, head and batch sorted
by stride, boxes of 64 features × ``rows`` tokens (one head, one batch entry) with the 128-byte
swizzle the wgmma operands use, zeros outside the tensor. ``order`` tells the kernel which of (token, head, batch) each of
dimensions 1..3 is.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from .config import FUSED_BV, FUSED_L, FUSED_MAPS_BYTES

TMAP_BYTES = 128
#: NumPy twin of tfla::FusedMaps (three 64-byte aligned CUtensorMap, then int order[3][3]);
#: tests/test_config.py checks its size against the C++ struct.
FUSED_MAPS_DTYPE = np.dtype({"names": ["q", "k", "v", "order"],
                             "formats": [f"V{TMAP_BYTES}"] * 3 + [(np.int32, (3, 3))],
                             "offsets": [m * TMAP_BYTES for m in range(4)], "itemsize": FUSED_MAPS_BYTES})


@functools.lru_cache(maxsize=None)
def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    return driver


def unavailable():
    """None when tensor maps can be encoded here, else why not."""
    if _driver() is None:
        return "it needs NVIDIA's cuda-bindings package (pip install 'tfla-cupy[cuda12]' or '[cuda13]')"
    return None


def outer_dims(strides_bht, S, NH, B, itemsize):
    """Dimensions 1..3 of a sequence tensor's map: (coordinate, extent, byte stride) of token (0),
    head (1) and batch (2), sorted by stride. A dimension of extent 1 gets the largest extent ·
    stride (its own stride may be anything, even 0)."""
    sb, sh, st = strides_bht
    dims = [(0, S, st * itemsize), (1, NH, sh * itemsize), (2, B, sb * itemsize)]
    big = max([n * s for _, n, s in dims if n > 1], default=16)
    dims = [(c, n, s if n > 1 else big) for c, n, s in dims]
    return sorted(dims, key=lambda d: (d[2], d[0]))


@functools.lru_cache(maxsize=256)
def _sequence_map(ptr, dtype_name, itemsize, D, strides_bht, S, NH, B, rows):
    """(128 raw bytes, order) of the 4-D map of a sequence tensor at ``ptr`` with D features and
    element strides (b, h, t). Memoised: the map is a function of exactly these arguments."""
    drv = _driver()
    kind = {"bfloat16": drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            "float16": drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16}[dtype_name]
    dims = outer_dims(strides_bht, S, NH, B, itemsize)
    u64, u32 = drv.cuuint64_t, drv.cuuint32_t
    err, tmap = drv.cuTensorMapEncodeTiled(
        kind, 4, ptr,
        [u64(D)] + [u64(n) for _, n, _ in dims],
        [u64(s) for _, _, s in dims],
        [u32(FUSED_BV)] + [u32(rows if c == 0 else 1) for c, _, _ in dims], [u32(1)] * 4,
        drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    if err != drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err}) for a {dtype_name} tensor of {D} features, "
                           f"element strides {strides_bht}, {S} tokens, {NH} heads, {B} batch entries")
    return ctypes.string_at(tmap.getPtr(), TMAP_BYTES), tuple(c for c, _, _ in dims)


@functools.lru_cache(maxsize=256)
def _fused_record(keys):
    out = np.zeros(1, dtype=FUSED_MAPS_DTYPE)
    for m, (name, key) in enumerate(zip(("q", "k", "v"), keys)):
        raw, order = _sequence_map(*key)
        out[name] = np.frombuffer(raw, dtype=f"V{TMAP_BYTES}")[0]
        out["order"][0, m] = order
    out.flags.writeable = False
    return out


def fused_maps(tensors, S, NH, B):
    """A one-element FUSED_MAPS_DTYPE array for the fused forward: ``tensors`` is
    ((q, strides), (k, strides), (v, strides)) with element strides (batch, head, token)."""
    keys = tuple((x.data.ptr, x.dtype.name, x.itemsize, x.shape[-1], tuple(strides), S, NH, B, FUSED_L)
                 for x, strides in tensors)
    return _fused_record(keys)
