"""tfla_cupy — mLSTM with Tiled Flash Linear Attention kernels on CuPy arrays.

Public API (layout (B, NH, S, D)): :func:`mlstm`, :func:`mlstm_fwd`, :func:`mlstm_bwd`,
:func:`mlstm_vjp`, :func:`mlstm_step` (and :func:`mlstm_step_plan` for decode loops), and the result types :class:`MLSTMState`,
:class:`MLSTMGrads`. NumPy inputs run the float64 reference (``tfla_cupy.reference``); CuPy
inputs (or any CUDA DLPack producer) run the CUDA kernels in ``cuda_src/``.
"""

from .api import (MLSTMContext, MLSTMGrads, MLSTMState, mlstm, mlstm_bwd, mlstm_fwd, mlstm_step, mlstm_step_plan,
                  mlstm_vjp)
from ._step_plan import StepPlan
from .config import KernelConfig

__version__ = "0.1.0"

__all__ = ["mlstm", "mlstm_fwd", "mlstm_bwd", "mlstm_vjp", "mlstm_step", "mlstm_step_plan", "StepPlan", "MLSTMState", "MLSTMGrads",
           "MLSTMContext", "KernelConfig", "__version__"]
