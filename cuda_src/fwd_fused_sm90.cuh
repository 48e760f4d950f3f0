// tfla_cupy — the Hopper (sm_90a) forward: one fused pass per (sequence, head, DV block) whose
// chunk state never leaves the SM (docs/performance.md, road B; docs/math.md §4.2, §4.3).
//
// Stage 0b (fused_terms_kernel, all chunks in parallel) writes per chunk a FusedTerms record: the
// column exponents, the row prefix sums and their stabiliser maxima — everything of the gates that
// does not depend on the running stabiliser m, in the same double arithmetic as the two-pass
// output kernel (prepare_causal anchored at row 0) — plus stage 0's ā, g and max a, which it
// computes itself (chunk_gate_vectors): the fused forward launches no stage 0.
//
// A CTA of two warpgroups then walks its sequence's chunks in order. For chunk c (L = 128 tokens,
// DK = 128, a 64-column block of DV) with the state C^(c) in registers:
//   1. thread 0 has already issued the next chunk's bulk copies into the other stage (TMA boxes of
//      Q, K, V in the 128-byte swizzled layout wgmma reads, and the chunk's record), counted by an
//      mbarrier; rows past a ragged chunk's end are zeroed after it lands;
//   2. each thread combines the record with m for its two accumulator rows (M_r, the row scale
//      and exponent); ā for the state update goes to shared memory, Cᵀ (compute dtype, stmatrix)
//      and n^(c) (compute dtype) beside K;
//   3. warpgroup w (query rows 64w .. 64w + 63, state rows 64w .. 64w + 63):
//        [q·n | H | S_0] = Q_w · [n; Cᵀ; K_0]ᵀ      one m64n136 wgmma per k-step (B spans n, Cᵀ, K)
//        S_1 = Q_1 · K_1ᵀ                           warpgroup 1 only (the causal upper block)
//        H  ← s·β̄ ⊙ H,  P = exp2(row + col) ⊙ S, masked   registers -> A fragments
//        H += P · V                                 wgmma, A from registers, B = V MN-major
//        C ← γ C + Kᵀ · (ā ⊙ V)                     wgmma, A = K MN-major, B = ā ⊙ V MN-major
//      with ā ⊙ V on the CUDA cores during the first products, Σ ā k and the normalizer during
//      the second;
//   4. h = H / (N + ε), N = max(|s·β̄ q·n + Σ P|, e^{−M}), through shared memory into 16-byte
//      rows; n ← γ n + Σ ā k.
// Writes h, N, M as the two-pass forward does, the last state in fp32, and — when requested
// (keep_states) — the chunk-boundary states. Shapes it does not cover use the sm_80 family
// (tfla_cupy/config.py: fused_fwd_unsupported).
#pragma once
#include "coords.cuh"
#include "fused_schedule.cuh"
#include "gate_terms.cuh"
#include "swizzle.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

// Profiling build only (-DTFLA_FUSED_CLOCKS): thread 0 of each warpgroup
// adds the clock64() cycles of the seven phases of every chunk and the whole kernel into
// tfla_fused_clocks[warpgroup][phase] (phase 7: kernel, 8: chunks walked; 9-11 global-timer ns).
// Off, it is nothing.
#if defined(TFLA_FUSED_CLOCKS)
extern "C" {
__device__ unsigned long long tfla_fused_clocks[2][16];  // [9]: Σ CTA ns, [10] / [11]: first start / last end
}
__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
#define TFLA_FUSED_CLOCK(i)                              \
  do {                                                   \
    if ((threadIdx.x & 127) == 0) {                      \
      const long long now_ = clock64();                  \
      clk_phase_[threadIdx.x >> 7][i] += now_ - clk_prev_; \
      clk_prev_ = now_;                                  \
    }                                                    \
  } while (0)
#else
#define TFLA_FUSED_CLOCK(i) \
  do {                      \
  } while (0)
#endif

namespace tfla {

// Shared-memory carve (bytes from a 1024-aligned base; swizzle atoms need that alignment).
// Q and K tiles are two 64-column blocks of kL rows × 128 bytes, V one block (per stage); Cᵀ two
// blocks of kBV rows and n two rows, per stage beside K; ā ⊙ V one block; one FusedTerms record
// per stage.
struct FusedFwdSmem : SwizzledCarve {
  static constexpr int kL = 128, kDK = 128, kBV = 64, kWarpgroups = 2, kThreads = 128 * kWarpgroups;
  static constexpr int kBlk = kL * 128, kCtBlk = kBV * 128;
  // per stage: Q halves, then per DK half h one swizzle atom whose row 0 is n^(c) (rows 1..7 zero),
  // the Cᵀ rows and the K rows back to back, so that [n; Cᵀ; K_0] is one B operand of 8 + 64 + 64
  // rows (q·n, Q·C and Q·K_0ᵀ in one wgmma), then V
  static constexpr int kAtom = 1024;
  static constexpr int kQ = 0, kCtK = 2 * kBlk, kCtKHalf = kAtom + kCtBlk + kBlk, kV = kCtK + 2 * kCtKHalf,
                       kStage = kV + kBlk, kStages = 2;
  static constexpr int kVw = kStages * kStage;
  static constexpr int kAbar = kVw + kBlk, kNvec = kAbar + 4 * kL,
                       kNpart = kNvec + 4 * kDK, kNparts = kThreads / 32, kTerms = kNpart + 4 * kNparts * kDK,
                       kTermBytes = 4 * FusedTerms::kFloats, kEnd = kTerms + kStages * kTermBytes;
  static constexpr int kBytes = kEnd + 1024;  // dynamic shared memory: the carve plus alignment slack
  static constexpr int kStageTxBytes = 5 * kBlk + kTermBytes;  // what one stage's copies deliver
  static_assert(kBV * 2 == 128 && kDK == 2 * 64, "tiles are whole 128-byte swizzle rows");
  static_assert(kThreads == 2 * 16 * kL / 16 && kDK == 128, "Σ ā k: per warp 16 × 8 dimensions, 2 × 8 keys");
  static_assert(kTermBytes % 16 == 0 && kTerms % 16 == 0, "bulk copies move 16-byte multiples to 16-byte addresses");

