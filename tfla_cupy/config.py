"""Launch configuration: the Python twin of cuda_src/config.cuh and the one heuristic.

Every block size used by a launch comes from a :class:`KernelConfig`, picked by
:func:`pick_config` or given by the caller (``config=`` of :func:`tfla_cupy.mlstm`).
:func:`all_instantiations` lists every kernel the heuristic can ask for; CI compiles them all.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ._arrays import BFLOAT16
from ._loader import NVRTC_OPTIONS_ENV, kernel_name  # noqa: F401  (the loader's variable, named here too)
from .reference.gates import GATE_SPECS

DEFAULT_CHUNK_SIZE = 128
#: Head dims the GPU kernels take (multiples of 8 up to these).
MAX_DK, MAX_DV = 512, 1024
SMEM_LIMIT_BYTES = 232_448   # H100/H200 opt-in per block; smaller devices are checked at launch

#: The compute policy (C++ ``tfla::Mma*``) per (dtype, precision).
MMA = {
    (np.dtype(BFLOAT16), "default"): "MmaBF16",
    (np.dtype(np.float16), "default"): "MmaF16",
    (np.dtype(np.float32), "default"): "MmaF32",
    (np.dtype(np.float32), "tf32"): "MmaTF32",
}
ELEMENT_BYTES = {"MmaBF16": 2, "MmaF16": 2, "MmaF32": 4, "MmaTF32": 4}
STORAGE_TYPE = {"MmaBF16": "tfla::bf16", "MmaF16": "tfla::f16", "MmaF32": "float", "MmaTF32": "float"}

#: Threads per CTA of the fixed-size kernels (C++ constants; tests/test_config.py compiles
#: static_asserts that the two sides agree).
THREADS = {"tfla::kStepThreads": 256, "tfla::kStepNmThreads": 128, "tfla::kGateThreads": 256,
           "tfla::kChunkGateThreads": 128, "tfla::kSeqTableThreads": 1024, "tfla::kSegCombineThreads": 256}

#: Chunk sizes: powers of two from MIN_CHUNK to MAX_CHUNK (the range the kernels are built and
#: tested for; the gate preparations keep a chunk's log gates in shared memory, L doubles each).
MIN_CHUNK, MAX_CHUNK = 16, 1024


#: The Hopper forward (cuda_src/fwd_fused_sm90.cuh, struct FusedFwdSmem): the chunk size and
#: DK it is built for, its DV block, threads and dynamic shared memory (tests/test_config.py
#: compiles static_asserts that these equal the C++ constants).
FUSED_FWD = {"tfla::FusedFwdSmem::kL": 128, "tfla::FusedFwdSmem::kDK": 128, "tfla::FusedFwdSmem::kBV": 64,
             "tfla::FusedFwdSmem::kThreads": 256, "tfla::FusedFwdSmem::kBytes": 230_432,
             # the states mode's compact carve (the backward's recompute), two CTAs per SM
             "tfla::FusedStatesSmem::kBytes": 111_648, "tfla::FusedStatesSmem::kCtasPerSm": 2,
             # stage 0b: the per-chunk gate record it reads, and the kernel that writes it
             "tfla::FusedTerms::kFloats": 900, "tfla::FusedTermsSmem::kThreads": 128,
             "tfla::FusedTermsSmem::kBytes": 5_120,
             # its tensor-map argument (tfla_cupy/_tma.py: FUSED_MAPS_DTYPE)
             "sizeof(tfla::FusedMaps)": 448, "alignof(tfla::FusedMaps)": 64,
             # segments of long sequences (cuda_src/segments.cuh)
             "tfla::kMaxSegments": 64}
#: Its modes: the kernel's Mode policy (cuda_src/fwd_fused_sm90.cuh).
FUSED_MODES = {"full": "FusedFull", "summary": "FusedSummary", "states": "FusedStates"}
FUSED_L = FUSED_FWD["tfla::FusedFwdSmem::kL"]
FUSED_DK = FUSED_FWD["tfla::FusedFwdSmem::kDK"]
FUSED_BV = FUSED_FWD["tfla::FusedFwdSmem::kBV"]
FUSED_THREADS = FUSED_FWD["tfla::FusedFwdSmem::kThreads"]
FUSED_SMEM_BYTES = FUSED_FWD["tfla::FusedFwdSmem::kBytes"]
FUSED_STATES_SMEM_BYTES = FUSED_FWD["tfla::FusedStatesSmem::kBytes"]
FUSED_STATES_CTAS_PER_SM = FUSED_FWD["tfla::FusedStatesSmem::kCtasPerSm"]
FUSED_TERM_FLOATS = FUSED_FWD["tfla::FusedTerms::kFloats"]
FUSED_TERMS_THREADS = FUSED_FWD["tfla::FusedTermsSmem::kThreads"]
FUSED_TERMS_SMEM_BYTES = FUSED_FWD["tfla::FusedTermsSmem::kBytes"]
FUSED_MAPS_BYTES = FUSED_FWD["sizeof(tfla::FusedMaps)"]
MAX_SEGMENTS = FUSED_FWD["tfla::kMaxSegments"]
SEG_COMBINE_THREADS = THREADS["tfla::kSegCombineThreads"]
#: The warp-specialised Hopper forward (cuda_src/fwd_ws_sm90.cuh, struct WsFwdSmem): chunk size, DK,
#: the DV columns of one CTA (two consumer warpgroups of 64), threads and dynamic shared memory.
FUSED_WS = {"tfla::WsFwdSmem::kL": 128, "tfla::WsFwdSmem::kDK": 128, "tfla::WsFwdSmem::kBV": 128,
            "tfla::WsFwdSmem::kThreads": 512, "tfla::WsFwdSmem::kBytes": 231_968}
#: Its modes: the forward, the segments' summary pass, the backward's recompute of the chunk states.
FUSED_WS_MODES = {"full": "WsFull", "summary": "WsSummary", "states": "WsStates"}
FUSED_WS_BV = FUSED_WS["tfla::WsFwdSmem::kBV"]
FUSED_WS_THREADS = FUSED_WS["tfla::WsFwdSmem::kThreads"]
FUSED_WS_SMEM_BYTES = FUSED_WS["tfla::WsFwdSmem::kBytes"]
assert FUSED_WS["tfla::WsFwdSmem::kL"] == FUSED_L and FUSED_WS["tfla::WsFwdSmem::kDK"] == FUSED_DK
#: Environment variable that turns the warp-specialised forward on ("1", wherever it covers the
#: call). The default ("auto", or "0") keeps the fused forward: the warp-specialised kernel has not
#: been run on a GPU yet (docs/performance.md, history "ws v1").
FWD_WS_ENV = "TFLA_CUPY_FWD_WS"
#: The segment heuristic's cost of one chunk in summary mode (pass 1: the state recurrence only)
#: relative to a full chunk of the fused forward, and the fixed cost of the two extra launches in
#: full chunk walks (estimates; docs/performance.md §8 has the measurements).
SEGMENT_SUMMARY_COST = 0.3
SEGMENT_FIXED_COST = 4.0

#: The Hopper backward token-gradient kernel (cuda_src/bwd_chunks_sm90.cuh, struct BwdSm90Smem):
#: the chunk size it is built for, its contraction and output blocks (head dims must be multiples
#: of them), threads, copy-stream depth and dynamic shared memory, which grows with the contraction
#: dimension DX (bwd_sm90_smem_bytes; checked against the C++ constants like FUSED_FWD).
BWD_SM90 = {"tfla::BwdSm90Smem::kL": 128, "tfla::BwdSm90Smem::kBX": 64, "tfla::BwdSm90Smem::kBN": 64,
            "tfla::BwdSm90Smem::kThreads": 128, "tfla::BwdSm90Smem::kStages": 4,
            "tfla::BwdSm90Smem::bytes(0)": 37_888, "tfla::BwdSm90Smem::kXBlk": 8_192,
            "tfla::BwdRecord::kBytes": 4_096}
BWD_SM90_L = BWD_SM90["tfla::BwdSm90Smem::kL"]
BWD_SM90_BLOCK = BWD_SM90["tfla::BwdSm90Smem::kBN"]
assert BWD_SM90["tfla::BwdSm90Smem::kBX"] == BWD_SM90_BLOCK
BWD_SM90_THREADS = BWD_SM90["tfla::BwdSm90Smem::kThreads"]
#: bytes of one chunk's gate record of the Hopper backward, written by its pre-pass bwd_terms_sm90_kernel
BWD_SM90_RECORD_BYTES = BWD_SM90["tfla::BwdRecord::kBytes"]
#: The Hopper reverse dC pass (cuda_src/bwd_dstates_sm90.cuh, struct BwdDStatesSm90Smem): one
#: warpgroup per 64 × 64 block of dC, its copy-stream depth and dynamic shared memory. It covers
#: what BWD_SM90 covers (the same chunk size and 64-wide blocks).
BWD_DSTATES_SM90 = {"tfla::BwdDStatesSm90Smem::kL": 128, "tfla::BwdDStatesSm90Smem::kBK": 64,
                    "tfla::BwdDStatesSm90Smem::kBV": 64, "tfla::BwdDStatesSm90Smem::kThreads": 128,
                    "tfla::BwdDStatesSm90Smem::kStages": 3, "tfla::BwdDStatesSm90Smem::kBytes": 99_840}
assert BWD_DSTATES_SM90["tfla::BwdDStatesSm90Smem::kL"] == BWD_SM90_L
assert BWD_DSTATES_SM90["tfla::BwdDStatesSm90Smem::kBK"] == BWD_DSTATES_SM90["tfla::BwdDStatesSm90Smem::kBV"] \
    == BWD_SM90_BLOCK
BWD_DSTATES_SM90_THREADS = BWD_DSTATES_SM90["tfla::BwdDStatesSm90Smem::kThreads"]
BWD_DSTATES_SM90_SMEM_BYTES = BWD_DSTATES_SM90["tfla::BwdDStatesSm90Smem::kBytes"]

#: The fused Hopper backward (cuda_src/bwd_walk_sm90.cuh, struct BwdWalkSm90Smem): one cluster of
#: DV / kBV CTAs per sequence·head walks the chunks in reverse with dC on chip. Chunk size, DK, the
#: value block per CTA, threads, the largest cluster and its dynamic shared memory.
BWD_WALK_SM90 = {"tfla::BwdWalkSm90Smem::kL": 128, "tfla::BwdWalkSm90Smem::kDK": 128,
                 "tfla::BwdWalkSm90Smem::kBV": 64, "tfla::BwdWalkSm90Smem::kThreads": 256,
                 "tfla::BwdWalkSm90Smem::kMaxParts": 8, "tfla::BwdWalkSm90Smem::kBytes": 210_944,
                 "tfla::WalkRecord::kBytes": 5_120}
BWD_WALK_L = BWD_WALK_SM90["tfla::BwdWalkSm90Smem::kL"]
BWD_WALK_DK = BWD_WALK_SM90["tfla::BwdWalkSm90Smem::kDK"]
BWD_WALK_BV = BWD_WALK_SM90["tfla::BwdWalkSm90Smem::kBV"]
BWD_WALK_THREADS = BWD_WALK_SM90["tfla::BwdWalkSm90Smem::kThreads"]
BWD_WALK_SMEM_BYTES = BWD_WALK_SM90["tfla::BwdWalkSm90Smem::kBytes"]
#: bytes of one chunk's gate record of the walk, written by its pre-pass walk_terms_kernel
WALK_RECORD_BYTES = BWD_WALK_SM90["tfla::WalkRecord::kBytes"]
#: The cluster sizes (value blocks per sequence·head) instantiated: DV = 64, 128, 256, 512.
BWD_WALK_PARTS = (1, 2, 4, 8)
assert max(BWD_WALK_PARTS) <= BWD_WALK_SM90["tfla::BwdWalkSm90Smem::kMaxParts"]
#: Environment variable that turns the fused backward on ("1", wherever it covers the call). The
#: default ("auto", or "0") keeps the per-stage kernels: measured on an H100 (2026-12-07, main shape,
#: docs/performance.md history "walk v1") the first version of the walk is 1.9× slower.
BWD_WALK_ENV = "TFLA_CUPY_BWD_WALK"


def bwd_sm90_smem_bytes(DX: int) -> int:
    """Dynamic shared memory of the Hopper backward kernel for contraction dimension DX (mirrors
    tfla::BwdSm90Smem::bytes: the fixed carve, then the resident 64 × DX rows of X)."""
    return BWD_SM90["tfla::BwdSm90Smem::bytes(0)"] + DX // BWD_SM90_BLOCK * BWD_SM90["tfla::BwdSm90Smem::kXBlk"]


#: The three roles of the backward chunk product (C++ tfla::RoleDQ / RoleDK / RoleDV).
BWD_ROLES = ("RoleDQ", "RoleDK", "RoleDV")

#: Kernel families: "sm80" (mma.sync, every GPU from compute capability 8.0; the fallback),
#: "sm90" (Hopper: wgmma; the fused forward with the chunk state on chip, and the backward's
#: dq / dk / dv kernels and reverse dC pass), "auto" (sm90 where it covers the call, else sm80;
#: the forward and the backward decide separately). The environment variable TFLA_CUPY_FAMILY overrides "auto".
FAMILIES = ("auto", "sm80", "sm90")
#: With packed sequences (which are not cut into segments) "auto" takes the fused forward when its
#: grid has at least this many CTAs per SM. Measured on the H200 (docs/performance.md §8, 2026-12-02): one
#: sequence of 65536 tokens, 16 heads = 64 CTAs (0.48 per SM), one walk each: fused 2.73 ms against
#: sm80 4.90 ms; below that the fused time stays that of one CTA's walk while the two-pass time
#: shrinks with the work, crossing near a quarter (an estimate from that one point).
FUSED_AUTO_MIN_CTAS_PER_SM = 0.25
FAMILY_ENV = "TFLA_CUPY_FAMILY"


def pick_segments(ctas: int, chunks: int, sms: int, forced: int = 0):
    """(segments, chunks per segment) of a fused forward with ``ctas`` walks of ``chunks`` chunks on
    ``sms`` SMs (one CTA each): ``forced`` (KernelConfig.segments) if non-zero, else the count of
    least modelled time — waves × chunks per segment for pass 2, SEGMENT_SUMMARY_COST of that for
    pass 1's nseg − 1 segments, SEGMENT_FIXED_COST for the extra launches — the fewest segments
    among near-ties (within 2 %). Chunks per segment is ceil(chunks / n) and the count is recomputed
    from it, so no segment is empty. (1, 0): no segments."""
    def waves(n):
        return -(-n // sms)

    def split(n):
        per = -(-chunks // n)
        return -(-chunks // per), per

    if chunks <= 1:
        return 1, 0
    if forced:
        n, per = split(min(forced, chunks))
        return (1, 0) if n == 1 else (n, per)
    best = []
    for n in range(1, min(MAX_SEGMENTS, chunks) + 1):
        n, per = split(n)
        cost = waves(ctas * n) * per
        if n > 1:
            cost += SEGMENT_SUMMARY_COST * waves(ctas * (n - 1)) * per + SEGMENT_FIXED_COST
        best.append((cost, n, per))
    low = min(c for c, _, _ in best)
    n, per = min((n, per) for c, n, per in best if c <= 1.02 * low)
    return (1, 0) if n == 1 else (n, per)


def fused_fwd_unsupported(mma: str, DK: int, DV: int, L: int):
    """None when the Hopper forward covers (mma, DK, DV, L), else the reason it does not."""
    if mma not in ("MmaBF16", "MmaF16"):
        return "it needs bfloat16 or float16 inputs (float32 and TF32 stay on the sm80 family)"
    if L != FUSED_L:
        return f"it is built for chunk_size {FUSED_L}, got {L}"
    if DK != FUSED_DK:
        return f"it is built for DK = {FUSED_DK}, got {DK}"
    if DV % FUSED_BV:
        return f"it needs DV a multiple of {FUSED_BV}, got {DV}"
    return None


def fused_ws_unsupported(mma: str, DK: int, DV: int, L: int):
    """None when the warp-specialised Hopper forward covers the call, else the reason it does not
    (the fused forward then runs it)."""
    why = fused_fwd_unsupported(mma, DK, DV, L)
    if why is not None:
        return why
    if DV % FUSED_WS_BV:
        return f"it needs DV a multiple of {FUSED_WS_BV}, got {DV}"
    return None


def bwd_sm90_unsupported(mma: str, DK: int, DV: int, L: int):
    """None when the Hopper backward kernels cover (mma, DK, DV, L), else the reason they do not."""
    if mma not in ("MmaBF16", "MmaF16"):
        return "it needs bfloat16 or float16 inputs (float32 and TF32 stay on the sm80 family)"
    if L != BWD_SM90_L:
        return f"its backward is built for chunk_size {BWD_SM90_L}, got {L}"
    if DK % BWD_SM90_BLOCK or DV % BWD_SM90_BLOCK:
        return f"its backward needs DK and DV multiples of {BWD_SM90_BLOCK}, got DK = {DK}, DV = {DV}"
    return None


def bwd_walk_unsupported(mma: str, DK: int, DV: int, L: int):
    """None when the fused Hopper backward covers (mma, DK, DV, L), else the reason it does not."""
    if mma not in ("MmaBF16", "MmaF16"):
        return "it needs bfloat16 or float16 inputs (float32 and TF32 stay on the sm80 family)"
    if L != BWD_WALK_L:
        return f"it is built for chunk_size {BWD_WALK_L}, got {L}"
    if DK != BWD_WALK_DK:
        return f"it is built for DK = {BWD_WALK_DK}, got {DK}"
    if DV % BWD_WALK_BV or DV // BWD_WALK_BV not in BWD_WALK_PARTS:
        return f"it needs DV in {tuple(BWD_WALK_BV * n for n in BWD_WALK_PARTS)}, got {DV}"
    return None


def chunk_gates_smem_bytes(L: int) -> int:  # mirrors tfla::chunk_gates_smem_bytes
    return 3 * 8 * L


#: The gate policy (C++ ``tfla::Gate*``) per (gate, normalize).
GATE_POLICY = {(name, normalize): cpp for name, spec in GATE_SPECS.items()
               for normalize, cpp in spec.cpp_policy.items()}


def default_chunk_size(S: int) -> int:
    """128 (the TFLA default), or the smallest power of two >= 16 covering a short sequence."""
    L = 16
    while L < min(S, DEFAULT_CHUNK_SIZE):
        L *= 2
    return L


def _pad(cols: int, e: int) -> int:
    return cols + 16 // e


@dataclass(frozen=True)
class StateTile:
    """Tile of the chunk-recurrence kernels (forward states, backward dC): a bk × bv state tile
    per CTA, chunks consumed bt steps at a time, wm × wn warps."""

    bk: int = 64
    bv: int = 128
    bt: int = 64
    wm: int = 4
    wn: int = 2

    @property
    def threads(self):
        return 32 * self.wm * self.wn

    def cpp(self):
        return f"tfla::StateTile<{self.bk}, {self.bv}, {self.bt}, {self.wm}, {self.wn}>"

    def smem_bytes(self, e: int, L: int) -> int:  # mirrors StateTile::smem_bytes
        groups = self.threads // (self.bk // 2)
        return 2 * e * self.bt * (_pad(self.bk, e) + _pad(self.bv, e)) + 4 * (2 * 3 * self.bt + self.bt + self.bk
                                                                            + groups * self.bk)

    def check(self):
        if self.bk % (16 * self.wm) or self.bv % (8 * self.wn) or self.bt % 16 or self.threads % (self.bk // 2):
            raise ValueError(f"config: invalid {self}: need bk % (16·wm) == 0, bv % (8·wn) == 0, bt % 16 == 0, "
                             f"32·wm·wn a multiple of bk/2")


@dataclass(frozen=True)
class ChunkTile:
    """Tile of the chunk-parallel kernels: bm rows per CTA, bl-row tiles of the other operand,
    bx-column blocks of the contraction dim, bn output columns; bm/16 × wn warps."""

    bm: int = 64
    bl: int = 64
    bx: int = 128
    bn: int = 128
    wn: int = 2

    @property
    def threads(self):
        return 32 * (self.bm // 16) * self.wn

    def cpp(self):
        return f"tfla::ChunkTile<{self.bm}, {self.bl}, {self.bx}, {self.bn}, {self.wn}>"

    def d_elems(self, e: int) -> int:
        return max(self.bx * _pad(self.bn, e), self.bn * _pad(self.bx, e))

    def smem_bytes(self, e: int, L: int) -> int:  # mirrors ChunkTile::smem_bytes
        tiles = (self.bm * _pad(self.bx, e) + self.bl * _pad(self.bx, e) + self.bl * _pad(self.bn, e)
                 + self.d_elems(e) + self.bm * _pad(self.bl, e))
        return e * tiles + 8 * (4 * L + 2 * self.bm) + 4 * (4 * self.bm + self.wn * self.bm + self.bx)

    def check(self):
        if (self.bm % 16 or self.bl % (16 * self.wn) or self.bn % (16 * self.wn) or self.bx % 16
                or (32 % (2 * self.wn))):
            raise ValueError(f"config: invalid {self}: need bm % 16 == 0, bl and bn multiples of 16·wn, "
                             f"bx % 16 == 0, wn in (1, 2, 4, 8, 16)")


@dataclass(frozen=True)
class KernelConfig:
    """All launch parameters of one call."""

    states: StateTile
    fwd_h: ChunkTile
    bwd_dq: ChunkTile
    bwd_dk: ChunkTile
    bwd_dv: ChunkTile
    #: kernel family of the forward (see FAMILIES); the tiles above are the sm80 family's
    family: str = "auto"
    #: segments per sequence of the fused forward (docs/architecture.md, "Segments"): 0 = the
    #: heuristic (pick_segments), 1 = none, 2 … MAX_SEGMENTS = that many (fewer if the sequence
    #: has fewer chunks). Ignored by the sm80 family and with packed sequences.
    segments: int = 0

    def check(self, e: int, L: int, smem_limit: int = SMEM_LIMIT_BYTES):
        if self.family not in FAMILIES:
            raise ValueError(f"config.family: expected one of {FAMILIES}, got {self.family!r}")
        if not isinstance(self.segments, int) or isinstance(self.segments, bool) or not 0 <= self.segments <= MAX_SEGMENTS:
            raise ValueError(f"config.segments: expected an int in [0, {MAX_SEGMENTS}], got {self.segments!r}")
        for name in ("states", "fwd_h", "bwd_dq", "bwd_dk", "bwd_dv"):
            tile = getattr(self, name)
            tile.check()
            need = tile.smem_bytes(e, L)
            if need > smem_limit:
                raise ValueError(f"config.{name}: {tile} needs {need} bytes of shared memory at chunk size {L}, "
                                 f"the device allows {smem_limit}")


def _chunk_tile(mma: str, L: int) -> ChunkTile:
    bm = min(64, L)
    wn = 1 if bm == 16 else 2
    wide = 128 if ELEMENT_BYTES[mma] == 2 else 64
    return ChunkTile(bm=bm, bl=bm, bx=wide, bn=wide, wn=wn)


def pick_config(mma: str, DK: int, DV: int, L: int) -> KernelConfig:
    """The heuristic. Row tiles follow the chunk size (64, or L for L < 64); contraction and
    output blocks are 128 columns for 16-bit operands (64 for fp32, whose tiles are twice the
    bytes); head dims beyond a block are streamed in blocks. Depends on (mma, L) only today;
    DK and DV are part of the signature because the choice is theirs to influence."""
    del DK, DV
    tile = _chunk_tile(mma, L)
    return KernelConfig(states=StateTile(), fwd_h=tile, bwd_dq=tile, bwd_dk=tile, bwd_dv=tile)


# ------------------------------------------------------------------------------------------
# Kernel names
# ------------------------------------------------------------------------------------------


def state_kernels(mma: str, gate: str, tile: StateTile):
    return {k: kernel_name(k, f"tfla::{mma}", gate, tile.cpp()) for k in ("fwd_states_kernel", "bwd_dstates_kernel")}


def chunk_kernel(kind: str, mma: str, gate: str, tile: ChunkTile):
    return kernel_name(kind, f"tfla::{mma}", gate, tile.cpp())


def fused_fwd_kernel(mma: str, gate: str, mode: str = "full"):
    """The fused Hopper forward in one of FUSED_MODES: "full" (the forward), "summary" (pass 1 of
    segments: segment end states only), "states" (the backward's recompute: chunk-boundary states
    only)."""
    return kernel_name("fwd_fused_sm90_kernel", STORAGE_TYPE[mma], gate, f"tfla::{FUSED_MODES[mode]}")


def fused_ws_kernel(mma: str, gate: str, mode: str = "full"):
    """The warp-specialised Hopper forward in one of FUSED_WS_MODES: "full" (the forward),
    "summary" (pass 1 of segments: segment end states only) or "states" (the backward's recompute:
    chunk-boundary states C and m only)."""
    return kernel_name("fwd_ws_sm90_kernel", STORAGE_TYPE[mma], gate, f"tfla::{FUSED_WS_MODES[mode]}")


def bwd_chunk_sm90_kernel(mma: str, gate: str, role: str):
    """The Hopper backward chunk product in one of BWD_ROLES (dq, dk or dv)."""
    return kernel_name("bwd_chunk_sm90_kernel", STORAGE_TYPE[mma], gate, f"tfla::{role}")


def bwd_dstates_sm90_kernel(mma: str, gate: str, tma: bool):
    """The Hopper reverse dC pass (the chunk-boundary state gradients), its tiles read by bulk
    tensor copies (``tma``: the call's q and dh have tensor maps) or by cp.async."""
    return kernel_name("bwd_dstates_sm90_kernel", STORAGE_TYPE[mma], gate, "true" if tma else "false")


def bwd_walk_sm90_kernel(mma: str, gate: str, parts: int):
    """The fused Hopper backward for DV = parts · BWD_WALK_BV (a cluster of ``parts`` CTAs)."""
    return kernel_name("bwd_walk_sm90_kernel", STORAGE_TYPE[mma], gate, str(parts))


def bwd_terms_sm90_kernel(gate: str):
    """The Hopper backward's pre-pass: every chunk's gate record (BwdRecord), read by dq, dk and dv."""
    return kernel_name("bwd_terms_sm90_kernel", gate)


def walk_terms_kernel(gate: str):
    """The fused backward's pre-pass: every chunk's gate record (WalkRecord)."""
    return kernel_name("walk_terms_kernel", gate)


def segment_combine_kernel(gate: str):
    return kernel_name("segment_combine_kernel", gate)


def fused_terms_kernel(gate: str):
    return kernel_name("fused_terms_kernel", gate)


def gates_kernel(gate: str):
    return kernel_name("bwd_gates_kernel", gate)


def chunk_gates_kernel(gate: str):
    return kernel_name("chunk_gates_kernel", gate)


def seq_table_kernel(index_dtype) -> str:
    """The kernel that builds the chunk table of packed sequences from int32 / int64 cu_seqlens."""
    return kernel_name("seq_table_kernel", {4: "int", 8: "long long"}[np.dtype(index_dtype).itemsize])


def step_kernel(mma: str, gate: str):
    return kernel_name("step_kernel", STORAGE_TYPE[mma], gate)


def step_nm_kernel(mma: str, gate: str):
    return kernel_name("step_nm_kernel", STORAGE_TYPE[mma], gate)


#: float4 columns per DV slab of the step kernel (``lanes``), widest first.
STEP_LANES = (32, 16, 8, 4, 2)
STEP_THREADS = THREADS["tfla::kStepThreads"]
STEP_NM_THREADS = THREADS["tfla::kStepNmThreads"]


def step_lanes(BH: int, DV: int, sms: int) -> int:
    """Width of the step kernel's DV slabs (in float4 columns): the widest slab (128 columns:
    512-byte rows per warp, the copy-kernel access pattern) that still launches >= 4 CTAs per SM,
    so that B = 1 and 8 fill the GPU too; never wider than DV needs. The decode step streams C
    once (docs/performance.md §2a): CTAs in flight matter, tiles do not."""
    need = 4 * sms
    DV4 = DV // 4
    fit = [w for w in STEP_LANES if w // 2 < DV4] or [STEP_LANES[-1]]
    for lanes in fit:
        if BH * -(-DV4 // lanes) >= need:
            return lanes
    return fit[-1]


def all_instantiations():
    """Every kernel the heuristic can launch, grouped by compute policy: {mma: [names]}."""
    out = {}
    for mma in ELEMENT_BYTES:
        names = []
        for gate in GATE_POLICY.values():
            tiles = {_chunk_tile(mma, L) for L in (16, 32, 64, 128, 256, 512, 1024)}
            names += state_kernels(mma, gate, StateTile()).values()
            for tile, kind in itertools.product(sorted(tiles, key=repr),
                                                ("fwd_h_kernel", "bwd_dq_kernel", "bwd_dk_kernel", "bwd_dv_kernel")):
                names.append(chunk_kernel(kind, mma, gate, tile))
            if mma != "MmaTF32":
                names += [step_kernel(mma, gate), step_nm_kernel(mma, gate)]
            if fused_fwd_unsupported(mma, FUSED_DK, FUSED_BV, FUSED_L) is None:
                names += [fused_fwd_kernel(mma, gate, mode) for mode in FUSED_MODES]
                names += [fused_ws_kernel(mma, gate, mode) for mode in FUSED_WS_MODES]
            if bwd_sm90_unsupported(mma, BWD_SM90_BLOCK, BWD_SM90_BLOCK, BWD_SM90_L) is None:
                names += [bwd_chunk_sm90_kernel(mma, gate, role) for role in BWD_ROLES]
                names += [bwd_dstates_sm90_kernel(mma, gate, tma) for tma in (True, False)]
            if bwd_walk_unsupported(mma, BWD_WALK_DK, BWD_WALK_BV, BWD_WALK_L) is None:
                names += [bwd_walk_sm90_kernel(mma, gate, parts) for parts in BWD_WALK_PARTS]
        if mma == "MmaF32":  # (they compute in fp32 whatever the inputs: listed once, here)
            names += stage_kernels()
        out[mma] = names
    return out


def stage_kernels():
    """The kernels of the stages every family shares, which compute in fp32 whatever the inputs:
    the gate preparations and records, the gate gradients, the segment fold, the packed-sequence
    table."""
    names = []
    for gate in GATE_POLICY.values():
        names += [gates_kernel(gate), chunk_gates_kernel(gate), fused_terms_kernel(gate), segment_combine_kernel(gate),
                  walk_terms_kernel(gate), bwd_terms_sm90_kernel(gate)]
    return names + [seq_table_kernel(np.int32), seq_table_kernel(np.int64)]
