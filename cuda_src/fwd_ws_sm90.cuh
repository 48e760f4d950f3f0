// tfla_cupy — the warp-specialised Hopper (sm_90a) forward: the fused forward's walk with its
// work split by role over four warpgroups, and the chunk state held transposed (docs/math.md §4.2,
// §4.3; docs/architecture.md, "The warp-specialised forward").
//
// A CTA walks items (segment, sequence·head, pair of 64-column DV blocks) as the fused forward
// does (fused_schedule.cuh, DV block 128), and per chunk c (L = 128 tokens, DK = 128):
//   warpgroup 0, the producer: one thread issues the bulk tensor copies of Q, K and the CTA's two
//     V blocks into a two-stage ring (full / empty mbarriers);
//   warpgroup 1, the scores: the gates from the chunk's FusedTerms record (stage 0b) and the
//     running stabiliser m; S = Q·Kᵀ in three 64 × 64 blocks (the causal ones) and q·n (an m64n8
//     product with n in a swizzle atom's first row); P = exp2(row + col) ⊙ S, masked, into shared
//     memory; the row scales s·β̄ and 1 / (N + ε); ā ⊙ K in place of K and n ← γ n + Σ ā k;
//   warpgroups 2 and 3, the consumers, one 64-column DV block each, hold Cᵀ (64 × DK, fp32):
//       Hᵀ  = Cᵀ · Qᵀ                 A = Cᵀ from registers (compute dtype), B = Q K-major
//       Hᵀ ← Hᵀ ⊙ s·β̄ (per column)   once the scores warpgroup's chunk is ready
//       Hᵀ += Vᵀ · Pᵀ                 A = V MN-major, B = P K-major
//       Cᵀ ← γ Cᵀ + Vᵀ · (ā ⊙ K)       A = V MN-major, B = ā ⊙ K MN-major
//     then h = Hᵀ ⊙ 1 / (N + ε) transposed (stmatrix) into their V block and out in 16-byte rows.
// The transposed state lets the score work (P, the normalizer, ā ⊙ K) be done once per pair of DV
// blocks instead of once per block, and the two consumers' products run while the scores
// warpgroup forms the next chunk's P.
//
// Hand-offs (mbarriers; phase k completes once per chunk):
//   full[s]   the producer's copies of stage s landed (transaction bytes);
//   empty[s]  both consumers are done with stage s (their V block holds h until it is stored);
//   ready     the scores warpgroup's chunk is in shared memory: P, the row scales, γ, ā ⊙ K;
//   pfree     both consumers are done with P and the row scales (the scores warpgroup waits for it
//             before it writes the next chunk's; it also keeps `ready` one phase ahead at most;
//             1 / (N + ε), read after it, has two buffers);
//   rec       the chunk's gate record landed (one buffer: the scores warpgroup copies the next
//             chunk's record in once it has used the current one).
//
// Modes (the Mode policy; tfla_cupy/config.py: FUSED_WS_MODES): WsFull, the forward (h, N, M, the
// last state; segment g > 0 starts from seg_*[g − 1]; with keep_states the chunk-boundary states
// C^(c), n, m); WsSummary, pass 1 of segments (segments 0 .. nseg − 2 from the initial or the empty
// state, only the recurrence, the end state into seg_*[g]); WsStates, the backward's recompute of
// the chunk-boundary states C^(c) (compute dtype) and m, without Q and outputs and without n.
// Shapes it does not cover use the fused forward (tfla_cupy/config.py: fused_ws_unsupported).
#pragma once
#include "coords.cuh"
#include "fused_schedule.cuh"
#include "gate_terms.cuh"
#include "swizzle.cuh"
#include "tma.cuh"
#include "warpspec.cuh"
#include "wgmma.cuh"

namespace tfla {

// Shared-memory carve (bytes from a 1024-aligned base). Per stage: Q and K as two 64-column DK
// blocks of 128 rows, then the CTA's two 64-column V blocks (consumer j's is block j). Then, once:
// the three causal 64 × 64 blocks of P (rows r, keys u: (0, 0), (1, 0), (1, 1)), two swizzle atoms
// whose row 0 is n (compute dtype; rows 1..7 zero), the gate record, the row scales and the row
// inverses 1 / (N + ε) (two buffers each), γ per stage, and the scores warps' parts of Σ ā k.
struct WsFwdSmem : SwizzledCarve {
  static constexpr int kL = 128, kDK = 128, kBV = 128, kHalfV = 64, kThreads = 512, kStages = 2;
  static constexpr int kBlk = kL * 128, kPBlk = 64 * 128, kAtom = 1024;
  static constexpr int kQ = 0, kK = 2 * kBlk, kV = 4 * kBlk, kStage = 6 * kBlk;
  static constexpr int kP = kStages * kStage, kNAtom = kP + 3 * kPBlk, kRec = kNAtom + 2 * kAtom,
                       kTermBytes = 4 * FusedTerms::kFloats, kRowSc = kRec + kTermBytes, kRowInv = kRowSc + 2 * 4 * kL,
                       kGamma = kRowInv + 2 * 4 * kL, kNPart = kGamma + 16, kEnd = kNPart + 4 * 4 * kDK;
  static constexpr int kBytes = kEnd + 1024;  // dynamic shared memory: the carve plus alignment slack
  static_assert(kBV == 2 * kHalfV && kDK == 2 * 64, "tiles are whole 128-byte swizzle rows");
  static_assert(kP % 1024 == 0 && kNAtom % 1024 == 0 && kRec % 16 == 0 && kTermBytes % 16 == 0, "alignment");
  static_assert(kBytes + 64 <= 227 * 1024, "one CTA per SM, with the static barriers");

