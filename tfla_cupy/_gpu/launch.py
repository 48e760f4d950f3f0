"""Every launch of the GPU path, built in one place: a :class:`LaunchSpec` (kernel, grid,
block, dynamic shared memory, whether it takes tensor maps) per kernel family, from the
geometry of one call (:class:`Geometry`: sizes, chunk slots, strides, the Params record).

Grids are 1-d. The sm80 family tiles come from the call's KernelConfig; the Hopper kernels'
constants from config.py's mirrors of their C++ structs (tests/test_config.py checks both
sides). Kernels are fetched through ``_loader.get_kernel`` (compiled once per process and
device, thread-safe).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import _arrays, _loader, _tma
from .._params import POINTER_FIELDS, SEQUENCE_TENSORS, bind, make_params
from ..config import (BWD_DSTATES_SM90_SMEM_BYTES, BWD_DSTATES_SM90_THREADS, BWD_SM90_BLOCK, BWD_SM90_THREADS,
                      BWD_WALK_BV, BWD_WALK_SMEM_BYTES, BWD_WALK_THREADS, ELEMENT_BYTES, FUSED_SMEM_BYTES, FUSED_STATES_CTAS_PER_SM, FUSED_STATES_SMEM_BYTES,
                      FUSED_TERMS_SMEM_BYTES, FUSED_TERMS_THREADS, FUSED_THREADS, FUSED_WS_SMEM_BYTES, FUSED_WS_THREADS, GATE_POLICY, SEG_COMBINE_THREADS,
                      STEP_NM_THREADS, STEP_THREADS, THREADS, bwd_chunk_sm90_kernel, bwd_dstates_sm90_kernel,
                      bwd_sm90_smem_bytes, bwd_terms_sm90_kernel, bwd_walk_sm90_kernel, walk_terms_kernel, chunk_gates_kernel, chunk_gates_smem_bytes, chunk_kernel,
                      fused_fwd_kernel, fused_terms_kernel, fused_ws_kernel, gates_kernel, segment_combine_kernel, seq_table_kernel,
                      state_kernels, step_kernel, step_lanes, step_nm_kernel)
from .operands import F32, cdiv, strides

POINTER_NAMES = frozenset(POINTER_FIELDS)


class LaunchSpec(NamedTuple):
    """One kernel launch on the current stream: ``spec(params)``, or ``spec(params, maps)``
    for the kernels that also take the tensor maps of q, k, v (``maps``)."""

    kernel: Any          # a _loader.Kernel
    grid: int
    block: int
    smem: int = 0        # dynamic shared memory, bytes
    maps: bool = False   # takes a tensor-map record after its Params

    def __call__(self, params, *more):
        self.kernel(self.grid, self.block, (params, *more) if more else params, self.smem)


class Geometry:
    """Sizes of one problem under one config, and what every launch of it shares: chunk slots,
    the sequence table of packed input, the Params fields every record of the call holds, and
    the launch specs built so far. Built once per signature (geometry()), except with packed
    sequences, whose table is an array of the call."""

    def __init__(self, problem, cfg, mma, seq_table=None):
        p = problem
        self.p, self.cfg, self.mma = p, cfg, mma
        self.gate = GATE_POLICY[(p.gate, p.normalize)]
        self.e = ELEMENT_BYTES[mma]
        self.BH = p.B * p.NH
        L = p.chunk_size
        # chunk slots per batch·head: ceil(S / L), or the bound floor(S / L) + N of packed input
        self.NC = p.S // L + p.NSEQ if p.varlen else cdiv(p.S, L)
        self.NM = self.NC + (p.NSEQ if p.varlen else 1)  # m-state slots per batch·head
        self.seq_table = seq_table
        self.fields = dict(BH=self.BH, S=p.S, DK=p.DK, DV=p.DV, L=L, NC=self.NC, NH=p.NH, NSEQ=p.NSEQ, NM=self.NM,
                           scale=p.scale, eps=p.eps)
        scratch = (p.NH * p.S, p.S, 1)   # N, M: (B, NH, S) float32
        self.base = make_params(**self.fields, st_N=scratch, st_M=scratch).tobytes()
        self.specs = {}

    def strides(self, **named):
        """{st_<name>: (batch, head, token) element strides} of sequence tensors in the call's layout
        (N and M, internal, are always (B, NH, S) and in the base record)."""
        lay = self.p.layout
        return {f"st_{name}": strides(x, lay) for name, x in named.items()
                if x is not None and name not in ("N", "M")}

    def _split(self, fields):
        """(pointers, scalars, sequence tensors) of Params fields given by name."""
        pointers, scalars, seq = {}, {}, {}
        for name, x in fields.items():
            if name in POINTER_NAMES:
                pointers[name] = x
                if x is not None and name in SEQUENCE_TENSORS and name not in ("N", "M"):
                    seq[name] = x
            else:
                scalars[name] = x
        return pointers, scalars, seq

    def binder(self, **common):
        """params() for the launches of one call that share ``common`` fields (their strides are
        computed once)."""
        pointers, scalars, seq = self._split(common)
        pointers.setdefault("seq_table", self.seq_table)
        st = self.strides(**seq)

        def params(**fields):
            more_pointers, more_scalars, more_seq = self._split(fields)
            return bind(self.base, {**pointers, **more_pointers}, {**st, **self.strides(**more_seq)},
                        {**scalars, **more_scalars})
        return params

    def params(self, **fields):
        """A Params record: the base fields, every pointer given (arrays or device addresses), the
        strides of every sequence tensor given and any other field."""
        return self.binder()(**fields)

    def gate_layout(self):
        """The parts of stage 0's per-chunk log-gate vectors (chunk-aligned), for an Arena."""
        L = self.p.chunk_size
        return [("gate_a", self.BH * self.NC * L * 4), ("gate_b", self.BH * self.NC * L * 4),
                ("gate_g", self.BH * self.NC * 4), ("gate_amax", self.BH * self.NC * 4)]

    def gate_arrays(self):
        """Stage 0's vectors as arrays of their own, unfilled (sequence parallelism sums gate_g)."""
        cp = _arrays.cupy_module()
        L = self.p.chunk_size
        return dict(gate_a=cp.empty((self.BH, self.NC, L), F32), gate_b=cp.empty((self.BH, self.NC, L), F32),
                    gate_g=cp.empty((self.BH, self.NC), F32), gate_amax=cp.empty((self.BH, self.NC), F32))

    def gate_vectors(self, i32, f32):
        """Stage 0 into arrays of their own: the per-chunk log-gate vectors every later stage reads."""
        g = self.gate_arrays()
        chunk_gates(self)(self.params(i=i32, f=f32, **g))
        return g


