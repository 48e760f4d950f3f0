"""The GPU forward: a plan per call signature, then allocations, pointers and launches.

sm80 family: stage 0 (per-chunk log-gate vectors) → fwd_states (chunk-boundary states) →
fwd_h (outputs, N, M). sm90 family, where it covers the call: stage 0b (per-chunk gate records)
→ one fused pass (states on chip; h, N, M), with long sequences cut into segments (summary pass,
fold, then every segment at once). Everything runs on CuPy's current stream with no host
synchronisation, so a warmed-up call can be captured in a CUDA graph. Packed sequences
(cu_seqlens) get their chunk table on the device: nothing reads cu_seqlens on the host.
"""

from __future__ import annotations

import os

import numpy as np

from .. import _arrays, _loader, _tma
from .._params import bind, make_params
from .._types import MLSTMContext, MLSTMState
from ..config import FAMILY_ENV, FUSED_BV, FUSED_TERM_FLOATS, FUSED_WS_BV, FWD_WS_ENV, pick_segments
from . import family, launch
from .operands import F32, check_disjoint, check_state_buffers, gpu_inputs, seq_strides, strides


def seq_table(problem):
    """Stage −1 (packed sequences only): the int32 table [token offsets | first chunk slots |
    sequence of each chunk slot] built on the device from cu_seqlens (seq_table.cuh). No host
    synchronisation: a NumPy cu_seqlens is uploaded, a CuPy one read by the kernel."""
    cp = _arrays.cupy_module()
    p = problem
    cu = cp.ascontiguousarray(cp.asarray(p.cu_seqlens))
    NC = p.S // p.chunk_size + p.NSEQ
    table = cp.empty(2 * (p.NSEQ + 1) + NC, np.int32)
    launch.seq_table(cu.dtype)(make_params(cu_seqlens=cu, seq_table=table, S=p.S, L=p.chunk_size, NC=NC, NSEQ=p.NSEQ))
    return cu, table


