"""Validation at the API boundary: every error names the argument, what was received and
what was expected. Nothing past this module re-checks user input."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _arrays
from ._types import MLSTMContext, MLSTMState
from .config import MAX_CHUNK, MIN_CHUNK, KernelConfig, default_chunk_size
from .reference.gates import GATE_SPECS, GATES  # the one gate specification

PRECISIONS = ("default", "tf32")
LAYOUTS = ("bhsd", "bshd")


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
    layout: str = "bhsd"    # "bhsd": q (B, NH, S, DK), gates (B, NH, S); "bshd": q (B, S, NH, DK), gates (B, S, NH)
    cu_seqlens: Any = None  # packed sequences: NSEQ + 1 offsets (NumPy or CuPy int32 / int64), or None
    NSEQ: int = 0           # sequences: B, or len(cu_seqlens) − 1 (0 = derive: B without cu_seqlens)

    def __post_init__(self):
        if self.NSEQ == 0 and self.cu_seqlens is None:
            object.__setattr__(self, "NSEQ", self.B)  # every constructor of an unpacked call gets B

    @property
    def varlen(self):
        return self.cu_seqlens is not None

    def seq_shape(self, D=None):
        """Shape of a sequence tensor in this call's layout: (B, NH, S[, D]) or (B, S, NH[, D])."""
        dims = (self.B, self.NH, self.S) if self.layout == "bhsd" else (self.B, self.S, self.NH)
        return dims if D is None else dims + (D,)

    @property
    def stabilized(self):
        return GATE_SPECS[self.gate].stabilized

    @property
    def has_n(self):
        return self.normalize

    @property
    def has_m(self):
        return GATE_SPECS[self.gate].stabilized


def shape_str(shape):
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _check_rank_and_dtype(name, x, rank, dims_doc):
    if x.ndim != rank:
        raise ValueError(f"{name}: expected a {rank}-d array {dims_doc}, got shape {shape_str(x.shape)}")
    if not _arrays.is_floating(x.dtype):
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32 or float64), "
                        f"got {_arrays.dtype_name(x.dtype)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name}: every dimension must be >= 1, got shape {shape_str(x.shape)}")


def _check_shape(name, x, expected, dims_doc):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {shape_str(expected)} {dims_doc}, got {shape_str(x.shape)}")


def _finite_positive(x, *, zero=False):
    try:
        x = float(x)
    except OverflowError:  # an int beyond the float range
        return False
    return math.isfinite(x) and (x >= 0 if zero else x > 0)


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
    if bool(normalize) not in GATE_SPECS[gate].normalize_values:
        where = " or ".join(f"gate={g!r}" for g, sp in GATE_SPECS.items() if bool(normalize) in sp.normalize_values)
        raise ValueError(f"normalize: normalize={bool(normalize)} is only defined for {where} (the exp variant's "
                         f"numerator is in stabilizer-dependent units); got gate={gate!r}, normalize={bool(normalize)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps: expected a real number >= 0, got {eps!r}")
    if not _finite_positive(eps, zero=True):
        # 0 is valid: the denominator max(|n·q|, e^{-m}) + ε stays >= e^{-m} (exp) or 1 (sig)
        raise ValueError(f"eps: expected a finite number >= 0, got {_short(eps)}")
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


_SEQ_DOC = {"bhsd": ("(B, NH, S, {})", "(B, NH, S)"), "bshd": ("(B, S, NH, {})", "(B, S, NH)")}


def check_layout(layout):
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {_short(layout)}")