  __device__ __forceinline__ char* q(int s) const { return base + s * kStage + kQ; }
  __device__ __forceinline__ char* nrow(int s, int h) const { return base + s * kStage + kCtK + h * kCtKHalf; }
  __device__ __forceinline__ char* ct(int s, int h) const { return nrow(s, h) + kAtom; }
  __device__ __forceinline__ char* k(int s, int h) const { return ct(s, h) + kCtBlk; }
  __device__ __forceinline__ char* v(int s) const { return base + s * kStage + kV; }
  __device__ __forceinline__ char* vw(int) const { return base + kVw; }  // one buffer for both stages
  __device__ __forceinline__ float* abar() const { return at<float>(kAbar); }
  __device__ __forceinline__ float* nvec() const { return at<float>(kNvec); }
  __device__ __forceinline__ float* npart() const { return at<float>(kNpart); }  // kNparts (warps) × kDK
  __device__ __forceinline__ float* terms(int s) const { return at<float>(kTerms + s * kTermBytes); }
};

// The carve of the states mode (the backward's recompute: no Q, no Cᵀ or n atoms, ā ⊙ V formed in
// place over the staged V, which that mode reads nowhere else): 109 KB, so two CTAs share an SM.
// Same accessors as FusedFwdSmem for what the mode touches.
struct FusedStatesSmem : SwizzledCarve {
  static constexpr int kL = FusedFwdSmem::kL, kDK = FusedFwdSmem::kDK, kBV = FusedFwdSmem::kBV,
                       kThreads = FusedFwdSmem::kThreads, kBlk = FusedFwdSmem::kBlk, kStages = 2, kCtasPerSm = 2;
  static constexpr int kK = 0, kV = 2 * kBlk, kStage = kV + kBlk;
  static constexpr int kAbar = kStages * kStage, kNvec = kAbar + 4 * kL, kNpart = kNvec + 4 * kDK,
                       kNparts = kThreads / 32, kTerms = kNpart + 4 * kNparts * kDK,
                       kTermBytes = FusedFwdSmem::kTermBytes, kEnd = kTerms + kStages * kTermBytes;
  static constexpr int kBytes = kEnd + 1024;                   // the carve plus alignment slack
  static constexpr int kStageTxBytes = 3 * kBlk + kTermBytes;  // K halves, V, the gate record
  static_assert(kStage % 1024 == 0 && kTerms % 16 == 0, "swizzle atoms 1024-aligned, records 16-aligned");
  static_assert(kCtasPerSm * (kBytes + 1024) <= 228 * 1024, "two CTAs per SM (1 KB reserved per CTA)");

