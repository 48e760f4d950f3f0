"""The pre-validated decode step: the public :class:`StepPlan` type and its NumPy form. The GPU
form (allocation-free, graph-capturable launches) is tfla_cupy._gpu.step.GpuStepPlan; made by
:func:`tfla_cupy.mlstm_step_plan`."""

from __future__ import annotations

from . import _numpy_path, _validate
from ._arrays import dtype_name


class StepPlan:
    """One decode step for fixed shapes: made by :func:`tfla_cupy.mlstm_step_plan`.

    ``plan(q, k, v, i, f, state, out_state=None, state_indices=None, h=None) -> (h, state)``.
    The state is updated in place unless ``out_state`` is given (then it receives the new
    state; it may also be ``state``). With a pool plan (made with ``state_indices``) every call
    takes ``state_indices`` (B,) int32. GPU calls allocate nothing and never synchronise: a
    loop of them can be captured in a CUDA graph. NumPy plans run :func:`tfla_cupy.mlstm_step`
    with the same semantics (the float64 reference).

    A plan keeps one launch record and one h buffer: call one plan from one thread at a time
    (plans of their own per thread are independent).
    """

    kind = "numpy"

    def __init__(self, problem, state, indices):
        p = self.problem = problem
        self.pool = indices is not None
        self._state_shapes = tuple(None if x is None else tuple(x.shape) for x in state)
        tok = (p.B, p.NH)
        self._shapes = dict(q=tok + (p.DK,), k=tok + (p.DK,), v=tok + (p.DV,), i=tok, f=tok)

    def __repr__(self):
        p = self.problem
        return (f"StepPlan(kind={self.kind!r}, B={p.B}, NH={p.NH}, DK={p.DK}, DV={p.DV}, "
                f"dtype={dtype_name(p.dtype)}, gate={p.gate!r}, normalize={p.normalize}, pool={self.pool})")

    def _check_indices(self, state_indices):
        if (state_indices is None) == self.pool:
            raise ValueError("state_indices: " + ("required by this pool plan" if self.pool else
                                                  "this plan was made without state_indices; make a pool plan"))

    def __call__(self, q, k, v, i, f, state, out_state=None, state_indices=None, h=None):
        self._check_indices(state_indices)
        p = self.problem
        if state_indices is not None:
            out_state = None
        elif out_state is None:
            out_state = state
        problem, arrays, st, out, idx = _validate.step_inputs(
            q, k, v, i, f, state, gate=p.gate, normalize=p.normalize, eps=p.eps, scale=p.scale,
            out_state=out_state, state_indices=state_indices)
        hh, new = _numpy_path.step(problem, arrays, st, out, idx)
        if h is not None:
            h[...] = hh
            hh = h
        return hh, new
