"""The decode step on the GPU: one launch record per problem, and :class:`StepPlan`, the
pre-validated form for loops (docs/performance.md §2a).

A step is step_kernel (C, h; n and m too when they are not updated in place), then
step_nm_kernel (n, m) when they are: see cuda_src/step.cuh for why in-place n and m need the
second launch. Launch parameters are a StepParams record whose scalars are filled once; a
call writes the pointers into a uint64 view of it and launches (CUDA copies kernel arguments
at launch, so the record can be reused at once, also while a graph is captured).
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from . import _arrays, _loader, _validate
from ._params import STEP_PARAMS_DTYPE, STEP_POINTER_SLOT
from ._types import MLSTMState
from .config import GATE_POLICY, STEP_NM_THREADS, STEP_THREADS, step_kernel, step_lanes, step_nm_kernel

_F32 = np.dtype(np.float32)
_I32 = np.dtype(np.int32)


def _span(x):
    return (0, 0) if x is None else (x.data.ptr, x.data.ptr + x.nbytes)


def _aliasing(name, a, b):
    """True when b is a (same start, same size), False when disjoint; partial overlap is an error."""
    if a is None or b is None:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
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
            (a0, a1), (b0, b1) = _span(a), _span(b)
            if a0 < b1 and b0 < a1:
                raise ValueError(f"out_state.{key}: overlaps initial_state.{key0}; the forward's last state needs "
                                 f"buffers of its own (the backward reads the initial state)")


def check_state_buffers(name, st, problem):
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


@functools.lru_cache(maxsize=None)
def _functions(device_id, mma, gate):
    k1 = _loader._kernel(device_id, step_kernel(mma, gate)).fn
    k2 = _loader._kernel(device_id, step_nm_kernel(mma, gate)).fn
    return k1, k2


class StepLaunch:
    """Grid, kernels and a reusable StepParams record of one step problem on one device."""

    __slots__ = ("buf", "record", "raw", "k1", "k2", "grid1", "grid2", "has_nm", "BH")

    def __init__(self, problem, mma, device_id, *, pool_size=0):
        p = problem
        self.BH = p.B * p.NH
        sms = _loader.device_limits(device_id)[0]
        lanes = step_lanes(self.BH, p.DV, sms)
        self.buf = bytearray(STEP_PARAMS_DTYPE.itemsize)   # the record's memory: pointers packed by struct
        self.record = np.frombuffer(self.buf, STEP_PARAMS_DTYPE)
        self.raw = np.frombuffer(self.buf, _loader._raw_dtype(len(self.buf)))  # the same bytes, for launches
        for name, value in dict(BH=self.BH, NH=p.NH, DK=p.DK, DV=p.DV, P=pool_size, lanes=lanes,
                                scale=p.scale, eps=p.eps).items():
            self.record[name] = value
        self.k1, self.k2 = _functions(device_id, mma, GATE_POLICY[(p.gate, p.normalize)])
        self.grid1 = ((self.BH * -(-(p.DV // 4) // lanes)),)
        self.grid2 = (self.BH,)
        self.has_nm = p.has_n or p.has_m

    def __call__(self, q, k, v, i, f, state, out, h, indices, private=False):
        """Launch on the current stream. ``state`` is (C0, n0, m0) (entries may be None), ``out``
        the buffers of the new state (may be those of ``state``). ``private``: fill a copy of the
        record (callers that may share this object between threads)."""
        C0, n0, m0 = state
        nm_in_place = _aliasing("n", n0, out.n) | _aliasing("m", m0, out.m)
        _aliasing("C", C0, out.C)
        self.launch_pointers(tuple(0 if x is None else x.data.ptr for x in (
            q, k, v, i, f, C0, n0, m0, h, out.C, out.n, out.m, indices)), nm_in_place, private)

    def launch_pointers(self, pointers, nm_in_place, private=False):
        """Pack the 13 pointers (q … state_indices, 0 for none) and launch; no checks."""
        buf = bytearray(self.buf) if private else self.buf
        struct.pack_into(_POINTERS, buf, 0, *pointers)
        struct.pack_into("<i", buf, _NM_HERE, 0 if nm_in_place else 1)
        # raw bytes, not the record dtype: CuPy's read of a record's __array_interface__ costs more
        # than the rest of the launch (tfla_cupy/_loader.py: _raw)
        record = np.frombuffer(buf, _loader._raw_dtype(len(buf))) if private else self.raw
        self.k1(self.grid1, (STEP_THREADS,), (record,))
        if nm_in_place and self.has_nm:
            self.k2(self.grid2, (STEP_NM_THREADS,), (record,))


#: The pointer fields of StepParams in order (q … state_indices), packed as little-endian uint64.
_POINTER_ORDER = ("q", "k", "v", "i", "f", "C0", "n0", "m0", "h", "C_last", "n_last", "m_last", "state_indices")
assert tuple(STEP_POINTER_SLOT) == _POINTER_ORDER and list(STEP_POINTER_SLOT.values()) == list(range(13))
_POINTERS = "<13Q"
_NM_HERE = STEP_PARAMS_DTYPE.fields["nm_here"][1]


@functools.lru_cache(maxsize=256)
def step_launch(problem, mma, device_id, pool_size):
    """The StepLaunch of a problem (memoised: eager steps of one shape share it, each filling a
    private copy of its record)."""
    return StepLaunch(problem, mma, device_id, pool_size=pool_size)


def _c_strides(shape, itemsize):
    """Byte strides of a C-contiguous array of ``shape``."""
    out, step = [], itemsize
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def _check(name, x, shape, dtype):
    if x is None or x.shape != shape or x.dtype != dtype or not x.flags.c_contiguous or x.data.ptr % 16:
        what = "None" if x is None else (f"shape {_validate._shape_str(x.shape)}, {_arrays.dtype_name(x.dtype)}, "
                                         f"{'' if x.flags.c_contiguous else 'not '}C-contiguous, address {x.data.ptr:#x}")
        raise ValueError(f"{name}: this StepPlan takes a C-contiguous, 16-byte aligned {_validate._shape_str(shape)} "
                         f"{_arrays.dtype_name(dtype)} array, got {what}")
    return x


class StepPlan:
    """One decode step for fixed shapes: made by :func:`tfla_cupy.mlstm_step_plan`.

    ``plan(q, k, v, i, f, state, out_state=None, state_indices=None, h=None) -> (h, state)``.
    The state is updated in place unless ``out_state`` is given (then it receives the new
    state; it may also be ``state``). With a pool plan (made with ``state_indices``) every call
    takes ``state_indices`` (B,) int32. GPU calls allocate nothing and never synchronise: a
    loop of them can be captured in a CUDA graph. NumPy plans run :func:`tfla_cupy.mlstm_step`
    with the same semantics (the float64 reference).
    """

    def __init__(self, problem, arrays, state, indices):
        p = self.problem = problem
        self.kind = p.kind
        self.pool = indices is not None
        self._state_shapes = tuple(None if x is None else tuple(x.shape) for x in state)
        tok = (p.B, p.NH)
        self._shapes = dict(q=tok + (p.DK,), k=tok + (p.DK,), v=tok + (p.DV,), i=tok, f=tok)
        if self.kind == "numpy":
            return
        from ._cuda_path import _mma, _same_device, _check_head_dims
        cp = _arrays.cupy_module()
        mma = _mma(p)
        _check_head_dims(p.DK, p.DV)
        for name, x in zip("if", arrays[3:]):
            if x.dtype != _F32:
                raise TypeError(f"{name}: a GPU StepPlan reads float32 gates (no conversion per call), got "
                                f"{_arrays.dtype_name(x.dtype)}")
        named = dict(zip("qkvif", arrays), **{f"state.{k}": x for k, x in zip("Cnm", state)})
        device = _same_device(named)
        self._device = device.id
        self._dtypes = dict(q=p.dtype, k=p.dtype, v=p.dtype, i=_F32, f=_F32)
        check_state_buffers("state", state, p)
        # (shape, dtype, C-contiguous strides) of every argument: one tuple comparison per check
        spec = {n: (shape, self._dtypes[n]) for n, shape in self._shapes.items()}
        spec.update({f"state.{k}": (shape, _F32) for k, shape in zip("Cnm", self._state_shapes) if shape is not None})
        spec["h"] = (self._shapes["v"], p.dtype)
        spec["state_indices"] = ((p.B,), _I32)
        self._spec = {n: (shape, dt, _c_strides(shape, dt.itemsize)) for n, (shape, dt) in spec.items()}
        with device:
            self._launch = StepLaunch(p, mma, device.id, pool_size=state.C.shape[0] if self.pool else 0)
            self._h = cp.empty(tok + (p.DV,), p.dtype)
            self._h_ptr = self._h.data.ptr

    def __repr__(self):
        p = self.problem
        return (f"StepPlan(kind={self.kind!r}, B={p.B}, NH={p.NH}, DK={p.DK}, DV={p.DV}, "
                f"dtype={_arrays.dtype_name(p.dtype)}, gate={p.gate!r}, normalize={p.normalize}, pool={self.pool})")

    def __call__(self, q, k, v, i, f, state, out_state=None, state_indices=None, h=None):
        if (state_indices is None) == self.pool:
            raise ValueError("state_indices: " + ("required by this pool plan" if self.pool else
                                                  "this plan was made without state_indices; make a pool plan"))
        if self.kind == "numpy":
            from .api import mlstm_step
            p = self.problem
            if state_indices is not None:
                out_state = None
            elif out_state is None:
                out_state = state
            hh, st = mlstm_step(q, k, v, i, f, state, gate=p.gate, normalize=p.normalize, eps=p.eps,
                                scale=p.scale, out_state=out_state, state_indices=state_indices)
            if h is not None:
                h[...] = hh
                hh = h
            return hh, st
        ptr = self._pointer
        tok = [ptr(n, a) for n, a in zip("qkvif", (q, k, v, i, f))]
        st = state if isinstance(state, MLSTMState) else MLSTMState(*state)
        st = MLSTMState(*(a if shape is not None else None for a, shape in zip(st, self._state_shapes)))
        old = [0 if a is None else ptr(f"state.{key}", a) for key, a in zip("Cnm", st)]
        if out_state is None:  # in place (the default): every entry of the state is its own output
            out, new, nm_in_place = st, old, st.n is not None or st.m is not None
        else:
            if self.pool:
                raise ValueError("out_state: must be None with state_indices (the pool is updated in place)")
            o = out_state if isinstance(out_state, MLSTMState) else MLSTMState(*out_state)
            out = MLSTMState(*(a if shape is not None else None for a, shape in zip(o, self._state_shapes)))
            new = [0 if a is None else _check(f"out_state.{key}", a, shape, _F32).data.ptr
                   for key, a, shape in zip("Cnm", out, self._state_shapes)]
            nm_in_place = _aliasing("n", st.n, out.n) | _aliasing("m", st.m, out.m)
            _aliasing("C", st.C, out.C)
        idx = 0 if state_indices is None else ptr("state_indices", state_indices)
        if h is None:
            h = self._h
            hp = self._h_ptr
        else:
            hp = ptr("h", h)
        self._launch.launch_pointers((*tok, *old, hp, *new, idx), nm_in_place)
        return h, out

    def _pointer(self, name, x):
        """x's device pointer after a check of shape, dtype and C-contiguity (one tuple
        comparison each) and of 16-byte alignment; the slow check names what is wrong."""
        shape, dtype, strides = self._spec[name]
        if x is None or x.shape != shape or x.dtype != dtype or x.strides != strides:
            _check(name, x, shape, dtype)
        p = x.data.ptr
        if p % 16:
            _check(name, x, shape, dtype)
        return p
