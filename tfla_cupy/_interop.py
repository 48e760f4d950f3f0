"""What the framework adapters (tfla_cupy.jax, tfla_cupy.torch) share: validation from shapes and
dtypes alone (JAX traces abstract arrays, PyTorch traces fake tensors), CuPy views of a foreign
CUDA stream, and the backward context rebuilt from tensors a framework kept (its autograd saves
tensors, not Python objects)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from . import _arrays, _gpu, _normgrad, _numpy_path, _validate
from . import config as _config
from ._types import MLSTMContext, MLSTMState
from ._validate import Problem

#: Columns that normalizer_grad appends to v on the GPU path (docs/math.md §6.6: the augmented
#: value column, padded to keep DV a multiple of 8).
NORMGRAD_PAD = _normgrad._pad("cuda")


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
                     normalizer_grad=False, config=None, kind="cuda"):
    """The Problem of a sequence call from shapes and dtypes (no device access): on the GPU path
    (``kind="cuda"``, with its dtype and head-size limits) or the NumPy path (``kind="numpy"``)."""
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
        chunk_size = _config.default_chunk_size(S)
    p = Problem(kind=kind, B=B, NH=NH, S=S, DK=DK, DV=DV, dtype=dtype, gate=gate, normalize=bool(normalize),
                eps=eps, scale=scale, chunk_size=int(chunk_size), has_initial_state=bool(has_state),
                precision=precision, config=config, normalizer_grad=bool(normalizer_grad) and bool(normalize))
    if kind == "cuda":
        _gpu.check_problem(p)
        if p.normalizer_grad and DV + NORMGRAD_PAD > _config.MAX_DV:
            raise ValueError(f"v: normalizer_grad=True on the GPU path needs DV + {NORMGRAD_PAD} <= {_config.MAX_DV} "
                             f"(an augmented value column, padded to a multiple of 8), got DV={DV}")
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


# ------------------------------------------------------------------------------------------
# The backward context from kept tensors
# ------------------------------------------------------------------------------------------


def residuals(ctx):
    """What :func:`rebuild_context` needs from a forward's context beside the inputs and the
    returned h: (N, M, C_inner, sign), None where the call has none. C_inner is the last C of the
    augmented forward of normalizer_grad on the GPU (the last C returned is its first DV columns;
    the NumPy backward does not read it); sign the branch of docs/math.md §6.6."""
    p, s = ctx.problem, ctx.saved
    if p.normalizer_grad:
        inner = s["inner"].saved
        return inner["N"], inner["M"] if p.has_m else None, inner.get("C_last"), s["sign"]
    return s["N"] if p.has_n else None, s["M"] if p.has_m else None, None, None


def _numpy_context(problem, arrays, state, N, M):
    """The NumPy path's context (it keeps float64 copies of the inputs in (B, NH, S, D) order and
    recomputes the rest in the backward)."""
    inputs = tuple(np.asarray(_numpy_path._bhsd(problem, x), dtype=np.float64) for x in arrays)
    saved = dict(inputs=inputs, initial=_numpy_path._initial(problem, state), dtypes=tuple(x.dtype for x in arrays),
                 N=N, M=M)
    return MLSTMContext("numpy", problem, saved)


def context(problem, arrays, state, N, M, C_last, *, h=None, sign=None):
    """The context :func:`tfla_cupy.mlstm_bwd` takes, rebuilt from a forward's inputs (validated:
    ``arrays`` and ``state`` as returned by ``_validate.inputs``) and its kept outputs N, M, C_last
    (with normalizer_grad: the augmented forward's, see :func:`residuals`) and, with
    normalizer_grad, the returned h and the branch sign. Nothing is copied; the GPU path
    recomputes its gate vectors (stage 0)."""
    kind = problem.kind
    if problem.normalizer_grad:   # the context of _normgrad.forward: an augmented inner one
        xp = np if kind == "numpy" else _arrays.cupy_module()
        pad = _normgrad._pad(kind)
        q, k, v, i, f = arrays
        with _normgrad._device(kind, v):
            v_aug = _normgrad._augment(xp, v, 1, pad)
            st = None if state is None else MLSTMState(_normgrad._augment(xp, state.C, state.n, pad), state.n, state.m)
            inner_p = dataclasses.replace(problem, DV=problem.DV + pad, normalizer_grad=False)
            inner = context(inner_p, (q, k, v_aug, i, f), st, N, M, C_last)
            ct = np.float64 if kind == "numpy" else np.float32
            saved = dict(inner=inner, h=h, hN=N.astype(ct) + problem.eps, sign=sign, pad=pad)
        return MLSTMContext(kind, problem, saved)
    if kind == "numpy":
        return _numpy_context(problem, arrays, state, N, M)
    return _gpu.context(problem, arrays, state, N, M, C_last)


def rebuild_context(q, k, v, i, f, initial_state, N, M, C_last, h=None, sign=None, **options):
    """:func:`context` for the arrays and options of a forward call (validated as the forward
    validated them, so the Problem is the forward's)."""
    problem, arrays, state = _validate.inputs(q, k, v, i, f, initial_state=initial_state, **options)
    return context(problem, arrays, state, N, M, C_last, h=h, sign=sign)
