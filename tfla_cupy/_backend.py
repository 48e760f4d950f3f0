"""The interface both backends implement, and the choice between them.

A backend is a module with

* ``forward(problem, arrays, state, *, out=None, copy_saved=True) -> (h, last_state, ctx)``
* ``backward(ctx, dh, dC_last) -> MLSTMGrads``
* ``step(problem, arrays, state, out=None, indices=None) -> (h, new_state)``

taking what tfla_cupy._validate returns (a Problem, the converted arrays, an MLSTMState).
"numpy" runs the float64 reference (tfla_cupy._numpy_path), "cuda" the CUDA kernels
(tfla_cupy._gpu), whose forward, backward and step also take preallocated outputs
(``out=``, the adapters' hooks). Neither imports the public API.
"""

from __future__ import annotations

from . import _gpu, _numpy_path

BACKENDS = {"numpy": _numpy_path, "cuda": _gpu}


def backend(kind):
    """The backend module of a problem's ``kind``."""
    return BACKENDS[kind]