  __device__ __forceinline__ char* q(int s, int b) const { return base + s * kStage + kQ + b * kBlk; }
  __device__ __forceinline__ char* k(int s, int b) const { return base + s * kStage + kK + b * kBlk; }
  __device__ __forceinline__ char* v(int s, int j) const { return base + s * kStage + kV + j * kBlk; }
  // P block i: 0 = (rows 0..63, keys 0..63), 1 = (rows 64..127, keys 0..63), 2 = (rows 64.., keys 64..)
  __device__ __forceinline__ char* p(int i) const { return base + kP + i * kPBlk; }
  __device__ __forceinline__ char* natom(int b) const { return base + kNAtom + b * kAtom; }
  __device__ __forceinline__ float* rec() const { return at<float>(kRec); }
  // the row terms of chunk it in buffer it & 1 (the consumers read a chunk's 1 / (N + ε) after they
  // released its P)
  __device__ __forceinline__ float* row_sc(int buf) const { return at<float>(kRowSc + buf * 4 * kL); }
  __device__ __forceinline__ float* row_inv(int buf) const { return at<float>(kRowInv + buf * 4 * kL); }
  __device__ __forceinline__ float* gamma() const { return at<float>(kGamma); }
  __device__ __forceinline__ float* npart() const { return at<float>(kNPart); }  // [scores warp][DK]
};

// The modes and their register budgets per role (setmaxnreg; the four sum to 512 = 65536 / 128
// per thread of a 512-thread CTA): producer, scores, each consumer.
struct WsFull {
  static constexpr bool kOutputs = true, kSummary = false;
  static constexpr int kProducerRegs = 24, kScoresRegs = 136, kConsumerRegs = 176;
};
struct WsStates {
  static constexpr bool kOutputs = false, kSummary = false;
  static constexpr int kProducerRegs = 32, kScoresRegs = 96, kConsumerRegs = 192;
};
struct WsSummary {
  static constexpr bool kOutputs = false, kSummary = true;
  static constexpr int kProducerRegs = 32, kScoresRegs = 96, kConsumerRegs = 192;
};
constexpr int kWsLaunchRegs = 65536 / WsFwdSmem::kThreads;
static_assert(WsFull::kProducerRegs + WsFull::kScoresRegs + 2 * WsFull::kConsumerRegs == 4 * kWsLaunchRegs, "budget");
static_assert(WsStates::kProducerRegs + WsStates::kScoresRegs + 2 * WsStates::kConsumerRegs == 4 * kWsLaunchRegs,
              "budget");
static_assert(WsSummary::kProducerRegs + WsSummary::kScoresRegs + 2 * WsSummary::kConsumerRegs == 4 * kWsLaunchRegs,
              "budget");

// The CTA's mbarriers (static shared memory) and their arrival counts.
struct WsBarriers {
  static constexpr int kCount = 7, kConsumerThreads = 256, kScoresThreads = 128;
  u64* b;
  __device__ __forceinline__ u64* full(int s) const { return b + s; }
  __device__ __forceinline__ u64* empty(int s) const { return b + 2 + s; }
  __device__ __forceinline__ u64* ready() const { return b + 4; }
  __device__ __forceinline__ u64* pfree() const { return b + 5; }
  __device__ __forceinline__ u64* rec() const { return b + 6; }
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __device__ __forceinline__ void init() const {
    for (int s = 0; s < 2; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), kConsumerThreads);
    }
    mbar_init(ready(), kScoresThreads);
    mbar_init(pfree(), kConsumerThreads);
    mbar_init(rec(), 1);
  }
#endif
};

// Named barriers (1..15) of the roles that synchronise within their warpgroup.
constexpr int kWsScoresBar = 1, kWsConsumerBar = 2;  // consumer j: kWsConsumerBar + j

// ---- the walk order ------------------------------------------------------------------------------

// Every role walks the same chunks in the same order: the items w = first, next, ... of the
// schedule that are valid, each from its chunk cb to ce. ws_first / ws_next give the (item, chunk)
// pairs; false at the end.
__device__ __forceinline__ bool ws_first(const Params& p, const FusedSchedule& sched, int& w, int& c) {
  for (w = sched.first(); sched.has(w); w = sched.next(w)) {
    const FusedItem it = sched.item(p, w);
    if (it.valid && it.cb < it.ce) {
      c = it.cb;
      return true;
    }
  }
  return false;
}
__device__ __forceinline__ bool ws_next(const Params& p, const FusedSchedule& sched, int& w, int& c) {
  if (c + 1 < sched.item(p, w).ce) {
    ++c;
    return true;
  }
  for (w = sched.next(w); sched.has(w); w = sched.next(w)) {
    const FusedItem it = sched.item(p, w);
    if (it.valid && it.cb < it.ce) {
      c = it.cb;
      return true;
    }
  }
  return false;
}

