"""Validation at the API boundary: every error names the argument, what was received and
what was expected. Nothing past this module re-checks user input."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import _arrays
from ._types import MLSTMContext, MLSTMState

GATES = ("exp", "sig")
PRECISIONS = ("default", "tf32")
MIN_CHUNK, MAX_CHUNK = 16, 1024


@dataclass(frozen=True)
class Problem:
    """Sizes and options of one call, after validation."""

    kind: str               # "numpy" or "cuda"
    B: int
    NH: int
    S: int
    DK: int
    DV: int
    dtype: Any              # dtype of q, k, v (and of h)
    gate: str
    normalize: bool
    eps: float
    scale: float
    chunk_size: int
    has_initial_state: bool
    precision: str = "default"
    config: Any = None      # a KernelConfig override, or None for the heuristic
    keep_states: bool = False
    normalizer_grad: bool = False   # the exact gradient through N (docs/math.md §6.6); only with normalize

    @property
    def stabilized(self):
        return self.gate == "exp"

    @property
    def has_n(self):
        return self.normalize

    @property
    def has_m(self):
        return self.gate == "exp"


def _shape_str(shape):
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _check_rank_and_dtype(name, x, rank, dims_doc):
    if x.ndim != rank:
        raise ValueError(f"{name}: expected a {rank}-d array {dims_doc}, got shape {_shape_str(x.shape)}")
    if not _arrays.is_floating(x.dtype):
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32 or float64), "
                        f"got {_arrays.dtype_name(x.dtype)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name}: every dimension must be >= 1, got shape {_shape_str(x.shape)}")


def _check_shape(name, x, expected, dims_doc):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {_shape_str(expected)} {dims_doc}, got {_shape_str(x.shape)}")


def _finite_positive(x):
    try:
        x = float(x)
    except OverflowError:  # an int beyond the float range
        return False
    return math.isfinite(x) and x > 0


def _short(x):
    text = repr(x)
    return text if len(text) <= 40 else text[:20] + "…" + text[-10:]


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {value!r}")


def check_options(*, gate, normalize, eps, scale, chunk_size, precision, DK):
    if gate not in GATES:
        raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
    _check_bool("normalize", normalize)
    if gate == "exp" and not normalize:
        raise ValueError("normalize: normalize=False is only defined for gate='sig' (the exp variant's "
                         "numerator is in stabilizer-dependent units); got gate='exp', normalize=False")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps: expected a positive real number, got {eps!r}")
    if not _finite_positive(eps):
        raise ValueError(f"eps: expected a finite number > 0, got {_short(eps)}")
    if scale is None:
        scale = 1.0 / math.sqrt(DK)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale: expected None or a positive real number, got {scale!r}")
    elif not _finite_positive(scale):
        raise ValueError(f"scale: expected None or a finite number > 0, got {_short(scale)}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
            raise TypeError(f"chunk_size: expected None or an int, got {chunk_size!r}")
        c = int(chunk_size)
        if c < MIN_CHUNK or c > MAX_CHUNK or (c & (c - 1)) != 0:
            raise ValueError(f"chunk_size: expected a power of two in [{MIN_CHUNK}, {MAX_CHUNK}], got {chunk_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return float(eps), float(scale)


def inputs(q, k, v, i, f, *, gate, normalize, eps, scale, chunk_size, initial_state,
           precision="default", config=None, keep_states=False, normalizer_grad=False):
    """Validate a sequence call. Returns (Problem, (q, k, v, i, f), initial_state) with the
    arrays converted to the call's array module (DLPack producers become CuPy or NumPy arrays)."""
    arrays = _arrays.to_common_module(dict(q=q, k=k, v=v, i=i, f=f))
    kind = arrays.pop("_kind")
    q, k, v, i, f = (arrays[n] for n in "qkvif")
    _check_rank_and_dtype("q", q, 4, "(B, NH, S, DK)")
    B, NH, S, DK = q.shape
    _check_rank_and_dtype("k", k, 4, "(B, NH, S, DK)")
    _check_shape("k", k, (B, NH, S, DK), "(B, NH, S, DK) to match q")
    _check_rank_and_dtype("v", v, 4, "(B, NH, S, DV)")
    DV = v.shape[3]
    _check_shape("v", v, (B, NH, S, DV), "(B, NH, S, DV) to match q's B, NH, S")
    for name, g in (("i", i), ("f", f)):
        _check_rank_and_dtype(name, g, 3, "(B, NH, S)")
        _check_shape(name, g, (B, NH, S), "(B, NH, S) to match q")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({_arrays.dtype_name(q.dtype)}), "
                            f"got {_arrays.dtype_name(x.dtype)}")
    eps, scale = check_options(gate=gate, normalize=normalize, eps=eps, scale=scale,
                               chunk_size=chunk_size, precision=precision, DK=DK)
    _check_bool("keep_states", keep_states)
    _check_bool("normalizer_grad", normalizer_grad)
    if config is not None:
        from .config import KernelConfig
        if not isinstance(config, KernelConfig):
            raise TypeError(f"config: expected None or a tfla_cupy.KernelConfig, got {type(config).__name__}")
    if chunk_size is None:
        from .config import default_chunk_size
        chunk_size = default_chunk_size(S)
    problem = Problem(kind=kind, B=B, NH=NH, S=S, DK=DK, DV=DV, dtype=q.dtype, gate=gate,
                      normalize=bool(normalize), eps=eps, scale=scale, chunk_size=int(chunk_size),
                      has_initial_state=initial_state is not None, precision=precision,
                      config=config, keep_states=bool(keep_states),
                      normalizer_grad=bool(normalizer_grad) and bool(normalize))
    state = None
    if initial_state is not None:
        state = state_arg("initial_state", initial_state, problem)
    return problem, (q, k, v, i, f), state