  __device__ __forceinline__ char* k(int s, int h) const { return base + s * kStage + kK + h * kBlk; }
  __device__ __forceinline__ char* v(int s) const { return base + s * kStage + kV; }
  __device__ __forceinline__ char* vw(int s) const { return v(s); }  // in place
  __device__ __forceinline__ float* abar() const { return at<float>(kAbar); }
  __device__ __forceinline__ float* nvec() const { return at<float>(kNvec); }
  __device__ __forceinline__ float* npart() const { return at<float>(kNpart); }
  __device__ __forceinline__ float* terms(int s) const { return at<float>(kTerms + s * kTermBytes); }
};

template <bool kCompact> struct FusedCarve { using type = FusedFwdSmem; };
template <> struct FusedCarve<true> { using type = FusedStatesSmem; };

// Stage 0b: one CTA of 128 threads per chunk slot writes its FusedTerms record, with the same
// double arithmetic as the two-pass output kernel anchored at row 0 (prepare_causal).
struct FusedTermsSmem {
  static constexpr int kL = FusedTerms::kL, kThreads = kChunkGateThreads, kRows = kL;
  static constexpr int kLam = 0, kIota = 8 * kL, kScan = 16 * kL, kRowD = 24 * kL, kColLog = 32 * kL,
                       kBytes = 40 * kL;
  template <typename U> __device__ __forceinline__ U* at(int off) const {
    return reinterpret_cast<U*>(dynamic_smem() + off);
  }
  __device__ __forceinline__ double* lam() const { return at<double>(kLam); }
  __device__ __forceinline__ double* iota() const { return at<double>(kIota); }
  __device__ __forceinline__ double* scan() const { return at<double>(kScan); }
  __device__ __forceinline__ double* row_d() const { return at<double>(kRowD); }
  __device__ __forceinline__ float2* col_log() const { return at<float2>(kColLog); }
};

template <typename Gate>
__global__ void __launch_bounds__(FusedTermsSmem::kThreads) fused_terms_kernel(const Params p) {
  using Sm = FusedTermsSmem;
  constexpr int L = Sm::kL;
  const ChunkAt at(p, blockIdx.x % p.NC, blockIdx.x / p.NC);
  const int Lc = at.Lc, tid = threadIdx.x;
  if (Lc <= 0) return;  // surplus slots of packed input
  const Sm sm;
  const i64 slot = at.slot(p);
  float* rec = p.gate_terms + slot * FusedTerms::kFloats;
  // stage 0's vectors of this chunk straight into the record (the fused forward reads no gate
  // arrays), then the causal terms; both read the gates from global memory
  chunk_gate_vectors<Gate>(p, at, sm.lam(), sm.scan(), sm.iota(), rec + FusedTerms::kA, nullptr,
                           rec + FusedTerms::kG, rec + FusedTerms::kAmax);
  __syncthreads();
  const double b0 = prepare_causal<Gate>(p, sm, at, 0, Lc, Lc);
  __shared__ double kappa_max;
  if constexpr (Gate::kStabilized) {
    if (tid < 32) {
      if (tid == 0) kappa_max = sm.lam()[0];
      warp_scan_max(sm.scan() + 1, sm.lam() + 1, Lc - 1);  // max over (0, u] of κ
    }
    __syncthreads();
  }
  for (int u = tid; u < L; u += Sm::kThreads) {
    const bool ok = u < Lc;
    const double pr = sm.row_d()[u];
    double prpm = 0.0;
    if constexpr (Gate::kStabilized)
      if (ok) prpm = pr + (u == 0 ? kappa_max : fmax(kappa_max, sm.scan()[u]));
    reinterpret_cast<float2*>(rec + FusedTerms::kColLog)[u] = ok ? sm.col_log()[u] : make_float2(0.f, 0.f);
    reinterpret_cast<double*>(rec + FusedTerms::kPr)[u] = pr;
    reinterpret_cast<double*>(rec + FusedTerms::kPrPm)[u] = prpm;
  }
  if (tid == 0) *reinterpret_cast<double*>(rec + FusedTerms::kB0) = b0;
}

// One thread's two rows of its warpgroup's 64 query rows (rows g and g + 8 of its warp's 16,
// g = lane / 4) as the gate weights W[r][u] = exp2(row_log[r] + col_log[u]) need them: the rows'
// exponents, their positions in the chunk, and the thread's column pair t (columns 8j + 2t and
// 8j + 2t + 1 of every 8-key block j).
struct ScoreRows {
  float2 log_lo, log_hi;
  int lo, hi, t;
};

// Where a 64-key block lies relative to the diagonal of a warpgroup's 64 query rows: kBelow, every
// entry counts (rows past a ragged end have row exponent −inf, keys past it a zero score: both
// give 0); kDiagonal, keys u <= r only; kAbove, none (zero).
enum class Triangle { kBelow, kDiagonal, kAbove };

// P block of key half kHalf (keys 64 nb .. 64 nb + 63, nb = 0 or 1) of one thread's two rows from
// the score registers (S_0 at D[36 ..], S_1 in S1), into the A fragments P[4 nb .. 4 nb + 3] and
// the row sums rs_lo, rs_hi.
template <typename T, KeyHalf kHalf, Triangle kPart>
__device__ __forceinline__ void fused_p_block(const float (&D)[68], const float (&S1)[32], const float2* col_log,
                                              const ScoreRows& rows, float& rs_lo, float& rs_hi, u32 (&P)[8][4]) {
  constexpr int nb = int(kHalf);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float w[4] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (kPart != Triangle::kAbove) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = (e & 2) ? rows.hi : rows.lo, u = 64 * nb + 8 * j + 2 * rows.t + (e & 1);
        const float x = exp2f(add_split((e & 2) ? rows.log_hi : rows.log_lo, col_log[u])) *
                        (nb == 0 ? D[36 + 4 * j + e] : S1[4 * j + e]);
        w[e] = (kPart == Triangle::kBelow || u <= r) ? x : 0.f;
      }
    }
    rs_lo += w[0] + w[1];
    rs_hi += w[2] + w[3];
    const int kk = 4 * nb + (j >> 1), hh = (j & 1) * 2;
    P[kk][hh] = pack2<T>(w[0], w[1]);
    P[kk][hh + 1] = pack2<T>(w[2], w[3]);
  }
}

// ================================================================================================
// The fused walk in parts: its modes, the tile scheduler, the producer, the consumer's per-chunk
// steps and the epilogue. fwd_fused_sm90_kernel below strings them together in the order of the
// file header's steps 1-4.
// ================================================================================================

// The modes of the walk (the kernel's Mode policy; tfla_cupy/config.py: FUSED_MODES):
//   FusedFull     the forward: segment g > 0 starts from seg_*[g − 1], only the last segment
//                 writes the sequence's last state; chunk-boundary states when C_states is given;
//   FusedSummary  pass 1 of segments: items of segments 0 .. nseg − 2, from the initial state
//                 (segment 0) or the empty state, only the state recurrence — no Q, no outputs —
//                 and the end state into seg_C / seg_n / seg_m[g];
//   FusedStates   the backward's recompute of the chunk-boundary states: as FusedFull, but only
//                 the state recurrence (no Q, no h, N, M) and C_states / m_states written, on the
//                 compact carve (FusedStatesSmem), two CTAs per SM.
struct FusedFull {
  static constexpr bool kOutputs = true, kSummary = false, kCompact = false;
  static constexpr int kCtasPerSm = 1;
  using Carve = FusedFwdSmem;
};
struct FusedSummary {
  static constexpr bool kOutputs = false, kSummary = true, kCompact = false;
  static constexpr int kCtasPerSm = 1;
  using Carve = FusedFwdSmem;
};
struct FusedStates {
  static constexpr bool kOutputs = false, kSummary = false, kCompact = true;  // no Q in the carve
  static constexpr int kCtasPerSm = FusedStatesSmem::kCtasPerSm;
  using Carve = FusedStatesSmem;
};

// ---- thread geometry ----------------------------------------------------------------------------

// One thread's place in the CTA: warpgroup wg (query rows 64·wg .., state rows 64·wg ..), warp and
// lane within it, and its two accumulator rows (rows g and g + 8 of its warp's 16, g = lane / 4;
// columns 8j + 2t, + 1 of every 8-column block j, t = lane % 4).
struct FusedLanes {
  int tid, warp, lane, wg, g, t, row_lo, row_hi;
  __device__ __forceinline__ FusedLanes() : tid(threadIdx.x), warp((tid >> 5) & 3), lane(tid & 31) {
    wg = __shfl_sync(0xffffffffu, tid >> 7, 0);  // warp-uniform: the wgmma branches are not divergent
    g = lane >> 2;
    t = lane & 3;
    row_lo = 64 * wg + 16 * warp + g;
    row_hi = row_lo + 8;
  }
  // element e of accumulator block j in a DK × DV fp32 state whose column v0 starts at base
  __device__ __forceinline__ i64 acc_at(const Params& p, i64 base, int j, int e) const {
    const int r = (e & 2) ? row_hi : row_lo, col = 8 * j + 2 * t + (e & 1);
    return base + i64(r) * p.DV + col;
  }
};

