"""PyTorch functions over the CUDA kernels, differentiable with ``torch.autograd``.

    import tfla_cupy.torch as tt
    h = tt.mlstm(q, k, v, i, f)          # CUDA tensors, layout (B, NH, S, D)
    h.float().square().sum().backward()

Tensors cross to CuPy and back through DLPack (zero-copy, outputs included) and the kernels run
on PyTorch's current CUDA stream, so they are ordered with the surrounding PyTorch work. The
backward context keeps views of the input tensors, saved with ``save_for_backward``: editing an
input in place before the backward makes PyTorch raise its usual "modified by an inplace
operation" error instead of silently changing the gradients. Outputs live in CuPy's memory pool
(owned by the returned tensors), beside PyTorch's caching allocator.

CPU tensors run the float64 NumPy reference (results in the input dtype). PyTorch is not a
dependency of tfla_cupy: ``pip install 'tfla-cupy[torch]'`` or bring your own.
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

from . import _interop, api
from ._types import MLSTMState

__all__ = ["mlstm", "mlstm_step", "MLSTMState"]


def _on_stream(t):
    """CuPy on PyTorch's current stream of t's device (nothing for CPU tensors)."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    from . import _arrays
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
        from . import _arrays
        return _arrays.cupy_module().from_dlpack(t)
    return t.numpy()


def _import(x):
    """A tensor viewing x (CuPy via DLPack, NumPy via from_numpy), zero-copy; None stays None."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.from_dlpack(x)


class _MLSTMFunction(torch.autograd.Function):
    """(q, k, v, i, f, C0, n0, m0) -> (h, C_last[, n_last][, m_last]); m_last is not differentiable."""

    @staticmethod
    def forward(ctx, opts, with_state, q, k, v, i, f, C0, n0, m0):
        with _on_stream(q):
            state = None if C0 is None else MLSTMState(_export(C0), _export(n0), _export(m0))
            h, last, mctx = api._forward(*(_export(x) for x in (q, k, v, i, f)), initial_state=state,
                                         keep_states=False, copy_inputs=False, **opts)
            outs = [_import(h)]
            if with_state:
                outs += [_import(x) for x in last if x is not None]
        ctx.mctx, ctx.with_state, ctx.has = mctx, with_state, (n0 is not None, m0 is not None)
        ctx.state_layout = tuple(x is not None for x in last)
        ctx.save_for_backward(q, k, v, i, f, C0, n0, m0)   # PyTorch's in-place check
        ctx.set_materialize_grads(False)
        if with_state and last.m is not None:
            ctx.mark_non_differentiable(outs[-1])
        return tuple(outs)

    @staticmethod
    def backward(ctx, dh, *d_last):
        q, k, v, i, f, C0, n0, m0 = ctx.saved_tensors   # raises if an input was edited in place
        p = ctx.mctx.problem
        if dh is None:
            dh = torch.zeros(p.B, p.NH, p.S, p.DV, dtype=q.dtype, device=q.device)
        dC = dn = None
        if ctx.with_state:
            it = iter(d_last)
            dC, dn, _ = (next(it) if present else None for present in ctx.state_layout)
            if dC is None and dn is not None:
                dC = torch.zeros(p.B, p.NH, p.DK, p.DV, dtype=dn.dtype, device=q.device)
        with _on_stream(q):
            d_state = None if dC is None else (_export(dC.contiguous()),
                                               None if dn is None else _export(dn.contiguous()), None)
            g = api.mlstm_bwd(ctx.mctx, _export(dh.contiguous()), d_state)
            grads = [_import(x) for x in g[:5]]
            dC0 = dn0 = None
            if g.d_initial_state is not None:
                dC0 = _import(g.d_initial_state.C)
                if ctx.has[0] and g.d_initial_state.n is not None:
                    dn0 = _import(g.d_initial_state.n)
        return (None, None, *grads, dC0, dn0, None)


def mlstm(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", i: "torch.Tensor", f: "torch.Tensor", *,
          gate: str = "exp", normalize: bool = True, initial_state: Optional[Any] = None,
          return_state: bool = False, chunk_size: Optional[int] = None, eps: float = 1e-6,
          scale: Optional[float] = None, precision: str = "default", config: Any = None,
          normalizer_grad: bool = False) -> Any:
    """:func:`tfla_cupy.mlstm` on tensors, differentiable through ``torch.autograd``.

    Returns h, or ``(h, MLSTMState(C, n, m))`` with ``return_state=True`` (float32 states on the
    GPU; n / m None where the variant has none; m carries no gradient). Gradients are those of
    :func:`tfla_cupy.mlstm_bwd`: the custom backward of docs/math.md §6, or the exact gradient
    through the normalizer with ``normalizer_grad=True`` (§6.6). States are cast to float32 on
    the GPU (a PyTorch operation: the gradient flows back through the cast).
    """
    api._validate._check_bool("return_state", return_state)
    for name, x in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    C0 = n0 = m0 = None
    if initial_state is not None:
        if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 3):
            raise TypeError("initial_state: expected an MLSTMState(C, n, m) or a (C, n, m) tuple, "
                            f"got {type(initial_state).__name__}")
        cast = (lambda t: t.float()) if q.device.type == "cuda" else (lambda t: t)
        C0, n0, m0 = (None if t is None else cast(t) for t in initial_state)
        if gate != "exp":
            m0 = None
        if not normalize:
            n0 = None
    opts = dict(gate=gate, normalize=normalize, chunk_size=chunk_size, eps=eps, scale=scale, precision=precision,
                config=config, normalizer_grad=normalizer_grad)
    out = _MLSTMFunction.apply(opts, bool(return_state), q, k, v, i, f, C0, n0, m0)
    out = out if isinstance(out, tuple) else (out,)
    if not return_state:
        return out[0]
    h, rest = out[0], list(out[1:])
    C = rest.pop(0)
    n = rest.pop(0) if (normalize and rest) else None
    m = rest.pop(0) if (gate == "exp" and rest) else None
    return h, MLSTMState(C, n, m)


def mlstm_step(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", i: "torch.Tensor", f: "torch.Tensor",
               state: Optional[Any] = None, *, gate: str = "exp", normalize: bool = True, eps: float = 1e-6,
               scale: Optional[float] = None) -> Tuple["torch.Tensor", MLSTMState]:
    """:func:`tfla_cupy.mlstm_step` on tensors (inference: the outputs carry no gradient)."""
    with _on_stream(q):
        st = None if state is None else tuple(None if t is None else _export(t.float() if q.is_cuda else t)
                                              for t in state)
        h, new = api.mlstm_step(*(_export(x) for x in (q, k, v, i, f)), st, gate=gate, normalize=normalize,
                                eps=eps, scale=scale)
        return _import(h), MLSTMState(*(_import(x) for x in new))
