"""The decode step on the GPU (docs/math.md §8): one launch record per problem, and the GPU side
of :class:`tfla_cupy.StepPlan`, the pre-validated form for loops.

A step is step_kernel (C, h; n and m too when they are not updated in place), then
step_nm_kernel (n, m) when they are: see cuda_src/step.cuh for why in-place n and m need the
second launch. Launch parameters are a StepParams record whose scalars are filled once; a
call packs the pointers into a copy of it (or, in a plan, into the plan's own record: CUDA
copies kernel arguments at launch, so the record can be reused at once, also while a graph is
captured) and launches.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from .. import _arrays, _loader
from .._params import STEP_PARAMS_DTYPE, STEP_POINTER_SLOT
from .._step_plan import StepPlan
from .._types import MLSTMState
from .._validate import shape_str
from . import launch
from .operands import F32, aliasing, c_strides, check_problem, check_state_buffers, gpu_inputs, mma_of, same_device

#: The pointer fields of StepParams in order (q … state_indices), packed as little-endian uint64.
_POINTER_ORDER = ("q", "k", "v", "i", "f", "C0", "n0", "m0", "h", "C_last", "n_last", "m_last", "state_indices")
assert tuple(STEP_POINTER_SLOT) == _POINTER_ORDER and list(STEP_POINTER_SLOT.values()) == list(range(13))
_POINTERS = struct.Struct("<13Q")
_NM_HERE = STEP_PARAMS_DTYPE.fields["nm_here"][1]
_NM = struct.Struct("<i")


class StepLaunch:
    """Kernels, grids and the StepParams record (scalars filled, pointers not) of one step
    problem on one device. Immutable after construction: shared by the calls of that problem,
    from any thread."""

    __slots__ = ("template", "specs", "has_nm", "BH")

    def __init__(self, problem, mma, device_id, *, pool_size=0):
        p = problem
        self.BH = p.B * p.NH
        self.specs = launch.step(p, mma, device_id)
        record = np.zeros(1, STEP_PARAMS_DTYPE)
        for name, value in dict(BH=self.BH, NH=p.NH, DK=p.DK, DV=p.DV, P=pool_size, lanes=self.specs.lanes,
                                scale=p.scale, eps=p.eps).items():
            record[name] = value
        self.template = record.tobytes()
        self.has_nm = p.has_n or p.has_m

    def launch_into(self, buf, raw, pointers, nm_in_place):
        """Pack the 13 pointers (q … state_indices, 0 for none) into ``buf`` (a bytearray of the
        record, ``raw`` its void-dtype view) and launch; no checks."""
        _POINTERS.pack_into(buf, 0, *pointers)
        _NM.pack_into(buf, _NM_HERE, 0 if nm_in_place else 1)
        sp = self.specs
        # raw bytes, not the record dtype: CuPy's read of a record's __array_interface__ costs more
        # than the rest of the launch (tfla_cupy/_loader.py: _raw)
        sp.k1(sp.grid1, sp.block1, (raw,))
        if nm_in_place and self.has_nm:
            sp.k2(sp.grid2, sp.block2, (raw,))

    def launch(self, pointers, nm_in_place):
        """launch_into a private copy of the record (calls from any thread)."""
        buf = bytearray(self.template)
        self.launch_into(buf, np.frombuffer(buf, _loader.raw_dtype(len(buf))), pointers, nm_in_place)

    def __call__(self, q, k, v, i, f, state, out, h, indices):
        """Launch on the current stream. ``state`` is (C0, n0, m0) (entries may be None), ``out``
        the buffers of the new state (may be those of ``state``)."""
        C0, n0, m0 = state
        nm_in_place = aliasing("n", n0, out.n) | aliasing("m", m0, out.m)
        aliasing("C", C0, out.C)
        self.launch(tuple(0 if x is None else x.data.ptr for x in (
            q, k, v, i, f, C0, n0, m0, h, out.C, out.n, out.m, indices)), nm_in_place)


@functools.lru_cache(maxsize=256)
def step_launch(problem, mma, device_id, pool_size):
    """The StepLaunch of a problem (memoised; two threads may build one at once, both complete
    and equal)."""
    return StepLaunch(problem, mma, device_id, pool_size=pool_size)


def step(problem, arrays, state, out=None, indices=None, *, h_out=None):
    """One token: out-of-place (new buffers), into ``out`` (may be the input state) or, with
    ``indices``, in place on the rows of the pool ``state``. ``h_out``: a preallocated h (the
    JAX adapter writes into XLA's buffer)."""
    if indices is not None:
        check_state_buffers("state", state)   # updated in place: never copied
    if out is not None:
        check_state_buffers("out_state", out)
    mma, device, (q, k, v, i32, f32), (C0, n0, m0) = gpu_inputs(problem, arrays, state, sequence=False)
    cp = _arrays.cupy_module()
    with device:
        p = problem
        if indices is not None and indices.device.id != device.id:
            raise ValueError(f"state_indices: expected an array on GPU {device.id}, got one on GPU {indices.device.id}")
        h = h_out if h_out is not None else cp.empty((p.B, p.NH, p.DV), p.dtype)
        if out is None:
            out = MLSTMState(cp.empty((p.B, p.NH, p.DK, p.DV), F32),
                             cp.empty((p.B, p.NH, p.DK), F32) if p.has_n else None,
                             cp.empty((p.B, p.NH), F32) if p.has_m else None)
        step_launch(problem, mma, device.id, 0 if indices is None else state.C.shape[0])(
            q, k, v, i32, f32, (C0, n0, m0), out, h, indices)
    return h, out


def _check(name, x, shape, dtype):
    if x is None or x.shape != shape or x.dtype != dtype or not x.flags.c_contiguous or x.data.ptr % 16:
        what = "None" if x is None else (f"shape {shape_str(x.shape)}, {_arrays.dtype_name(x.dtype)}, "
                                         f"{'' if x.flags.c_contiguous else 'not '}C-contiguous, address {x.data.ptr:#x}")
        raise ValueError(f"{name}: this StepPlan takes a C-contiguous, 16-byte aligned {shape_str(shape)} "
                         f"{_arrays.dtype_name(dtype)} array, got {what}")
    return x


class GpuStepPlan(StepPlan):
    """The GPU StepPlan: every argument checked by one tuple comparison of (shape, dtype,
    strides) and its alignment, the pointers packed into the plan's own record, one or two
    launches. No allocation, no host synchronisation."""

    kind = "cuda"

    def __init__(self, problem, arrays, state, indices):
        super().__init__(problem, state, indices)
        p = problem
        cp = _arrays.cupy_module()
        mma = check_problem(p)
        for name, x in zip("if", arrays[3:]):
            if x.dtype != F32:
                raise TypeError(f"{name}: a GPU StepPlan reads float32 gates (no conversion per call), got "
                                f"{_arrays.dtype_name(x.dtype)}")
        device = same_device(dict(zip("qkvif", arrays), **{f"state.{k}": x for k, x in zip("Cnm", state)}))
        self._device = device.id
        dtypes = dict(q=p.dtype, k=p.dtype, v=p.dtype, i=F32, f=F32)
        check_state_buffers("state", state)
        # (shape, dtype, C-contiguous strides) of every argument: one tuple comparison per check
        spec = {n: (shape, dtypes[n]) for n, shape in self._shapes.items()}
        spec.update({f"state.{k}": (shape, F32) for k, shape in zip("Cnm", self._state_shapes) if shape is not None})
        spec["h"] = (self._shapes["v"], p.dtype)
        spec["state_indices"] = ((p.B,), np.dtype(np.int32))
        self._spec = {n: (shape, dt, c_strides(shape, dt.itemsize)) for n, (shape, dt) in spec.items()}
        with device:
            self._launch = StepLaunch(p, mma, device.id, pool_size=state.C.shape[0] if self.pool else 0)
            self._h = cp.empty(self._shapes["v"], p.dtype)
            self._h_ptr = self._h.data.ptr
        self._buf = bytearray(self._launch.template)
        self._raw = np.frombuffer(self._buf, _loader.raw_dtype(len(self._buf)))

    def __call__(self, q, k, v, i, f, state, out_state=None, state_indices=None, h=None):
        self._check_indices(state_indices)
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
            new = [0 if a is None else _check(f"out_state.{key}", a, shape, F32).data.ptr
                   for key, a, shape in zip("Cnm", out, self._state_shapes)]
            nm_in_place = aliasing("n", st.n, out.n) | aliasing("m", st.m, out.m)
            aliasing("C", st.C, out.C)
        idx = 0 if state_indices is None else ptr("state_indices", state_indices)
        if h is None:
            h, hp = self._h, self._h_ptr
        else:
            hp = ptr("h", h)
        self._launch.launch_into(self._buf, self._raw, (*tok, *old, hp, *new, idx), nm_in_place)
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


# ------------------------------------------------------------------------------------------
# The plain call's fast path: a signature seen before skips validation
# ------------------------------------------------------------------------------------------

#: signature of an mlstm_step call that validated and ran -> (problem, StepLaunch, device id)
_SEEN = {}
_SEEN_MAX = 256


def _signature(cp, q, k, v, i, f, state, out_state, indices, options):
    """What decides a step call's validation, for GPU calls whose every array is a C-contiguous
    CuPy array: (key, data pointers), the key made of the options, which optional arguments are
    given, and each array's shape, dtype and device; (None, None) where the call does not qualify
    (then it takes the validated path each time)."""
    nd = cp.ndarray
    arrays = [q, k, v, i, f]
    for group in (state, out_state):
        if group is None:
            arrays += (None, None, None)
        elif (type(group) is not tuple and not isinstance(group, MLSTMState)) or len(group) != 3:
            return None, None
        else:
            arrays += group
    arrays.append(indices)
    key, ptrs = [tuple((type(o), o) for o in options), state is None, out_state is None], []
    for x in arrays:
        if x is None:
            key.append(None)
            ptrs.append(0)
        elif type(x) is not nd or not x.flags.c_contiguous:
            return None, None
        else:
            d = x.data
            key.append((x.shape, x.dtype, d.device_id))
            ptrs.append(d.ptr)
    return tuple(key), ptrs


def remember(cp, args, problem, arrays, state, indices):
    """Record the signature of a step call that validated and ran: later calls of it take
    quick_step. Only calls whose operands need no conversion qualify (the kernel dtypes, float32
    gates and states, the arrays passed in)."""
    key, _ = _signature(cp, *args)
    if key is None or any(a is not b for a, b in zip(arrays, args[:5])) or (indices is not None
                                                                          and indices is not args[7]):
        return
    if arrays[3].dtype != F32 or arrays[4].dtype != F32:
        return
    try:
        hash(key)
    except TypeError:   # an option of an unhashable type (it validated, e.g. a 0-d array)
        return
    if len(_SEEN) >= _SEEN_MAX:
        _SEEN.clear()
    device = arrays[0].data.device_id
    _SEEN[key] = (problem, step_launch(problem, mma_of(problem), device, 0 if indices is None else state.C.shape[0]),
                  device)


def quick_step(cp, q, k, v, i, f, state, out_state, indices, options):
    """mlstm_step for a signature that validated before: pointers, allocations, one or two
    launches. None where the call must take the validated path: a new signature, an array that
    is not 16-byte aligned (the validated path copies it), anything else it would convert or
    reject."""
    key, ptrs = _signature(cp, q, k, v, i, f, state, out_state, indices, options)
    if key is None:
        return None
    try:
        hit = _SEEN.get(key)
    except TypeError:
        return None
    if hit is None or any(x % 16 for x in ptrs[:8]):
        return None
    p, launcher, device = hit
    st = (None, None, None) if state is None else MLSTMState(state[0], state[1] if p.has_n else None,
                                                              state[2] if p.has_m else None)
    old = ptrs[5:8] if state is not None else (0, 0, 0)
    if state is not None:
        old = (old[0], old[1] if p.has_n else 0, old[2] if p.has_m else 0)
    with cp.cuda.Device(device):
        h = cp.empty((p.B, p.NH, p.DV), p.dtype)
        if indices is not None:   # the pool, updated in place
            out, new, nm_in_place = st, old, p.has_n or p.has_m
        elif out_state is None:   # new buffers: nothing aliases
            out = MLSTMState(cp.empty((p.B, p.NH, p.DK, p.DV), F32),
                             cp.empty((p.B, p.NH, p.DK), F32) if p.has_n else None,
                             cp.empty((p.B, p.NH), F32) if p.has_m else None)
            new, nm_in_place = tuple(0 if x is None else x.data.ptr for x in out), False
        else:
            if ptrs[8] % 16 or ptrs[9] % 4 or ptrs[10] % 4:
                return None
            out = MLSTMState(out_state[0], out_state[1] if p.has_n else None, out_state[2] if p.has_m else None)
            nm_in_place = aliasing("n", st.n, out.n) | aliasing("m", st.m, out.m)
            aliasing("C", st.C, out.C)
            new = (ptrs[8], ptrs[9] if p.has_n else 0, ptrs[10] if p.has_m else 0)
        launcher.launch((*ptrs[:5], *old, h.data.ptr, *new, ptrs[11]), nm_in_place)
    return h, out
