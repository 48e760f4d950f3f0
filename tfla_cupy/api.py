"""The public functions. Layout (B, NH, S, D) or (B, S, NH, D); packed variable-length
sequences through ``cu_seqlens``; NumPy-like, keyword-only options.

NumPy inputs run the float64 reference (results in the input dtype); CuPy inputs, and any
CUDA DLPack producer (PyTorch, JAX: zero-copy), run the CUDA TFLA kernels and return CuPy
arrays. Inputs are validated once, here.
"""

from __future__ import annotations

from . import _numpy_path, _validate
from ._types import MLSTMContext, MLSTMGrads, MLSTMState

__all__ = ["mlstm", "mlstm_fwd", "mlstm_bwd", "mlstm_vjp", "mlstm_step",
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
        ε > 0 of h = num / (max(|den|, exp(−M)) + ε).
    scale : float, optional
        Query scale; None means 1/sqrt(DK). It multiplies q only: the states accumulate
        unscaled keys.
    precision : {"default", "tf32"}
        GPU float32 inputs compute in true fp32 by default; "tf32" opts into TF32 tensor-core
        products. Ignored for float16/bfloat16 (tensor cores with fp32 accumulation) and on
        the NumPy path.
    config : KernelConfig, optional
        GPU launch parameters; None uses :func:`tfla_cupy.config.pick_config`.
"""


def _dispatch(kind):
    if kind == "numpy":
        return _numpy_path
    from . import _cuda_path
    return _cuda_path


def mlstm_fwd(q, k, v, i, f, *, gate="exp", normalize=True, initial_state=None, chunk_size=None,
              eps=1e-6, scale=None, precision="default", config=None, keep_states=False, layout="bhsd",
              cu_seqlens=None):
    """Forward pass that also returns what the backward needs.

    Returns ``(h, state, ctx)``: h (B, NH, S, DV) (or (B, S, NH, DV)) in the dtype of q, the last state
    (:class:`MLSTMState`), and an opaque context for :func:`mlstm_bwd`.
    ``keep_states=True`` (GPU path) keeps the chunk-boundary states for the backward instead
    of recomputing them: faster backward, (NC·DK·DV) more memory per head.
    """
    problem, arrays, state = _validate.inputs(
        q, k, v, i, f, gate=gate, normalize=normalize, eps=eps, scale=scale, chunk_size=chunk_size,
        initial_state=initial_state, precision=precision, config=config, keep_states=keep_states,
        layout=layout, cu_seqlens=cu_seqlens)
    return _dispatch(problem.kind).forward(problem, arrays, state)


mlstm_fwd.__doc__ += _COMMON_DOC


def mlstm(q, k, v, i, f, *, gate="exp", normalize=True, initial_state=None, return_state=False,
          chunk_size=None, eps=1e-6, scale=None, precision="default", config=None, layout="bhsd",
          cu_seqlens=None):
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

    computed chunkwise (TFLA, MLSTM_SPEC.md §4). NaN or Inf in the inputs propagate to the
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
    h, state, _ = mlstm_fwd(q, k, v, i, f, gate=gate, normalize=normalize, initial_state=initial_state,
                            chunk_size=chunk_size, eps=eps, scale=scale, precision=precision,
                            config=config, layout=layout, cu_seqlens=cu_seqlens)
    return (h, state) if return_state else h


mlstm.__doc__ += _COMMON_DOC


def mlstm_bwd(ctx, dh, d_state=None):
    """Manual backward of :func:`mlstm_fwd` (MLSTM_SPEC.md §6).

    Parameters
    ----------
    ctx : MLSTMContext
        From :func:`mlstm_fwd`; it may be used more than once.
    dh : array (B, NH, S, DV), or (B, S, NH, DV) for a layout="bshd" forward
        Gradient of the loss with respect to h (same array module as the forward).
    d_state : MLSTMState or (dC, dn, dm), optional
        Gradient with respect to the returned last state. Only dC (B, NH, DK, DV) (N for B
        with cu_seqlens) is used:
        the custom backward treats the normalizer and the stabilizers as constants, so the
        gradients of n and m do not propagate (they are zero when d_state comes from the
        ``d_initial_state`` of a later call's backward). dn and dm may be None.

    Returns
    -------
    MLSTMGrads(dq, dk, dv, di, df, d_initial_state)
        Token gradients in the dtypes and the layout of q, k, v, i, f. The gate gradients include the
        ⟨dC_last, C_last⟩ term of §6.5, so gradients are exact under state passing.
    """
    dh, dC_last = _validate.backward_args(ctx, dh, d_state)
    return _dispatch(ctx.kind).backward(ctx, dh, dC_last)


def mlstm_vjp(q, k, v, i, f, **opts):
    """Forward pass returning ``(h, vjp_fn)`` with ``vjp_fn(dh, d_state=None) -> MLSTMGrads``.

    ``opts`` are those of :func:`mlstm`; with ``return_state=True`` the first element is
    ``(h, state)``.
    """
    return_state = opts.pop("return_state", False)
    _validate._check_bool("return_state", return_state)
    h, state, ctx = mlstm_fwd(q, k, v, i, f, **opts)

    def vjp_fn(dh, d_state=None):
        return mlstm_bwd(ctx, dh, d_state)

    return ((h, state) if return_state else h), vjp_fn


def mlstm_step(q, k, v, i, f, state=None, *, gate="exp", normalize=True, eps=1e-6, scale=None):
    """One token of the recurrence (MLSTM_SPEC.md §2.1): ``(h, new_state)``.

    q, k: (B, NH, DK); v: (B, NH, DV); i, f: (B, NH); ``state=None`` means zeros.
    h (B, NH, DV) has the dtype of q; the new state is float32 on the GPU path.
    """
    problem, arrays, st = _validate.step_inputs(q, k, v, i, f, state, gate=gate, normalize=normalize,
                                                eps=eps, scale=scale)
    return _dispatch(problem.kind).step(problem, arrays, st)
