"""PyTorch functions over the CUDA kernels: differentiable with ``torch.autograd`` and traceable
by ``torch.compile`` (``fullgraph=True`` included).

    import tfla_cupy.torch as tt
    h = tt.mlstm(q, k, v, i, f)          # CUDA tensors, layout (B, NH, S, D)
    h.float().square().sum().backward()
    h = torch.compile(model, fullgraph=True)(x)   # tt.mlstm inside a compiled model

The passes are PyTorch custom operators (``torch.library.custom_op``): ``tfla_cupy::mlstm_fwd``,
``tfla_cupy::mlstm_bwd`` and ``tfla_cupy::mlstm_step``, each with a fake implementation (shapes
and dtypes only) for tracing; the forward's autograd formula (``register_autograd``) calls the
backward operator. Options cross the operator boundary as ints, floats, bools and strings; the
backward rebuilds its context from saved tensors (the inputs, and the forward's N, M and last
state, returned by the forward operator as extra outputs). See docs/adapters.md §1 and §2.

Tensors cross to CuPy and back through DLPack (zero-copy, outputs included) and the kernels run
on PyTorch's current CUDA stream, so they are ordered with the surrounding PyTorch work. The
autograd formula keeps the input tensors with ``save_for_backward``: editing an input in place
before the backward makes PyTorch raise its usual "modified by an inplace operation" error
instead of silently changing the gradients. Outputs live in CuPy's memory pool (owned by the
returned tensors), beside PyTorch's caching allocator.

CPU tensors run the float64 NumPy reference (results in the input dtype, states in float64).
PyTorch is not a dependency of tfla_cupy: ``pip install 'tfla-cupy[torch]'`` or bring your own.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Tuple

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised where PyTorch is absent
    raise ImportError("tfla_cupy.torch needs PyTorch: pip install 'tfla-cupy[torch]' (or a PyTorch build of "
                      f"your choice); the import failed with: {exc}") from exc

import numpy as np

from . import _arrays, _interop, _validate, api
from ._types import MLSTMState
from .config import KernelConfig

__all__ = ["mlstm", "mlstm_step", "MLSTMState"]

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------
# Crossing to CuPy / NumPy and back
# ------------------------------------------------------------------------------------------


def _on_stream(t):
    """CuPy on PyTorch's current stream of t's device (nothing for CPU tensors)."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    cp = _arrays.cupy_module()
    if cp is None:
        raise RuntimeError("tfla_cupy.torch: CUDA tensors need CuPy: pip install 'tfla-cupy[cuda12]' (or cuda13)")
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stack = contextlib.ExitStack()
    stack.enter_context(cp.cuda.Device(index))
    stack.enter_context(_interop.cupy_stream(torch.cuda.current_stream(index).cuda_stream, index))
    return stack


def _export(t):
    """A CuPy (CUDA) or NumPy (CPU) view of a tensor, zero-copy; None stays None."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cuda":
        return _arrays.cupy_module().from_dlpack(t)
    return t.numpy()


def _import(x):
    """A tensor viewing x (CuPy via DLPack, NumPy via from_numpy), zero-copy; None stays None."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.from_dlpack(x)


def _absent(like):
    """The stand-in for an output the variant does not have (operators return tensors only)."""
    return like.new_empty((0,), dtype=torch.float32)


def _state_dtype(t):
    """dtype of states, N and M: float32 on the GPU path, float64 on the NumPy path."""
    return torch.float32 if t.device.type == "cuda" else torch.float64


def _state_arg(C0, n0, m0):
    return None if C0 is None else MLSTMState(_export(C0), _export(n0), _export(m0))


# ------------------------------------------------------------------------------------------
# Options: simple types at the operator boundary
# ------------------------------------------------------------------------------------------

#: KernelConfig objects by the string that stands for them in an operator call (their repr, which
#: names every field: equal strings are equal configurations).
_CONFIGS: dict = {}