// ---- producer -----------------------------------------------------------------------------------

// Chunk c into stage s, by bulk copies that thread 0 issues and full[s] counts: Q (outputs only)
// and K as two 64-feature boxes, this CTA's V block, the chunk's gate record. Rows past a ragged
// chunk's end are zeroed once the stage has landed.
template <typename Mode>
struct FusedProducer {
  using Sm = typename Mode::Carve;
  static constexpr int kTxBytes = Mode::kOutputs || Mode::kCompact ? Sm::kStageTxBytes : Sm::kStageTxBytes - 2 * Sm::kBlk;
  const Params& p;
  const FusedMaps& maps;
  const Sm& sm;
  u64* full;  // one mbarrier per stage
  int tid;

  // the barriers; in the forward also rows 1..7 of the n atoms, which stay zero
  __device__ __forceinline__ void init(int nt) const {
    if (tid == 0) {
      for (int i = 0; i < Sm::kStages; ++i) mbar_init(&full[i], 1);
    }
    if constexpr (Mode::kOutputs) {
      for (int idx = tid; idx < Sm::kStages * 2 * Sm::kAtom / 16; idx += nt) {
        const int atom = idx / (Sm::kAtom / 16), piece = idx % (Sm::kAtom / 16);
        *reinterpret_cast<uint4*>(sm.nrow(atom >> 1, atom & 1) + 16 * piece) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }
  __device__ __forceinline__ void issue(const FusedItem& it, int c, int s) const {
    if (tid != 0) return;
    const SeqCoords& q = it.sq;
    const int tok = q.t0 + c * Sm::kL;  // the chunk's first token in the tensors' token coordinate
    auto load = [&](char* dst, const TensorMap& map, const int (&order)[3], int x) {
      tma_load_4d(dst, &map, x, map_coord(order[0], tok, q.h, q.b), map_coord(order[1], tok, q.h, q.b),
                  map_coord(order[2], tok, q.h, q.b), &full[s]);
    };
    fence_async_smem();  // the stage's last generic-proxy accesses (chunk c − 2) before the copies
    mbar_expect_tx(&full[s], kTxBytes);
    if constexpr (Mode::kOutputs) {
      load(sm.q(s), maps.q, maps.order[0], 0);
      load(sm.q(s) + Sm::kBlk, maps.q, maps.order[0], 64);
    }
    load(sm.k(s, 0), maps.k, maps.order[1], 0);
    load(sm.k(s, 1), maps.k, maps.order[1], 64);
    load(sm.v(s), maps.v, maps.order[2], it.vb * Sm::kBV);
    bulk_load(sm.terms(s), p.gate_terms + q.chunk_slot(p, c) * FusedTerms::kFloats, Sm::kTermBytes, &full[s]);
  }
  // After chunk c of ``item`` (stage s): the item's next chunk, or the next item's first one, into
  // the other stage, so that the pipeline never drains between items. True when that was the
  // next item's.
  __device__ __forceinline__ bool issue_next(const FusedSchedule& sched, int w, const FusedItem& item, int c,
                                             int s) const {
    if (c + 1 < item.ce) {
      issue(item, c + 1, s ^ 1);
    } else if (sched.has(sched.next(w))) {
      const FusedItem next = sched.item(p, sched.next(w));
      if (next.valid && next.cb < next.ce) {
        issue(next, next.cb, s ^ 1);
        return true;
      }
    }
    return false;
  }
  // Chunk ``it`` of this CTA (stage it & 1) landed; rows Lc .. of a ragged chunk zeroed (they may
  // hold the next sequence's tokens). The caller synchronises the CTA.
  __device__ __forceinline__ void land(int it, int Lc, int nt) const {
    const int s = it & 1;
    mbar_wait(&full[s], (it >> 1) & 1);  // the next chunk may be in flight
    if (Lc < Sm::kL) {
      if constexpr (!Mode::kCompact) {
        zero_rows_sw128(sm.q(s), Lc, Sm::kL, tid, nt);
        zero_rows_sw128(sm.q(s) + Sm::kBlk, Lc, Sm::kL, tid, nt);
      }
      zero_rows_sw128(sm.k(s, 0), Lc, Sm::kL, tid, nt);
      zero_rows_sw128(sm.k(s, 1), Lc, Sm::kL, tid, nt);
      zero_rows_sw128(sm.v(s), Lc, Sm::kL, tid, nt);
    }
  }
};

// ---- the state a walk starts from and ends with -------------------------------------------------

// The incoming state of ``item``: C rows 64·wg + (16·warp + g, +8), columns v0 + 8j + 2t (+1) into
// Cacc, n into shared memory, m returned. Segment 0 starts from the initial state, a later one
// from the empty state in summary mode, else from seg_*[g − 1].
template <typename Gate, typename Mode, typename Sm>
__device__ __forceinline__ float fused_state_in(const Params& p, const Sm& sm, const FusedLanes& ln,
                                                const FusedItem& item, float (&Cacc)[32]) {
  constexpr int DK = Sm::kDK;
  const i64 nsh = i64(p.NSEQ) * p.NH;
  const int seg = item.seg;
  const float *C_in = p.C0, *n_in = p.n0, *m_in = p.m0;
  i64 in_state = item.sq.state;
  if (seg > 0) {
    C_in = Mode::kSummary ? nullptr : p.seg_C;
    n_in = Mode::kSummary ? nullptr : p.seg_n;
    m_in = Mode::kSummary ? nullptr : p.seg_m;
    in_state = (seg - 1) * nsh + item.sq.state;
  }
  const i64 in_base = in_state * DK * p.DV + item.vb * Sm::kBV;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) Cacc[4 * j + e] = C_in != nullptr ? C_in[ln.acc_at(p, in_base, j, e)] : 0.f;
  if (ln.tid < DK) sm.nvec()[ln.tid] = (Gate::kNormalize && n_in != nullptr) ? n_in[in_state * DK + ln.tid] : 0.f;
  return (Gate::kStabilized && m_in != nullptr) ? m_in[in_state] : (Mode::kSummary && seg > 0 ? kEmptyM : 0.f);
}

// The state a walk ends with, fp32: in summary mode the segment's end state into seg_*[g]; else,
// by the sequence's last segment, the state after its last step (C_last, n_last, m_last, and
// the final m-state slot).
template <typename Gate, typename Mode, typename Sm>
__device__ __forceinline__ void fused_state_out(const Params& p, const Sm& sm, const FusedLanes& ln,
                                                const FusedItem& item, const float (&Cacc)[32], float m) {
  constexpr int DK = Sm::kDK;
  const SeqCoords& sq = item.sq;
  const int tid = ln.tid;
  if constexpr (Mode::kSummary) {
    const i64 out_state = item.seg * (i64(p.NSEQ) * p.NH) + sq.state, obase = out_state * DK * p.DV + item.vb * Sm::kBV;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) p.seg_C[ln.acc_at(p, obase, j, e)] = Cacc[4 * j + e];
    if (item.owns_nm() && Gate::kNormalize && tid < DK) p.seg_n[out_state * DK + tid] = sm.nvec()[tid];
    if (item.owns_nm() && Gate::kStabilized && tid == 0) p.seg_m[out_state] = m;
  } else if (item.last()) {
    if (item.owns_nm() && tid == 0 && Gate::kStabilized) {
      if (p.m_states != nullptr) p.m_states[sq.m_slot(p, sq.nc)] = m;
      if (p.m_last != nullptr) p.m_last[sq.state] = m;
    }
    if (p.C_last != nullptr) {
      const i64 cbase = i64(sq.state) * DK * p.DV + item.vb * Sm::kBV;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) p.C_last[ln.acc_at(p, cbase, j, e)] = Cacc[4 * j + e];
    }
    if (item.owns_nm() && Gate::kNormalize && p.n_last != nullptr && tid < DK)
      p.n_last[i64(sq.state) * DK + tid] = sm.nvec()[tid];
  }
}

