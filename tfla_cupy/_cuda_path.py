"""The GPU path: buffers, launch order and grids of the TFLA kernels.

Forward: fwd_states (chunk-boundary states) -> fwd_h (outputs, N, M) on the sm80 family; on
Hopper, where it covers the call, one fused pass (fwd_fused_sm90: states on chip, h, N, M).
Backward: [fwd_states again, unless the forward kept its states] -> bwd_dq -> bwd_dstates ->
bwd_dk, bwd_dv -> bwd_gates; on Hopper, where they cover the call, dq, dk and dv come from the
warpgroup-MMA kernels (bwd_chunk_sm90) instead. Everything is launched on CuPy's current stream with no host
synchronisation, so a warmed-up call can be captured in a CUDA graph.

Sequence tensors are passed with their strides (tfla::Strides: batch, head, token, in
elements), so both layouts and strided views are read in place: q, k, v and dh need a
contiguous feature dimension and 16-byte aligned strides and data pointer, and are copied once
otherwise; gates are read as float32 with any strides (other dtypes are converted, a copy of
B·NH·S values). Outputs are allocated C-contiguous in the call's layout. Packed sequences
(cu_seqlens) get their chunk table from seq_table_kernel on the device: nothing reads
cu_seqlens on the host, and grids are sized by the host-known bound floor(S / L) + N chunks.
"""

from __future__ import annotations

import numpy as np

from . import _arrays, _loader
from . import _tma
from ._params import bind_pointers, make_params
from ._types import MLSTMContext, MLSTMGrads, MLSTMState
import os

from .config import (BWD_DSTATES_SM90_SMEM_BYTES, BWD_DSTATES_SM90_THREADS, BWD_SM90_BLOCK, BWD_SM90_THREADS,
                     bwd_chunk_sm90_kernel, bwd_dstates_sm90_kernel, bwd_sm90_smem_bytes, bwd_sm90_unsupported,
                     ELEMENT_BYTES, FAMILIES, FAMILY_ENV, FUSED_AUTO_MIN_CTAS_PER_SM, FUSED_BV, FUSED_SMEM_BYTES, FUSED_STATES_CTAS_PER_SM, FUSED_STATES_SMEM_BYTES,
                     FUSED_TERM_FLOATS, FUSED_TERMS_SMEM_BYTES, FUSED_TERMS_THREADS, FUSED_THREADS, GATE_POLICY, MMA,
                     THREADS, chunk_gates_kernel, chunk_gates_smem_bytes, chunk_kernel, fused_fwd_kernel,
                     fused_fwd_unsupported, fused_terms_kernel, gates_kernel, pick_config, pick_segments,
                     SEG_COMBINE_THREADS, segment_combine_kernel, seq_table_kernel, state_kernels)

MAX_DK, MAX_DV = 512, 1024
_F32 = np.dtype(np.float32)
_GATE_THREADS = THREADS["tfla::kGateThreads"]
_CHUNK_GATE_THREADS = THREADS["tfla::kChunkGateThreads"]
_SEQ_TABLE_THREADS = THREADS["tfla::kSeqTableThreads"]
_INT31 = 2 ** 31 - 1


