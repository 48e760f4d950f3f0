"""Public result types and the backward context."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional


class MLSTMState(NamedTuple):
    """The recurrent state of the mLSTM, stabilized (docs/math.md §2.2).

    C : (B, NH, DK, DV) matrix memory.
    n : (B, NH, DK) normalizer state; None for ``gate="sig", normalize=False``.
    m : (B, NH) log-scale stabilizer; None for ``gate="sig"`` (which has no stabilizer).

    float32 on the GPU path, float64 on the NumPy path.
    """

    C: Any
    n: Optional[Any] = None
    m: Optional[Any] = None


class MLSTMGrads(NamedTuple):
    """Gradients returned by :func:`tfla_cupy.mlstm_bwd`.

    dq, dk, dv, di, df have the shapes and dtypes of q, k, v, i, f. ``d_initial_state`` is
    None when the forward had no initial state; otherwise an :class:`MLSTMState` whose C is
    the gradient of the initial C and whose n and m are zeros (the custom backward treats
    the normalizer and the stabilizers as constants, so these gradients are zero by
    construction, docs/math.md §6.4), or None where the state has no n / m. With
    ``normalizer_grad=True`` in the forward, n is the gradient of the initial n (§6.6);
    m stays zero (the stabilizer is stop-gradient).
    """

    dq: Any
    dk: Any
    dv: Any
    di: Any
    df: Any
    d_initial_state: Optional[MLSTMState]


class MLSTMContext:
    """What :func:`tfla_cupy.mlstm_bwd` needs from a forward call. Opaque to users.

    ``kind`` is "numpy" or "cuda": a context is only accepted with gradients of the same kind.
    """

    __slots__ = ("kind", "problem", "saved")

    def __init__(self, kind, problem, saved):
        self.kind = kind
        self.problem = problem
        self.saved = saved

    def __repr__(self):
        p = self.problem
        return (f"MLSTMContext(kind={self.kind!r}, B={p.B}, NH={p.NH}, S={p.S}, DK={p.DK}, "
                f"DV={p.DV}, gate={p.gate!r}, normalize={p.normalize}, chunk_size={p.chunk_size})")
