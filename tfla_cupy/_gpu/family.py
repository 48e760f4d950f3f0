"""Which kernel family runs a call, and its launch configuration.

"sm80" (mma.sync, every GPU from compute capability 8.0) or "sm90" (Hopper: wgmma and bulk
tensor copies), chosen per pass: ``config.family``, or with "auto" the TFLA_CUPY_FAMILY
environment variable, or the default — sm90 on compute capability 9.0 where its kernels cover
the call, sm80 otherwise (never an error).
"""

from __future__ import annotations

import os

from .. import _loader, _tma
from ..config import (BWD_WALK_ENV, ELEMENT_BYTES, FAMILIES, FAMILY_ENV, FUSED_AUTO_MIN_CTAS_PER_SM, FUSED_BV, FWD_WS_ENV,
                      bwd_sm90_unsupported, bwd_walk_unsupported, fused_fwd_unsupported, fused_ws_unsupported,
                      pick_config)


def config(problem, mma, device):
    """The caller's KernelConfig (type checked at the boundary) or the heuristic's, checked
    against this device's shared-memory limit."""
    cfg = problem.config or pick_config(mma, problem.DK, problem.DV, problem.chunk_size)
    cfg.check(ELEMENT_BYTES[mma], problem.chunk_size, _loader.device_limits(device.id)[1])
    return cfg


def choose(cfg, device, reason, auto_reason=None):
    """"sm80" or "sm90": config.family, or with "auto" the TFLA_CUPY_FAMILY environment variable,
    or the default — sm90 on compute capability 9.0 when `reason` (why the sm90 kernels do not
    cover the call) and `auto_reason` (why the default should not take them though they could run)
    are None, sm80 otherwise. An explicit "sm90" that cannot run (another device, a `reason`) is
    a ValueError naming why."""
    want, where = cfg.family, "config.family"
    if want == "auto":
        want, where = os.environ.get(FAMILY_ENV, "auto") or "auto", FAMILY_ENV
        if want not in FAMILIES:
            raise ValueError(f"{FAMILY_ENV}: expected one of {FAMILIES}, got {want!r}")
    if want == "sm80":
        return "sm80"
    cc = device.compute_capability
    if want == "sm90":
        if cc != "90":
            raise ValueError(f"{where}: 'sm90' needs compute capability 9.0, this device has {cc[:-1]}.{cc[-1]}")
        if reason is not None:
            raise ValueError(f"{where}: 'sm90' does not cover this call: {reason}")
        return "sm90"
    return "sm90" if cc == "90" and reason is None and auto_reason is None else "sm80"


def operands_reason(p, seq_strides, h_aligned):
    """Why this call's arrays cannot take the fused forward (None if they can): it reads q, k, v by
    tensor maps (positive strides, cuda-bindings installed) and writes h in 16-byte pieces.
    ``seq_strides``: the (batch, head, token) element strides of q, k, v; ``h_aligned``: whether
    the output h is 16-byte aligned."""
    why = _tma.unavailable()
    extents = (p.B, p.NH, p.S)
    if why is None and any(s <= 0 for st in seq_strides for s, n in zip(st, extents) if n > 1):
        why = "its bulk tensor copies need positive strides of q, k and v"
    if why is None and not h_aligned:
        why = "its output h must be 16-byte aligned (the out buffer given is not)"
    return why


def forward(problem, cfg, mma, device, sms, operands_why=None):
    """The forward's family: "sm90" (the fused Hopper forward) or "sm80" (the two-pass forward).
    A grid of few walks (one CTA per DV block, sequence and head) is cut into segments
    (config.pick_segments); packed sequences are not, so with cu_seqlens "auto" also needs at least
    FUSED_AUTO_MIN_CTAS_PER_SM CTAs per SM (`sms`): below that each CTA walks a long sequence
    alone and the two-pass forward, which spreads the chunks over the GPU, is faster
    (docs/performance.md). `operands_why`: see operands_reason."""
    p = problem
    reason = fused_fwd_unsupported(mma, p.DK, p.DV, p.chunk_size) or operands_why
    few = None
    if p.varlen and (p.DV // FUSED_BV) * p.NSEQ * p.NH < FUSED_AUTO_MIN_CTAS_PER_SM * sms:
        few = "packed sequences with too few fused CTAs per SM"
    return choose(cfg, device, reason, auto_reason=few)


def _switch(env):
    """The value of an opt-in switch variable: "0", "1" or "auto" (unset or empty: "auto")."""
    want = os.environ.get(env, "auto") or "auto"
    if want not in ("0", "1", "auto"):
        raise ValueError(f"{env}: expected '0', '1' or 'auto', got {want!r}")
    return want


def forward_ws(problem, mma):
    """Whether a forward on the sm90 family runs on the warp-specialised kernel (fwd_ws_sm90, and
    its states mode for the backward's recompute) rather than the fused one: only where the
    environment variable TFLA_CUPY_FWD_WS is "1" and it covers the call (fused_ws_unsupported).
    Its default ("auto", or "0") is off until the kernel has been measured (config.FWD_WS_ENV)."""
    p = problem
    return _switch(FWD_WS_ENV) == "1" and fused_ws_unsupported(mma, p.DK, p.DV, p.chunk_size) is None


def backward(problem, cfg, mma, device):
    """The backward's family for the token gradients and the reverse dC pass, chosen as the
    forward's is with bwd_sm90_unsupported as the reason. The gate gradients are one kernel on
    both; the state recompute follows the forward's family."""
    p = problem
    return choose(cfg, device, bwd_sm90_unsupported(mma, p.DK, p.DV, p.chunk_size))


def backward_walk(problem, mma):
    """Whether a backward on the sm90 family runs as the fused reverse walk (bwd_walk_sm90) rather
    than the per-stage Hopper kernels: only where the environment variable TFLA_CUPY_BWD_WALK is
    "1" and the walk covers the call (bwd_walk_unsupported). Its default ("auto", or "0") is off:
    the walk's first version is slower than the per-stage kernels (config.BWD_WALK_ENV)."""
    p = problem
    return _switch(BWD_WALK_ENV) == "1" and bwd_walk_unsupported(mma, p.DK, p.DV, p.chunk_size) is None