// The state an item starts from: the initial state for segment 0; for a later one the fold of the
// segments before it (seg_*[g − 1], segments.cuh), or in the summary pass the empty state (C = 0,
// n = 0, m = kEmptyM: null pointers and m_empty).
struct WsStateIn {
  const float *C, *n, *m;
  i64 state;
  float m_empty;  // m where m is null
  __device__ __forceinline__ WsStateIn(const Params& p, const FusedItem& item, bool summary)
      : C(p.C0), n(p.n0), m(p.m0), state(item.sq.state), m_empty(0.f) {
    if (item.seg > 0) {
      C = summary ? nullptr : p.seg_C;
      n = summary ? nullptr : p.seg_n;
      m = summary ? nullptr : p.seg_m;
      m_empty = summary ? kEmptyM : 0.f;
      state = (item.seg - 1) * (i64(p.NSEQ) * p.NH) + item.sq.state;
    }
  }
};
// Where the summary pass writes segment g's end state: seg_*[g] (segments.cuh).
__device__ __forceinline__ i64 ws_summary_slot(const Params& p, const FusedItem& item) {
  return item.seg * (i64(p.NSEQ) * p.NH) + item.sq.state;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// ---- producer ------------------------------------------------------------------------------------

// One thread issues every chunk's copies: stage it & 1 once both consumers released it.
template <typename Mode>
__device__ __forceinline__ void ws_producer(const Params& p, const FusedMaps& maps, const WsFwdSmem& sm,
                                            const WsBarriers& bar, const FusedSchedule& sched) {
  using Sm = WsFwdSmem;
  constexpr int kTx = (Mode::kOutputs ? 6 : 4) * Sm::kBlk;
  int w, c;
  bool more = ws_first(p, sched, w, c);
  for (int it = 0; more; ++it, more = ws_next(p, sched, w, c)) {
    const int s = it & 1;
    if (it >= 2) mbar_wait(bar.empty(s), ((it >> 1) + 1) & 1);  // use it >> 1 of the stage waits for the last
    const FusedItem item = sched.item(p, w);
    const SeqCoords& q = item.sq;
    const int tok = q.t0 + c * Sm::kL;
    auto load = [&](char* dst, const TensorMap& map, const int (&order)[3], int x) {
      tma_load_4d(dst, &map, x, map_coord(order[0], tok, q.h, q.b), map_coord(order[1], tok, q.h, q.b),
                  map_coord(order[2], tok, q.h, q.b), bar.full(s));
    };
    fence_async_smem();
    mbar_expect_tx(bar.full(s), kTx);
    if constexpr (Mode::kOutputs) {
      load(sm.q(s, 0), maps.q, maps.order[0], 0);
      load(sm.q(s, 1), maps.q, maps.order[0], 64);
    }
    load(sm.k(s, 0), maps.k, maps.order[1], 0);
    load(sm.k(s, 1), maps.k, maps.order[1], 64);
    load(sm.v(s, 0), maps.v, maps.order[2], item.vb * Sm::kBV);
    load(sm.v(s, 1), maps.v, maps.order[2], item.vb * Sm::kBV + Sm::kHalfV);
  }
}

// ---- scores warpgroup ------------------------------------------------------------------------------

// The record of chunk (w, c) into the record buffer (thread 0 of the scores warpgroup).
__device__ __forceinline__ void ws_fetch_record(const Params& p, const WsFwdSmem& sm, const WsBarriers& bar,
                                                const FusedSchedule& sched, int w, int c) {
  const FusedItem item = sched.item(p, w);
  fence_async_smem();
  mbar_expect_tx(bar.rec(), WsFwdSmem::kTermBytes);
  bulk_load(sm.rec(), p.gate_terms + item.sq.chunk_slot(p, c) * FusedTerms::kFloats, WsFwdSmem::kTermBytes, bar.rec());
}

// One scores thread's place: warp sw of the warpgroup, its accumulator rows g, g + 8 of the warp's
// 16 in each 64-row half, its column pair t.
struct WsScoreLanes {
  int st, sw, lane, g, t;
  __device__ __forceinline__ explicit WsScoreLanes(int st_) : st(st_), sw(st_ >> 5), lane(st_ & 31) {
    g = lane >> 2;
    t = lane & 3;
  }
  __device__ __forceinline__ int row(int half, int hi) const { return 64 * half + 16 * sw + g + 8 * hi; }
};

// The gate terms of a scores thread's four rows (half h, hi): M, the row scale, the split exponent.
struct WsRowTerms {
  float M[2][2], sc[2][2];
  float2 rl[2][2];
};

// S block i of the causal three (rows 64·rh .., keys 64·kh ..) into S (issued, committed, not
// waited for); with the q·n column of the rows (qn, an m64n8 product) when kQn.
template <typename T, bool kQn>
__device__ __forceinline__ void ws_score_mma(const WsFwdSmem& sm, int s, int rh, int kh, float (&S)[32],
                                             float (&qn)[4]) {
  fence_regs(S);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const u64 da = sw128_desc(sm.q(s, kk >> 2) + rh * 64 * 128 + 32 * (kk & 3));
    wgmma_ss<T, Major::kK, Major::kK>(S, da, sw128_desc(sm.k(s, kk >> 2) + kh * 64 * 128 + 32 * (kk & 3)), kk > 0);
    if constexpr (kQn) wgmma_ss_n8<T>(qn, da, sw128_desc(sm.natom(kk >> 2) + 32 * (kk & 3)), kk > 0);
  }
  wgmma_commit();
}