// The state entering chunk c (keep_states, and the states mode): C^(c) in the compute dtype, n and
// m at the chunk boundary.
template <typename T, typename Gate, typename Mode, typename Sm>
__device__ __forceinline__ void fused_boundary_state(const Params& p, const Sm& sm, const FusedLanes& ln,
                                                     const FusedItem& item, int c, const float (&Cacc)[32], float m) {
  if constexpr (!Mode::kSummary) {
    constexpr int DK = Sm::kDK;
    const SeqCoords& sq = item.sq;
    const i64 slot = sq.chunk_slot(p, c);
    const int tid = ln.tid;
    if (p.C_states != nullptr) {
      T* Cs = ptr<T>(p.C_states) + slot * DK * p.DV + item.vb * Sm::kBV;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        store2(Cs + i64(ln.row_lo) * p.DV + 8 * j + 2 * ln.t, Cacc[4 * j], Cacc[4 * j + 1]);
        store2(Cs + i64(ln.row_hi) * p.DV + 8 * j + 2 * ln.t, Cacc[4 * j + 2], Cacc[4 * j + 3]);
      }
    }
    if (item.owns_nm() && Gate::kNormalize && p.n_states != nullptr && tid < DK) p.n_states[slot * DK + tid] = sm.nvec()[tid];
    if (item.owns_nm() && Gate::kStabilized && p.m_states != nullptr && tid == 0) p.m_states[sq.m_slot(p, c)] = m;
  }
}

// ---- consumer: the per-chunk step ---------------------------------------------------------------

// Step 2: the chunk's gates for one thread, from the staged record and the running stabiliser m:
// m after the chunk, the state's decay γ, ā's shift, and — in the forward — the thread's two rows
// (M_r, the row scale s·exp(A0 + p_r − M_r) and the split row exponent; zeros past Lc).
struct FusedChunkGates {
  float m_next, gamma, shift;
  float M_lo, M_hi, sc_lo, sc_hi;
  float2 rl_lo, rl_hi;
};
template <typename Gate, bool kRows>
__device__ __forceinline__ FusedChunkGates fused_chunk_gates(const Params& p, const float* tr, float m, int Lc,
                                                             const FusedLanes& ln, double log2_scale) {
  FusedChunkGates gt;
  const FusedChunkDecay d = fused_chunk_decay<Gate>(tr, m);
  gt.m_next = d.m_next;
  gt.gamma = d.gamma;
  gt.shift = d.shift;
  gt.M_lo = gt.M_hi = gt.sc_lo = gt.sc_hi = 0.f;
  gt.rl_lo = gt.rl_hi = make_float2(0.f, 0.f);
  if constexpr (kRows) {
    fused_row_terms<Gate>(p, tr, d.A0, ln.row_lo, Lc, log2_scale, gt.M_lo, gt.sc_lo, gt.rl_lo);
    fused_row_terms<Gate>(p, tr, d.A0, ln.row_hi, Lc, log2_scale, gt.M_hi, gt.sc_hi, gt.rl_hi);
  }
  return gt;
}