def _cdiv(a, b):
    return -(-a // b)


def _mma(problem):
    key = (np.dtype(problem.dtype), problem.precision if np.dtype(problem.dtype) == _F32 else "default")
    if key not in MMA:
        raise TypeError(f"q: the GPU path supports float16, bfloat16 and float32, got {_arrays.dtype_name(problem.dtype)}")
    return MMA[key]


def _check_head_dims(DK, DV, *, where="q"):
    if DK % 8 or DK > MAX_DK:
        raise ValueError(f"{where}: the GPU path needs DK to be a multiple of 8 and <= {MAX_DK}, got DK={DK}")
    if DV % 8 or DV > MAX_DV:
        raise ValueError(f"v: the GPU path needs DV to be a multiple of 8 and <= {MAX_DV}, got DV={DV}")


def _same_device(named):
    cp = _arrays.cupy_module()
    ids = {n: x.device.id for n, x in named.items() if x is not None}
    if len(set(ids.values())) > 1:
        raise ValueError("inputs live on different GPUs: " + ", ".join(f"{n}: device {d}" for n, d in ids.items()))
    return cp.cuda.Device(next(iter(ids.values())))


def _operand(x, dtype=None):
    """C-contiguous, 16-byte aligned, of ``dtype`` (copies only when needed)."""
    cp = _arrays.cupy_module()
    if dtype is not None and x.dtype != dtype:
        x = x.astype(dtype)
    if not x.flags.c_contiguous:
        x = cp.ascontiguousarray(x)
    if x.data.ptr % 16:
        x = x.copy()
    return x


def _state_f32(state, problem):
    if state is None:
        return None, None, None
    C0 = _operand(state.C)
    n0 = _operand(state.n) if problem.has_n else None
    m0 = _operand(state.m) if problem.has_m else None
    return C0, n0, m0


def _token_axes(layout):
    """(batch, head, token) axes of a sequence tensor in ``layout``."""
    return (0, 1, 2) if layout == "bhsd" else (0, 2, 1)


def _strides(x, layout):
    """Element strides (batch, head, token) of a sequence tensor of ``layout``."""
    e = x.itemsize
    return tuple(x.strides[a] // e for a in _token_axes(layout))


def _readable_in_place(x, layout):
    """Whether the kernels can read the token rows of x where they are: contiguous feature
    dimension, every other stride and the data pointer 16-byte aligned, token stride < 2^31."""
    e = x.itemsize
    tok = x.strides[_token_axes(layout)[2]] // e
    return (x.strides[3] == e and all(st % 16 == 0 for st in x.strides[:3]) and x.data.ptr % 16 == 0
            and abs(tok) <= _INT31)


def _sequence_operand(x, layout, dtype=None):
    """A q / k / v / dh operand: the array itself when the kernels can read it in place,
    otherwise one C-contiguous copy (of ``dtype``)."""
    cp = _arrays.cupy_module()
    if dtype is not None and x.dtype != dtype:
        x = x.astype(dtype)
    if not _readable_in_place(x, layout):
        x = cp.ascontiguousarray(x)
        if x.data.ptr % 16:
            x = x.copy()
    return x


def _gate_operand(x):
    """A gate operand: float32 with any strides (a copy only to convert the dtype)."""
    return x if x.dtype == _F32 and all(s % 4 == 0 for s in x.strides) else _operand(x, _F32)


def _gpu_inputs(problem, arrays, state, *, sequence=True):
    """GPU-specific checks, then the kernel operands: (mma, device, (q, k, v, i32, f32), (C0, n0, m0)).
    Sequence calls read q, k, v in place where possible; the step kernel takes contiguous,
    aligned operands. Gates and states are float32. Runs under `device`."""
    q, k, v, i, f = arrays
    mma = _mma(problem)
    _check_head_dims(problem.DK, problem.DV)
    cu = problem.cu_seqlens if _arrays.kind_of(problem.cu_seqlens) == "cuda" else None
    device = _same_device(dict(q=q, k=k, v=v, i=i, f=f, cu_seqlens=cu,
                               **({} if state is None else state._asdict())))
    with device:
        lay = problem.layout
        if sequence:
            operands = (_sequence_operand(q, lay), _sequence_operand(k, lay), _sequence_operand(v, lay),
                        _gate_operand(i), _gate_operand(f))
        else:
            operands = (_operand(q), _operand(k), _operand(v), _operand(i, _F32), _operand(f, _F32))
        return mma, device, operands, _state_f32(state, problem)


def _seq_table(problem):
    """Stage −1 (packed sequences only): the int32 table [token offsets | first chunk slots |
    sequence of each chunk slot] built on the device from cu_seqlens (coords.cuh). No host
    synchronisation: a NumPy cu_seqlens is uploaded, a CuPy one read by the kernel."""
    cp = _arrays.cupy_module()
    p = problem
    cu = p.cu_seqlens
    cu = cp.ascontiguousarray(cp.asarray(cu))
    NC = p.S // p.chunk_size + p.NSEQ
    table = cp.empty(2 * (p.NSEQ + 1) + NC, np.int32)
    params = make_params(cu_seqlens=cu, seq_table=table, S=p.S, L=p.chunk_size, NC=NC, NSEQ=p.NSEQ)
    _loader.get_kernel(seq_table_kernel(cu.dtype))(1, _SEQ_TABLE_THREADS, params)
    return cu, table


class _Launch:
    """Grids of one problem under one config, and the geometry every launch shares: sizes,
    chunk slots, the sequence table and the strides of the sequence tensors."""

    def __init__(self, problem, cfg, mma, seq_table=None):
        p = problem
        self.p, self.cfg, self.mma = p, cfg, mma
        self.gate = GATE_POLICY[(p.gate, p.normalize)]
        self.e = ELEMENT_BYTES[mma]
        self.BH = p.B * p.NH
        L = p.chunk_size
        # chunk slots per batch·head: ceil(S / L), or the bound floor(S / L) + N of packed input
        self.NC = p.S // L + p.NSEQ if p.varlen else _cdiv(p.S, L)
        self.NM = self.NC + (p.NSEQ if p.varlen else 1)  # m-state slots per batch·head
        self.seq_table = seq_table
        self.geometry = dict(BH=self.BH, S=p.S, DK=p.DK, DV=p.DV, L=L, NC=self.NC, NH=p.NH, NSEQ=p.NSEQ, NM=self.NM,
                             seq_table=seq_table, scale=p.scale, eps=p.eps)

    def strides(self, **named):
        """{st_<name>: (batch, head, token) element strides} of sequence tensors in the call's layout
        (N and M are internal and always (B, NH, S))."""
        out = {}
        for name, x in named.items():
            if x is None:
                continue
            layout = "bhsd" if name in ("N", "M") else self.p.layout
            out[f"st_{name}"] = _strides(x, layout)
        return out

    def params(self, **fields):
        """make_params with the shared geometry and the strides of every sequence tensor given."""
        seq = {n: fields.get(n) for n in ("q", "k", "v", "i", "f", "h", "dh", "dq", "dk", "dv", "di", "df", "N", "M")}
        return make_params(**self.geometry, **self.strides(**seq), **fields)

    def gate_arrays(self):
        """The per-chunk log-gate vectors stage 0 writes (chunk-aligned), unfilled."""
        cp = _arrays.cupy_module()
        L = self.p.chunk_size
        return dict(gate_a=cp.empty((self.BH, self.NC, L), _F32), gate_b=cp.empty((self.BH, self.NC, L), _F32),
                    gate_g=cp.empty((self.BH, self.NC), _F32), gate_amax=cp.empty((self.BH, self.NC), _F32))

    def gates_stage0_launch(self):
        """(kernel, grid, threads, shared bytes) of stage 0."""
        return (_loader.get_kernel(chunk_gates_kernel(self.gate)), self.NC * self.BH, _CHUNK_GATE_THREADS,
                chunk_gates_smem_bytes(self.p.chunk_size))

    def gates_stage0(self, params):
        """Stage 0 into the gate arrays of ``params`` (which also carries i and f)."""
        kernel, grid, threads, smem = self.gates_stage0_launch()
        kernel(grid, threads, params, smem)

    def gate_vectors(self, i32, f32):
        """Stage 0: the per-chunk log-gate vectors (chunk-aligned) every later stage reads."""
        g = self.gate_arrays()
        self.gates_stage0(self.params(i=i32, f=f32, **g))
        return g

    def states_launch(self, kind):
        t, p = self.cfg.states, self.p
        grid = _cdiv(p.DK, t.bk) * _cdiv(p.DV, t.bv) * p.NSEQ * p.NH
        name = state_kernels(self.mma, self.gate, t)[kind]
        return _loader.get_kernel(name), grid, t.threads, t.smem_bytes(self.e, p.chunk_size)

    def states(self, kind, params):
        kernel, grid, threads, smem = self.states_launch(kind)
        kernel(grid, threads, params, smem)

    def chunk_launch(self, kind):
        t, p = getattr(self.cfg, kind), self.p
        DZ = p.DV if kind in ("fwd_h", "bwd_dv") else p.DK
        grid = _cdiv(DZ, t.bn) * _cdiv(p.chunk_size, t.bm) * self.NC * self.BH
        name = chunk_kernel(f"{kind}_kernel", self.mma, self.gate, t)
        return _loader.get_kernel(name), grid, t.threads, t.smem_bytes(self.e, p.chunk_size)

    def chunk(self, kind, params):
        kernel, grid, threads, smem = self.chunk_launch(kind)
        kernel(grid, threads, params, smem)

    def chunk_sm90_launch(self, role):
        """(kernel, grid, threads, shared bytes) of the Hopper backward chunk kernel in `role`: one
        CTA per (half chunk, chunk slot, batch·head), every output column."""
        p = self.p
        DX = p.DK if role == "RoleDV" else p.DV
        return (_loader.get_kernel(bwd_chunk_sm90_kernel(self.mma, self.gate, role)), 2 * self.NC * self.BH,
                BWD_SM90_THREADS, bwd_sm90_smem_bytes(DX))

    def chunk_sm90(self, role, params):
        kernel, grid, threads, smem = self.chunk_sm90_launch(role)
        kernel(grid, threads, params, smem)

    def dstates(self, hopper, params, q, dh):
        """The reverse dC pass (dC_states, and dC0 where given) on the Hopper kernel (one warpgroup
        per 64 × 64 block of dC and sequence·head; bulk tensor copies where q and dh take tensor
        maps, else cp.async) or the sm80 state kernel."""
        if not hopper:
            return self.states("bwd_dstates_kernel", params)
        p = self.p
        st = self.strides(q=q, dh=dh)
        tma = _fused_operands_reason(p, (st["st_q"], st["st_dh"]), True) is None
        maps = (_tma.fused_maps(((q, st["st_q"]), (q, st["st_q"]), (dh, st["st_dh"])), p.S, p.NH, p.B) if tma
                else np.zeros(1, _tma.FUSED_MAPS_DTYPE))
        grid = (p.DK // BWD_SM90_BLOCK) * (p.DV // BWD_SM90_BLOCK) * p.NSEQ * p.NH
        _loader.get_kernel(bwd_dstates_sm90_kernel(self.mma, self.gate, tma))(
            grid, BWD_DSTATES_SM90_THREADS, (params, maps), BWD_DSTATES_SM90_SMEM_BYTES)

    def gates_grad(self, params):
        _loader.get_kernel(gates_kernel(self.gate))(self.p.NSEQ * self.p.NH, _GATE_THREADS, params)

    def parts(self, kind):
        return _cdiv(self.p.DK, getattr(self.cfg, kind).bn)


def _config(problem, mma, device):
    """The caller's KernelConfig (type checked at the boundary) or the heuristic's, checked
    against this device's shared-memory limit."""
    cfg = problem.config or pick_config(mma, problem.DK, problem.DV, problem.chunk_size)
    cfg.check(ELEMENT_BYTES[mma], problem.chunk_size, _loader.device_limits(device.id)[1])
    return cfg


def _forward_family(problem, cfg, mma, device, sms, operands_reason=None):
    """"sm90" (the fused Hopper forward) or "sm80" (the two-pass mma.sync forward) for this call:
    config.family, or with "auto" the TFLA_CUPY_FAMILY environment variable, or the default —
    sm90 on compute capability 9.0 where it covers the shape, sm80 otherwise (never an error).
    A grid of few walks (one CTA per DV block, sequence and head) is cut into segments
    (config.pick_segments); packed sequences are not, so with cu_seqlens "auto" also needs at least
    FUSED_AUTO_MIN_CTAS_PER_SM CTAs per SM (`sms`): below that each CTA walks a long sequence
    alone and the two-pass forward, which spreads the chunks over the GPU, is faster (bench/NOTES.md:
    the H200 measurements). `operands_reason`: why this call's arrays keep it off the fused forward
    (see _fused_operands_reason), or None. An explicit "sm90" that cannot run is a ValueError
    naming why."""
    p = problem
    reason = fused_fwd_unsupported(mma, p.DK, p.DV, p.chunk_size)
    if reason is None:
        reason = operands_reason
    few = None
    if p.varlen and (p.DV // FUSED_BV) * p.NSEQ * p.NH < FUSED_AUTO_MIN_CTAS_PER_SM * sms:
        few = "packed sequences with too few fused CTAs per SM"
    return _choose_family(cfg, device, reason, auto_reason=few)


def _choose_family(cfg, device, reason, auto_reason=None):
    """"sm80" or "sm90": config.family, or with "auto" the TFLA_CUPY_FAMILY environment variable,
    or the default — sm90 on compute capability 9.0 when `reason` (why the sm90 kernels do not
    cover the call) and `auto_reason` (why the default should not take them though they could run)
    are None, sm80 otherwise (never an error). An explicit "sm90" that cannot run (another device,
    a `reason`) is a ValueError naming why."""
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


def _backward_family(problem, cfg, mma, device):
    """"sm90" (the Hopper dq / dk / dv and dC kernels) or "sm80" for this call's backward token gradients,
    chosen as the forward's family is (_choose_family) with bwd_sm90_unsupported as the reason; the
    reverse dC pass follows it. The gate gradients are the sm80 kernel on both; the state recompute
    follows the forward's family (_recompute_states)."""
    p = problem
    return _choose_family(cfg, device, bwd_sm90_unsupported(mma, p.DK, p.DV, p.chunk_size))


def _fused_operands_reason(p, strides, h_aligned):
    """Why this call's arrays cannot take the fused forward (None if they can): it reads q, k, v by
    tensor maps (positive strides, cuda-bindings installed) and writes h in 16-byte pieces.
    ``strides``: the (batch, head, token) element strides of q, k, v; ``h_aligned``: whether the
    output h is 16-byte aligned."""
    why = _tma.unavailable()
    extents = (p.B, p.NH, p.S)
    if why is None and any(s <= 0 for st in strides for s, n in zip(st, extents) if n > 1):
        why = "its bulk tensor copies need positive strides of q, k and v"
    if why is None and not h_aligned:
        why = "its output h must be 16-byte aligned (the out buffer given is not)"
    return why


def _seq_strides(p, D):
    """(batch, head, token) element strides of a C-contiguous sequence tensor with D features."""
    return (p.NH * p.S * D, p.S * D, D) if p.layout == "bhsd" else (p.S * p.NH * D, D, p.NH * D)


class _ForwardPlan:
    """What a forward fixes once its signature is known: the config, the kernel family, the
    launches and the Params record with everything but its pointers. Cached per signature
    (problem, device, operand strides, the output h, the family override), so a call that repeats
    one only allocates its outputs, binds pointers and launches (docs/architecture.md: host path)."""

    def __init__(self, p, device, mma, strides, h_key):
        self.cfg = cfg = _config(p, mma, device)
        h_strides, h_aligned = h_key if h_key is not None else (_seq_strides(p, p.DV), True)
        self.family = _forward_family(p, cfg, mma, device, _loader.device_limits(device.id)[0],
                                      _fused_operands_reason(p, strides[:3], h_aligned))
        self.run = run = _Launch(p, cfg, mma)
        self.mma, self._states_launches = mma, None
        # the two-pass forward passes every chunk state between its kernels; the fused one writes
        # them only when the backward is to keep them
        self.with_states = self.family == "sm80" or p.keep_states
        self.strides = strides
        scratch = (p.NH * p.S, p.S, 1)  # N, M: (B, NH, S) float32
        ctas, sms = (p.DV // FUSED_BV) * p.NSEQ * p.NH, _loader.device_limits(device.id)[0]
        self.nseg, seg_chunks = 1, 0
        if self.family == "sm90" and not p.varlen:  # long sequences in segments when the walks cannot fill the GPU
            self.nseg, seg_chunks = pick_segments(ctas, run.NC, sms, cfg.segments)
        # the fused walks' work items (segment, sequence, head, DV block) and the SMs they share
        self.items, self.sms = ctas * self.nseg, sms
        self.template = make_params(**run.geometry, **dict(zip(("st_q", "st_k", "st_v", "st_i", "st_f"), strides)),
                                    st_h=h_strides, st_N=scratch, st_M=scratch, seg_chunks=seg_chunks, nseg=self.nseg)
        if self.family == "sm90":
            # stage 0b computes stage 0's vectors into its records itself: no gate arrays
            terms = (_loader.get_kernel(fused_terms_kernel(run.gate)), run.NC * run.BH, FUSED_TERMS_THREADS,
                     FUSED_TERMS_SMEM_BYTES, False)
            # persistent grids: at most one CTA per SM, each walking items (segment, sequence, head,
            # DV block) in turn
            fused = (_loader.get_kernel(fused_fwd_kernel(mma, run.gate)), min(self.items, sms), FUSED_THREADS,
                     FUSED_SMEM_BYTES, True)
            if self.nseg == 1:
                self.launches = (terms, fused)
            else:  # pass 1 (segment summaries), their fold, pass 2
                self.launches = (terms,
                                 (_loader.get_kernel(fused_fwd_kernel(mma, run.gate, mode="summary")),
                                  min(ctas * (self.nseg - 1), sms), FUSED_THREADS, FUSED_SMEM_BYTES, True),
                                 (_loader.get_kernel(segment_combine_kernel(run.gate)), p.NSEQ * p.NH,
                                  SEG_COMBINE_THREADS, 0, False),
                                 fused)
        else:
            self.launches = tuple(launch + (False,) for launch in (
                run.gates_stage0_launch(), run.states_launch("fwd_states_kernel"), run.chunk_launch("fwd_h")))

    def states_launches(self):
        """The backward's recompute of the chunk-boundary states on the fused path (sm90 plans):
        the forward's launches with the last in "states" mode (no Q, no outputs; its compact carve
        lets the persistent grid hold FUSED_STATES_CTAS_PER_SM CTAs per SM)."""
        if self._states_launches is None:
            last = (_loader.get_kernel(fused_fwd_kernel(self.mma, self.run.gate, mode="states")),
                    min(self.items, FUSED_STATES_CTAS_PER_SM * self.sms), FUSED_THREADS, FUSED_STATES_SMEM_BYTES, True)
            self._states_launches = self.launches[:-1] + (last,)
        return self._states_launches

    def buffers(self):
        """The fused path's scratch: stage 0b's records and, with segments, the segment summaries
        folded into the states entering segments 1 ..; {} on the sm80 family."""
        if self.family != "sm90":
            return {}
        cp = _arrays.cupy_module()
        p, run = self.run.p, self.run
        out = dict(gate_terms=cp.empty((run.BH, run.NC, FUSED_TERM_FLOATS), _F32))
        if self.nseg > 1:
            held = (self.nseg - 1, p.NSEQ, p.NH)
            out.update(seg_C=cp.empty(held + (p.DK, p.DV), _F32),
                       seg_n=cp.empty(held + (p.DK,), _F32) if p.has_n else None,
                       seg_m=cp.empty(held, _F32) if p.has_m else None)
        return out

    def launch(self, launches, params, q, k, v):
        """Run ``launches`` (this plan's, or states_launches()) on ``params``; the fused kernels also
        get the tensor maps of q, k, v."""
        p = self.run.p
        for kernel, grid, threads, smem, with_maps in launches:
            if with_maps:
                maps = _tma.fused_maps(tuple(zip((q, k, v), self.strides)), p.S, p.NH, p.B)
                kernel(grid, threads, (params, maps), smem)
            else:
                kernel(grid, threads, params, smem)


_PLANS = {}
_PLANS_MAX = 64


def _forward_plan(p, device, mma, operands, h_out):
    """The _ForwardPlan of this call, from the cache unless the call has packed sequences (their
    cu_seqlens is an array: no signature)."""
    lay = p.layout
    strides = tuple(_strides(x, lay) for x in operands)
    h_key = None if h_out is None else (_strides(h_out, lay), h_out.data.ptr % 16 == 0)
    if p.cu_seqlens is not None:
        return _ForwardPlan(p, device, mma, strides, h_key)
    key = (p, device.id, strides, h_key, os.environ.get(FAMILY_ENV))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _ForwardPlan(p, device, mma, strides, h_key)
    return plan


def _private(x, user):
    """``x`` when the conversion already copied it, else a copy: the saved context must not alias
    an input that the caller may later edit in place (that would change the gradients)."""
    return x.copy() if x is not None and x is user else x


def _out(out, name, empty):
    """The caller's preallocated ``out[name]`` (the JAX / PyTorch adapters write straight into
    their framework's buffers), else a new array from ``empty()``."""
    return out[name] if out is not None and name in out else empty()


def forward(problem, arrays, state, *, out=None, copy_saved=True):
    """``out``: optional preallocated outputs h, N, M, C_last, n_last, m_last (C-contiguous, of the
    shapes and dtypes below). ``copy_saved=False`` lets the context alias the inputs (for callers
    that never run the backward, or whose inputs are immutable)."""
    cp = _arrays.cupy_module()
    if out is not None and "C_last" in out:  # the last state into the caller's buffers (out_state)
        from ._step_plan import check_disjoint, check_state_buffers
        last = MLSTMState(out["C_last"], out.get("n_last"), out.get("m_last"))
        check_state_buffers("out_state", last, problem)
        check_disjoint(last, state)
    mma, device, (q, k, v, i32, f32), (C0, n0, m0) = _gpu_inputs(problem, arrays, state)
    with device:
        if copy_saved:
            q, k, v, i32, f32 = (_private(x, u) for x, u in zip((q, k, v, i32, f32), arrays))
            if state is not None:
                C0, n0, m0 = (_private(x, u) for x, u in zip((C0, n0, m0), state))
        p = problem
        cu, table = _seq_table(p) if p.varlen else (None, None)
        h = _out(out, "h", lambda: cp.empty(p.seq_shape(p.DV), p.dtype))
        plan = _forward_plan(p, device, mma, (q, k, v, i32, f32), h if out is not None and "h" in out else None)
        cfg, run, family = plan.cfg, plan.run, plan.family
        BH, NC = run.BH, run.NC
        shape = (p.B, p.NH)
        states = (p.NSEQ, p.NH)
        N = _out(out, "N", lambda: cp.empty(shape + (p.S,), _F32)) if p.has_n else None
        M = _out(out, "M", lambda: cp.empty(shape + (p.S,), _F32)) if p.has_m else None
        with_states = plan.with_states
        C_states = cp.empty((BH, NC, p.DK, p.DV), p.dtype) if with_states else None
        n_states = cp.empty((BH, NC, p.DK), _F32) if p.has_n and with_states else None
        m_states = cp.empty((BH, run.NM), _F32) if p.has_m and with_states else None
        C_last = _out(out, "C_last", lambda: cp.empty(states + (p.DK, p.DV), _F32))
        n_last = _out(out, "n_last", lambda: cp.empty(states + (p.DK,), _F32)) if p.has_n else None
        m_last = _out(out, "m_last", lambda: cp.empty(states, _F32)) if p.has_m else None
        # the fused forward needs no gate arrays (the backward makes them if it runs), stage 0b's
        # records instead
        gates = run.gate_arrays() if family == "sm80" else None
        params = bind_pointers(plan.template, q=q, k=k, v=v, i=i32, f=f32, C0=C0, n0=n0, m0=m0, h=h, N=N, M=M,
                               C_last=C_last, n_last=n_last, m_last=m_last, C_states=C_states, n_states=n_states,
                               m_states=m_states, seq_table=table, **(gates or {}), **plan.buffers())
        plan.launch(plan.launches, params, q, k, v)
    saved = dict(q=q, k=k, v=v, i=i32, f=f32, C0=C0, n0=n0, m0=m0, N=N, M=M, C_last=C_last, gates=gates,
                 C_states=C_states if p.keep_states else None, m_states=m_states if p.keep_states else None,
                 dtypes=(arrays[3].dtype, arrays[4].dtype), mma=mma, cfg=cfg, device=device.id,
                 cu_seqlens=cu, seq_table=table)
    return h, MLSTMState(C_last, n_last, m_last), MLSTMContext("cuda", problem, saved)


def _saved_gates(run, saved):
    """The context's gate vectors; a fused forward keeps none, so stage 0 runs here then (B·NH·S
    work) and the context keeps them for a later backward."""
    if saved["gates"] is None:
        saved["gates"] = run.gate_vectors(saved["i"], saved["f"])
    return saved["gates"]


def _recompute_states(p, device, saved, C_states, m_states):
    """The chunk-boundary states (and stabilisers) of a forward whose context did not keep them,
    where the fused forward covers the call: its "states" mode (the forward's own launch plan:
    stage 0b, segments if any, then the state recurrence alone). False (nothing launched) where it
    does not; the caller then runs the two-pass forward's state pass. Either gives states
    consistent with the forward's N and M."""
    operands = tuple(saved[n] for n in ("q", "k", "v", "i", "f"))
    plan = _forward_plan(p, device, saved["mma"], operands, None)
    if plan.family != "sm90":
        return False
    q, k, v, i32, f32 = operands
    params = bind_pointers(plan.template, q=q, k=k, v=v, i=i32, f=f32, C0=saved["C0"], n0=saved["n0"],
                           m0=saved["m0"], C_states=C_states, m_states=m_states, seq_table=saved["seq_table"],
                           **plan.buffers())
    plan.launch(plan.states_launches(), params, q, k, v)
    return True


def backward(ctx, dh, dC_last, *, out=None):
    """``out``: optional preallocated outputs dq, dk, dv (dtypes of q, k, v), di, df (float32),
    dC0 (float32), as for :func:`forward`."""
    cp = _arrays.cupy_module()
    p, s = ctx.problem, ctx.saved
    device = cp.cuda.Device(s["device"])
    if dh.device.id != device.id or (dC_last is not None and dC_last.device.id != device.id):
        raise ValueError(f"dh, d_state: expected arrays on GPU {device.id}, where the forward ran")
    with device:
        run = _Launch(p, s["cfg"], s["mma"], s["seq_table"])
        BH, NC = run.BH, run.NC
        dh = _sequence_operand(dh, p.layout, p.dtype)
        dC_last = None if dC_last is None else _operand(dC_last)
        common = dict(q=s["q"], k=s["k"], v=s["v"], i=s["i"], f=s["f"], C0=s["C0"], n0=s["n0"], m0=s["m0"],
                      N=s["N"], M=s["M"], dh=dh, dC_last=dC_last, C_last=s["C_last"], **_saved_gates(run, s))
        C_states, m_states = s["C_states"], s["m_states"]
        if C_states is None:  # recompute the boundary states (default: saves NC·DK·DV per head)
            C_states = cp.empty((BH, NC, p.DK, p.DV), p.dtype)
            m_states = cp.empty((BH, run.NM), _F32) if p.has_m else None
            if not _recompute_states(p, device, s, C_states, m_states):
                run.states("fwd_states_kernel", run.params(**{**common, "C_last": None}, C_states=C_states,
                                                           m_states=m_states))
        hopper = _backward_family(p, s["cfg"], s["mma"], device) == "sm90"

        def token_grads(kind, params):  # dq, dk or dv on the family of this backward
            if hopper:
                run.chunk_sm90({"bwd_dq": "RoleDQ", "bwd_dk": "RoleDK", "bwd_dv": "RoleDV"}[kind], params)
            else:
                run.chunk(kind, params)

        def parts(kind):  # per-token partial dots q·dq, k·dk: one per output block (one CTA owns all on sm90)
            return 1 if hopper else run.parts(kind)

        dq = _out(out, "dq", lambda: cp.empty(p.seq_shape(p.DK), p.dtype))
        qdq = cp.empty((parts("bwd_dq"), BH, p.S), _F32)
        token_grads("bwd_dq", run.params(**common, C_states=C_states, m_states=m_states, dq=dq, qdq=qdq))
        del C_states  # dq was its last reader (unless the forward keeps it)

        dC_states = cp.empty((BH, NC, p.DK, p.DV), p.dtype)
        dC0 = _out(out, "dC0", lambda: cp.empty((p.NSEQ, p.NH, p.DK, p.DV), _F32)) if p.has_initial_state else None
        run.dstates(hopper, run.params(**common, m_states=m_states, dC_states=dC_states, dC0=dC0), s["q"], dh)
        dk = _out(out, "dk", lambda: cp.empty(p.seq_shape(p.DK), p.dtype))
        dv = _out(out, "dv", lambda: cp.empty(p.seq_shape(p.DV), p.dtype))
        kdk = cp.empty((parts("bwd_dk"), BH, p.S), _F32)
        params = run.params(**common, m_states=m_states, dC_states=dC_states, dk=dk, dv=dv, kdk=kdk)
        token_grads("bwd_dk", params)
        token_grads("bwd_dv", params)
        del dC_states

        di = _out(out, "di", lambda: cp.empty(p.seq_shape(), _F32))
        df = _out(out, "df", lambda: cp.empty(p.seq_shape(), _F32))
        run.gates_grad(run.params(**common, qdq=qdq, kdk=kdk, di=di, df=df, qdq_parts=qdq.shape[0],
                                  kdk_parts=kdk.shape[0]))
        di_dtype, df_dtype = s["dtypes"]
        di, df = di.astype(di_dtype, copy=False), df.astype(df_dtype, copy=False)
        d_initial = None
        if p.has_initial_state:
            d_initial = MLSTMState(dC0, cp.zeros((p.NSEQ, p.NH, p.DK), _F32) if p.has_n else None,
                                   cp.zeros((p.NSEQ, p.NH), _F32) if p.has_m else None)
    return MLSTMGrads(dq, dk, dv, di, df, d_initial)


def step(problem, arrays, state, out=None, indices=None, *, h_out=None):
    """One token: out-of-place (new buffers), into ``out`` (may be the input state) or, with
    ``indices``, in place on the rows of the pool ``state``. ``h_out``: a preallocated h (the
    JAX adapter writes into XLA's buffer)."""
    from ._step_plan import check_state_buffers, step_launch
    if indices is not None:
        check_state_buffers("state", state, problem)   # updated in place: never copied
    if out is not None:
        check_state_buffers("out_state", out, problem)
    mma, device, (q, k, v, i32, f32), (C0, n0, m0) = _gpu_inputs(problem, arrays, state, sequence=False)
    cp = _arrays.cupy_module()
    with device:
        p = problem
        if indices is not None and indices.device.id != device.id:
            raise ValueError(f"state_indices: expected an array on GPU {device.id}, got one on GPU {indices.device.id}")
        h = h_out if h_out is not None else cp.empty((p.B, p.NH, p.DV), p.dtype)
        if out is None:
            out = MLSTMState(cp.empty((p.B, p.NH, p.DK, p.DV), _F32),
                             cp.empty((p.B, p.NH, p.DK), _F32) if p.has_n else None,
                             cp.empty((p.B, p.NH), _F32) if p.has_m else None)
        run = step_launch(problem, mma, device.id, 0 if indices is None else state.C.shape[0])
        run(q, k, v, i32, f32, (C0, n0, m0), out, h, indices, private=True)
    return h, out


def segment_summary(problem, arrays, state, *, empty_m=None):
    """States-only forward for sequence parallelism (docs/distributed.md §1): stage 0 and the
    state pass with no outputs, no boundary states written. Returns (last state, G) with G
    (B, NH) float64 the sum of the slice's floored λ, from stage 0's per-chunk sums (the λ the
    state pass used). ``empty_m`` starts from the empty state C = 0, n = 0, m = empty_m
    instead of ``state``."""
    cp = _arrays.cupy_module()
    mma, device, (q, k, v, i32, f32), (C0, n0, m0) = _gpu_inputs(problem, arrays, state)
    with device:
        p = problem
        run = _Launch(p, _config(p, mma, device), mma)
        shape = (p.B, p.NH)
        if empty_m is not None:
            C0, n0 = None, None
            m0 = cp.full(shape, empty_m, _F32) if p.has_m else None
        C_last = cp.empty(shape + (p.DK, p.DV), _F32)
        n_last = cp.empty(shape + (p.DK,), _F32) if p.has_n else None
        m_last = cp.empty(shape, _F32) if p.has_m else None
        gates = run.gate_vectors(i32, f32)
        run.states("fwd_states_kernel", run.params(k=k, v=v, C0=C0, n0=n0, m0=m0, C_last=C_last, n_last=n_last,
                                                   m_last=m_last, **gates))
        G = gates["gate_g"].sum(axis=1, dtype=cp.float64).reshape(shape)
    return MLSTMState(C_last, n_last, m_last), G


def initial_state_grad(ctx, dh, dC_last):
    """d(initial C) alone (docs/distributed.md §2): the reverse dC pass of :func:`backward`
    without the token gradients, after recomputing the boundary stabilizers (a state pass,
    exp only) unless the forward kept them. Returns (B, NH, DK, DV) float32."""
    cp = _arrays.cupy_module()
    p, s = ctx.problem, ctx.saved
    with cp.cuda.Device(s["device"]):
        run = _Launch(p, s["cfg"], s["mma"], s.get("seq_table"))
        BH, NC = run.BH, run.NC
        common = dict(q=s["q"], k=s["k"], v=s["v"], i=s["i"], f=s["f"], C0=s["C0"], n0=s["n0"], m0=s["m0"],
                      N=s["N"], M=s["M"], **_saved_gates(run, s))
        m_states = s["m_states"]
        if p.has_m and m_states is None:
            m_states = cp.empty((BH, run.NM), _F32)
            run.states("fwd_states_kernel", run.params(**common, m_states=m_states))
        dC0 = cp.empty((p.NSEQ, p.NH, p.DK, p.DV), _F32)
        scratch = cp.empty((BH, NC, p.DK, p.DV), p.dtype)  # the kernel also writes every dC^(c)
        hopper = _backward_family(p, s["cfg"], s["mma"], cp.cuda.Device(s["device"])) == "sm90"
        dh = _sequence_operand(dh, p.layout, p.dtype)
        run.dstates(hopper, run.params(**common, dh=dh, dC_last=None if dC_last is None else _operand(dC_last),
                                       m_states=m_states, dC_states=scratch, dC0=dC0), s["q"], dh)
    return dC0


def context(problem, arrays, state, N, M, C_last):
    """The backward context of a forward whose outputs N, M, C_last were kept elsewhere (the JAX
    adapter keeps them as residuals of XLA): nothing is copied, the gate vectors are recomputed
    (stage 0, B·NH·S work). ``arrays`` are (q, k, v, i, f) with float32 gates."""
    mma, device, (q, k, v, i32, f32), (C0, n0, m0) = _gpu_inputs(problem, arrays, state)
    with device:
        cfg = _config(problem, mma, device)
        gates = _Launch(problem, cfg, mma).gate_vectors(i32, f32)
    saved = dict(q=q, k=k, v=v, i=i32, f=f32, C0=C0, n0=n0, m0=m0, N=N, M=M, C_last=C_last, gates=gates,
                 C_states=None, m_states=None, dtypes=(_F32, _F32), mma=mma, cfg=cfg, device=device.id,
                 cu_seqlens=None, seq_table=None)
    return MLSTMContext("cuda", problem, saved)