// P block (rh, kh) of a scores thread from its score registers: exp2(row + col) ⊙ S where key u <= row r
// < Lc (a select: scores past the chunk's end never reach P), into P block i as 16-bit pairs, and the
// rows' sums.
template <typename T>
__device__ __forceinline__ void ws_p_block(const WsFwdSmem& sm, const WsScoreLanes& ln, const WsRowTerms& rt,
                                           const float2* col_log, int rh, int kh, int i, int Lc, const float (&S)[32],
                                           float (&rs)[2]) {
  char* pb = sm.p(i);
  const int rl0 = 16 * ln.sw + ln.g;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float x[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int hi = e >> 1, r = 64 * rh + rl0 + 8 * hi, u = 64 * kh + 8 * j + 2 * ln.t + (e & 1);
      const bool keep = u <= r && r < Lc;
      x[e] = keep ? exp2f(add_split(rt.rl[rh][hi], col_log[u])) * S[4 * j + e] : 0.f;
      rs[hi] += x[e];
    }
    *reinterpret_cast<u32*>(pb + sw128_offset(rl0, 8 * j + 2 * ln.t)) = pack2<T>(x[0], x[1]);
    *reinterpret_cast<u32*>(pb + sw128_offset(rl0 + 8, 8 * j + 2 * ln.t)) = pack2<T>(x[2], x[3]);
  }
}

// The normalizer of the thread's rows of half rh, N = max(|s·β̄ q·n + Σ P|, e^{−M}); the row
// scales and 1 / (N + ε) to shared memory (N, M to the outputs by the item's first DV pair).
template <typename Gate>
__device__ __forceinline__ void ws_row_outputs(const Params& p, const WsFwdSmem& sm, const WsScoreLanes& ln,
                                               const WsRowTerms& rt, const FusedItem& item, int rh, const float (&qn)[4],
                                               float (&rs)[2], int Lc, int u0, int buf) {
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const int r = ln.row(rh, hi);
    float inv = 1.f;
    if constexpr (Gate::kNormalize) {
      const float qnr = __shfl_sync(0xffffffffu, qn[2 * hi], ln.lane & ~3);  // column 0: the quad's first thread
      const float den = rt.sc[rh][hi] * qnr + quad_sum(rs[hi]);
      const float N = fmaxf(fabsf(den), expf(-rt.M[rh][hi]));
      inv = 1.f / (N + p.eps);
      if (item.owns_nm() && ln.t == 0 && r < Lc) {
        p.N[item.sq.tok(p.st_N, u0 + r)] = N;
        if (Gate::kStabilized) p.M[item.sq.tok(p.st_M, u0 + r)] = rt.M[rh][hi];
      }
    }
    if (ln.t == 0) {
      sm.row_sc(buf)[r] = rt.sc[rh][hi];
      sm.row_inv(buf)[r] = inv;
    }
  }
}

// ā ⊙ K in place of K (stage s; keys past Lc set to zero) and, with kSum, this thread's parts of
// Σ ā k (fp32, before rounding) reduced over its warp into npart[warp]. The thread owns 16-byte
// piece st % 8 of rows st / 8 + 16 i of the two DK blocks.
template <typename T, bool kSum>
__device__ __forceinline__ void ws_scale_keys(const WsFwdSmem& sm, const WsScoreLanes& ln, const float* tr, float shift,
                                              int s, int Lc) {
  const int piece = ln.st & 7;
  float acc[2][8];
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[b][e] = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int b = i >> 3, u = (ln.st >> 3) + 16 * (i & 7);
    const bool ok = u < Lc;
    const float a = ok ? expf(tr[FusedTerms::kA + u] + shift) : 0.f;
    char* at = sm.k(s, b) + sw128_offset(u, 8 * piece);
    uint4 x = *reinterpret_cast<const uint4*>(at);
    u32* xs = reinterpret_cast<u32*>(&x);
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const float2 kv = unpack2<T>(xs[h]);
      const float y0 = ok ? a * kv.x : 0.f, y1 = ok ? a * kv.y : 0.f;
      if constexpr (kSum) {
        acc[b][2 * h] += y0;
        acc[b][2 * h + 1] += y1;
      }
      xs[h] = pack2<T>(y0, y1);
    }
    *reinterpret_cast<uint4*>(at) = x;
  }
  if constexpr (kSum) {
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        acc[b][e] += __shfl_xor_sync(0xffffffffu, acc[b][e], 8);
        acc[b][e] += __shfl_xor_sync(0xffffffffu, acc[b][e], 16);
      }
    if (ln.lane < 8) {
      float4* np = reinterpret_cast<float4*>(sm.npart() + ln.sw * WsFwdSmem::kDK + 8 * piece);
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        np[16 * b] = make_float4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]);
        np[16 * b + 1] = make_float4(acc[b][4], acc[b][5], acc[b][6], acc[b][7]);
      }
    }
  }
}