def check_cu_seqlens(cu_seqlens, *, B, S, kind):
    """Validate packed-sequence offsets. Returns (cu_seqlens as an array, number of sequences).

    Shape and dtype are always checked; the values (0 first, strictly increasing, S last) are
    checked when they are on the host. A CuPy cu_seqlens on the GPU path is not read by the
    host (that would synchronise): the device table clamps it so that no kernel leaves its
    buffers, but wrong offsets give wrong results."""
    k = _arrays.kind_of(cu_seqlens)
    if isinstance(cu_seqlens, (list, tuple)):
        cu_seqlens, k = np.asarray(cu_seqlens), "numpy"
        if cu_seqlens.dtype.kind == "i":
            cu_seqlens = cu_seqlens.astype(np.int64)
    elif k in ("dlpack-cpu", "dlpack-cuda"):
        cu_seqlens, k = _arrays._convert("cu_seqlens", cu_seqlens, k)
    if k not in ("numpy", "cuda"):
        raise TypeError(f"cu_seqlens: expected None or a 1-d int32 / int64 NumPy or CuPy array, "
                        f"got {type(cu_seqlens).__name__}")
    if cu_seqlens.ndim != 1:
        raise ValueError(f"cu_seqlens: expected a 1-d array of N + 1 offsets, got shape {shape_str(cu_seqlens.shape)}")
    if np.dtype(cu_seqlens.dtype) not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"cu_seqlens: expected dtype int32 or int64, got {_arrays.dtype_name(cu_seqlens.dtype)}")
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected N + 1 >= 2 offsets (at least one sequence), got {cu_seqlens.shape[0]}")
    if B != 1:
        raise ValueError(f"cu_seqlens: packed sequences need B = 1 (all sequences along S of one batch entry), "
                         f"got B = {B}")
    if k == "cuda" and kind == "numpy":
        cu_seqlens, k = _arrays.cupy_module().asnumpy(cu_seqlens), "numpy"
    if k == "numpy":
        cu = np.asarray(cu_seqlens, dtype=np.int64)
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {int(cu[0])}")
        steps = np.diff(cu)
        if np.any(steps <= 0):
            j = int(np.argmax(steps <= 0))
            raise ValueError(f"cu_seqlens: expected strictly increasing offsets, got cu_seqlens[{j}] = {int(cu[j])} "
                             f"and cu_seqlens[{j + 1}] = {int(cu[j + 1])}")
        if cu[-1] != S:
            raise ValueError(f"cu_seqlens: expected cu_seqlens[-1] == S = {S} (the packed length), got {int(cu[-1])}")
    return cu_seqlens, cu_seqlens.shape[0] - 1


#: Signatures of sequence calls that validated -> their Problem (inputs_seen)
_SEEN = {}
_SEEN_MAX = 256


def _signature(arrays, state, options):
    """What decides a sequence call's validation: the options, and the type, shape and dtype of
    every array (NumPy or CuPy arrays only; the state as a 3-tuple). None where a call does not
    qualify (it is validated every time)."""
    cp = _arrays.cupy_module()
    types = (np.ndarray,) if cp is None else (np.ndarray, cp.ndarray)
    if state is not None:
        if not isinstance(state, tuple) or len(state) != 3:
            return None
        arrays = (*arrays, *state)
    key = [tuple((type(o), o) for o in options)]   # True and 1 validate differently
    for x in arrays:
        if x is None:
            key.append(None)
        elif type(x) not in types:
            return None
        else:
            key.append((type(x), x.shape, x.dtype))
    key = tuple(key)
    try:
        hash(key)
    except TypeError:  # an option of an unhashable type: validated every time
        return None
    return key


def inputs(q, k, v, i, f, *, gate, normalize, eps, scale, chunk_size, initial_state,
           precision="default", config=None, keep_states=False, normalizer_grad=False, layout="bhsd",
           cu_seqlens=None):
    """Validate a sequence call. Returns (Problem, (q, k, v, i, f), initial_state) with the
    arrays converted to the call's array module (DLPack producers become CuPy or NumPy arrays).
    A call whose signature (options; type, shape and dtype of every array) validated before is
    not validated again: NumPy and CuPy arrays pass through unconverted, so its Problem holds."""
    key = None
    if cu_seqlens is None:
        key = _signature((q, k, v, i, f), initial_state, (gate, normalize, eps, scale, chunk_size, precision, config,
                                                          keep_states, normalizer_grad, layout))
        problem = _SEEN.get(key) if key is not None else None
        if problem is not None:
            state = None
            if initial_state is not None:
                C, n, m = initial_state
                state = MLSTMState(C, n if problem.has_n else None, m if problem.has_m else None)
            return problem, (q, k, v, i, f), state
    problem, arrays, state = _inputs(q, k, v, i, f, gate=gate, normalize=normalize, eps=eps, scale=scale,
                                     chunk_size=chunk_size, initial_state=initial_state, precision=precision,
                                     config=config, keep_states=keep_states, normalizer_grad=normalizer_grad,
                                     layout=layout, cu_seqlens=cu_seqlens)
    if key is not None:
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        _SEEN[key] = problem
    return problem, arrays, state


