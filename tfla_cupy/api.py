"""The public functions. Layout (B, NH, S, D) or (B, S, NH, D); packed variable-length
sequences through ``cu_seqlens``; NumPy-like, keyword-only options.

NumPy inputs run the float64 reference (results in the input dtype); CuPy inputs, and any
CUDA DLPack producer (PyTorch, JAX: zero-copy), run the CUDA TFLA kernels and return CuPy
arrays. Inputs are validated once, here.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

from . import _arrays, _gpu, _normgrad, _validate
from ._backend import backend
from ._step_plan import StepPlan
from ._types import MLSTMContext, MLSTMGrads, MLSTMState

Array = Any   # a NumPy or CuPy array, or a DLPack producer (PyTorch, JAX, ...)
StateLike = Union[MLSTMState, Tuple[Any, Any, Any]]

__all__ = ["mlstm", "mlstm_fwd", "mlstm_bwd", "mlstm_vjp", "mlstm_step", "mlstm_step_plan",
           "MLSTMState", "MLSTMGrads", "MLSTMContext"]

_COMMON_DOC = """
    Parameters
    ----------
    q, k : array (B, NH, S, DK), or (B, S, NH, DK) with layout="bshd"
        Queries and keys; one floating dtype (float16, bfloat16, float32; float64 on NumPy).
    v : array (B, NH, S, DV), or (B, S, NH, DV)
        Values, dtype of q.
    i, f : array (B, NH, S), or (B, S, NH)
        Input- and forget-gate pre-activations ĩ, f̃ (any floating dtype).
    layout : {"bhsd", "bshd"}
        Axis order of the sequence tensors; h and the gradients come back in the same layout
        (states keep theirs). On the GPU path neither layout copies q, k, v: strided views are
        read in place when the feature dimension is contiguous and every other stride and the
        data pointer are 16-byte aligned.
    cu_seqlens : 1-d int32 / int64 array (NumPy or CuPy), optional
        Packed variable-length sequences (B = 1): N + 1 offsets, cu_seqlens[0] == 0, strictly
        increasing, cu_seqlens[-1] == S; sequence j is tokens cu_seqlens[j]:cu_seqlens[j+1].
        No state crosses a boundary; states (initial, last, their gradients) have N in place
        of B. A CuPy cu_seqlens is not read by the host (no synchronisation, graph-capturable),
        so only its shape and dtype are checked there.
    gate : {"exp", "sig"}
        "exp" is mLSTMexp (input gate exp(ĩ), max-stabilized); "sig" is mLSTMsig
        (input gate σ(ĩ), no stabilizer).
    normalize : bool
        Divide by the normalizer (default). False is only defined for gate="sig".
    initial_state : MLSTMState or (C, n, m), optional
        C (B, NH, DK, DV), n (B, NH, DK), m (B, NH) (N for B with cu_seqlens); float32 on
        the GPU path. Absent means
        zeros (with m_0 = 0). m may be None for gate="sig", n for normalize=False.
    chunk_size : int, optional
        Chunk length L, a power of two in [16, 1024]; None picks one from S. The result does
        not depend on it beyond rounding and the ε·e^M term of the −10 row-max floor.
    eps : float
        ε >= 0 of h = num / (max(|den|, exp(−M)) + ε); 0 is valid (the denominator stays >= exp(−M)).
    scale : float, optional
        Query scale; None means 1/sqrt(DK). It multiplies q only: the states accumulate
        unscaled keys.
    precision : {"default", "tf32"}
        GPU float32 inputs compute in true fp32 by default; "tf32" opts into TF32 tensor-core
        products. Ignored for float16/bfloat16 (tensor cores with fp32 accumulation) and on
        the NumPy path.
    config : KernelConfig, optional
        GPU launch parameters; None uses :func:`tfla_cupy.config.pick_config`.
    out_state : MLSTMState, optional
        Buffers of the last state's shapes (float32, C-contiguous on the GPU) that receive it
        (returned as the state), e.g. a decode state or views of preallocated memory; they must
        not overlap ``initial_state``.
    normalizer_grad : bool
        False (default): the custom backward of docs/math.md §6, which holds the normalizer N
        constant (exact when a per-head norm follows the cell). True: the exact gradient of h as
        computed, through |n·q| where it is the max (§6.6, an augmented value column: the
        forward runs with DV + 1 columns on NumPy, DV + 8 on the GPU, so DV <= 1016 there);
        ``d_initial_state.n`` is then a real gradient and an incoming ``d_state.n`` is used.
        Ignored with normalize=False (no normalizer).