@torch.compiler.assume_constant_result
def _config_key(config):
    if config is None:
        return ""
    if not isinstance(config, KernelConfig):
        raise TypeError(f"config: expected None or a tfla_cupy.KernelConfig, got {type(config).__name__}")
    key = repr(config)
    _CONFIGS[key] = config
    return key


def _options(gate, normalize, chunk_size, eps, scale, precision, config, normalizer_grad):
    """The keyword options of :func:`tfla_cupy.mlstm` from the operators' simple-typed arguments."""
    return dict(gate=gate, normalize=normalize, chunk_size=chunk_size, eps=eps, scale=scale, precision=precision,
                config=_CONFIGS[config] if config else None, normalizer_grad=normalizer_grad)


def _simple_options(gate, normalize, chunk_size, eps, scale, precision, normalizer_grad):
    """Checked and converted to the operators' argument types (int, float, bool, str), so that a
    wrong option is the library's error, not the operator schema's."""
    _validate.check_options(gate=gate, normalize=normalize, eps=eps, scale=scale, chunk_size=chunk_size,
                            precision=precision, DK=1)
    _validate._check_bool("normalizer_grad", normalizer_grad)
    return (gate, bool(normalize), None if chunk_size is None else int(chunk_size), float(eps),
            None if scale is None else float(scale), precision, bool(normalizer_grad))


class _Spec:
    """Shape and NumPy dtype of a (fake) tensor, for the library's shape-only validation."""

    _DTYPES = {torch.float16: np.dtype(np.float16), torch.bfloat16: _arrays.BFLOAT16,
               torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}

    def __init__(self, t):
        self.shape = tuple(int(s) for s in t.shape)
        self.ndim = len(self.shape)
        self.dtype = self._DTYPES.get(t.dtype, np.dtype(object))


def _static(*tensors):
    """Whether every size is a plain int (not a symbolic size of a dynamic-shape trace)."""
    return all(isinstance(s, int) for t in tensors if t is not None for s in t.shape)


# ------------------------------------------------------------------------------------------
# tfla_cupy::mlstm_fwd
# ------------------------------------------------------------------------------------------

_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor i, Tensor f, Tensor? C0, Tensor? n0, Tensor? m0, str gate, "
               "bool normalize, int? chunk_size, float eps, float? scale, str precision, str config, "
               "bool normalizer_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("tfla_cupy::mlstm_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _mlstm_fwd(q, k, v, i, f, C0, n0, m0, gate, normalize, chunk_size, eps, scale, precision, config,
               normalizer_grad):
    """(h, C_last, n_last, m_last, N, M, C_inner, sign): the output, the last state, and what the
    backward needs beside the inputs — N and M, and with normalizer_grad the branch sign and (GPU)
    the last state of the augmented forward. An entry the call does not have is an empty tensor."""
    opts = _options(gate, normalize, chunk_size, eps, scale, precision, config, normalizer_grad)
    with _on_stream(q):
        h, last, ctx = api._forward(*(_export(x) for x in (q, k, v, i, f)), initial_state=_state_arg(C0, n0, m0),
                                    keep_states=False, copy_inputs=False, **opts)
        outs = (h, *last, *_interop.residuals(ctx))
        return tuple(_absent(q) if x is None else _import(x) for x in outs)