class ForwardPlan:
    """What a forward fixes once its signature is known: the config, the kernel family, the
    launches and the Params record with everything but its pointers. Cached per signature
    (problem, device, operand strides, the output h, the family override), so a call that repeats
    one only allocates its outputs, binds pointers and launches (docs/architecture.md: host path).
    A plan is immutable once built and may be shared between threads."""

    def __init__(self, p, device, mma, seq_st, h_key, ws=None):
        self.cfg = cfg = family.config(p, mma, device)
        h_strides, h_aligned = h_key if h_key is not None else (seq_strides(p, p.DV), True)
        sms = _loader.device_limits(device.id)[0]
        self.family = family.forward(p, cfg, mma, device, sms, family.operands_reason(p, seq_st[:3], h_aligned))
        self.geo = g = launch.geometry(p, cfg, mma)
        self.strides = seq_st
        # the warp-specialised forward (opt-in; ``ws``: the choice of an earlier plan of this call)
        # walks pairs of DV blocks, the fused forward single ones
        self.ws = self.family == "sm90" and (family.forward_ws(p, mma) if ws is None else ws)
        walks = p.NSEQ * p.NH
        ctas = (p.DV // (FUSED_WS_BV if self.ws else FUSED_BV)) * walks
        self.nseg, seg_chunks = 1, 0
        if self.family == "sm90" and not p.varlen:  # long sequences in segments when the walks cannot fill the GPU
            self.nseg, seg_chunks = pick_segments(ctas, g.NC, sms, cfg.segments)
        self.template = bind(g.base, {}, dict(zip(("st_q", "st_k", "st_v", "st_i", "st_f", "st_h"), (*seq_st, h_strides))),
                             dict(seg_chunks=seg_chunks, nseg=self.nseg)).tobytes()
        if self.family == "sm90":
            # stage 0b computes stage 0's vectors into its records itself: no gate arrays
            items = ctas * self.nseg  # work items (segment, sequence, head, DV block or pair)
            walk = launch.fused_ws if self.ws else launch.fused
            last = walk(g, "full", items, sms)
            first = (launch.fused_terms(g),)
            if self.nseg > 1:  # pass 1 (segment summaries), their fold, then pass 2
                first += (walk(g, "summary", ctas * (self.nseg - 1), sms), launch.segment_combine(g))
            self.launches = first + (last,)
            self._states = (walk, items, sms)
        else:
            self.launches = (launch.chunk_gates(g), launch.states(g, "fwd_states_kernel"), launch.chunk(g, "fwd_h"))
        # the call's scratch in one allocation: the chunk states the two-pass forward passes between
        # its kernels (unless the backward keeps them), or stage 0b's records and the segment
        # summaries of the fused forward; the sm80 gate vectors, which the backward reuses, apart
        BH, NC, e = g.BH, g.NC, np.dtype(p.dtype).itemsize
        if self.family == "sm90":
            parts = [("gate_terms", BH * NC * FUSED_TERM_FLOATS * 4)]
            if self.nseg > 1:
                held = (self.nseg - 1) * p.NSEQ * p.NH
                parts += [("seg_C", held * p.DK * p.DV * 4), ("seg_n", held * p.DK * 4 if p.has_n else 0),
                          ("seg_m", held * 4 if p.has_m else 0)]
        elif p.keep_states:
            parts = []
        else:
            parts = [("C_states", BH * NC * p.DK * p.DV * e), ("n_states", BH * NC * p.DK * 4 if p.has_n else 0),
                     ("m_states", BH * g.NM * 4 if p.has_m else 0)]
        self.scratch = launch.Arena([(n, b) for n, b in parts if b])
        self.gates = launch.Arena(g.gate_layout()) if self.family == "sm80" else None

    def states_launches(self):
        """The backward's recompute of the chunk-boundary states on the fused path (sm90 plans): the
        forward's launches with the last in "states" mode (no Q, no outputs; the warp-specialised
        kernel's where the forward takes it). Built on first use,
        so that a forward-only program never compiles that kernel."""
        walk, items, sms = self._states
        return self.launches[:-1] + (walk(self.geo, "states", items, sms),)

    def run(self, launches, params, q, k, v):
        """Run ``launches`` (this plan's, or its states_launches) on ``params``; the fused kernels
        also get the tensor maps of q, k, v."""
        p = self.geo.p
        maps = None
        for spec in launches:
            if spec.maps:
                if maps is None:
                    maps = _tma.fused_maps(tuple(zip((q, k, v), self.strides)), p.S, p.NH, p.B)
                spec(params, maps)
            else:
                spec(params)


_PLANS = {}
_PLANS_MAX = 64


def plan_for(p, device, mma, operands, h_out, ws=None):
    """The ForwardPlan of this call, from the cache unless the call has packed sequences (their
    cu_seqlens is an array: no signature). ``ws``: the warp-specialised kernel's choice of the
    forward this plan repeats (the backward's recompute), else the environment's. Two threads may
    build one plan at once; either result is complete before it is published, and they are equal."""
    lay = p.layout
    seq_st = tuple(strides(x, lay) for x in operands)
    h_key = None if h_out is None else (strides(h_out, lay), h_out.data.ptr % 16 == 0)
    if p.cu_seqlens is not None:
        return ForwardPlan(p, device, mma, seq_st, h_key, ws)
    key = (p, device.id, seq_st, h_key, os.environ.get(FAMILY_ENV), os.environ.get(FWD_WS_ENV) if ws is None else ws)
    plan = _PLANS.get(key)
    if plan is None:
        plan = ForwardPlan(p, device, mma, seq_st, h_key, ws)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _private(x, user):
    """``x`` when the conversion already copied it, else a copy: the saved context must not alias
    an input that the caller may later edit in place (that would change the gradients)."""
    return x.copy() if x is not None and x is user else x


def out_or_new(out, name, empty):
    """The caller's preallocated ``out[name]`` (the JAX / PyTorch adapters write straight into
    their framework's buffers), else a new array from ``empty()``."""
    return out[name] if out is not None and name in out else empty()


def forward(problem, arrays, state, *, out=None, copy_saved=True):
    """``out``: optional preallocated outputs h, N, M, C_last, n_last, m_last (C-contiguous, of the
    shapes and dtypes below). ``copy_saved=False`` lets the context alias the inputs (for callers
    that never run the backward, or whose inputs are immutable)."""
    cp = _arrays.cupy_module()
    if out is not None and "C_last" in out:  # the last state into the caller's buffers (out_state)
        last = MLSTMState(out["C_last"], out.get("n_last"), out.get("m_last"))
        check_state_buffers("out_state", last)
        check_disjoint(last, state)
    mma, device, (q, k, v, i32, f32), (C0, n0, m0) = gpu_inputs(problem, arrays, state)
    with device:
        if copy_saved:
            q, k, v, i32, f32 = (_private(x, u) for x, u in zip((q, k, v, i32, f32), arrays))
            if state is not None:
                C0, n0, m0 = (_private(x, u) for x, u in zip((C0, n0, m0), state))
        p = problem
        cu, table = seq_table(p) if p.varlen else (None, None)
        h = out_or_new(out, "h", lambda: cp.empty(p.seq_shape(p.DV), p.dtype))
        plan = plan_for(p, device, mma, (q, k, v, i32, f32), h if out is not None and "h" in out else None)
        g = plan.geo
        states = (p.NSEQ, p.NH)
        N = out_or_new(out, "N", lambda: cp.empty((p.B, p.NH, p.S), F32)) if p.has_n else None
        M = out_or_new(out, "M", lambda: cp.empty((p.B, p.NH, p.S), F32)) if p.has_m else None
        C_last = out_or_new(out, "C_last", lambda: cp.empty(states + (p.DK, p.DV), F32))
        n_last = out_or_new(out, "n_last", lambda: cp.empty(states + (p.DK,), F32)) if p.has_n else None
        m_last = out_or_new(out, "m_last", lambda: cp.empty(states, F32)) if p.has_m else None
        kept = {}
        if p.keep_states:  # the backward reads the chunk states instead of recomputing them
            kept = dict(C_states=cp.empty((g.BH, g.NC, p.DK, p.DV), p.dtype),
                        n_states=cp.empty((g.BH, g.NC, p.DK), F32) if p.has_n else None,
                        m_states=cp.empty((g.BH, g.NM), F32) if p.has_m else None)
        scratch, parts = plan.scratch.allocate()
        # the fused forward needs no gate vectors (the backward makes them if it runs), stage 0b's
        # records instead
        gates = plan.gates.allocate() if plan.gates is not None else None
        params = bind(plan.template, dict(q=q, k=k, v=v, i=i32, f=f32, C0=C0, n0=n0, m0=m0, h=h, N=N, M=M,
                                          C_last=C_last, n_last=n_last, m_last=m_last, seq_table=table,
                                          **kept, **parts, **(gates[1] if gates else {})))
        plan.run(plan.launches, params, q, k, v)
        del scratch  # the stream orders its reuse after the kernels
    saved = dict(q=q, k=k, v=v, i=i32, f=f32, C0=C0, n0=n0, m0=m0, N=N, M=M, C_last=C_last, gates=gates,
                 C_states=kept.get("C_states"), m_states=kept.get("m_states"), fwd_ws=plan.ws,
                 dtypes=(arrays[3].dtype, arrays[4].dtype), mma=mma, cfg=plan.cfg, device=device.id,
                 cu_seqlens=cu, seq_table=table)
    return h, MLSTMState(C_last, n_last, m_last), MLSTMContext("cuda", problem, saved)


def recompute_states(p, device, saved, C_states, m_states):
    """The chunk-boundary states (and stabilisers) of a forward whose context did not keep them,
    where the fused forward covers the call: its "states" mode (the forward's own plan: stage 0b,
    segments if any, then the state recurrence alone). False (nothing launched) where it does
    not; the caller then runs the two-pass forward's state pass. Either gives states consistent
    with the forward's N and M; the fused path takes the kernel the forward took (the
    warp-specialised one or not), whatever the environment says now."""
    operands = tuple(saved[n] for n in ("q", "k", "v", "i", "f"))
    plan = plan_for(p, device, saved["mma"], operands, None, ws=saved.get("fwd_ws"))
    if plan.family != "sm90":
        return False
    q, k, v, i32, f32 = operands
    scratch, parts = plan.scratch.allocate()
    params = bind(plan.template, dict(q=q, k=k, v=v, i=i32, f=f32, C0=saved["C0"], n0=saved["n0"], m0=saved["m0"],
                                      C_states=C_states, m_states=m_states, seq_table=saved["seq_table"], **parts))
    plan.run(plan.states_launches(), params, q, k, v)
    return True


def segment_summary(problem, arrays, state, *, empty_m=None):
    """States-only forward for sequence parallelism (docs/distributed.md §1): stage 0 and the
    state pass with no outputs, no boundary states written. Returns (last state, G) with G
    (B, NH) float64 the sum of the slice's floored λ, from stage 0's per-chunk sums (the λ the
    state pass used). ``empty_m`` starts from the empty state C = 0, n = 0, m = empty_m
    instead of ``state``."""
    cp = _arrays.cupy_module()
    mma, device, (q, k, v, i32, f32), (C0, n0, m0) = gpu_inputs(problem, arrays, state)
    with device:
        p = problem
        g = launch.geometry(p, family.config(p, mma, device), mma)
        shape = (p.B, p.NH)
        if empty_m is not None:
            C0, n0 = None, None
            m0 = cp.full(shape, empty_m, F32) if p.has_m else None
        C_last = cp.empty(shape + (p.DK, p.DV), F32)
        n_last = cp.empty(shape + (p.DK,), F32) if p.has_n else None
        m_last = cp.empty(shape, F32) if p.has_m else None
        gates = g.gate_vectors(i32, f32)
        launch.states(g, "fwd_states_kernel")(g.params(k=k, v=v, C0=C0, n0=n0, m0=m0, C_last=C_last, n_last=n_last,
                                                       m_last=m_last, **gates))
        G = gates["gate_g"].sum(axis=1, dtype=cp.float64).reshape(shape)
    return MLSTMState(C_last, n_last, m_last), G


def context(problem, arrays, state, N, M, C_last):
    """The backward context of a forward whose outputs N, M, C_last were kept elsewhere (the JAX
    and PyTorch adapters keep them as residuals of their framework): nothing is copied, the gate
    vectors are recomputed (stage 0, B·NH·S work). ``arrays`` are (q, k, v, i, f) with float32
    gates."""
    mma, device, (q, k, v, i32, f32), (C0, n0, m0) = gpu_inputs(problem, arrays, state)
    with device:
        cfg = family.config(problem, mma, device)
        vectors = launch.geometry(problem, cfg, mma).gate_vectors(i32, f32)
        gates = (vectors, vectors)
    saved = dict(q=q, k=k, v=v, i=i32, f=f32, C0=C0, n0=n0, m0=m0, N=N, M=M, C_last=C_last, gates=gates,
                 C_states=None, m_states=None, dtypes=(F32, F32), mma=mma, cfg=cfg, device=device.id,
                 cu_seqlens=None, seq_table=None)
    return MLSTMContext("cuda", problem, saved)