def _inputs(q, k, v, i, f, *, gate, normalize, eps, scale, chunk_size, initial_state, precision, config,
            keep_states, normalizer_grad, layout, cu_seqlens):
    check_layout(layout)
    arrays = _arrays.to_common_module(dict(q=q, k=k, v=v, i=i, f=f))
    kind = arrays.pop("_kind")
    q, k, v, i, f = (arrays[n] for n in "qkvif")
    tok, gates_doc = _SEQ_DOC[layout]
    _check_rank_and_dtype("q", q, 4, tok.format("DK"))
    if layout == "bhsd":
        B, NH, S, DK = q.shape
    else:
        B, S, NH, DK = q.shape
    seq = (B, NH, S) if layout == "bhsd" else (B, S, NH)
    _check_rank_and_dtype("k", k, 4, tok.format("DK"))
    _check_shape("k", k, seq + (DK,), tok.format("DK") + " to match q")
    _check_rank_and_dtype("v", v, 4, tok.format("DV"))
    DV = v.shape[3]
    _check_shape("v", v, seq + (DV,), tok.format("DV") + " to match q's B, NH, S")
    for name, g in (("i", i), ("f", f)):
        _check_rank_and_dtype(name, g, 3, gates_doc)
        _check_shape(name, g, seq, gates_doc + " to match q")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({_arrays.dtype_name(q.dtype)}), "
                            f"got {_arrays.dtype_name(x.dtype)}")
    eps, scale = check_options(gate=gate, normalize=normalize, eps=eps, scale=scale,
                               chunk_size=chunk_size, precision=precision, DK=DK)
    _check_bool("keep_states", keep_states)
    _check_bool("normalizer_grad", normalizer_grad)
    if normalizer_grad and normalize and (layout != "bhsd" or cu_seqlens is not None):
        got = f"layout={layout!r}" if layout != "bhsd" else "cu_seqlens"
        raise ValueError(f"normalizer_grad: True is supported with layout='bhsd' and no cu_seqlens, got {got}")
    if config is not None:
        if not isinstance(config, KernelConfig):
            raise TypeError(f"config: expected None or a tfla_cupy.KernelConfig, got {type(config).__name__}")
    NSEQ = B
    if cu_seqlens is not None:
        cu_seqlens, NSEQ = check_cu_seqlens(cu_seqlens, B=B, S=S, kind=kind)
    if chunk_size is None:
        chunk_size = default_chunk_size(S)
    problem = Problem(kind=kind, B=B, NH=NH, S=S, DK=DK, DV=DV, dtype=q.dtype, gate=gate,
                      normalize=bool(normalize), eps=eps, scale=scale, chunk_size=int(chunk_size),
                      has_initial_state=initial_state is not None, precision=precision,
                      config=config, keep_states=bool(keep_states),
                      normalizer_grad=bool(normalizer_grad) and bool(normalize), layout=layout,
                      cu_seqlens=cu_seqlens, NSEQ=NSEQ)
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
    # one state per sequence: B of them, or N with cu_seqlens (a pool: P, from C)
    B, NH, DK, DV = p.NSEQ, p.NH, p.DK, p.DV
    lead = "N" if p.varlen else "B"
    if pool:
        C = _arrays.to_module(f"{name}.C", C, p.kind)
        if C.ndim != 4 or C.shape[0] < 1:
            raise ValueError(f"{name}.C: expected a state pool of shape (P, NH, DK, DV) = (P, {NH}, {DK}, {DV}) "
                             f"with P >= 1, got {shape_str(C.shape)}")
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
            why = " (one state per cu_seqlens sequence)" if p.varlen else ""
            raise ValueError(f"{full}: expected shape {shape_str(shape)} {doc}{why}, got {shape_str(x.shape)}")
        if state_dtype is not None and x.dtype != state_dtype:
            raise TypeError(f"{full}: the GPU path keeps states in float32, got {_arrays.dtype_name(x.dtype)}")
        out[key] = x
    return MLSTMState(out["C"], out["n"], out["m"])


def backward_args(ctx, dh, d_state):
    """Validate the arguments of mlstm_bwd. Returns (dh, dC_last or None, dn_last or None, dm_last or
    None); dn_last and dm_last are only read with normalizer_grad=True (the custom backward holds n
    and m constant; dm_last with gate="exp", which has a stabilizer)."""
    if not isinstance(ctx, MLSTMContext):
        raise TypeError(f"ctx: expected the context returned by mlstm_fwd, got {type(ctx).__name__}")
    p = ctx.problem
    dh = _arrays.to_module("dh", dh, p.kind, ctx_kind=True)
    expected = p.seq_shape(p.DV)
    if dh.ndim != 4 or tuple(dh.shape) != expected:
        raise ValueError(f"dh: expected shape {shape_str(expected)} {_SEQ_DOC[p.layout][0].format('DV')} of h, "
                         f"got {shape_str(dh.shape)}")
    if not _arrays.is_floating(dh.dtype):
        raise TypeError(f"dh: expected a floating dtype (float16, bfloat16, float32 or float64), "
                        f"got {_arrays.dtype_name(dh.dtype)}")
    dC = dn = dm = None
    if d_state is not None:
        given = isinstance(d_state, (tuple, list)) and len(d_state) == 3
        use_n = p.normalizer_grad and given and d_state[1] is not None
        use_m = p.normalizer_grad and p.has_m and given and d_state[2] is not None
        st = state_arg("d_state", d_state, p, require_m=use_m, require_n=use_n)
        dC, dn, dm = st
    return dh, dC, dn, dm


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
        raise ValueError(f"state_indices: expected shape ({B},) (B,) to match q, got {shape_str(idx.shape)}")
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