// The scores warpgroup's walk: per item n and m (thread st owns n[st]), per chunk the gates, S, P,
// the row terms and ā ⊙ K (WsFull), or only m and ā ⊙ K (WsStates); at the item's end n and m out.
template <typename T, typename Gate, typename Mode>
__device__ __forceinline__ void ws_scores(const Params& p, const WsFwdSmem& sm, const WsBarriers& bar,
                                          const FusedSchedule& sched, int st) {
  using Sm = WsFwdSmem;
  constexpr int L = Sm::kL;
  constexpr bool kN = (Mode::kOutputs || Mode::kSummary) && Gate::kNormalize;  // n carried (the states mode: none)
  const WsScoreLanes ln(st);
  const double log2_scale = double(log2f(p.scale));
  {
    int w0, c0;
    if (st == 0 && ws_first(p, sched, w0, c0)) ws_fetch_record(p, sm, bar, sched, w0, c0);
  }
  if constexpr (kN) {  // rows 1..7 of the n atoms stay zero
    for (int idx = st; idx < 2 * Sm::kAtom / 16; idx += 128)
      *reinterpret_cast<uint4*>(sm.natom(0) + 16 * idx) = make_uint4(0u, 0u, 0u, 0u);
  }
  int it = 0;
  for (int w = sched.first(); sched.has(w); w = sched.next(w)) {
    const FusedItem item = sched.item(p, w);
    if (!item.valid) continue;
    const WsStateIn in(p, item, Mode::kSummary);
    float n = (kN && in.n != nullptr) ? in.n[in.state * Sm::kDK + st] : 0.f;
    float m = (Gate::kStabilized && in.m != nullptr) ? in.m[in.state] : in.m_empty;
    for (int c = item.cb; c < item.ce; ++c, ++it) {
      const int s = it & 1, Lc = item.sq.chunk_len(p, c), u0 = c * L;
      if (!Mode::kSummary && item.owns_nm()) {  // the state entering chunk c: m, n (the forward's keep_states)
        if (Gate::kStabilized && p.m_states != nullptr && st == 0) p.m_states[item.sq.m_slot(p, c)] = m;
        if (kN && p.n_states != nullptr) p.n_states[item.sq.chunk_slot(p, c) * Sm::kDK + st] = n;
      }
      mbar_wait(bar.full(s), (it >> 1) & 1);
      mbar_wait(bar.rec(), it & 1);
      const float* tr = sm.rec();
      const FusedChunkDecay d = fused_chunk_decay<Gate>(tr, m);
      // (P, the row terms: the consumers must be done with the last chunk's before they are written)
      auto wait_pfree = [&]() {
        if (it > 0) mbar_wait(bar.pfree(), (it - 1) & 1);
      };
      if constexpr (Mode::kOutputs) {
        WsRowTerms rt;
#pragma unroll
        for (int rh = 0; rh < 2; ++rh)
#pragma unroll
          for (int hi = 0; hi < 2; ++hi)
            fused_row_terms<Gate>(p, tr, d.A0, ln.row(rh, hi), Lc, log2_scale, rt.M[rh][hi], rt.sc[rh][hi],
                                  rt.rl[rh][hi]);
        if constexpr (kN) {
          *reinterpret_cast<T*>(sm.natom(st >> 6) + sw128_offset(0, st & 63)) = from_float<T>(n);
          fence_async_smem();
          named_barrier_sync(kWsScoresBar, 128);  // every n before the products read it
        }
        const float2* col_log = reinterpret_cast<const float2*>(tr + FusedTerms::kColLog);
        float qn[4] = {0.f, 0.f, 0.f, 0.f}, rs[2];
        // query rows 0 .. 63: the diagonal block
        {
          float S[32];
          ws_score_mma<T, kN>(sm, s, 0, 0, S, qn);
          wait_pfree();  // beside the first product
          wgmma_wait<0>();
          fence_regs(S);
          fence_regs(qn);
          rs[0] = rs[1] = 0.f;
          ws_p_block<T>(sm, ln, rt, col_log, 0, 0, 0, Lc, S, rs);
          ws_row_outputs<Gate>(p, sm, ln, rt, item, 0, qn, rs, Lc, u0, it & 1);
        }
        // query rows 64 .. 127: the block below the diagonal, then the diagonal one
        {
          float S[32];
          ws_score_mma<T, kN>(sm, s, 1, 0, S, qn);
          wgmma_wait<0>();
          fence_regs(S);
          fence_regs(qn);
          rs[0] = rs[1] = 0.f;
          ws_p_block<T>(sm, ln, rt, col_log, 1, 0, 1, Lc, S, rs);
          float qn_unused[4];
          ws_score_mma<T, false>(sm, s, 1, 1, S, qn_unused);
          wgmma_wait<0>();
          fence_regs(S);
          ws_p_block<T>(sm, ln, rt, col_log, 1, 1, 2, Lc, S, rs);
          ws_row_outputs<Gate>(p, sm, ln, rt, item, 1, qn, rs, Lc, u0, it & 1);
        }
      } else {
        wait_pfree();  // (keeps `ready` at most one phase ahead of the consumers)
      }
      ws_scale_keys<T, kN>(sm, ln, tr, d.shift, s, Lc);  // the score products are done with K
      if (st == 0) sm.gamma()[s] = d.gamma;
      fence_async_smem();  // P and ā ⊙ K visible to the consumers' products
      mbar_arrive(bar.ready());
      named_barrier_sync(kWsScoresBar, 128);  // the record and the Σ ā k parts are complete
      {
        int wn = w, cn = c;
        if (st == 0 && ws_next(p, sched, wn, cn)) ws_fetch_record(p, sm, bar, sched, wn, cn);
      }
      if constexpr (kN) {
        float sum = 0.f;
#pragma unroll
        for (int g4 = 0; g4 < 4; ++g4) sum += sm.npart()[g4 * Sm::kDK + st];
        n = d.gamma * n + sum;
        // (the forward's next chunk synchronises before its next parts, at the n atoms; the summary
        // pass has no such step)
        if constexpr (!Mode::kOutputs) named_barrier_sync(kWsScoresBar, 128);
      }
      m = d.m_next;
    }
    if (Mode::kSummary) {  // the segment's end state
      const i64 out = ws_summary_slot(p, item);
      if (item.owns_nm() && Gate::kStabilized && st == 0) p.seg_m[out] = m;
      if (item.owns_nm() && kN) p.seg_n[out * Sm::kDK + st] = n;
    } else if (item.last() && item.owns_nm()) {
      if (Gate::kStabilized && st == 0) {
        if (p.m_states != nullptr) p.m_states[item.sq.m_slot(p, item.sq.nc)] = m;
        if (Mode::kOutputs && p.m_last != nullptr) p.m_last[item.sq.state] = m;
      }
      if (kN && p.n_last != nullptr) p.n_last[i64(item.sq.state) * Sm::kDK + st] = n;
    }
  }
}