@_mlstm_fwd.register_fake
def _mlstm_fwd_fake(q, k, v, i, f, C0, n0, m0, gate, normalize, chunk_size, eps, scale, precision, config,
                    normalizer_grad):
    cuda = q.device.type == "cuda"
    if _static(q, k, v, i, f, C0, n0, m0):   # the errors of the real call, raised while tracing
        p = _interop.sequence_problem(*(_Spec(x) for x in (q, k, v, i, f)), has_state=C0 is not None, gate=gate,
                                      normalize=normalize, eps=eps, scale=scale, chunk_size=chunk_size,
                                      precision=precision, normalizer_grad=normalizer_grad,
                                      kind="cuda" if cuda else "numpy")
        if C0 is not None:
            _interop.check_state("initial_state", tuple(_Spec(x) if x is not None else None for x in (C0, n0, m0)),
                                 p)
    B, NH, S, DK = q.shape
    DV = v.shape[3]
    sd = _state_dtype(q)
    has_n, has_m = bool(normalize), _validate.GATE_SPECS[gate].stabilized
    exact = bool(normalizer_grad) and has_n

    def new(shape, dtype=sd, present=True):
        return q.new_empty(shape, dtype=dtype) if present else _absent(q)

    return (new((B, NH, S, DV), q.dtype), new((B, NH, DK, DV)), new((B, NH, DK), present=has_n),
            new((B, NH), present=has_m), new((B, NH, S), present=has_n), new((B, NH, S), present=has_m),
            new((B, NH, DK, DV + _interop.NORMGRAD_PAD), present=exact and cuda), new((B, NH, S), present=exact))


# ------------------------------------------------------------------------------------------
# tfla_cupy::mlstm_bwd
# ------------------------------------------------------------------------------------------

_BWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor i, Tensor f, Tensor? C0, Tensor? n0, Tensor? m0, Tensor? N, "
               "Tensor? M, Tensor C_last, Tensor? h, Tensor? sign, Tensor dh, Tensor? dC_last, Tensor? dn_last, "
               "str gate, bool normalize, int? chunk_size, float eps, float? scale, str precision, str config, "
               "bool normalizer_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("tfla_cupy::mlstm_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _mlstm_bwd(q, k, v, i, f, C0, n0, m0, N, M, C_last, h, sign, dh, dC_last, dn_last, gate, normalize, chunk_size,
               eps, scale, precision, config, normalizer_grad):
    """(dq, dk, dv, di, df, dC0, dn0, dm0) of :func:`tfla_cupy.mlstm_bwd` from a context rebuilt
    from the forward's inputs and its residual outputs; di, df are float32 on the GPU; dC0, dn0,
    dm0 are empty without an initial state (dn0, dm0 also where the variant has no n, m)."""
    opts = _options(gate, normalize, chunk_size, eps, scale, precision, config, normalizer_grad)
    with _on_stream(q):
        ctx = _interop.rebuild_context(*(_export(x) for x in (q, k, v, i, f)), _state_arg(C0, n0, m0),
                                       *(_export(x) for x in (N, M, C_last, h, sign)), **opts)
        d_state = None if dC_last is None else (_export(dC_last), _export(dn_last), None)
        g = api.mlstm_bwd(ctx, _export(dh), d_state)
        d0 = g.d_initial_state or MLSTMState(None, None, None)
        outs = (*g[:5], *d0)
        return tuple(_absent(q) if x is None else _import(x) for x in outs)


@_mlstm_bwd.register_fake
def _mlstm_bwd_fake(q, k, v, i, f, C0, n0, m0, N, M, C_last, h, sign, dh, dC_last, dn_last, gate, normalize,
                    chunk_size, eps, scale, precision, config, normalizer_grad):
    sd = _state_dtype(q)
    gd = (lambda g: torch.float32) if q.device.type == "cuda" else (lambda g: g.dtype)
    dC0 = _absent(q) if C0 is None else q.new_empty(C0.shape, dtype=sd)
    dn0 = _absent(q) if C0 is None or n0 is None or not normalize else q.new_empty(n0.shape, dtype=sd)
    has_m = _validate.GATE_SPECS[gate].stabilized
    dm0 = _absent(q) if C0 is None or m0 is None or not has_m else q.new_empty(m0.shape, dtype=sd)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            q.new_empty(i.shape, dtype=gd(i)), q.new_empty(f.shape, dtype=gd(f)), dC0, dn0, dm0)


# ------------------------------------------------------------------------------------------
# The autograd formula of mlstm_fwd
# ------------------------------------------------------------------------------------------

_OPTION_NAMES = ("gate", "normalize", "chunk_size", "eps", "scale", "precision", "config", "normalizer_grad")