def state_arg(name, state, problem, *, require_m=None, require_n=None, pool=False):
    """Validate an MLSTMState (or (C, n, m) tuple) against the problem sizes.

    C is always required. n is required when the problem normalizes and m for the exp
    variant; where the variant has no n or m the entry may be None (it is ignored otherwise).
    ``pool=True``: a state pool, leading dimension P (any P >= 1, taken from C) instead of B.
    """
    if isinstance(state, (tuple, list)) and len(state) == 3:
        C, n, m = state
    elif isinstance(state, (tuple, list)):
        raise TypeError(f"{name}: expected an MLSTMState(C, n, m) or a (C, n, m) tuple, "
                        f"got a {type(state).__name__} of length {len(state)}")
    else:
        raise TypeError(f"{name}: expected an MLSTMState(C, n, m) or a (C, n, m) tuple, got {type(state).__name__}")
    p = problem
    require_n = p.has_n if require_n is None else require_n
    require_m = p.has_m if require_m is None else require_m
    B, NH, DK, DV = p.B, p.NH, p.DK, p.DV
    lead = "B"
    if pool:
        C = _arrays.to_module(f"{name}.C", C, p.kind)
        if C.ndim != 4 or C.shape[0] < 1:
            raise ValueError(f"{name}.C: expected a state pool of shape (P, NH, DK, DV) = (P, {NH}, {DK}, {DV}) "
                             f"with P >= 1, got {_shape_str(C.shape)}")
        B, lead = C.shape[0], "P"
    entries = [("C", C, (B, NH, DK, DV), f"({lead}, NH, DK, DV)", True),
               ("n", n, (B, NH, DK), f"({lead}, NH, DK)", require_n),
               ("m", m, (B, NH), f"({lead}, NH)", require_m)]
    out = {}
    state_dtype = np.dtype(np.float32) if p.kind == "cuda" else None
    for key, x, shape, doc, required in entries:
        full = f"{name}.{key}"
        if not required:  # the variant has no such state (or its gradient is not used): ignored
            out[key] = None
            continue
        if x is None:
            why = "for gate='exp'" if key == "m" else "when normalize=True"
            raise ValueError(f"{full}: required {why}, got None")
        x = _arrays.to_module(full, x, p.kind)
        if not _arrays.is_floating(x.dtype):
            raise TypeError(f"{full}: expected a floating dtype (float16, bfloat16, float32 or float64), "
                            f"got {_arrays.dtype_name(x.dtype)}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{full}: expected shape {_shape_str(shape)} {doc}, got {_shape_str(x.shape)}")
        if state_dtype is not None and x.dtype != state_dtype:
            raise TypeError(f"{full}: the GPU path keeps states in float32, got {_arrays.dtype_name(x.dtype)}")
        out[key] = x
    return MLSTMState(out["C"], out["n"], out["m"])


def backward_args(ctx, dh, d_state):
    """Validate the arguments of mlstm_bwd. Returns (dh, dC_last or None, dn_last or None); dn_last
    is only read with normalizer_grad=True (the custom backward holds n constant)."""
    if not isinstance(ctx, MLSTMContext):
        raise TypeError(f"ctx: expected the context returned by mlstm_fwd, got {type(ctx).__name__}")
    p = ctx.problem
    dh = _arrays.to_module("dh", dh, p.kind, ctx_kind=True)
    expected = (p.B, p.NH, p.S, p.DV)
    if dh.ndim != 4 or tuple(dh.shape) != expected:
        raise ValueError(f"dh: expected shape {_shape_str(expected)} (B, NH, S, DV) of h, got {_shape_str(dh.shape)}")
    if not _arrays.is_floating(dh.dtype):
        raise TypeError(f"dh: expected a floating dtype (float16, bfloat16, float32 or float64), "
                        f"got {_arrays.dtype_name(dh.dtype)}")
    dC = dn = None
    if d_state is not None:
        use_n = p.normalizer_grad and isinstance(d_state, (tuple, list)) and len(d_state) == 3 \
            and d_state[1] is not None
        st = state_arg("d_state", d_state, p, require_m=False, require_n=use_n)
        dC, dn = st.C, st.n
    return dh, dC, dn