// ---- consumers -------------------------------------------------------------------------------------

// One consumer thread's place: consumer j (DV block j of the CTA's pair), warp cw, accumulator rows
// (value columns) 16·cw + g, + 8, columns 8·jj + 2t, + 1.
struct WsConsumerLanes {
  int j, ct, cw, lane, g, t;
  __device__ __forceinline__ WsConsumerLanes(int j_, int ct_) : j(j_), ct(ct_), cw(ct_ >> 5), lane(ct_ & 31) {
    g = lane >> 2;
    t = lane & 3;
  }
  // element e of block jj of Cᵀ's DK half b, as an offset into a DK × DV fp32 state from `base`
  __device__ __forceinline__ i64 state_at(const Params& p, i64 base, int b, int jj, int e) const {
    const int dv = 16 * cw + g + 8 * (e >> 1), dk = 64 * b + 8 * jj + 2 * t + (e & 1);
    return base + i64(dk) * p.DV + dv;
  }
};

// An accumulator tile (64 rows × 64 columns, fp32) into `tile` transposed, in the compute dtype:
// tile row `row0` + column, 16-byte pieces of 8 accumulator rows (stmatrix .trans).
template <typename T>
__device__ __forceinline__ void ws_store_transposed(char* tile, int row0, const WsConsumerLanes& ln, const float (&A)[32],
                                                    const float* col_scale) {
  const int i = ln.lane >> 3, bb = ln.lane & 7, hh = i & 1;
#pragma unroll
  for (int q4 = 0; q4 < 4; ++q4) {
    const int jj = 2 * q4 + (i >> 1);
    float x[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = A[8 * q4 + e];
    if (col_scale != nullptr) {
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] *= col_scale[16 * q4 + 8 * (e >> 2) + 2 * ln.t + (e & 1)];
    }
    stmatrix_x4_trans(tile + sw128_offset(row0 + 8 * jj + bb, 16 * ln.cw + 8 * hh), pack2<T>(x[0], x[1]),
                      pack2<T>(x[2], x[3]), pack2<T>(x[4], x[5]), pack2<T>(x[6], x[7]));
  }
}