"""


def _forward(q, k, v, i, f, *, gate, normalize, initial_state, chunk_size, eps, scale, precision, config,
             keep_states, normalizer_grad, copy_inputs, out_state=None, layout="bhsd", cu_seqlens=None):
    problem, arrays, state = _validate.inputs(
        q, k, v, i, f, gate=gate, normalize=normalize, eps=eps, scale=scale, chunk_size=chunk_size,
        initial_state=initial_state, precision=precision, config=config, keep_states=keep_states,
        normalizer_grad=normalizer_grad, layout=layout, cu_seqlens=cu_seqlens)
    if copy_inputs is not None and not isinstance(copy_inputs, bool):
        raise TypeError(f"copy_inputs: expected None or a bool, got {type(copy_inputs).__name__}")
    path = backend(problem.kind)
    # None: private copies on the NumPy path (host memory, cheap); none on the GPU path
    kw = dict(copy_saved=problem.kind == "numpy" if copy_inputs is None else copy_inputs)
    if out_state is not None:
        if problem.normalizer_grad:
            raise ValueError("out_state: not supported with normalizer_grad=True (the last state comes from an "
                             "augmented forward); got both")
        out = _validate.forward_out_state(out_state, problem)
        kw["out"] = dict(C_last=out.C, n_last=out.n, m_last=out.m)
    if problem.normalizer_grad:
        return _normgrad.forward(problem, arrays, state, path, **kw)
    return path.forward(problem, arrays, state, **kw)


def mlstm_fwd(q: Array, k: Array, v: Array, i: Array, f: Array, *, gate: str = "exp", normalize: bool = True,
              initial_state: Optional[StateLike] = None, chunk_size: Optional[int] = None, eps: float = 1e-6,
              scale: Optional[float] = None, precision: str = "default", config: Any = None,
              keep_states: bool = False, normalizer_grad: bool = False,
              copy_inputs: Optional[bool] = None, out_state: Optional[StateLike] = None, layout: str = "bhsd",
              cu_seqlens: Any = None) -> Tuple[Array, MLSTMState, MLSTMContext]:
    """Forward pass that also returns what the backward needs.

    Returns ``(h, state, ctx)``: h (B, NH, S, DV) (or (B, S, NH, DV)) in the dtype of q, the last state
    (:class:`MLSTMState`), and an opaque context for :func:`mlstm_bwd`.
    ``keep_states=True`` (GPU path) keeps the chunk-boundary states for the backward instead
    of recomputing them: faster backward, (NC·DK·DV) more memory per head.
    ``out_state``: buffers (C (B, NH, DK, DV), n, m; float32 and C-contiguous on the GPU) that
    receive the last state, e.g. the decode state of :func:`mlstm_step`; they must not overlap
    ``initial_state`` (the backward reads it), and the backward reads C from them too: update
    them (decode in place) only after :func:`mlstm_bwd`.

    ``copy_inputs``: whether the context holds private copies of the inputs that the call did
    not already convert (a float64 NumPy input; a GPU input the kernels read in place: a kernel
    dtype, contiguous or a strided view with a contiguous, aligned feature dimension; float32
    gates and states). With copies, editing an input in place after the forward does not change
    the gradients. ``None`` (default): copies on the NumPy path (host memory), none on the GPU
    path, where a copy would cost one device copy of q, k, v, i, f and the initial state
    (B·NH·S·(2·DK + DV) elements of q's dtype plus the float32 rest: +1 GB at the benchmark's
    main shape) — there the inputs must stay unchanged until the last :func:`mlstm_bwd` of this
    context, as with a framework's autograd. ``True`` copies on both paths, ``False`` on
    neither. The JAX and PyTorch adapters rely on immutable arrays and on PyTorch's in-place
    check instead. :func:`mlstm` (no backward) never copies.
    """
    return _forward(q, k, v, i, f, gate=gate, normalize=normalize, initial_state=initial_state,
                    chunk_size=chunk_size, eps=eps, scale=scale, precision=precision, config=config,
                    keep_states=keep_states, normalizer_grad=normalizer_grad, copy_inputs=copy_inputs,
                    out_state=out_state, layout=layout, cu_seqlens=cu_seqlens)


mlstm_fwd.__doc__ += _COMMON_DOC


def mlstm(q: Array, k: Array, v: Array, i: Array, f: Array, *, gate: str = "exp", normalize: bool = True,
          initial_state: Optional[StateLike] = None, return_state: bool = False, chunk_size: Optional[int] = None,
          eps: float = 1e-6, scale: Optional[float] = None, precision: str = "default",
          config: Any = None, normalizer_grad: bool = False,
          out_state: Optional[StateLike] = None, layout: str = "bhsd",
          cu_seqlens: Any = None) -> Union[Array, Tuple[Array, MLSTMState]]:
    """The mLSTM over a sequence.

    Returns h (B, NH, S, DV) (or (B, S, NH, DV) with layout="bshd") in the dtype of q, or
    ``(h, state)`` with ``return_state=True``.

    Notes
    -----
    Per (batch, head), with λ_t = logσ(f̃_t), ι_t = ĩ_t (exp) or logσ(ĩ_t) (sig):

        m_t = max(λ_t + m_{t−1}, ι_t)            (exp; m ≡ 0 for sig)
        C_t = e^{λ_t + m_{t−1} − m_t} C_{t−1} + e^{ι_t − m_t} k_t v_tᵀ
        n_t = e^{λ_t + m_{t−1} − m_t} n_{t−1} + e^{ι_t − m_t} k_t
        h_t = C_tᵀ (s q_t) / (max(|n_tᵀ (s q_t)|, e^{−m_t}) + ε)

    computed chunkwise (TFLA, docs/math.md §4). NaN or Inf in the inputs propagate to the
    outputs of the affected heads; they never crash or hang.

    Examples
    --------
    >>> import numpy as np, tfla_cupy
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 1, 2, 10, 16))
    >>> v = rng.standard_normal((1, 2, 10, 32))
    >>> i, f = rng.standard_normal((2, 1, 2, 10))
    >>> h, state = tfla_cupy.mlstm(q, k, v, i, f, return_state=True)
    >>> h.shape, state.C.shape
    ((1, 2, 10, 32), (1, 2, 16, 32))
    """
    _validate._check_bool("return_state", return_state)
    _validate._check_bool("normalizer_grad", normalizer_grad)   # forward values do not depend on it
    h, state, _ = _forward(q, k, v, i, f, gate=gate, normalize=normalize, initial_state=initial_state,
                           chunk_size=chunk_size, eps=eps, scale=scale, precision=precision, config=config,
                           keep_states=False, normalizer_grad=False, copy_inputs=False,
                           out_state=out_state, layout=layout, cu_seqlens=cu_seqlens)
    return (h, state) if return_state else h


mlstm.__doc__ += _COMMON_DOC


def mlstm_bwd(ctx: MLSTMContext, dh: Array, d_state: Optional[StateLike] = None) -> MLSTMGrads:
    """Manual backward of :func:`mlstm_fwd` (docs/math.md §6).

    Parameters
    ----------
    ctx : MLSTMContext
        From :func:`mlstm_fwd`; it may be used more than once.
    dh : array (B, NH, S, DV), or (B, S, NH, DV) for a layout="bshd" forward
        Gradient of the loss with respect to h (same array module as the forward).
    d_state : MLSTMState or (dC, dn, dm), optional
        Gradient with respect to the returned last state. By default only dC (B, NH, DK, DV)
        (N for B with cu_seqlens) is used: the custom backward treats the normalizer and the stabilizers as constants,
        so the gradients of n and m do not propagate (they are zero when d_state comes from
        the ``d_initial_state`` of a later call's backward). With ``normalizer_grad=True`` in
        the forward dn (B, NH, DK) and, for gate="exp", dm (B, NH) are used too: dm is the gradient of
        m with the unstabilized state e^{m}·(C, n) held fixed, the convention of the returned
        ``d_initial_state.m`` (docs/math.md §6.6), so chained calls compose. dn and dm may be None.

    Returns
    -------
    MLSTMGrads(dq, dk, dv, di, df, d_initial_state)
        Token gradients in the dtypes and the layout of q, k, v, i, f. The gate gradients include the
        ⟨dC_last, C_last⟩ term of §6.5, so gradients are exact under state passing.
    """
    dh, dC_last, dn_last, dm_last = _validate.backward_args(ctx, dh, d_state)
    if ctx.problem.normalizer_grad:
        return _normgrad.backward(ctx, dh, dC_last, dn_last, backend(ctx.kind), dm_last=dm_last)
    return backend(ctx.kind).backward(ctx, dh, dC_last)


def mlstm_vjp(q: Array, k: Array, v: Array, i: Array, f: Array, *, gate: str = "exp", normalize: bool = True,
              initial_state: Optional[StateLike] = None, return_state: bool = False,
              chunk_size: Optional[int] = None, eps: float = 1e-6, scale: Optional[float] = None,
              precision: str = "default", config: Any = None, keep_states: bool = False,
              normalizer_grad: bool = False, copy_inputs: Optional[bool] = None,
              out_state: Optional[StateLike] = None, layout: str = "bhsd",
              cu_seqlens: Any = None) -> Tuple[Any, Callable[..., MLSTMGrads]]:
    """Forward pass returning ``(h, vjp_fn)`` with ``vjp_fn(dh, d_state=None) -> MLSTMGrads``.

    The options are those of :func:`mlstm_fwd`; with ``return_state=True`` the first element is
    ``(h, state)``. ``vjp_fn`` may be called more than once.
    """
    _validate._check_bool("return_state", return_state)
    h, state, ctx = mlstm_fwd(q, k, v, i, f, gate=gate, normalize=normalize, initial_state=initial_state,
                              chunk_size=chunk_size, eps=eps, scale=scale, precision=precision, config=config,
                              keep_states=keep_states, normalizer_grad=normalizer_grad, copy_inputs=copy_inputs,
                              out_state=out_state, layout=layout, cu_seqlens=cu_seqlens)

    def vjp_fn(dh: Array, d_state: Optional[StateLike] = None) -> MLSTMGrads:
        return mlstm_bwd(ctx, dh, d_state)

    return ((h, state) if return_state else h), vjp_fn


def mlstm_step(q: Array, k: Array, v: Array, i: Array, f: Array, state: Optional[StateLike] = None, *,
               gate: str = "exp", normalize: bool = True, eps: float = 1e-6,
               scale: Optional[float] = None, out_state: Optional[StateLike] = None,
               state_indices: Any = None) -> Tuple[Array, MLSTMState]:
    """One token of the recurrence (docs/math.md §2.1): ``(h, new_state)``.

    Parameters
    ----------
    q, k : array (B, NH, DK)
    v : array (B, NH, DV)
        One token per batch row; one floating dtype.
    i, f : array (B, NH)
        Gate pre-activations.
    state : MLSTMState or (C, n, m), optional
        The state before the token (None: zeros). float32 on the GPU path. The state returned
        by ``mlstm(..., return_state=True)`` (a prefill) feeds in directly. With
        ``state_indices`` it is a state pool C (P, NH, DK, DV), n (P, NH, DK), m (P, NH).
    gate, normalize, eps, scale
        As for :func:`mlstm`.
    out_state : MLSTMState, optional
        Buffers that receive the new state (shapes of ``state``; on the GPU float32,
        C-contiguous, 16-byte aligned), so no state is allocated per token. Passing ``state``
        itself updates it in place (safe: every element is read before it is written).
        A buffer must either be the input's or not overlap it.
    state_indices : (B,) int32 array, optional
        Continuous batching: batch row b reads and updates row ``state_indices[b]`` of the
        pool ``state`` in place (out_state must be None); rows not selected are untouched.
        ``-1`` skips the row: the pool is untouched and h of that row is 0. Selected rows must
        be distinct. NumPy indices are checked on the host (values in [-1, P), no duplicates);
        CuPy indices are trusted: the kernel skips rows whose index lies outside [-1, P) and
        writes NaN into their h (a range check would need a host synchronisation).

    Returns
    -------
    h : (B, NH, DV), dtype of q
    new_state : MLSTMState
        A new state (float32 on the GPU, float64 on NumPy), or ``out_state``'s arrays, or the
        pool. n is None for normalize=False, m for gate="sig".

    For loops of equal shapes, :func:`mlstm_step_plan` validates once and launches with a few
    microseconds of host time (and can be captured in a CUDA graph).
    """
    cp = _arrays.cupy_module()
    args = (q, k, v, i, f, state, out_state, state_indices, (gate, normalize, eps, scale))
    if cp is not None:   # a CuPy call whose signature validated before: no validation again
        result = _gpu.quick_step(cp, *args)
        if result is not None:
            return result
    problem, arrays, st, out, idx = _validate.step_inputs(
        q, k, v, i, f, state, gate=gate, normalize=normalize, eps=eps, scale=scale, out_state=out_state,
        state_indices=state_indices)
    result = backend(problem.kind).step(problem, arrays, st, out, idx)
    if problem.kind == "cuda":
        _gpu.remember_step(cp, args, problem, arrays, st, idx)
    return result


def mlstm_step_plan(q, k, v, i, f, state, *, gate="exp", normalize=True, eps=1e-6, scale=None,
                    state_indices=None):
    """A pre-validated :func:`mlstm_step` for a decode loop: a :class:`StepPlan`.

    The arguments are validated as by :func:`mlstm_step` (they are examples: the plan is
    fixed to their shapes, dtypes, device and options; with ``state_indices`` to a pool of
    ``state``'s size P). On the GPU the gates must be float32 and every array C-contiguous
    (nothing is converted or copied per call). Then ``plan(q, k, v, i, f, state,
    out_state=None, state_indices=None, h=None)`` runs one token with no allocation and no
    host synchronisation: it checks shapes and dtypes, packs pointers and launches, so a
    loop of calls can be captured in a CUDA graph. Unlike :func:`mlstm_step`, the plan
    updates ``state`` in place unless ``out_state`` is given, and it writes h into one buffer
    that it owns (overwritten by the next call) unless ``h=`` is given.
    """
    problem, arrays, st, _, idx = _validate.step_inputs(
        q, k, v, i, f, state, gate=gate, normalize=normalize, eps=eps, scale=scale, state_indices=state_indices)
    if st is None:
        raise ValueError("state: mlstm_step_plan needs the state it will update (zeros for a fresh sequence), "
                         "got None")
    if problem.kind == "cuda":
        return _gpu.GpuStepPlan(problem, arrays, st, idx)
    return StepPlan(problem, st, idx)