// Step 2: Cᵀ and n for the first product, beside K (the state rows of warpgroup w are Cᵀ columns
// 64w ..). stmatrix .trans: 8 × 8 blocks (j, hh) of C (rows 16·warp + 8hh + .., columns 8j + ..)
// become 16-byte pieces of Cᵀ rows 8j + .. (lane 8i + b addresses stored row b of block i).
template <typename T, typename Sm>
__device__ __forceinline__ void fused_stage_state(const Sm& sm, const FusedLanes& ln, int s, const float (&Cacc)[32]) {
  const int i = ln.lane >> 3, b = ln.lane & 7, hh = i & 1;
#pragma unroll
  for (int q4 = 0; q4 < 4; ++q4) {
    const int j = 2 * q4 + (i >> 1);
    stmatrix_x4_trans(sm.ct(s, ln.wg) + sw128_offset(8 * j + b, 16 * ln.warp + 8 * hh),
                      pack2<T>(Cacc[8 * q4], Cacc[8 * q4 + 1]), pack2<T>(Cacc[8 * q4 + 2], Cacc[8 * q4 + 3]),
                      pack2<T>(Cacc[8 * q4 + 4], Cacc[8 * q4 + 5]), pack2<T>(Cacc[8 * q4 + 6], Cacc[8 * q4 + 7]));
  }
  if (ln.tid < Sm::kDK)
    *reinterpret_cast<T*>(sm.nrow(s, ln.tid >> 6) + sw128_offset(0, ln.tid & 63)) = from_float<T>(sm.nvec()[ln.tid]);
}

// Step 3, first products (issued, committed, not waited for): D = Q_w · [n; Cᵀ; K_0]ᵀ (N = 136:
// q·n in column 0 = D[0] / D[2] of the quads' first threads, H = D[4, 36), the score block S_0 =
// D[36, 68)) and, for warpgroup 1, S_1 = Q_w · K_1ᵀ (the upper block of warpgroup 0 is never
// formed).
template <typename T, typename Sm>
__device__ __forceinline__ void fused_scores_mma(const Sm& sm, int wg, int s, float (&Cacc)[32], float (&D)[68],
                                                 float (&S1)[32]) {
  fence_regs(Cacc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const u64 da = sw128_desc(sm.q(s) + (kk >> 2) * Sm::kBlk + wg * 64 * 128 + 32 * (kk & 3));
    wgmma_ss_wide<T, 136>(D, da, sw128_desc(sm.nrow(s, kk >> 2) + 32 * (kk & 3)), kk > 0);
  }
  if (wg == 1) {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const u64 da = sw128_desc(sm.q(s) + (kk >> 2) * Sm::kBlk + 64 * 128 + 32 * (kk & 3));
      wgmma_ss<T, Major::kK, Major::kK>(S1, da, sw128_desc(sm.k(s, kk >> 2) + 64 * 128 + 32 * (kk & 3)), kk > 0);
    }
  }
  wgmma_commit();
}

// Step 3, once the first products landed: H ← s·β̄ ⊙ H (the inter-chunk term), q·n of the
// thread's rows, and the gated, masked scores P = exp2(row + col) ⊙ S as A fragments with their
// row sums.
struct FusedScores {
  float H[32], qn_lo, qn_hi, rs_lo, rs_hi;
  u32 P[8][4];
};
template <typename T>
__device__ __forceinline__ void fused_score_tiles(const FusedLanes& ln, const FusedChunkGates& gt,
                                                  const float2* col_log, float (&D)[68], float (&S1)[32],
                                                  FusedScores& sc) {
  fence_regs(D);
  fence_regs(S1);
#pragma unroll
  for (int e = 0; e < 32; ++e) sc.H[e] = D[4 + e] * ((e & 2) ? gt.sc_hi : gt.sc_lo);
  sc.qn_lo = __shfl_sync(0xffffffffu, D[0], ln.lane & ~3);
  sc.qn_hi = __shfl_sync(0xffffffffu, D[2], ln.lane & ~3);
  const ScoreRows score_rows{gt.rl_lo, gt.rl_hi, ln.row_lo, ln.row_hi, ln.t};
  if (ln.wg == 0) {  // query rows 0 .. 63
    fused_p_block<T, KeyHalf::kLow, Triangle::kDiagonal>(D, S1, col_log, score_rows, sc.rs_lo, sc.rs_hi, sc.P);
    fused_p_block<T, KeyHalf::kHigh, Triangle::kAbove>(D, S1, col_log, score_rows, sc.rs_lo, sc.rs_hi, sc.P);
  } else {           // query rows 64 .. 127
    fused_p_block<T, KeyHalf::kLow, Triangle::kBelow>(D, S1, col_log, score_rows, sc.rs_lo, sc.rs_hi, sc.P);
    fused_p_block<T, KeyHalf::kHigh, Triangle::kDiagonal>(D, S1, col_log, score_rows, sc.rs_lo, sc.rs_hi, sc.P);
  }
}

// Step 3, second products (issued, committed, not waited for): H += P · V (A from registers, B = V
// MN-major; keys past the warpgroup's last row skipped) in the forward, and the state update
// C ← γ C + Kᵀ · (ā ⊙ V) (A = K MN-major, B = ā ⊙ V MN-major).
template <typename T, typename Mode, typename Sm>
__device__ __forceinline__ void fused_update_mma(const Sm& sm, int wg, int s, float gamma, float (&Cacc)[32],
                                                 FusedScores& sc) {
#pragma unroll
  for (int e = 0; e < 32; ++e) Cacc[e] *= gamma;
  fence_regs(Cacc);
  if constexpr (Mode::kOutputs) {
    fence_regs(sc.H);
    fence_regs(sc.P);
  }
  wgmma_fence();
  if constexpr (Mode::kOutputs) {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      if (kk >= 4 * (wg + 1)) break;  // keys past this warpgroup's last row
      wgmma_rs<T, Major::kMN>(sc.H, sc.P[kk], sw128_desc_mn(sm.v(s) + 2048 * kk, 1024), 1);
    }
  }
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
    wgmma_ss<T, Major::kMN, Major::kMN>(Cacc, sw128_desc_mn(sm.k(s, wg) + 2048 * kk, 1024),
                                        sw128_desc_mn(sm.vw(s) + 2048 * kk, 1024), 1);
  wgmma_commit();
}