// `rows` rows of a 128-byte swizzled tile out to global memory in 16-byte pieces: row r to
// dst + r·ld (the consumer's 128 threads).
template <typename T>
__device__ __forceinline__ void ws_tile_out(T* dst, i64 ld, const char* tile, int rows, int ct) {
#pragma unroll 4
  for (int idx = ct; idx < 128 * 8; idx += 128) {
    const int r = idx >> 3, pc = idx & 7;
    if (r < rows)
      *reinterpret_cast<uint4*>(dst + i64(r) * ld + 8 * pc) = *reinterpret_cast<const uint4*>(tile + sw128_offset(r, 8 * pc));
  }
}

// A fragments (k-steps 0..3 of 16 columns) of an accumulator tile, in the compute dtype.
template <typename T> __device__ __forceinline__ void ws_a_frags(const float (&A)[32], u32 (&a)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int h = 0; h < 4; ++h) a[kk][h] = pack2<T>(A[8 * kk + 2 * h], A[8 * kk + 2 * h + 1]);
}

// The consumers' walk: per item Cᵀ in, per chunk Hᵀ = Cᵀ·Qᵀ, then (once the scores are ready) the
// row scales, Hᵀ += Vᵀ·Pᵀ and the state update, h out (WsFull); or C^(c) out and the update
// (WsStates); at the item's end the last state.
template <typename T, typename Gate, typename Mode>
__device__ __forceinline__ void ws_consumer(const Params& p, const WsFwdSmem& sm, const WsBarriers& bar,
                                            const FusedSchedule& sched, int j, int ct) {
  using Sm = WsFwdSmem;
  constexpr int L = Sm::kL, DK = Sm::kDK;
  const WsConsumerLanes ln(j, ct);
  int it = 0;
  for (int w = sched.first(); sched.has(w); w = sched.next(w)) {
    const FusedItem item = sched.item(p, w);
    if (!item.valid) continue;
    const int v0 = item.vb * Sm::kBV + j * Sm::kHalfV;  // this consumer's first value column
    float CT[2][32];                                     // Cᵀ: rows = value columns, DK halves b
    {
      const WsStateIn in(p, item, Mode::kSummary);
      const i64 base = in.state * DK * p.DV + v0;
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
#pragma unroll
          for (int e = 0; e < 4; ++e) CT[b][4 * jj + e] = in.C != nullptr ? in.C[ln.state_at(p, base, b, jj, e)] : 0.f;
    }
    if (Mode::kOutputs && p.C_states != nullptr && item.cb < item.ce) {  // keep_states: C^(cb) from the registers
      T* Cs = ptr<T>(p.C_states) + item.sq.chunk_slot(p, item.cb) * DK * p.DV + v0;
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
#pragma unroll
          for (int e = 0; e < 4; ++e) Cs[ln.state_at(p, 0, b, jj, e)] = from_float<T>(CT[b][4 * jj + e]);
    }
    for (int c = item.cb; c < item.ce; ++c, ++it) {
      const int s = it & 1, Lc = item.sq.chunk_len(p, c), u0 = c * L;
      if constexpr (!Mode::kOutputs && !Mode::kSummary) {  // C^(c) out, through the stage's idle Q block j
        if (p.C_states != nullptr) {
          char* tile = sm.q(s, j);
#pragma unroll
          for (int b = 0; b < 2; ++b) ws_store_transposed<T>(tile, 64 * b, ln, CT[b], nullptr);
          named_barrier_sync(kWsConsumerBar + j, 128);
          ws_tile_out<T>(ptr<T>(p.C_states) + item.sq.chunk_slot(p, c) * DK * p.DV + v0, p.DV, tile, DK, ct);
        }
      }
      mbar_wait(bar.full(s), (it >> 1) & 1);
      if (Lc < L) {  // value rows past the chunk's end: zero (they may hold the next sequence's tokens)
        zero_rows_sw128(sm.v(s, j), Lc, L, ct, 128);
        fence_async_smem();
        named_barrier_sync(kWsConsumerBar + j, 128);
      }
      float HL[32], HR[32];  // Hᵀ: value columns × query rows 0..63 / 64..127
      if constexpr (Mode::kOutputs) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          u32 a[4][4];
          ws_a_frags<T>(CT[b], a);
          fence_regs(HL);
          fence_regs(HR);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            const int acc = b > 0 || kk > 0;
            wgmma_rs<T, Major::kK>(HL, a[kk], sw128_desc(sm.q(s, b) + 32 * kk), acc);
            wgmma_rs<T, Major::kK>(HR, a[kk], sw128_desc(sm.q(s, b) + 64 * 128 + 32 * kk), acc);
          }
          wgmma_commit();
          wgmma_wait<0>();
          fence_regs(a);
        }
        fence_regs(HL);
        fence_regs(HR);
      }
      mbar_wait(bar.ready(), it & 1);
      const float gamma = sm.gamma()[s];
      if constexpr (Mode::kOutputs) {
#pragma unroll
        for (int e = 0; e < 32; ++e) {
          const int col = 8 * (e >> 2) + 2 * ln.t + (e & 1);
          HL[e] *= sm.row_sc(it & 1)[col];
          HR[e] *= sm.row_sc(it & 1)[64 + col];
        }
      } else {
        mbar_arrive(bar.pfree());  // γ read; the states mode reads nothing else of the scores' buffers
      }
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int e = 0; e < 32; ++e) CT[b][e] *= gamma;
      fence_regs(CT[0]);
      fence_regs(CT[1]);
      if constexpr (Mode::kOutputs) {
        fence_regs(HL);
        fence_regs(HR);
      }
      wgmma_fence();
      if constexpr (Mode::kOutputs) {  // its own commit group: P is released as soon as it is read
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
          const u64 dv = sw128_desc_mn(sm.v(s, j) + 2048 * kk, 1024);
          if (kk < 4) wgmma_ss<T, Major::kMN, Major::kK>(HL, dv, sw128_desc(sm.p(0) + 32 * kk), 1);
          wgmma_ss<T, Major::kMN, Major::kK>(HR, dv, sw128_desc(sm.p(1 + (kk >> 2)) + 32 * (kk & 3)), 1);
        }
        wgmma_commit();
      }
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int kk = 0; kk < 8; ++kk)
          wgmma_ss<T, Major::kMN, Major::kMN>(CT[b], sw128_desc_mn(sm.v(s, j) + 2048 * kk, 1024),
                                              sw128_desc_mn(sm.k(s, b) + 2048 * kk, 1024), 1);
      wgmma_commit();
      if constexpr (Mode::kOutputs) {
        wgmma_wait<1>();           // Hᵀ += Vᵀ·Pᵀ done (groups complete in order)
        mbar_arrive(bar.pfree());  // P and the row scales are read (1 / (N + ε) has two buffers)
      }
      wgmma_wait<0>();
      fence_regs(CT[0]);
      fence_regs(CT[1]);
      if constexpr (Mode::kOutputs) {
        fence_regs(HL);
        fence_regs(HR);
        char* tile = sm.v(s, j);  // the V block is free: h goes out through it
        ws_store_transposed<T>(tile, 0, ln, HL, sm.row_inv(it & 1));
        ws_store_transposed<T>(tile, 64, ln, HR, sm.row_inv(it & 1) + 64);
        named_barrier_sync(kWsConsumerBar + j, 128);
        ws_tile_out<T>(ptr<T>(p.h) + item.sq.tok(p.st_h, u0) + v0, p.st_h.t, tile, Lc, ct);
        if (p.C_states != nullptr && c + 1 < item.ce) {  // keep_states: C^(c+1) out through the same block
          named_barrier_sync(kWsConsumerBar + j, 128);  // every row of h has left it
#pragma unroll
          for (int b = 0; b < 2; ++b) ws_store_transposed<T>(tile, 64 * b, ln, CT[b], nullptr);
          named_barrier_sync(kWsConsumerBar + j, 128);
          ws_tile_out<T>(ptr<T>(p.C_states) + item.sq.chunk_slot(p, c + 1) * DK * p.DV + v0, p.DV, tile, DK, ct);
        }
      }
      fence_async_smem();  // this thread's writes to the stage (zeroed rows, h) before the next copies
      mbar_arrive(bar.empty(s));
    }
    float* out = Mode::kSummary ? p.seg_C : item.last() ? p.C_last : nullptr;  // the end state, fp32
    if (out != nullptr) {
      const i64 base = (Mode::kSummary ? ws_summary_slot(p, item) : i64(item.sq.state)) * DK * p.DV + v0;
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
#pragma unroll
          for (int e = 0; e < 4; ++e) out[ln.state_at(p, base, b, jj, e)] = CT[b][4 * jj + e];
    }
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// ---- the kernel ------------------------------------------------------------------------------------

