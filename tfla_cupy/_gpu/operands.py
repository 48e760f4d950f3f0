"""The GPU path's own checks and its operands: what the kernels accept beyond the API's
validation (dtype policy, head-size limits, one device), and the arrays they read.

Sequence tensors are passed with their strides (tfla::Strides: batch, head, token, in
elements), so both layouts and strided views are read in place: q, k, v and dh need a
contiguous feature dimension and 16-byte aligned strides and data pointer, and are copied once
otherwise; gates are read as float32 with any strides (other dtypes are converted, a copy of
B·NH·S values). State buffers that the kernels write are never copied, so anything they cannot
take is an error here.
"""

from __future__ import annotations

import numpy as np

from .. import _arrays
from ..config import MAX_DK, MAX_DV, MMA

F32 = np.dtype(np.float32)
INT31 = 2 ** 31 - 1


def cdiv(a, b):
    return -(-a // b)


def mma_of(problem):
    """The compute policy (C++ tfla::Mma*) of the call's dtype and precision."""
    key = (np.dtype(problem.dtype), problem.precision if np.dtype(problem.dtype) == F32 else "default")
    if key not in MMA:
        raise TypeError(f"q: the GPU path supports float16, bfloat16 and float32, got {_arrays.dtype_name(problem.dtype)}")
    return MMA[key]


def check_head_dims(DK, DV, *, where="q"):
    if DK % 8 or DK > MAX_DK:
        raise ValueError(f"{where}: the GPU path needs DK to be a multiple of 8 and <= {MAX_DK}, got DK={DK}")
    if DV % 8 or DV > MAX_DV:
        raise ValueError(f"v: the GPU path needs DV to be a multiple of 8 and <= {MAX_DV}, got DV={DV}")


def check_problem(problem):
    """The GPU path's limits on a validated problem; returns its compute policy."""
    mma = mma_of(problem)
    check_head_dims(problem.DK, problem.DV)
    return mma


def same_device(named):
    """The one cupy Device of the non-None arrays in ``named``."""
    cp = _arrays.cupy_module()
    ids = {n: x.device.id for n, x in named.items() if x is not None}
    if len(set(ids.values())) > 1:
        raise ValueError("inputs live on different GPUs: " + ", ".join(f"{n}: device {d}" for n, d in ids.items()))
    return cp.cuda.Device(next(iter(ids.values())))


def operand(x, dtype=None):
    """C-contiguous, 16-byte aligned, of ``dtype`` (copies only when needed)."""
    cp = _arrays.cupy_module()
    if dtype is not None and x.dtype != dtype:
        x = x.astype(dtype)
    if not x.flags.c_contiguous:
        x = cp.ascontiguousarray(x)
    if x.data.ptr % 16:
        x = x.copy()
    return x


def token_axes(layout):
    """(batch, head, token) axes of a sequence tensor in ``layout``."""
    return (0, 1, 2) if layout == "bhsd" else (0, 2, 1)


def strides(x, layout):
    """Element strides (batch, head, token) of a sequence tensor of ``layout``."""
    e = x.itemsize
    return tuple(x.strides[a] // e for a in token_axes(layout))


def c_strides(shape, itemsize):
    """Byte strides of a C-contiguous array of ``shape``."""
    out, step = [], itemsize
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def seq_strides(p, D):
    """(batch, head, token) element strides of a C-contiguous sequence tensor with D features."""
    return (p.NH * p.S * D, p.S * D, D) if p.layout == "bhsd" else (p.S * p.NH * D, D, p.NH * D)


def _readable_in_place(x, layout):
    """Whether the kernels can read the token rows of x where they are: contiguous feature
    dimension, every other stride and the data pointer 16-byte aligned, token stride < 2^31."""
    e = x.itemsize
    tok = x.strides[token_axes(layout)[2]] // e
    return (x.strides[3] == e and all(st % 16 == 0 for st in x.strides[:3]) and x.data.ptr % 16 == 0
            and abs(tok) <= INT31)


def sequence_operand(x, layout, dtype=None):
    """A q / k / v / dh operand: the array itself when the kernels can read it in place,
    otherwise one C-contiguous copy (of ``dtype``)."""
    cp = _arrays.cupy_module()
    if dtype is not None and x.dtype != dtype:
        x = x.astype(dtype)
    if not _readable_in_place(x, layout):
        x = cp.ascontiguousarray(x)
        if x.data.ptr % 16:
            x = x.copy()
    return x


def gate_operand(x):
    """A gate operand: float32 with any strides (a copy only to convert the dtype)."""
    return x if x.dtype == F32 and all(s % 4 == 0 for s in x.strides) else operand(x, F32)


def _state_f32(state, problem):
    if state is None:
        return None, None, None
    C0 = operand(state.C)
    n0 = operand(state.n) if problem.has_n else None
    m0 = operand(state.m) if problem.has_m else None
    return C0, n0, m0


def gpu_inputs(problem, arrays, state, *, sequence=True):
    """GPU-specific checks, then the kernel operands: (mma, device, (q, k, v, i32, f32), (C0, n0, m0)).
    Sequence calls read q, k, v in place where possible; the step kernel takes contiguous,
    aligned operands. Gates and states are float32. Runs under `device`."""
    q, k, v, i, f = arrays
    mma = check_problem(problem)
    cu = problem.cu_seqlens if _arrays.kind_of(problem.cu_seqlens) == "cuda" else None
    device = same_device(dict(q=q, k=k, v=v, i=i, f=f, cu_seqlens=cu, **({} if state is None else state._asdict())))
    with device:
        lay = problem.layout
        if sequence:
            ops = (sequence_operand(q, lay), sequence_operand(k, lay), sequence_operand(v, lay),
                   gate_operand(i), gate_operand(f))
        else:
            ops = (operand(q), operand(k), operand(v), operand(i, F32), operand(f, F32))
        return mma, device, ops, _state_f32(state, problem)


# ------------------------------------------------------------------------------------------
# State buffers the kernels write (out_state, a decode state updated in place)
# ------------------------------------------------------------------------------------------


def span(x):
    return (0, 0) if x is None else (x.data.ptr, x.data.ptr + x.nbytes)


def aliasing(name, a, b):
    """True when b is a (same start, same size), False when disjoint; partial overlap is an error."""
    if a is None or b is None:
        return False
    (a0, a1), (b0, b1) = span(a), span(b)
    if (a0, a1) == (b0, b1):
        return True
    if a0 < b1 and b0 < a1:
        raise ValueError(f"out_state.{name}: overlaps state.{name} without being the same buffer; pass the state "
                         f"itself (in place) or a separate buffer")
    return False


def check_disjoint(out, state):
    """The forward's out_state must not overlap its initial state (the backward reads it)."""
    if state is None:
        return
    for key, a in zip("Cnm", out):
        for key0, b in zip("Cnm", state):
            if a is None or b is None:
                continue
            (a0, a1), (b0, b1) = span(a), span(b)
            if a0 < b1 and b0 < a1:
                raise ValueError(f"out_state.{key}: overlaps initial_state.{key0}; the forward's last state needs "
                                 f"buffers of its own (the backward reads the initial state)")


def check_state_buffers(name, st):
    """Buffers written by the kernels: float32 (validated before), C-contiguous, C 16-byte aligned
    (float4 stores). They are never copied, so anything else is an error."""
    for key, x in zip("Cnm", st):
        if x is None:
            continue
        if not x.flags.c_contiguous:
            raise ValueError(f"{name}.{key}: the GPU path writes this buffer in place and needs it C-contiguous, "
                             f"got strides {x.strides}")
        if x.data.ptr % (16 if key == "C" else 4):
            raise ValueError(f"{name}.{key}: the GPU path needs a 16-byte aligned buffer, got address "
                             f"{x.data.ptr:#x}")
