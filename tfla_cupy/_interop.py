"""What the framework adapters (tfla_cupy.jax, tfla_cupy.torch) share: validation from shapes and
dtypes alone (JAX traces abstract arrays), and CuPy views of a foreign CUDA stream."""

from __future__ import annotations

import warnings

import numpy as np

from . import _arrays, _validate
from ._validate import Problem


class _RawStream:
    """A raw cudaStream_t pointer behind the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, ptr):
        self.ptr = int(ptr)

    def __cuda_stream__(self):
        return (0, self.ptr)


def cupy_stream(ptr, device_id):
    """A CuPy stream object for the foreign stream ``ptr`` of device ``device_id`` (not owned)."""
    cp = _arrays.cupy_module()
    ptr = int(ptr)
    if ptr == 0:   # the legacy default stream (PyTorch's default current stream)
        return cp.cuda.Stream.null
    if ptr == 2:   # cudaStreamPerThread
        return cp.cuda.Stream.ptds
    try:
        return cp.cuda.Stream.from_external(_RawStream(ptr))
    except Exception:   # CuPy < 14 has no from_external: ExternalStream (deprecated from 14 on)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cp.cuda.ExternalStream(ptr, int(device_id))


def _dims(x):
    return tuple(int(s) for s in x.shape)


def sequence_problem(q, k, v, i, f, *, has_state, gate, normalize, eps, scale, chunk_size, precision,
                     normalizer_grad=False, config=None):
    """The Problem of a sequence call on the GPU path from shapes and dtypes (no device access)."""
    _validate._check_rank_and_dtype("q", q, 4, "(B, NH, S, DK)")
    B, NH, S, DK = _dims(q)
    _validate._check_rank_and_dtype("k", k, 4, "(B, NH, S, DK)")
    _validate._check_shape("k", k, (B, NH, S, DK), "(B, NH, S, DK) to match q")
    _validate._check_rank_and_dtype("v", v, 4, "(B, NH, S, DV)")
    DV = _dims(v)[3]
    _validate._check_shape("v", v, (B, NH, S, DV), "(B, NH, S, DV) to match q's B, NH, S")
    for name, g in (("i", i), ("f", f)):
        _validate._check_rank_and_dtype(name, g, 3, "(B, NH, S)")
        _validate._check_shape(name, g, (B, NH, S), "(B, NH, S) to match q")
    dtype = np.dtype(q.dtype)
    for name, x in (("k", k), ("v", v)):
        if np.dtype(x.dtype) != dtype:
            raise TypeError(f"{name}: expected the dtype of q ({_arrays.dtype_name(dtype)}), "
                            f"got {_arrays.dtype_name(x.dtype)}")
    eps, scale = _validate.check_options(gate=gate, normalize=normalize, eps=eps, scale=scale,
                                         chunk_size=chunk_size, precision=precision, DK=DK)
    _validate._check_bool("normalizer_grad", normalizer_grad)
    if chunk_size is None:
        from .config import default_chunk_size
        chunk_size = default_chunk_size(S)
    p = Problem(kind="cuda", B=B, NH=NH, S=S, DK=DK, DV=DV, dtype=dtype, gate=gate, normalize=bool(normalize),
                eps=eps, scale=scale, chunk_size=int(chunk_size), has_initial_state=bool(has_state),
                precision=precision, config=config, normalizer_grad=bool(normalizer_grad) and bool(normalize))
    from . import _cuda_path
    _cuda_path._mma(p)
    _cuda_path._check_head_dims(DK, DV)
    if p.normalizer_grad and DV + 8 > _cuda_path.MAX_DV:
        raise ValueError(f"v: normalizer_grad=True on the GPU path needs DV + 8 <= {_cuda_path.MAX_DV} (an "
                         f"augmented value column, padded to a multiple of 8), got DV={DV}")
    return p


def check_state(name, state, p, *, leading=None):
    """Shapes of an (C, n, m) state against p; returns (C, n, m) with entries the variant lacks as None."""
    if isinstance(state, (tuple, list)) and len(state) == 3:
        C, n, m = state
    else:
        raise TypeError(f"{name}: expected an MLSTMState(C, n, m) or a (C, n, m) tuple, got {type(state).__name__}")
    lead = (p.B, p.NH) if leading is None else leading
    out = []
    for key, x, shape, doc, required in (("C", C, lead + (p.DK, p.DV), "(B, NH, DK, DV)", True),
                                         ("n", n, lead + (p.DK,), "(B, NH, DK)", p.has_n),
                                         ("m", m, lead, "(B, NH)", p.has_m)):
        if not required:
            out.append(None)
            continue
        if x is None:
            why = "for gate='exp'" if key == "m" else "when normalize=True"
            raise ValueError(f"{name}.{key}: required {why}, got None")
        if _dims(x) != shape:
            raise ValueError(f"{name}.{key}: expected shape {_validate._shape_str(shape)} {doc}, "
                             f"got {_validate._shape_str(_dims(x))}")
        if not _arrays.is_floating(x.dtype):
            raise TypeError(f"{name}.{key}: expected a floating dtype, got {_arrays.dtype_name(x.dtype)}")
        out.append(x)
    return tuple(out)