// Step 4 (CUDA cores, beside the second products): this warp's part of Σ ā k (8 keys × 8
// dimensions per thread, 16 keys per warp) into npart.
template <typename T, typename Sm>
__device__ __forceinline__ void fused_key_sum_part(const Sm& sm, const FusedLanes& ln, int s) {
  const int tid = ln.tid, d8 = tid & 15, tg = tid >> 4;
  const char* kb = sm.k(s, d8 >> 3);
  float acc[8] = {};
#pragma unroll
  for (int uu = 0; uu < 8; ++uu) {
    const int u = 8 * tg + uu;
    const float w = sm.abar()[u];
    const uint4 x = *reinterpret_cast<const uint4*>(kb + sw128_offset(u, 8 * (d8 & 7)));
    const T* e8 = reinterpret_cast<const T*>(&x);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = fmaf(w, to_float(e8[e]), acc[e]);
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], 16);  // the warp's two key groups
  if (ln.lane < 16) {
    float4* np = reinterpret_cast<float4*>(sm.npart() + (tid >> 5) * Sm::kDK + 8 * d8);
    np[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    np[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
  }
}

// Step 4: the normalizer of the thread's two rows, N = max(|s·β̄ q·n + Σ P|, e^{−M}) (N and M
// written by the item's first DV block); returns 1 / (N + ε) in inv_lo, inv_hi.
template <typename Gate>
__device__ __forceinline__ void fused_normalizer(const Params& p, const FusedLanes& ln, const FusedItem& item,
                                                 const FusedChunkGates& gt, FusedScores& sc, int Lc, int u0,
                                                 float& inv_lo, float& inv_hi) {
  const SeqCoords& sq = item.sq;
  sc.rs_lo = quad_sum(sc.rs_lo);
  sc.rs_hi = quad_sum(sc.rs_hi);
  const float den_lo = gt.sc_lo * sc.qn_lo + sc.rs_lo, den_hi = gt.sc_hi * sc.qn_hi + sc.rs_hi;
  const float N_lo = fmaxf(fabsf(den_lo), expf(-gt.M_lo));
  const float N_hi = fmaxf(fabsf(den_hi), expf(-gt.M_hi));
  inv_lo = 1.f / (N_lo + p.eps);
  inv_hi = 1.f / (N_hi + p.eps);
  if (item.owns_nm() && ln.t == 0) {
    if (ln.row_lo < Lc) {
      p.N[sq.tok(p.st_N, u0 + ln.row_lo)] = N_lo;
      if (Gate::kStabilized) p.M[sq.tok(p.st_M, u0 + ln.row_lo)] = gt.M_lo;
    }
    if (ln.row_hi < Lc) {
      p.N[sq.tok(p.st_N, u0 + ln.row_hi)] = N_hi;
      if (Gate::kStabilized) p.M[sq.tok(p.st_M, u0 + ln.row_hi)] = gt.M_hi;
    }
  }
}

// ---- epilogue of a chunk ------------------------------------------------------------------------

// h = H / (N + ε) of the warpgroup's 64 rows, through shared memory (its Cᵀ tile, free since the
// first products) so that each row leaves in 16-byte pieces; swizzled, so without bank conflicts.
template <typename T, typename Sm>
__device__ __forceinline__ void fused_store_h(const Params& p, const Sm& sm, const FusedLanes& ln,
                                              const FusedItem& item, int s, const float (&H)[32], float inv_lo,
                                              float inv_hi, int Lc, int u0) {
  char* hs = sm.ct(s, ln.wg);
  const int rl = 16 * ln.warp + ln.g;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    *reinterpret_cast<u32*>(hs + sw128_offset(rl, 8 * j + 2 * ln.t)) = pack2<T>(H[4 * j] * inv_lo, H[4 * j + 1] * inv_lo);
    *reinterpret_cast<u32*>(hs + sw128_offset(rl + 8, 8 * j + 2 * ln.t)) =
        pack2<T>(H[4 * j + 2] * inv_hi, H[4 * j + 3] * inv_hi);
  }
  named_barrier_sync(1 + ln.wg, 128);
  T* Hg = ptr<T>(p.h) + item.sq.tok(p.st_h, u0) + item.vb * Sm::kBV;
#pragma unroll
  for (int idx = ln.tid & 127; idx < 64 * 8; idx += 128) {
    const int r = idx >> 3, j = idx & 7;
    if (64 * ln.wg + r < Lc)
      *reinterpret_cast<uint4*>(Hg + i64(64 * ln.wg + r) * p.st_h.t + 8 * j) =
          *reinterpret_cast<const uint4*>(hs + sw128_offset(r, 8 * j));
  }
}

// n ← γ n + Σ ā k, from the warps' parts (the caller synchronised the CTA after writing them).
template <typename Sm>
__device__ __forceinline__ void fused_update_n(const Sm& sm, int tid, float gamma) {
  if (tid < Sm::kDK) {
    float sum = 0.f;
#pragma unroll
    for (int g8 = 0; g8 < Sm::kNparts; ++g8) sum += sm.npart()[g8 * Sm::kDK + tid];
    sm.nvec()[tid] = gamma * sm.nvec()[tid] + sum;
  }
}

// ---- the kernel ---------------------------------------------------------------------------------

