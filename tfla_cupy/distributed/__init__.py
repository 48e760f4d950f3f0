"""Sequence parallelism for the mLSTM: P ranks, each holding a contiguous slice of the
sequence, exchange one small summary per rank (forward) and one state gradient per rank
(backward) — docs/distributed.md.

* :func:`mlstm_fwd`, :func:`mlstm_bwd`: one rank per process and GPU, over NCCL
  (:func:`init` gives the communicator; ``python -m tfla_cupy.distributed.run --nproc N
  script.py`` starts the processes).
* :func:`virtual_mlstm_fwd`, :func:`virtual_mlstm_bwd`: the same per-rank code with P virtual
  ranks in one process, on NumPy (float64) or one GPU; results as one call returns them.
"""

from ._algebra import EMPTY_M, Summary, combine
from ._api import DistContext, VirtualContext, mlstm_bwd, mlstm_fwd, virtual_mlstm_bwd, virtual_mlstm_fwd
from ._comm import NcclComm, init

__all__ = ["mlstm_fwd", "mlstm_bwd", "virtual_mlstm_fwd", "virtual_mlstm_bwd", "init", "NcclComm",
           "DistContext", "VirtualContext", "Summary", "combine", "EMPTY_M"]
