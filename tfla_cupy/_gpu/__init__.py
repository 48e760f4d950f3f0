"""The GPU backend: the CUDA TFLA kernels behind the public API.

It offers what every backend offers (tfla_cupy/_backend.py: forward, backward, step) and the
GPU's extras (the adapters' hooks: preallocated outputs, a context rebuilt from kept outputs;
sequence parallelism's state-only passes). Its modules, bottom up:

* operands — the GPU path's own checks and the arrays the kernels read;
* launch — every launch as a LaunchSpec, built in one place from a call's Geometry;
* family — which kernel family (sm80 / sm90) runs a pass, and the launch configuration;
* fwd, bwd, decode — the drivers of the forward, the backward and the decode step.
"""

from .bwd import backward, initial_state_grad
from .fwd import context, forward, segment_summary
from .operands import check_head_dims, check_problem
from .decode import GpuStepPlan, quick_step, step
from .decode import remember as remember_step

__all__ = ["forward", "backward", "step", "quick_step", "remember_step", "GpuStepPlan", "context", "segment_summary", "initial_state_grad",
           "check_problem", "check_head_dims"]