def step_inputs(q, k, v, i, f, state, *, gate, normalize, eps, scale, out_state=None, state_indices=None):
    """Validate mlstm_step. Returns (Problem with S=1, arrays, state or None, out_state or None,
    state_indices or None); with state_indices the state is a pool (P, NH, ...)."""
    arrays = _arrays.to_common_module(dict(q=q, k=k, v=v, i=i, f=f))
    kind = arrays.pop("_kind")
    q, k, v, i, f = (arrays[n] for n in "qkvif")
    _check_rank_and_dtype("q", q, 3, "(B, NH, DK)")
    B, NH, DK = q.shape
    _check_rank_and_dtype("k", k, 3, "(B, NH, DK)")
    _check_shape("k", k, (B, NH, DK), "(B, NH, DK) to match q")
    _check_rank_and_dtype("v", v, 3, "(B, NH, DV)")
    DV = v.shape[2]
    _check_shape("v", v, (B, NH, DV), "(B, NH, DV) to match q's B, NH")
    for name, g in (("i", i), ("f", f)):
        _check_rank_and_dtype(name, g, 2, "(B, NH)")
        _check_shape(name, g, (B, NH), "(B, NH) to match q")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({_arrays.dtype_name(q.dtype)}), "
                            f"got {_arrays.dtype_name(x.dtype)}")
    eps, scale = check_options(gate=gate, normalize=normalize, eps=eps, scale=scale,
                               chunk_size=None, precision="default", DK=DK)
    problem = Problem(kind=kind, B=B, NH=NH, S=1, DK=DK, DV=DV, dtype=q.dtype, gate=gate,
                      normalize=bool(normalize), eps=eps, scale=scale, chunk_size=MIN_CHUNK,
                      has_initial_state=state is not None)
    if state_indices is None:
        st = None if state is None else state_arg("state", state, problem)
        out = None if out_state is None else _out_state(out_state, problem)
        return problem, (q, k, v, i, f), st, out, None
    if state is None:
        raise ValueError("state: required with state_indices (the state pool (P, NH, DK, DV), (P, NH, DK), "
                         "(P, NH) that the selected rows are read from and written to), got None")
    if out_state is not None:
        raise ValueError("out_state: must be None with state_indices (the selected rows of the state pool are "
                         "updated in place)")
    st = state_arg("state", state, problem, pool=True)
    return problem, (q, k, v, i, f), st, st, _state_indices(state_indices, B, st.C.shape[0], kind)


def forward_out_state(out_state, problem):
    """out_state of mlstm / mlstm_fwd: like mlstm_step's."""
    return _out_state(out_state, problem)


def _out_state(out_state, problem):
    """out_state: buffers of the state's shapes that receive the new state (GPU: float32)."""
    out = state_arg("out_state", out_state, problem)
    for key, x in zip("Cnm", out):
        if x is not None and problem.kind == "numpy" and not x.flags.writeable:
            raise ValueError(f"out_state.{key}: expected a writeable array, got a read-only one")
    return out


def _state_indices(idx, B, P, kind):
    """(B,) int32 rows of the pool, −1 = skip. NumPy indices are range-checked here (also on the
    GPU path, before the upload); GPU indices are trusted: the kernel skips out-of-range rows
    and writes NaN to their h (checking them here would need a host synchronisation)."""
    k = _arrays.kind_of(idx)
    if k is None:
        raise TypeError(f"state_indices: expected a (B,) int32 NumPy or CuPy array, got {type(idx).__name__}")
    idx, k = _arrays._convert("state_indices", idx, k)
    if k == "cuda" and kind == "numpy":
        raise TypeError("state_indices: is a GPU array but q, k, v, i, f are NumPy (host) arrays")
    if np.dtype(idx.dtype) != np.int32:
        raise TypeError(f"state_indices: expected dtype int32, got {_arrays.dtype_name(idx.dtype)}")
    if tuple(idx.shape) != (B,):
        raise ValueError(f"state_indices: expected shape ({B},) (B,) to match q, got {_shape_str(idx.shape)}")
    if k == "numpy":
        bad = (idx < -1) | (idx >= P)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"state_indices: expected values in [-1, {P}) (rows of the state pool, -1 = skip), "
                             f"got state_indices[{j}] = {int(idx[j])}")
        used = idx[idx >= 0]
        if len(np.unique(used)) != len(used):
            raise ValueError(f"state_indices: a pool row may be selected once per step, got duplicates in "
                             f"{idx.tolist()}")
        if kind == "cuda":
            idx = _arrays.cupy_module().asarray(idx)
    return idx