def _setup_context(ctx, inputs, output):
    q, k, v, i, f, C0, n0, m0 = inputs[:8]
    opts = dict(zip(_OPTION_NAMES, inputs[8:]))
    h, C_last, n_last, m_last, N, M, C_inner, sign = output
    p_has_n, p_has_m = opts["normalize"], _validate.GATE_SPECS[opts["gate"]].stabilized
    exact = opts["normalizer_grad"] and p_has_n
    ctx.opts = opts
    ctx.present = (p_has_n, p_has_m, exact, q.device.type == "cuda")
    ctx.meta = (tuple(h.shape), h.dtype, tuple(C_last.shape), C_last.dtype)
    # the inputs through save_for_backward: PyTorch's in-place check
    ctx.save_for_backward(q, k, v, i, f, C0, n0, m0, N if p_has_n else None, M if p_has_m else None,
                          C_inner if exact and q.device.type == "cuda" else C_last,
                          h if exact else None, sign if exact else None)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(m_last, N, M, C_inner, sign)


def _backward(ctx, dh, dC_last, dn_last, *_non_differentiable):
    q, k, v, i, f, C0, n0, m0, N, M, C_res, h, sign = ctx.saved_tensors   # raises if an input was edited in place
    has_n, has_m, exact, cuda = ctx.present
    h_shape, h_dtype, C_shape, C_dtype = ctx.meta
    if dh is None:
        dh = q.new_zeros(h_shape, dtype=h_dtype)
    if not exact:
        dn_last = None   # the custom backward holds n constant (docs/math.md §6.4)
    if dC_last is None and dn_last is not None:
        dC_last = q.new_zeros(C_shape, dtype=C_dtype)
    dq, dk, dv, di, df, dC0, dn0, dm0 = torch.ops.tfla_cupy.mlstm_bwd(
        q, k, v, i, f, C0, n0, m0, N, M, C_res, h, sign, dh.contiguous(),
        None if dC_last is None else dC_last.contiguous(), None if dn_last is None else dn_last.contiguous(),
        *ctx.opts.values())
    dC0 = None if C0 is None else dC0.to(C0.dtype)
    dn0 = None if n0 is None or not has_n else dn0.to(n0.dtype)
    # the initial m has a gradient with normalizer_grad (the ε·e^M term, docs/math.md §6.6); none otherwise
    dm0 = dm0.to(m0.dtype) if exact and m0 is not None and has_m else None
    return (dq, dk, dv, di.to(i.dtype), df.to(f.dtype), dC0, dn0, dm0) + (None,) * len(_OPTION_NAMES)


_mlstm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# tfla_cupy::mlstm_step (inference: no autograd formula)
# ------------------------------------------------------------------------------------------

_STEP_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor i, Tensor f, Tensor? C0, Tensor? n0, Tensor? m0, str gate, "
                "bool normalize, float eps, float? scale) -> (Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("tfla_cupy::mlstm_step", mutates_args=(), schema=_STEP_SCHEMA)
def _mlstm_step(q, k, v, i, f, C0, n0, m0, gate, normalize, eps, scale):
    """(h, C, n, m) of :func:`tfla_cupy.mlstm_step`; n, m empty where the variant has none."""
    with _on_stream(q):
        st = None if C0 is None else (_export(C0), _export(n0), _export(m0))
        h, new = api.mlstm_step(*(_export(x) for x in (q, k, v, i, f)), st, gate=gate, normalize=normalize,
                                eps=eps, scale=scale)
        return tuple(_absent(q) if x is None else _import(x) for x in (h, *new))


@_mlstm_step.register_fake
def _mlstm_step_fake(q, k, v, i, f, C0, n0, m0, gate, normalize, eps, scale):
    B, NH, DK = q.shape
    DV = v.shape[2]
    sd = _state_dtype(q)
    has_m = _validate.GATE_SPECS[gate].stabilized
    return (q.new_empty((B, NH, DV)), q.new_empty((B, NH, DK, DV), dtype=sd),
            q.new_empty((B, NH, DK), dtype=sd) if normalize else _absent(q),
            q.new_empty((B, NH), dtype=sd) if has_m else _absent(q))