_GEOMETRIES = {}


def geometry(problem, cfg, mma, seq_table=None):
    """The Geometry of a call: cached per (problem, config, policy, device) unless the call has
    packed sequences. Launch specs memoised in it hold the current device's kernels."""
    if seq_table is not None or problem.varlen:
        return Geometry(problem, cfg, mma, seq_table)
    key = (problem, cfg, mma, _arrays.cupy_module().cuda.Device().id)
    g = _GEOMETRIES.get(key)
    if g is None:
        g = Geometry(problem, cfg, mma)
        if len(_GEOMETRIES) >= 64:
            _GEOMETRIES.clear()
        _GEOMETRIES[key] = g
    return g


class Arena:
    """One allocation for a call's scratch buffers: the byte layout of named parts is fixed once
    (``parts``: (name, bytes), each part 256-byte aligned); each call allocates the whole and
    passes the parts to the kernels as device addresses."""

    def __init__(self, parts):
        self.offsets, total = {}, 0
        for name, nbytes in parts:
            self.offsets[name] = total
            total += -(-nbytes // 256) * 256
        self.nbytes = total

    def allocate(self):
        """(the allocation, {part: device address}); the allocation must outlive the kernels' use."""
        cp = _arrays.cupy_module()
        mem = cp.empty(max(self.nbytes, 256), np.uint8)
        base = mem.data.ptr
        return mem, {name: base + off for name, off in self.offsets.items()}


def _memo(build):
    """Memoise a launch-spec builder in its Geometry (the first argument)."""
    def cached(g, *args):
        key = (build.__name__, *args)
        spec = g.specs.get(key)
        if spec is None:
            spec = g.specs[key] = build(g, *args)
        return spec
    cached.__name__, cached.__doc__ = build.__name__, build.__doc__
    return cached


# ------------------------------------------------------------------------------------------
# Both families: gate stages and the packed-sequence table
# ------------------------------------------------------------------------------------------


def seq_table(index_dtype):
    """Stage −1 of packed sequences: one CTA builds the chunk table from cu_seqlens."""
    return LaunchSpec(_loader.get_kernel(seq_table_kernel(index_dtype)), 1, THREADS["tfla::kSeqTableThreads"])


@_memo
def chunk_gates(g):
    """Stage 0: one CTA per chunk slot and batch·head writes the chunk's log-gate vectors."""
    return LaunchSpec(_loader.get_kernel(chunk_gates_kernel(g.gate)), g.NC * g.BH, THREADS["tfla::kChunkGateThreads"],
                      chunk_gates_smem_bytes(g.p.chunk_size))


@_memo
def gates_grad(g):
    """Backward stage 3: di, df from the direct form's terms, one warp per chunk slot and batch·head."""
    warps = THREADS["tfla::kGateThreads"] // 32  # one warp per chunk slot and batch·head
    return LaunchSpec(_loader.get_kernel(gates_kernel(g.gate)), -(-g.NC * g.BH // warps), THREADS["tfla::kGateThreads"])


# ------------------------------------------------------------------------------------------
# sm80 family (mma.sync)
# ------------------------------------------------------------------------------------------


@_memo
def states(g, kind):
    """The chunk recurrence (``fwd_states_kernel`` or the reverse ``bwd_dstates_kernel``): one CTA
    per state tile, sequence and head."""
    t, p = g.cfg.states, g.p
    grid = cdiv(p.DK, t.bk) * cdiv(p.DV, t.bv) * p.NSEQ * p.NH
    return LaunchSpec(_loader.get_kernel(state_kernels(g.mma, g.gate, t)[kind]), grid, t.threads,
                      t.smem_bytes(g.e, p.chunk_size))


@_memo
def chunk(g, kind):
    """A chunk-parallel kernel (``fwd_h``, ``bwd_dq``, ``bwd_dk``, ``bwd_dv``): one CTA per output
    block, row tile, chunk slot and batch·head."""
    t, p = getattr(g.cfg, kind), g.p
    DZ = p.DV if kind in ("fwd_h", "bwd_dv") else p.DK
    grid = cdiv(DZ, t.bn) * cdiv(p.chunk_size, t.bm) * g.NC * g.BH
    return LaunchSpec(_loader.get_kernel(chunk_kernel(f"{kind}_kernel", g.mma, g.gate, t)), grid, t.threads,
                      t.smem_bytes(g.e, p.chunk_size))


def term_parts(g, kind):
    """Parts of the per-token gate-gradient terms an sm80 dq / dk kernel writes: one per output block."""
    return cdiv(g.p.DK, getattr(g.cfg, kind).bn)


def state_term_parts(g, hopper):
    """Parts of the chunk term B_c the reverse dC pass writes: one per warp and dC block."""
    p = g.p
    if hopper:
        return (p.DK // BWD_SM90_BLOCK) * (p.DV // BWD_SM90_BLOCK) * (BWD_DSTATES_SM90_THREADS // 32)
    t = g.cfg.states
    return cdiv(p.DK, t.bk) * cdiv(p.DV, t.bv) * (t.threads // 32)


# ------------------------------------------------------------------------------------------
# sm90 family (wgmma, bulk tensor copies)
# ------------------------------------------------------------------------------------------


@_memo
def fused_terms(g):
    """Stage 0b of the fused forward: one CTA per chunk slot and batch·head writes its gate record."""
    return LaunchSpec(_loader.get_kernel(fused_terms_kernel(g.gate)), g.NC * g.BH, FUSED_TERMS_THREADS,
                      FUSED_TERMS_SMEM_BYTES)


@_memo
def fused(g, mode, items, sms):
    """The fused forward in ``mode`` ("full", "summary", "states") on a persistent grid: at most
    one CTA per SM (two in the states mode, whose compact carve fits twice), each walking work
    items (segment, sequence, head, DV block) in turn."""
    per_sm, smem = (FUSED_STATES_CTAS_PER_SM, FUSED_STATES_SMEM_BYTES) if mode == "states" else (1, FUSED_SMEM_BYTES)
    return LaunchSpec(_loader.get_kernel(fused_fwd_kernel(g.mma, g.gate, mode)), min(items, per_sm * sms),
                      FUSED_THREADS, smem, True)


@_memo
def fused_ws(g, mode, items, sms):
    """The warp-specialised forward in ``mode`` ("full", "summary", "states") on a persistent grid of at most
    one CTA per SM, each walking work items (segment, sequence, head, pair of DV blocks) in turn."""
    return LaunchSpec(_loader.get_kernel(fused_ws_kernel(g.mma, g.gate, mode)), min(items, sms), FUSED_WS_THREADS,
                      FUSED_WS_SMEM_BYTES, True)


@_memo
def segment_combine(g):
    """The fold of segment summaries into the states entering segments 1 …: one CTA per
    sequence·head."""
    return LaunchSpec(_loader.get_kernel(segment_combine_kernel(g.gate)), g.p.NSEQ * g.p.NH, SEG_COMBINE_THREADS)


@_memo
def chunk_sm90(g, role):
    """The Hopper backward chunk product in ``role`` (RoleDQ, RoleDK, RoleDV): one CTA per (half
    chunk, chunk slot, batch·head), every output column; shared memory grows with the
    contraction dimension."""
    DX = g.p.DK if role == "RoleDV" else g.p.DV
    return LaunchSpec(_loader.get_kernel(bwd_chunk_sm90_kernel(g.mma, g.gate, role)), 2 * g.NC * g.BH,
                      BWD_SM90_THREADS, bwd_sm90_smem_bytes(DX))


@_memo
def terms_sm90(g):
    """The Hopper backward's pre-pass: one CTA per chunk slot and batch·head writes the chunk's gate
    record, which dq, dk and dv read."""
    return LaunchSpec(_loader.get_kernel(bwd_terms_sm90_kernel(g.gate)), g.NC * g.BH, BWD_SM90_THREADS)


@_memo
def dstates_sm90(g, tma):
    """The Hopper reverse dC pass: one warpgroup per 64 × 64 block of dC and sequence·head; tiles
    by bulk tensor copies (``tma``) or cp.async. It takes a tensor-map record either way."""
    p = g.p
    grid = (p.DK // BWD_SM90_BLOCK) * (p.DV // BWD_SM90_BLOCK) * p.NSEQ * p.NH
    return LaunchSpec(_loader.get_kernel(bwd_dstates_sm90_kernel(g.mma, g.gate, tma)), grid,
                      BWD_DSTATES_SM90_THREADS, BWD_DSTATES_SM90_SMEM_BYTES, True)


def walk_parts(g):
    """Value blocks of the fused Hopper backward: CTAs per cluster, and parts of its gate terms."""
    return g.p.DV // BWD_WALK_BV


@_memo
def walk_sm90(g):
    """The fused Hopper backward: one cluster of walk_parts CTAs (one 64-column value block each)
    per sequence·head walks the chunks in reverse."""
    p = g.p
    parts = walk_parts(g)
    return LaunchSpec(_loader.get_kernel(bwd_walk_sm90_kernel(g.mma, g.gate, parts)), parts * p.NSEQ * p.NH,
                      BWD_WALK_THREADS, BWD_WALK_SMEM_BYTES)


@_memo
def walk_terms(g):
    """The walk's pre-pass: one CTA per chunk slot and batch·head writes the chunk's gate record."""
    return LaunchSpec(_loader.get_kernel(walk_terms_kernel(g.gate)), g.NC * g.BH, BWD_WALK_THREADS)


def no_maps():
    """The tensor-map record of a kernel that reads by cp.async."""
    return np.zeros(1, _tma.FUSED_MAPS_DTYPE)


# ------------------------------------------------------------------------------------------
# The decode step (both families): step_kernel, then step_nm_kernel for in-place n, m
# ------------------------------------------------------------------------------------------


class StepSpecs(NamedTuple):
    """The two step kernels' CuPy functions (launched directly, no shared memory) and grids, and
    the DV slab width of the first."""

    k1: Any
    grid1: tuple
    k2: Any
    grid2: tuple
    lanes: int
    block1: tuple = (STEP_THREADS,)
    block2: tuple = (STEP_NM_THREADS,)


def step(problem, mma, device_id):
    p = problem
    BH = p.B * p.NH
    lanes = step_lanes(BH, p.DV, _loader.device_limits(device_id)[0])
    gate = GATE_POLICY[(p.gate, p.normalize)]
    k1 = _loader.kernel_on(device_id, step_kernel(mma, gate)).fn
    k2 = _loader.kernel_on(device_id, step_nm_kernel(mma, gate)).fn
    return StepSpecs(k1, (BH * cdiv(p.DV // 4, lanes),), k2, (BH,), lanes)
