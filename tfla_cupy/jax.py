"""JAX functions over the CUDA kernels: they work under ``jax.jit``, ``jax.grad``, ``jax.vjp`` and
``jax.vmap``.

    import tfla_cupy.jax as tj
    h = tj.mlstm(q, k, v, i, f)                       # JAX arrays on a CUDA device
    loss, grads = jax.jit(jax.value_and_grad(lambda q: tj.mlstm(q, k, v, i, f).sum()))(q)
    hs = jax.vmap(lambda q: tj.mlstm(q, k, v, i, f))(qs)   # qs (E, B, NH, S, DK): one call, E·B rows

Each kernel stage runs inside ``jax.experimental.buffer_callback``: XLA hands the callback its
device buffers and its stream; the kernels read the inputs and write the outputs straight into
those buffers (zero-copy, no host round trip, ordered on XLA's stream). ``jax.custom_vjp`` maps
the gradient onto the manual backward (docs/math.md §6): the forward returns N, M and the last
state as residuals, so the backward never recomputes the forward outputs.

Under ``jax.vmap`` every pass folds the mapped axis into B (``jax.custom_batching.custom_vmap``
around each callback): one kernel launch for the whole batch, forward and backward. Every
operand of a pass leads with B, so the fold is a reshape of the leading axes — free for a mapped
axis at position 0; another position costs a transpose, and an operand that is not mapped is
broadcast (a copy). Nested ``vmap`` folds each level in turn (docs/adapters.md §3).

Scratch memory of the kernels (chunk states, their gradients, gate vectors: small next to the
inputs, docs/performance.md §2) comes from CuPy's memory pool, outside XLA's preallocation: if
XLA preallocates most of the GPU (its default), lower ``XLA_PYTHON_CLIENT_MEM_FRACTION``.

With ``normalizer_grad=True`` the augmented value column of docs/math.md §6.6 is added and
removed by XLA operations (a padded copy of v, and h sliced out of the augmented output); for
mLSTMexp the gradient through the stabilizers (the ε·e^M term) comes from a callback of its own
that runs the library's float64 scans on XLA's stream.
Not supported: ``keep_states``, ``layout="bshd"``, ``cu_seqlens``, forward-mode differentiation
(``jax.jvp``), CPU devices.

Needs JAX with CUDA (``pip install 'tfla-cupy[jax]'`` plus JAX's CUDA plugin) and CuPy.
Inputs must be on one CUDA device; gates and states are computed in float32 (the casts are JAX
operations, so their gradients flow back in the input dtypes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Optional, Tuple

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    from jax.custom_batching import custom_vmap
    from jax.experimental.buffer_callback import buffer_callback
except ImportError as exc:  # pragma: no cover - exercised where JAX is absent
    raise ImportError("tfla_cupy.jax needs JAX (with its CUDA plugin): pip install 'tfla-cupy[jax]' "
                      f"and a CUDA build of jax; the import failed with: {exc}") from exc


from . import _arrays, _gpu, _interop, _normgrad
from ._types import MLSTMState

__all__ = ["mlstm", "mlstm_step", "MLSTMState"]

_F32 = jnp.float32
_PAD = _interop.NORMGRAD_PAD   # the augmented value column of normalizer_grad (docs/math.md §6.6)


def _cupy():
    cp = _arrays.cupy_module()
    if cp is None:
        raise RuntimeError("tfla_cupy.jax needs CuPy for its kernels: pip install 'tfla-cupy[cuda12]' (or cuda13)")
    return cp


def _view(buf):
    """A CuPy view (zero-copy) of an XLA buffer; None stays None."""
    if buf is None:
        return None
    x = _cupy().from_dlpack(buf)
    if x.data.ptr % 16:
        raise RuntimeError("tfla_cupy.jax: XLA handed over a buffer that is not 16-byte aligned")
    return x


def _on_xla_stream(ctx, buf):
    """CuPy on XLA's stream and on the device of ``buf``; buffers are viewed inside it, so that
    DLPack's stream handshake sees one stream on both sides."""
    cp = _cupy()
    device = int(buf.__dlpack_device__()[1])
    stack = contextlib.ExitStack()
    stack.enter_context(cp.cuda.Device(device))
    stack.enter_context(_interop.cupy_stream(ctx.stream, device))
    return stack


# ------------------------------------------------------------------------------------------
# Batching: the mapped axis of jax.vmap folded into B
# ------------------------------------------------------------------------------------------


def folded_problem(p, size):
    """The Problem of ``size`` calls of p stacked along B (one sequence per batch row)."""
    B = size * p.B
    return dataclasses.replace(p, B=B, NSEQ=B)


def _fold(x, batched, size):
    """(size, B, ...) -> (size·B, ...); an operand that is not mapped is broadcast first."""
    if x is None:
        return None
    if not batched:
        x = jnp.broadcast_to(x, (size,) + x.shape)
    return x.reshape((size * x.shape[1],) + x.shape[2:])