# ------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------


def _initial(state, q, gate, normalize):
    """(C0, n0, m0) of an initial state: float32 on the GPU (a PyTorch cast, so gradients flow
    back through it), entries the variant does not read as None."""
    if state is None:
        return None, None, None
    if not (isinstance(state, (tuple, list)) and len(state) == 3):
        raise TypeError("initial_state: expected an MLSTMState(C, n, m) or a (C, n, m) tuple, "
                        f"got {type(state).__name__}")
    C0, n0, m0 = state
    if q.device.type == "cuda":
        C0, n0, m0 = (None if t is None else t.float() for t in (C0, n0, m0))
    return C0, (n0 if normalize else None), (m0 if gate == "exp" else None)


def mlstm(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", i: "torch.Tensor", f: "torch.Tensor", *,
          gate: str = "exp", normalize: bool = True, initial_state: Optional[Any] = None,
          return_state: bool = False, chunk_size: Optional[int] = None, eps: float = 1e-6,
          scale: Optional[float] = None, precision: str = "default", config: Any = None,
          normalizer_grad: bool = False) -> Any:
    """:func:`tfla_cupy.mlstm` on tensors, differentiable through ``torch.autograd`` and traceable
    by ``torch.compile``.

    Returns h, or ``(h, MLSTMState(C, n, m))`` with ``return_state=True`` (float32 states on the
    GPU, float64 on the CPU; n / m None where the variant has none; m carries no gradient).
    Gradients are those of :func:`tfla_cupy.mlstm_bwd`: the custom backward of docs/math.md §6,
    or the exact gradient through the normalizer with ``normalizer_grad=True`` (§6.6). Initial
    states are cast to float32 on the GPU (a PyTorch operation: the gradient flows back through
    the cast). The initial m has no gradient (None), except with ``normalizer_grad=True``, where
    it is the O(ε) gradient through the stabilizer of §6.6.
    """
    _validate._check_bool("return_state", return_state)
    for name, x in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    gate_, normalize_, chunk_, eps_, scale_, precision_, exact = _simple_options(
        gate, normalize, chunk_size, eps, scale, precision, normalizer_grad)
    C0, n0, m0 = _initial(initial_state, q, gate_, normalize_)
    h, C, n, m, *_ = torch.ops.tfla_cupy.mlstm_fwd(q, k, v, i, f, C0, n0, m0, gate_, normalize_, chunk_, eps_,
                                                   scale_, precision_, _config_key(config), exact)
    if not return_state:
        return h
    return h, MLSTMState(C, n if normalize_ else None, m if gate_ == "exp" else None)


def mlstm_step(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", i: "torch.Tensor", f: "torch.Tensor",
               state: Optional[Any] = None, *, gate: str = "exp", normalize: bool = True, eps: float = 1e-6,
               scale: Optional[float] = None) -> Tuple["torch.Tensor", MLSTMState]:
    """:func:`tfla_cupy.mlstm_step` on tensors (inference: the outputs carry no gradient);
    traceable by ``torch.compile``."""
    for name, x in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    gate_, normalize_, _, eps_, scale_, _, _ = _simple_options(gate, normalize, None, eps, scale, "default", False)
    C0 = n0 = m0 = None
    if state is not None:
        if not (isinstance(state, (tuple, list)) and len(state) == 3):
            raise TypeError(f"state: expected an MLSTMState(C, n, m) or a (C, n, m) tuple, got {type(state).__name__}")
        C0, n0, m0 = (None if t is None else (t.float() if q.device.type == "cuda" else t).detach() for t in state)
    h, C, n, m = torch.ops.tfla_cupy.mlstm_step(q.detach(), k.detach(), v.detach(), i.detach(), f.detach(), C0, n0,
                                                m0, gate_, normalize_, eps_, scale_)
    return h, MLSTMState(C, n if normalize_ else None, m if gate_ == "exp" else None)