// The walk: per item its incoming state, then per chunk (steps 1-4 of the file header) the
// producer's copies one chunk ahead, the gates, the first products (scores and the inter-chunk
// term) beside ā ⊙ V, the score tiles, the second products (P · V and the state update) beside
// Σ ā k and the normalizer, the outputs; at the item's end its end state.
template <typename T, typename Gate, typename Mode>
__global__ void __launch_bounds__(FusedFwdSmem::kThreads, Mode::kCtasPerSm)
    fwd_fused_sm90_kernel(const Params p, const __grid_constant__ FusedMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Sm = typename Mode::Carve;
  constexpr int L = Sm::kL, NT = Sm::kThreads;
  const Sm sm;
  const FusedLanes ln;
  const int tid = ln.tid;
  const FusedSchedule sched(p, Mode::kSummary, Sm::kBV);
  __shared__ __align__(8) u64 full[Sm::kStages];
  const FusedProducer<Mode> producer{p, maps, sm, full, tid};
  producer.init(NT);
  __syncthreads();
  const double log2_scale = double(log2f(p.scale));
#if defined(TFLA_FUSED_CLOCKS)
  __shared__ long long clk_phase_[2][8];
  if (tid < 16) clk_phase_[tid >> 3][tid & 7] = 0;
  __syncthreads();
  const long long clk_start_ = clock64();
  const unsigned long long ns_start_ = globaltimer_ns();
  long long clk_prev_ = clk_start_;
#endif

  int it = 0;          // chunks this CTA has walked: stage it & 1, mbarrier parity (it >> 1) & 1
  bool ahead = false;  // the current item's first chunk is already in flight
  for (int w = sched.first(); sched.has(w); w = sched.next(w)) {
    const FusedItem item = sched.item(p, w);
    if (!item.valid) continue;
    float Cacc[32];  // the state's rows of this thread (FusedLanes), fp32
    float m = fused_state_in<Gate, Mode>(p, sm, ln, item, Cacc);

    if (!ahead && item.cb < item.ce) producer.issue(item, item.cb, it & 1);
    ahead = false;
    for (int c = item.cb; c < item.ce; ++c, ++it) {
      const int s = it & 1, Lc = item.sq.chunk_len(p, c), u0 = c * L;
      ahead = producer.issue_next(sched, w, item, c, s);
      TFLA_FUSED_CLOCK(0);

      fused_boundary_state<T, Gate, Mode>(p, sm, ln, item, c, Cacc, m);
      producer.land(it, Lc, NT);
      __syncthreads();
      TFLA_FUSED_CLOCK(1);

      // ---- gates; ā for the state update; Cᵀ and n for the first product ----
      const float* tr = sm.terms(s);
      const FusedChunkGates gt = fused_chunk_gates<Gate, Mode::kOutputs>(p, tr, m, Lc, ln, log2_scale);
      if (tid < L) sm.abar()[tid] = tid < Lc ? expf(tr[FusedTerms::kA + tid] + gt.shift) : 0.f;
      const float2* col_log = reinterpret_cast<const float2*>(tr + FusedTerms::kColLog);
      if constexpr (Mode::kOutputs) fused_stage_state<T>(sm, ln, s, Cacc);
      fence_async_smem();  // generic-proxy writes (Cᵀ, zeroed rows) visible to wgmma
      __syncthreads();     // and the row terms to every thread
      TFLA_FUSED_CLOCK(2);

      // ---- first products on the tensor cores, ā ⊙ V on the CUDA cores; the score tiles ----
      float D[68], S1[32];
      if constexpr (Mode::kOutputs) fused_scores_mma<T>(sm, ln.wg, s, Cacc, D, S1);
      scale_rows_sw128<T>(sm.vw(s), sm.v(s), sm.abar(), L, tid, NT);  // same swizzled places
      FusedScores sc;
      sc.qn_lo = sc.qn_hi = sc.rs_lo = sc.rs_hi = 0.f;
      if constexpr (Mode::kOutputs) {
        wgmma_wait<0>();
        TFLA_FUSED_CLOCK(3);
        fused_score_tiles<T>(ln, gt, col_log, D, S1, sc);
      }
      fence_async_smem();  // ā ⊙ V visible to wgmma
      __syncthreads();     // both warpgroups' ā ⊙ V rows and q·n
      TFLA_FUSED_CLOCK(4);

      // ---- second products on the tensor cores, Σ ā k and the normalizer on the CUDA cores ----
      fused_update_mma<T, Mode>(sm, ln.wg, s, gt.gamma, Cacc, sc);
      if constexpr (Gate::kNormalize) fused_key_sum_part<T>(sm, ln, s);
      float inv_lo = 1.f, inv_hi = 1.f;
      if constexpr (Gate::kNormalize && Mode::kOutputs) fused_normalizer<Gate>(p, ln, item, gt, sc, Lc, u0, inv_lo, inv_hi);
      wgmma_wait<0>();
      TFLA_FUSED_CLOCK(5);
      fence_regs(Cacc);

      // ---- outputs, n ----
      if constexpr (Mode::kOutputs) {
        fence_regs(sc.H);
        fence_regs(sc.P);
        fused_store_h<T>(p, sm, ln, item, s, sc.H, inv_lo, inv_hi, Lc, u0);
      }
      if constexpr (Gate::kNormalize) {
        __syncthreads();  // every part of Σ ā k
        fused_update_n(sm, tid, gt.gamma);
      }
      m = gt.m_next;
      __syncthreads();  // stage s, Cᵀ, ā ⊙ V and the gate scratch are free again
      TFLA_FUSED_CLOCK(6);
    }
    fused_state_out<Gate, Mode>(p, sm, ln, item, Cacc, m);
    __syncthreads();  // sm.nvec was read above; the next item writes it
  }  // items

#if defined(TFLA_FUSED_CLOCKS)
  if ((tid & 127) == 0) {
    for (int i = 0; i < 7; ++i) atomicAdd(&tfla_fused_clocks[tid >> 7][i], (unsigned long long)clk_phase_[tid >> 7][i]);
    atomicAdd(&tfla_fused_clocks[tid >> 7][7], (unsigned long long)(clock64() - clk_start_));
    atomicAdd(&tfla_fused_clocks[tid >> 7][8], (unsigned long long)it);
    const unsigned long long ns_end = globaltimer_ns();
    atomicAdd(&tfla_fused_clocks[tid >> 7][9], ns_end - ns_start_);
    atomicMin(&tfla_fused_clocks[tid >> 7][10], ns_start_);
    atomicMax(&tfla_fused_clocks[tid >> 7][11], ns_end);
  }
#endif
#else
  __trap();
#endif
}

}  // namespace tfla