def _unfold(y, size):
    return y.reshape((size, y.shape[0] // size) + y.shape[1:])


def _batched_over_b(call):
    """``call(p, *operands)`` (a pass: every operand and every output leads with B; None for an
    absent operand) with a batching rule: under ``jax.vmap`` the mapped axis (moved to the front by
    JAX) is folded into B, the pass runs once on the folded Problem and its outputs are unfolded."""

    @functools.wraps(call)
    def pass_(p, *operands):
        fn = custom_vmap(lambda *xs: call(p, *xs))

        @fn.def_vmap
        def rule(size, in_batched, *xs):
            out = pass_(folded_problem(p, size), *(_fold(x, b, size) for x, b in zip(xs, in_batched)))
            out = jax.tree_util.tree_map(lambda y: _unfold(y, size), out)
            return out, jax.tree_util.tree_map(lambda _: True, out)

        return fn(*operands)

    return pass_


# ------------------------------------------------------------------------------------------
# One buffer_callback per pass
# ------------------------------------------------------------------------------------------


def _sd(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


@_batched_over_b
def _fwd_call(p, q, k, v, i, f, C0, n0, m0):
    """The forward kernels: dict h, C_last and, where the variant has them, N, n_last, M, m_last."""
    lead = (p.B, p.NH)
    shapes = dict(h=_sd(lead + (p.S, p.DV), p.dtype), C_last=_sd(lead + (p.DK, p.DV), _F32))
    if p.has_n:
        shapes.update(N=_sd(lead + (p.S,), _F32), n_last=_sd(lead + (p.DK,), _F32))
    if p.has_m:
        shapes.update(M=_sd(lead + (p.S,), _F32), m_last=_sd(lead, _F32))

    def callback(ctx, out, q, k, v, i, f, C0, n0, m0):
        with _on_xla_stream(ctx, q):
            arrays = tuple(_view(x) for x in (q, k, v, i, f))
            state = None if C0 is None else MLSTMState(_view(C0), _view(n0), _view(m0))
            outs = {name: _view(b) for name, b in out.items()}
            _gpu.forward(p, arrays, state, out=outs, copy_saved=False)

    return buffer_callback(callback, shapes)(q, k, v, i, f, C0, n0, m0)


@_batched_over_b
def _bwd_call(p, q, k, v, i, f, C0, n0, m0, N, M, C_last, dh, dC_last):
    """The backward kernels: dict dq, dk, dv, di, df (float32) and dC0 with an initial state."""
    shapes = dict(dq=_sd(q.shape, q.dtype), dk=_sd(k.shape, k.dtype), dv=_sd(v.shape, v.dtype),
                  di=_sd(i.shape, _F32), df=_sd(f.shape, _F32))
    if p.has_initial_state:
        shapes["dC0"] = _sd(C0.shape, _F32)

    def callback(ctx, out, q, k, v, i, f, C0, n0, m0, N, M, C_last, dh, dC_last):
        with _on_xla_stream(ctx, q):
            arrays = tuple(_view(x) for x in (q, k, v, i, f))
            state = None if C0 is None else MLSTMState(_view(C0), _view(n0), _view(m0))
            outs = {name: _view(b) for name, b in out.items()}
            mctx = _gpu.context(p, arrays, state, _view(N), _view(M), _view(C_last))
            _gpu.backward(mctx, _view(dh), _view(dC_last), out=outs)

    return buffer_callback(callback, shapes)(q, k, v, i, f, C0, n0, m0, N, M, C_last, dh, dC_last)


@_batched_over_b
def _stabilizer_call(p, i, f, m0, dh_h, hN):
    """normalizer_grad's gradient through the stabilizers of mLSTMexp (docs/math.md §6.6): dict di,
    df (the additions to the gate gradients) and dm0 (the gradient of m_0), float32, from
    ``_normgrad.stabilizer_grads`` in float64 on XLA's stream. ``dh_h`` is dh·h per token, ``hN``
    is N + ε (float32, as the library's backward rounds it)."""
    shapes = dict(di=_sd(i.shape, _F32), df=_sd(f.shape, _F32), dm0=_sd(i.shape[:-1], _F32))

    def callback(ctx, out, i, f, m0, dh_h, hN):
        with _on_xla_stream(ctx, i):
            i, f, m0, dh_h, hN = (_view(x) for x in (i, f, m0, dh_h, hN))
            xp = np if isinstance(i, np.ndarray) else _cupy()
            m0 = xp.zeros(i.shape[:-1], np.float64) if m0 is None else m0
            e = -dh_h.astype(np.float64) * p.eps / hN.astype(np.float64)
            for name, x in zip(("di", "df", "dm0"), _normgrad.stabilizer_grads(xp, i, f, m0, e)):
                _view(out[name])[...] = x.astype(np.float32)

    return buffer_callback(callback, shapes)(i, f, m0, dh_h, hN)


# ------------------------------------------------------------------------------------------
# The differentiable core: q, k, v in their dtype; i, f and the states in float32
# ------------------------------------------------------------------------------------------


def _pad_last(x, first, pad):
    """[x, first, 0…] along the last axis."""
    col = jnp.zeros(x.shape[:-1] + (pad,), x.dtype).at[..., 0].set(first)
    return jnp.concatenate([x, col], axis=-1)


def _core_fwd(static, q, k, v, i, f, C0, n0, m0):
    p, with_state = static
    DV = p.DV
    if p.normalizer_grad:   # docs/math.md §6.6: v' = [v, 1, 0…], C0' = [C0, n0, 0…]
        inner = dataclasses.replace(p, DV=DV + _PAD, normalizer_grad=False)
        v_in = _pad_last(v, 1, _PAD)
        C0_in = None if C0 is None else _pad_last(C0, n0, _PAD)
    else:
        inner, v_in, C0_in = p, v, C0
    o = _fwd_call(inner, q, k, v_in, i, f, C0_in, n0, m0)
    h_in, C_in = o["h"], o["C_last"]
    N, M = o.get("N"), o.get("M")
    res = (q, k, v_in, i, f, C0_in, n0, m0, N, M, C_in)
    extra = None
    if p.normalizer_grad:
        h, C_last = h_in[..., :DV], C_in[..., :DV]
        sign = _normgrad.upper_branch_sign(jnp, h_in[..., DV], N, M, exact=False)
        extra = (h, sign)
    else:
        h, C_last = h_in, C_in
    outs = (h, (C_last, o.get("n_last"), o.get("m_last"))) if with_state else h
    return outs, (res, extra)


def _core_bwd(static, saved, cot):
    p, with_state = static
    res, extra = saved
    q, k, v_in, i, f, C0_in, n0, m0, N, M, C_in = res
    DV = p.DV
    if with_state:
        dh, (dC_last, dn_last, _) = cot
    else:
        dh, dC_last, dn_last = cot, None, None
    dh = dh.astype(p.dtype)
    if p.normalizer_grad:
        h, sign = extra
        dh_h = jnp.sum(dh.astype(_F32) * h.astype(_F32), axis=-1)             # dh·h
        dh = _pad_last(dh, (-dh_h * sign).astype(p.dtype), _PAD)              # dden·(N + ε)
        if dC_last is not None:
            dn = jnp.zeros(dC_last.shape[:-1], _F32) if dn_last is None else dn_last.astype(_F32)
            dC_last = _pad_last(dC_last.astype(_F32), dn, _PAD)
        inner = dataclasses.replace(p, DV=DV + _PAD, normalizer_grad=False)
    else:
        inner = p
    if dC_last is not None:
        dC_last = dC_last.astype(_F32)
    g = _bwd_call(inner, *res, dh, dC_last)
    dv = g["dv"][..., :DV] if p.normalizer_grad else g["dv"]
    di, df, stab = g["di"], g["df"], None
    if p.normalizer_grad and p.has_m:   # the ε·e^M term through the running maximum (docs/math.md §6.6)
        stab = _stabilizer_call(p, i, f, m0, dh_h, N + p.eps)
        di, df = di + stab["di"], df + stab["df"]
    dC0 = dn0 = dm0 = None
    if C0_in is not None:
        dC0 = g["dC0"][..., :DV] if p.normalizer_grad else g["dC0"]
        if n0 is not None:
            dn0 = g["dC0"][..., DV] if p.normalizer_grad else jnp.zeros_like(n0)
        if m0 is not None:   # the stabilizer is stop-gradient in the custom backward (docs/math.md §6.4)
            dm0 = jnp.zeros_like(m0) if stab is None else stab["dm0"]
    return g["dq"], g["dk"], dv, di, df, dC0, dn0, dm0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(static, q, k, v, i, f, C0, n0, m0):
    return _core_fwd(static, q, k, v, i, f, C0, n0, m0)[0]


_core.defvjp(_core_fwd, _core_bwd)


# ------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------


def _f32(x):
    return None if x is None else jnp.asarray(x).astype(_F32)


def _prepare_state(state, p, leading=None):
    if state is None:
        return None, None, None
    C, n, m = _interop.check_state("initial_state", tuple(state), p, leading=leading)
    return _f32(C), _f32(n), _f32(m)


def mlstm(q: Any, k: Any, v: Any, i: Any, f: Any, *, gate: str = "exp", normalize: bool = True,
          initial_state: Optional[Any] = None, return_state: bool = False, chunk_size: Optional[int] = None,
          eps: float = 1e-6, scale: Optional[float] = None, precision: str = "default",
          normalizer_grad: bool = False) -> Any:
    """:func:`tfla_cupy.mlstm` on JAX arrays (layout (B, NH, S, D)), differentiable.

    Returns h, or ``(h, MLSTMState(C, n, m))`` with ``return_state=True`` (float32 states; n / m
    None where the variant has none). Gradients are those of :func:`tfla_cupy.mlstm_bwd`: the
    custom backward, or with ``normalizer_grad=True`` the exact gradient through the normalizer
    (docs/math.md §6.6); through the returned state they include the §6.5 term, and the gradient
    of the initial m is zero. Options as in :func:`tfla_cupy.mlstm`.
    """
    _interop._validate._check_bool("return_state", return_state)
    q, k, v, i, f = (jnp.asarray(x) for x in (q, k, v, i, f))
    p = _interop.sequence_problem(q, k, v, i, f, has_state=initial_state is not None, gate=gate,
                                  normalize=normalize, eps=eps, scale=scale, chunk_size=chunk_size,
                                  precision=precision, normalizer_grad=normalizer_grad)
    C0, n0, m0 = _prepare_state(initial_state, p)
    out = _core((p, bool(return_state)), q, k, v, _f32(i), _f32(f), C0, n0, m0)
    if return_state:
        h, (C, n, m) = out
        return h, MLSTMState(C, n, m)
    return out


def mlstm_step(q: Any, k: Any, v: Any, i: Any, f: Any, state: Optional[Any] = None, *, gate: str = "exp",
               normalize: bool = True, eps: float = 1e-6, scale: Optional[float] = None) -> Tuple[Any, MLSTMState]:
    """One token (q, k (B, NH, DK), v (B, NH, DV), i, f (B, NH)): ``(h, new_state)``, differentiable.

    Evaluated, it runs the step kernel of :func:`tfla_cupy.mlstm_step`. Differentiated, value and
    gradient come from the sequence kernels on S = 1 (the same function up to rounding) and the
    custom backward.
    """
    q, k, v, i, f = (jnp.asarray(x) for x in (q, k, v, i, f))
    for name, x, rank in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("i", i, 2), ("f", f, 2)):
        if x.ndim != rank:
            raise ValueError(f"{name}: expected a {rank}-d array, got shape {tuple(x.shape)}")
    seq = [x[:, :, None] for x in (q, k, v, i, f)]
    p = _interop.sequence_problem(*seq, has_state=state is not None, gate=gate, normalize=normalize, eps=eps,
                                  scale=scale, chunk_size=None, precision="default")
    C0, n0, m0 = _prepare_state(state, p)
    h, (C, n, m) = _step(p, q, k, v, _f32(i), _f32(f), C0, n0, m0)
    return h, MLSTMState(C, n, m)


@_batched_over_b
def _step_call(p, q, k, v, i, f, C0, n0, m0):
    lead = (p.B, p.NH)
    shapes = dict(h=_sd(lead + (p.DV,), p.dtype), C=_sd(lead + (p.DK, p.DV), _F32))
    if p.has_n:
        shapes["n"] = _sd(lead + (p.DK,), _F32)
    if p.has_m:
        shapes["m"] = _sd(lead, _F32)
    step_problem = dataclasses.replace(p, S=1)

    def callback(ctx, out, q, k, v, i, f, C0, n0, m0):
        with _on_xla_stream(ctx, q):
            arrays = tuple(_view(x) for x in (q, k, v, i, f))
            state = None if C0 is None else MLSTMState(_view(C0), _view(n0), _view(m0))
            outs = {name: _view(b) for name, b in out.items()}
            new_state = MLSTMState(outs["C"], outs.get("n"), outs.get("m"))
            _gpu.step(step_problem, arrays, state, new_state, h_out=outs["h"])

    o = buffer_callback(callback, shapes)(q, k, v, i, f, C0, n0, m0)
    return o["h"], (o["C"], o.get("n"), o.get("m"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _step(p, q, k, v, i, f, C0, n0, m0):
    return _step_call(p, q, k, v, i, f, C0, n0, m0)


def _step_fwd(p, q, k, v, i, f, C0, n0, m0):
    out, saved = _core_fwd((p, True), q[:, :, None], k[:, :, None], v[:, :, None], i[:, :, None],
                           f[:, :, None], C0, n0, m0)
    h, st = out
    return (h[:, :, 0], st), saved


def _step_bwd(p, saved, cot):
    dh, st = cot
    g = _core_bwd((p, True), saved, (dh[:, :, None], st))
    dq, dk, dv, di, df = (x[:, :, 0] for x in g[:5])
    return (dq, dk, dv, di, df) + tuple(g[5:])


_step.defvjp(_step_fwd, _step_bwd)
