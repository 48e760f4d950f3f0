"""Float64 NumPy references of the mLSTM, written to be read (docs/math.md §13).

``recurrent``  the step recurrence (§2), the ground truth;
``parallel``   the quadratic stabilized form (§3), an independent cross-check;
``chunkwise``  the chunkwise form (§4) and the manual backward (§6), split into the stages the
               CUDA kernels have;
``gates``      the gate transforms shared by all three.
"""

from . import chunkwise, gates, parallel, recurrent

__all__ = ["chunkwise", "gates", "parallel", "recurrent"]