// Barriers, then each warpgroup to its role with its register budget. Launch: a persistent grid of
// at most one CTA per SM, kThreads threads, WsFwdSmem::kBytes of dynamic shared memory.
template <typename T, typename Gate, typename Mode>
__global__ void __launch_bounds__(WsFwdSmem::kThreads, 1)
    fwd_ws_sm90_kernel(const Params p, const __grid_constant__ FusedMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const WsFwdSmem sm;
  __shared__ __align__(8) u64 bars[WsBarriers::kCount];
  const WsBarriers bar{bars};
  const int tid = threadIdx.x, role = __shfl_sync(0xffffffffu, tid >> 7, 0);  // warp-uniform
  if (tid == 0) bar.init();
  __syncthreads();
  const FusedSchedule sched(p, Mode::kSummary, WsFwdSmem::kBV);
  if (role == 0) {
    setmaxnreg_to<Mode::kProducerRegs, kWsLaunchRegs>();
    if (tid == 0) ws_producer<Mode>(p, maps, sm, bar, sched);
  } else if (role == 1) {
    setmaxnreg_to<Mode::kScoresRegs, kWsLaunchRegs>();
    ws_scores<T, Gate, Mode>(p, sm, bar, sched, tid - 128);
  } else {
    setmaxnreg_to<Mode::kConsumerRegs, kWsLaunchRegs>();
    ws_consumer<T, Gate, Mode>(p, sm, bar, sched, role - 2, tid & 127);
  }
#else
  __trap();
#endif
}

}  // namespace tfla
