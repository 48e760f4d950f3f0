// tfla_cupy — the fused Hopper (sm_90a) backward: one reverse walk over a sequence's chunks that
// carries the state gradient dC on chip and forms every token gradient of each chunk beside it
// (docs/math.md §6.2, §6.3, §12.1; the float64 mirror is reference.chunkwise.bwd_walk):
//
//     dC^(nc) = dC_last (or 0);   for c = nc−1 … 0:
//       dq, dk, dv, the gate terms of chunk c   (from its q, k, v, dh tiles, C^(c) and dC^(c+1))
//       dC^(c) = γ_c dC^(c+1) + Qᵀ_c (w_c ⊙ dH_c)
//
// so no dC^(c) reaches device memory and each tile of q, k, v, dh is read once per CTA. The chunk
// states C^(c) come from the forward's state recompute (the fused forward's states mode).
//
// Work split. The value columns are cut into kParts = DV / 64 blocks, one CTA each, and the kParts
// CTAs of a (sequence, head) form a cluster. A CTA (block vb) is two warpgroups; warpgroup w owns
// rows 64w .. 64w + 63 of dC's 64-column block (DK = 128 rows) and, for the chunk products, rows
// 64w .. of the chunk (queries for dq, keys for dk and dv). Everything that sums over the value
// columns — dq, dk, the pair terms Z, the dots W and E — is formed per block and summed over the
// cluster: dq and dk as fp32 partials pushed into the shared memory of the CTA that owns a slice of
// the chunk's rows (distributed shared memory), which adds them in block order (deterministic);
// the gate terms as one plane per block, which the gate kernel adds in order. dv needs no sum.
//
// Per chunk c, with dC^(c+1) in registers (32 per thread):
//   0. the chunk's tiles and its gate record land (cp.async, issued as the previous chunk's tiles
//      died): the row and column terms of both directions, which a pre-pass (walk_terms_kernel)
//      formed for every chunk at once (gate_terms.cuh: causal_terms for dq, whose row scales are
//      also the weights w of the dC update; anticausal_terms for dk and dv);
//   1. B_c's part γ_c ⟨dC^(c+1), C^(c)⟩ (per warp), and dC^(c+1) into shared memory in the compute
//      dtype, the B operand of the inter-chunk products of dk and dv;
//   2. per key half h >= w: the dv scores S = K_w Q_hᵀ (the forward's q·k, unweighted) and the dk
//      scores T = V_w dH_hᵀ (this block's columns); with the anti-causal weights, P_dk = W ⊙ T (dS
//      transposed), P_dv = W ⊙ S as register fragments, and Z = P_dk ⊙ S: its row sums (per key,
//      Σ_τ Z_τσ) and column sums (per query, Σ_σ Z_τσ, through shared memory);
//   3. dk's block partial, per 64-column block n of DK: V_w · dC_nᵀ, times ā (E's part: k·that),
//      plus P_dk · Q_n, into the reduction buffer; dv's 64 columns: ā ⊙ K_w · dC + P_dv · dH;
//   4. the cluster sums dk; the causal dq scores dH_w V_hᵀ (h <= w), P_dq; dq's partial: the
//      scaled dH_w · C_nᵀ (W's part: q·that) plus P_dq · K_n, into the buffer; the cluster sums dq;
//   5. dH ← w ⊙ dH in place, acc ← γ_c acc + Q_wᵀ · dH (warpgroup w's 64 rows of dC).
// The tiles of chunk c − 1 are issued as those of chunk c die: K, C and V after step 4's products,
// Q, dH and the gate record after step 5. dC^(0) (fp32) is the initial-state gradient.
//
// Shapes it covers (tfla_cupy/config.py: bwd_walk_unsupported): 16-bit operands, chunk 128, DK 128,
// DV = 64·kParts with kParts in {1, 2, 4, 8}; the rest use the per-stage Hopper or sm80 kernels.
#pragma once
#include "chunk_products_sm90.cuh"
#include "cluster.cuh"
#include "coords.cuh"
#include "gate_terms.cuh"
#include "swizzle.cuh"
#include "wgmma.cuh"

namespace tfla {

// Shared-memory carve (bytes from a 1024-aligned base): the chunk's tiles (128 rows × 128 bytes
// per 64-column block, 128-byte swizzled: Q and K two blocks each, this CTA's blocks of V and dH,
// C^(c)'s 128 × 64 block, dC^(c+1)'s staging copy), the fp32 reduction buffer (128 rows of kRedLd
// floats), the chunk's gate record (WalkRecord), the column sums of Z.
struct BwdWalkSm90Smem : SwizzledCarve {
  static constexpr int kL = 128, kDK = 128, kBV = 64, kThreads = 256, kMaxParts = 8;
  static constexpr int kTile = kL * 128;  // one 64-column block of 128 rows
  static constexpr int kRedLd = kDK + 8;  // (padded: the rows' float2 stores spread over the banks)
  static constexpr int kQ = 0, kK = kQ + 2 * kTile, kV = kK + 2 * kTile, kDH = kV + kTile, kC = kDH + kTile,
                       kDC = kC + kTile, kRed = kDC + kTile, kRec = kRed + 4 * kL * kRedLd,
                       kColSum = kRec + 40 * kL, kEnd = kColSum + 4 * (kThreads / 32) * kL;
  static constexpr int kBytes = kEnd + 1024;  // dynamic shared memory: the carve plus alignment slack
  static_assert(kThreads == 2 * 128 && kL == 128 && kDK == 2 * 64, "two warpgroups, two 64-row halves");
  static_assert(kBytes <= 227 * 1024, "one CTA per SM");

  __device__ __forceinline__ char* q(int b) const { return base + kQ + b * kTile; }
  __device__ __forceinline__ char* k(int b) const { return base + kK + b * kTile; }
  __device__ __forceinline__ char* v() const { return base + kV; }
  __device__ __forceinline__ char* dh() const { return base + kDH; }
  __device__ __forceinline__ char* c() const { return base + kC; }
  __device__ __forceinline__ char* dc() const { return base + kDC; }
  __device__ __forceinline__ char* rec() const { return base + kRec; }
  __device__ __forceinline__ float* red() const { return at<float>(kRed); }
  __device__ __forceinline__ float* col_sum() const { return at<float>(kColSum); }
};

// A chunk's gate record for the walk (byte offsets): the causal (dq; its row scales are also the
// weights w of the dC update) and anti-causal (dk, dv) row and column terms of gate_terms.cuh for
// all 128 rows, anchored at row 0. walk_terms_kernel writes one per chunk slot to p.gate_terms; the
// walk copies it whole into its carve with the chunk's tiles.
struct WalkRecord {
  static constexpr int kL = BwdWalkSm90Smem::kL;
  static constexpr int kCRowLog = 0, kCRowScale = kCRowLog + 8 * kL, kCColLog = kCRowScale + 4 * kL,
                       kARowLog = kCColLog + 8 * kL, kARowScale = kARowLog + 8 * kL, kAColLog = kARowScale + 4 * kL,
                       kBytes = kAColLog + 8 * kL;
  static_assert(kBytes == 40 * kL && kBytes % 16 == 0, "the carve's record slot, 16-byte pieces");
};

// The gate preparation's view (gate_terms.cuh) of a record in shared memory, with a scratch of
// 4·L doubles (λ, ι, scans, row sums; only walk_terms_kernel prepares, the walk reads the terms).
template <bool kCausal> struct WalkTermsView {
  static constexpr int kThreads = BwdWalkSm90Smem::kThreads, kRows = WalkRecord::kL, kL = WalkRecord::kL;
  char* rec;
  double* scratch;
  __device__ __forceinline__ float2* row_log() const {
    return reinterpret_cast<float2*>(rec + (kCausal ? WalkRecord::kCRowLog : WalkRecord::kARowLog));
  }
  __device__ __forceinline__ float* row_scale() const {
    return reinterpret_cast<float*>(rec + (kCausal ? WalkRecord::kCRowScale : WalkRecord::kARowScale));
  }
  __device__ __forceinline__ float2* col_log() const {
    return reinterpret_cast<float2*>(rec + (kCausal ? WalkRecord::kCColLog : WalkRecord::kAColLog));
  }
  __device__ __forceinline__ double* lam() const { return scratch; }
  __device__ __forceinline__ double* iota() const { return scratch + kL; }
  __device__ __forceinline__ double* scan() const { return scratch + 2 * kL; }
  __device__ __forceinline__ double* row_d() const { return scratch + 3 * kL; }
};

// The walk's pre-pass: every chunk slot's WalkRecord at once. Grid: chunk slots × B·NH, flattened.
template <typename Gate>
__global__ void __launch_bounds__(BwdWalkSm90Smem::kThreads) walk_terms_kernel(const Params p) {
  constexpr int L = WalkRecord::kL, NT = BwdWalkSm90Smem::kThreads;
  __shared__ __align__(16) char rec[WalkRecord::kBytes];
  __shared__ double scratch[4 * L];
  const ChunkAt at(p, blockIdx.x % p.NC, blockIdx.x / p.NC);
  if (at.Lc == 0) return;  // a surplus slot of packed input
  causal_terms<Gate>(p, WalkTermsView<true>{rec, scratch}, at, 0);
  anticausal_terms<Gate>(p, WalkTermsView<false>{rec, scratch}, at, 0);  // (each ends synchronised)
  uint4* dst = reinterpret_cast<uint4*>(p.gate_terms + at.slot(p) * (WalkRecord::kBytes / 4));
  for (int i = threadIdx.x; i < WalkRecord::kBytes / 16; i += NT) dst[i] = reinterpret_cast<const uint4*>(rec)[i];
}

// Two 16-bit values at (row r, columns c, c + 1) of a 128-byte swizzled tile, as float2.
template <typename T> __device__ __forceinline__ float2 sw128_pair(const char* tile, int r, int c) {
  return unpack2<T>(*reinterpret_cast<const u32*>(tile + sw128_offset(r, c)));
}

// Key half h of the anti-causal products of one thread's rows (row_lo, row_hi: chunk rows σ):
// W = exp2(row_log[σ] + col_log[u]) where u >= σ and u < Lc, then
//   P_dk = W ⊙ T and P_dv = W ⊙ S as the A fragments [4h .. 4h + 3] (S: the dv scores k_σ·q_u,
//   T: the dk scores v_σ·dh_u over this block's columns), and the pair terms Z = P_dk ⊙ S summed
//   per row (z_lo, z_hi) and per column over the warp's 16 rows (a sum over its eight row groups,
//   which lanes t = 0 .. 3 write to col_sum_warp[64h + 8j + 2t + e]).
template <typename T, KeyHalf kHalf>
__device__ __forceinline__ void walk_anticausal_half(const float (&S)[32], const float (&Tt)[32], const float2* col_log,
                                                     float2 rl_lo, float2 rl_hi, int row_lo, int row_hi, int t,
                                                     int lane, int Lc, u32 (&Pk)[8][4], u32 (&Pv)[8][4], float& z_lo,
                                                     float& z_hi, float* col_sum_warp) {
  constexpr int h = int(kHalf);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float pk[4], pv[4], zc[2] = {0.f, 0.f};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = (e & 2) ? row_hi : row_lo, u = 64 * h + 8 * j + 2 * t + (e & 1);
      const bool keep = u < Lc && u >= r;
      const float w = keep ? exp2f(add_split((e & 2) ? rl_hi : rl_lo, col_log[u])) : 0.f;
      pk[e] = w * Tt[4 * j + e];
      pv[e] = w * S[4 * j + e];
      const float z = pk[e] * S[4 * j + e];
      if (e & 2) {
        z_hi += z;
      } else {
        z_lo += z;
      }
      zc[e & 1] += z;
    }
    const int kk = 4 * h + (j >> 1), hh = (j & 1) * 2;
    Pk[kk][hh] = pack2<T>(pk[0], pk[1]);
    Pk[kk][hh + 1] = pack2<T>(pk[2], pk[3]);
    Pv[kk][hh] = pack2<T>(pv[0], pv[1]);
    Pv[kk][hh + 1] = pack2<T>(pv[2], pv[3]);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      zc[e] += __shfl_xor_sync(0xffffffffu, zc[e], 4);
      zc[e] += __shfl_xor_sync(0xffffffffu, zc[e], 8);
      zc[e] += __shfl_xor_sync(0xffffffffu, zc[e], 16);
    }
    if (lane < 4) *reinterpret_cast<float2*>(col_sum_warp + 64 * h + 8 * j + 2 * lane) = make_float2(zc[0], zc[1]);
  }
}

// Key half h of step 2 for warpgroup rows r0 .. r0 + 63: the dv scores S = K_w Q_hᵀ (both DK blocks)
// and the dk scores T = V_w dH_hᵀ (this block's columns) on the tensor cores, then
// walk_anticausal_half (the column sums of Z into col_sum[gwarp]).
template <typename T, KeyHalf kHalf>
__device__ __forceinline__ void walk_dkdv_half(const BwdWalkSm90Smem& sm, const float2* col_log, float2 rl_lo,
                                               float2 rl_hi, int r0, int row_lo, int row_hi, int t, int lane,
                                               int gwarp, int Lc, u32 (&Pk)[8][4], u32 (&Pv)[8][4], float& z_lo,
                                               float& z_hi) {
  constexpr int h = int(kHalf);
  float S[32], Tt[32];
  fence_regs(S);
  fence_regs(Tt);
  wgmma_fence();
#pragma unroll
  for (int b = 0; b < 2; ++b) bwd_score_products<T>(S, sm.k(b) + r0 * 128, sm.q(b) + 64 * h * 128, b > 0);
  bwd_score_products<T>(Tt, sm.v() + r0 * 128, sm.dh() + 64 * h * 128, false);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(S);
  fence_regs(Tt);
  walk_anticausal_half<T, kHalf>(S, Tt, col_log, rl_lo, rl_hi, r0 + row_lo, r0 + row_hi, t, lane, Lc, Pk, Pv, z_lo,
                                 z_hi, sm.col_sum() + gwarp * BwdWalkSm90Smem::kL);
}

// Key half h of step 4 for warpgroup rows r0 .. r0 + 63: the causal dq scores dH_w V_hᵀ (this
// block's columns), then P_dq = W ⊙ them as the A fragments [4h .. 4h + 3].
template <typename T, KeyHalf kHalf>
__device__ __forceinline__ void walk_dq_half(const BwdWalkSm90Smem& sm, const float2* col_log, float2 rl_lo,
                                             float2 rl_hi, int r0, int row_lo, int row_hi, int t, int Lc,
                                             u32 (&Pq)[8][4]) {
  constexpr int h = int(kHalf);
  float S[32];
  fence_regs(S);
  wgmma_fence();
  bwd_score_products<T>(S, sm.dh() + r0 * 128, sm.v() + 64 * h * 128, false);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(S);
  bwd_p_half<T, true, kHalf>(S, col_log, rl_lo, rl_hi, r0 + row_lo, r0 + row_hi, t, Lc, Pq);
}

// One thread's part of a partial tile (chunk rows r0 + row_lo, r0 + row_hi, columns n0 + 8j + 2t +
// {0, 1}) pushed to the CTA that owns the row — the cluster's CTA r / R owns rows R·(r / R) ..,
// R = 128 / kParts — into its reduction buffer's slab of this CTA's block `part`: buffer row
// part·R + r % R (the same offsets in every CTA of the cluster).
template <int kParts>
__device__ __forceinline__ void walk_push_partial(const float* red, int part, const float (&acc)[32], int r0,
                                                  int row_lo, int row_hi, int n0, int t) {
  constexpr int R = BwdWalkSm90Smem::kL / kParts, ld = BwdWalkSm90Smem::kRedLd;
  const u32 base = smem_addr(red);
  const int lo = r0 + row_lo, hi = r0 + row_hi;
  const u32 a_lo = base + u32((part * R + lo % R) * ld + n0 + 2 * t) * 4u;
  const u32 a_hi = base + u32((part * R + hi % R) * ld + n0 + 2 * t) * 4u;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    st_cluster_f2(cluster_map(a_lo + 32u * j, lo / R), acc[4 * j], acc[4 * j + 1]);
    st_cluster_f2(cluster_map(a_hi + 32u * j, hi / R), acc[4 * j + 2], acc[4 * j + 3]);
  }
}

// This CTA's rows of the cluster's sum (chunk rows part·R .. part·R + R − 1, every DK column): its
// buffer's kParts slabs added in block order (local reads), written to out (row r at out + r·ld) in
// the compute dtype for rows < Lc. Between two cluster_sync: every block's partial has landed
// before, and no CTA pushes into this buffer again before it has been read.
template <typename T, int kParts>
__device__ __forceinline__ void walk_reduce(const float* red, int part, T* out, i64 ld, int Lc) {
  constexpr int R = BwdWalkSm90Smem::kL / kParts, ldr = BwdWalkSm90Smem::kRedLd, NT = BwdWalkSm90Smem::kThreads;
  constexpr int kQuads = BwdWalkSm90Smem::kDK / 4;
  static_assert(R * kQuads % NT == 0, "whole rounds of the CTA's threads");
#pragma unroll 4
  for (int idx = threadIdx.x; idx < R * kQuads; idx += NT) {
    const int rr = idx / kQuads, c = 4 * (idx % kQuads);
    float4 s = *reinterpret_cast<const float4*>(red + rr * ldr + c);
#pragma unroll
    for (int j = 1; j < kParts; ++j) {
      const float4 x = *reinterpret_cast<const float4*>(red + (j * R + rr) * ldr + c);
      s.x += x.x;
      s.y += x.y;
      s.z += x.z;
      s.w += x.w;
    }
    const int r = part * R + rr;
    if (r < Lc) {
      store2(out + r * ld + c, s.x, s.y);
      store2(out + r * ld + c + 2, s.z, s.w);
    }
  }
}

// Grid: kParts value blocks × sequences·NH, flattened, value blocks fastest (a cluster).
template <typename T, typename Gate, int kParts>
__global__ void __launch_bounds__(BwdWalkSm90Smem::kThreads, 1) TFLA_CLUSTER_DIMS(kParts)
    bwd_walk_sm90_kernel(const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Sm = BwdWalkSm90Smem;
  static_assert(kParts >= 1 && kParts <= Sm::kMaxParts && Sm::kL % kParts == 0, "a portable cluster");
  constexpr int L = Sm::kL, NT = Sm::kThreads;
  const int vb = blockIdx.x % kParts, sh = blockIdx.x / kParts;
  const SeqCoords sq(p, sh / p.NH, sh % p.NH);
  const Sm sm;
  const WalkTermsView<true> causal{sm.rec(), nullptr};  // (the chunk's record, copied in with its tiles)
  const WalkTermsView<false> anti{sm.rec(), nullptr};
  // (the warpgroup index through a shuffle: the compiler then knows it is the same in every lane, and
  // the branches on it around wgmma are not divergent paths)
  const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid >> 7, 0), gwarp = tid >> 5, warp = gwarp & 3,
            lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row_lo = 16 * warp + g, row_hi = row_lo + 8;  // rows of the warpgroup's 64 (chunk rows r0 + row)
  const int r0 = 64 * wg;
  const int nc = sq.nc;
  const i64 part_stride = i64(p.BH) * p.S;  // one plane of per-token gate terms

  // the sequence's tensors at its first token (this block's value columns for v, dh, dv)
  const T* Qg = ptr<T>(p.q) + sq.tok(p.st_q, 0);
  const T* Kg = ptr<T>(p.k) + sq.tok(p.st_k, 0);
  const T* Vg = ptr<T>(p.v) + sq.tok(p.st_v, 0) + Sm::kBV * vb;
  const T* Hg = ptr<T>(p.dh) + sq.tok(p.st_dh, 0) + Sm::kBV * vb;
  auto load_kcv = [&](int c) {  // K, C^(c) and V of chunk c (their last use: the dq products)
    if (c < 0) return;
    const int u0 = c * L, Lc = sq.chunk_len(p, c);
#pragma unroll
    for (int b = 0; b < 2; ++b)
      load_sw128_async<T, NT>(sm.k(b), Kg + i64(u0) * p.st_k.t + 64 * b, p.st_k.t, L, Lc);
    const T* Cc = ptr<T>(p.C_states) + sq.chunk_slot(p, c) * p.DK * p.DV + Sm::kBV * vb;
    load_sw128_async<T, NT>(sm.c(), Cc, p.DV, Sm::kDK, Sm::kDK);
    load_sw128_async<T, NT>(sm.v(), Vg + i64(u0) * p.st_v.t, p.st_v.t, L, Lc);
  };
  auto load_qh = [&](int c) {  // Q, dH and the gate record of chunk c (their last use: the dC update)
    if (c < 0) return;
    const int u0 = c * L, Lc = sq.chunk_len(p, c);
#pragma unroll
    for (int b = 0; b < 2; ++b)
      load_sw128_async<T, NT>(sm.q(b), Qg + i64(u0) * p.st_q.t + 64 * b, p.st_q.t, L, Lc);
    load_sw128_async<T, NT>(sm.dh(), Hg + i64(u0) * p.st_dh.t, p.st_dh.t, L, Lc);
    const char* rec = reinterpret_cast<const char*>(p.gate_terms + sq.chunk_slot(p, c) * (WalkRecord::kBytes / 4));
    for (int k = threadIdx.x; k < WalkRecord::kBytes / 16; k += NT) cp_async16(sm.rec() + 16 * k, rec + 16 * k, true);
  };
  load_kcv(nc - 1);
  load_qh(nc - 1);
  cp_async_commit();

  // dC^(nc): this thread's 32 values of warpgroup wg's 64 × 64 block (rows r0 + row, columns 8j + 2t + e)
  float acc_dc[32];
  const i64 sbase = i64(sq.state) * p.DK * p.DV + Sm::kBV * vb;  // dC_last / dC0 at this block
  auto dc_at = [&](int j, int e) { return i64(r0 + ((e & 2) ? row_hi : row_lo)) * p.DV + 8 * j + 2 * t + (e & 1); };
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dc[4 * j + e] = p.dC_last != nullptr ? p.dC_last[sbase + dc_at(j, e)] : 0.f;

  for (int i = 0; i < nc; ++i) {
    const int c = nc - 1 - i, Lc = sq.chunk_len(p, c);
    const ChunkAt at(p, sq.fc + c, sq.bh(p));
    const i64 slot = sq.chunk_slot(p, c);
    // ---- 0. the chunk's scalars while the tiles and the gate record land ----------------------------
    const float m_c = Gate::kStabilized ? p.m_states[sq.m_slot(p, c)] : 0.f;
    const float m_n = Gate::kStabilized ? p.m_states[sq.m_slot(p, c + 1)] : 0.f;
    const float gamma = expf(p.gate_g[slot] + m_c - m_n);
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();

    // ---- 1. B_c's part, then dC^(c+1) into shared memory in the compute dtype -----------------------
    if (p.state_terms != nullptr) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 lo = sw128_pair<T>(sm.c(), r0 + row_lo, 8 * j + 2 * t);
        const float2 hi = sw128_pair<T>(sm.c(), r0 + row_hi, 8 * j + 2 * t);
        s += acc_dc[4 * j] * lo.x + acc_dc[4 * j + 1] * lo.y + acc_dc[4 * j + 2] * hi.x + acc_dc[4 * j + 3] * hi.y;
      }
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0) p.state_terms[i64((wg * kParts + vb) * 4 + warp) * p.BH * p.NC + slot] = gamma * s;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      *reinterpret_cast<u32*>(sm.dc() + sw128_offset(r0 + row_lo, 8 * j + 2 * t)) =
          pack2<T>(acc_dc[4 * j], acc_dc[4 * j + 1]);
      *reinterpret_cast<u32*>(sm.dc() + sw128_offset(r0 + row_hi, 8 * j + 2 * t)) =
          pack2<T>(acc_dc[4 * j + 2], acc_dc[4 * j + 3]);
    }
    fence_async_smem();
    __syncthreads();

    // ---- 2. the anti-causal scores of both roles, their fragments and the pair terms ---------------
    u32 Pk[8][4] = {}, Pv[8][4] = {};
    float zk_lo = 0.f, zk_hi = 0.f;  // Σ_τ Z_τσ of this thread's rows
    {
      const float2 rl_lo = anti.row_log()[r0 + row_lo], rl_hi = anti.row_log()[r0 + row_hi];
      if (wg == 0)
        walk_dkdv_half<T, KeyHalf::kLow>(sm, anti.col_log(), rl_lo, rl_hi, r0, row_lo, row_hi, t, lane, gwarp, Lc, Pk,
                                         Pv, zk_lo, zk_hi);
      walk_dkdv_half<T, KeyHalf::kHigh>(sm, anti.col_log(), rl_lo, rl_hi, r0, row_lo, row_hi, t, lane, gwarp, Lc, Pk,
                                        Pv, zk_lo, zk_hi);
    }

    // ---- 3. dk's partial over this block's columns, then dv ------------------------------------------
    cluster_sync();  // every CTA has read its reduction buffer (the previous chunk's dq)
    const float sc_lo = anti.row_scale()[r0 + row_lo], sc_hi = anti.row_scale()[r0 + row_hi];
    float e_lo = 0.f, e_hi = 0.f;  // E's part: k_σ · (ā_σ V_σ dC_nᵀ) over DK
#pragma unroll 1
    for (int n = 0; n < 2; ++n) {
      float acc[32];
      fence_regs(acc);
      wgmma_fence();
      bwd_inter_products<T, true>(acc, sm.v() + r0 * 128, sm.dc() + 64 * n * 128, false);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(acc);
#pragma unroll
      for (int e = 0; e < 32; ++e) acc[e] *= (e & 2) ? sc_hi : sc_lo;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 lo = sw128_pair<T>(sm.k(n), r0 + row_lo, 8 * j + 2 * t);
        const float2 hi = sw128_pair<T>(sm.k(n), r0 + row_hi, 8 * j + 2 * t);
        e_lo += acc[4 * j] * lo.x + acc[4 * j + 1] * lo.y;
        e_hi += acc[4 * j + 2] * hi.x + acc[4 * j + 3] * hi.y;
      }
      fence_regs(acc);
      fence_regs(Pk);
      wgmma_fence();
      if (wg == 0) bwd_pz_products<T, KeyHalf::kLow>(acc, Pk, sm.q(n));
      bwd_pz_products<T, KeyHalf::kHigh>(acc, Pk, sm.q(n) + 64 * 128);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(acc);
      fence_regs(Pk);
      walk_push_partial<kParts>(sm.red(), vb, acc, r0, row_lo, row_hi, 64 * n, t);
    }
    {  // the keys' gate terms of this block: Σ_τ Z_τσ and E_σ
      zk_lo = quad_sum(zk_lo);
      zk_hi = quad_sum(zk_hi);
      e_lo = quad_sum(e_lo);
      e_hi = quad_sum(e_hi);
      auto put = [&](int row, float z, float e) {
        const i64 r = at.scratch_tok(p, row);
        p.k_terms[vb * part_stride + r] = z;
        p.k_terms[(p.k_parts + vb) * part_stride + r] = e;
      };
      if (t == 0 && r0 + row_lo < Lc) put(r0 + row_lo, zk_lo, e_lo);
      if (t == 0 && r0 + row_hi < Lc) put(r0 + row_hi, zk_hi, e_hi);
    }
    {  // dv: ā ⊙ K_w · dC + P_dv · dH, this block's 64 columns
      float acc[32];
      fence_regs(acc);
      wgmma_fence();
#pragma unroll
      for (int b = 0; b < 2; ++b) bwd_inter_products<T, false>(acc, sm.k(b) + r0 * 128, sm.dc() + 64 * b * 128, b > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(acc);
#pragma unroll
      for (int e = 0; e < 32; ++e) acc[e] *= (e & 2) ? sc_hi : sc_lo;
      fence_regs(acc);
      fence_regs(Pv);
      wgmma_fence();
      if (wg == 0) bwd_pz_products<T, KeyHalf::kLow>(acc, Pv, sm.dh());
      bwd_pz_products<T, KeyHalf::kHigh>(acc, Pv, sm.dh() + 64 * 128);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(acc);
      fence_regs(Pv);
      T* o = ptr<T>(p.dv) + at.tok(p.st_dv, r0) + Sm::kBV * vb + 2 * t;
      const i64 ldo = p.st_dv.t;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (r0 + row_lo < Lc) store2(o + row_lo * ldo + 8 * j, acc[4 * j], acc[4 * j + 1]);
        if (r0 + row_hi < Lc) store2(o + row_hi * ldo + 8 * j, acc[4 * j + 2], acc[4 * j + 3]);
      }
    }
    cluster_sync();  // every block's dk partial has landed in its owner's buffer
    walk_reduce<T, kParts>(sm.red(), vb, ptr<T>(p.dk) + at.tok(p.st_dk, 0), p.st_dk.t, Lc);
    cluster_sync();  // every CTA has read the buffers (and the column sums of Z are complete)

    // ---- 4. dq's partial over this block's columns ----------------------------------------------------
    {
      u32 Pq[8][4] = {};
      const float2 rl_lo = causal.row_log()[r0 + row_lo], rl_hi = causal.row_log()[r0 + row_hi];
      walk_dq_half<T, KeyHalf::kLow>(sm, causal.col_log(), rl_lo, rl_hi, r0, row_lo, row_hi, t, Lc, Pq);
      if (wg == 1) walk_dq_half<T, KeyHalf::kHigh>(sm, causal.col_log(), rl_lo, rl_hi, r0, row_lo, row_hi, t, Lc, Pq);
      const float sq_lo = causal.row_scale()[r0 + row_lo], sq_hi = causal.row_scale()[r0 + row_hi];
      float w_lo = 0.f, w_hi = 0.f;  // W's part: q_τ · (row scale · dH_τ C_nᵀ) over DK
#pragma unroll 1
      for (int n = 0; n < 2; ++n) {
        float acc[32];
        fence_regs(acc);
        wgmma_fence();
        bwd_inter_products<T, true>(acc, sm.dh() + r0 * 128, sm.c() + 64 * n * 128, false);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(acc);
#pragma unroll
        for (int e = 0; e < 32; ++e) acc[e] *= (e & 2) ? sq_hi : sq_lo;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float2 lo = sw128_pair<T>(sm.q(n), r0 + row_lo, 8 * j + 2 * t);
          const float2 hi = sw128_pair<T>(sm.q(n), r0 + row_hi, 8 * j + 2 * t);
          w_lo += acc[4 * j] * lo.x + acc[4 * j + 1] * lo.y;
          w_hi += acc[4 * j + 2] * hi.x + acc[4 * j + 3] * hi.y;
        }
        fence_regs(acc);
        fence_regs(Pq);
        wgmma_fence();
        bwd_pz_products<T, KeyHalf::kLow>(acc, Pq, sm.k(n));
        if (wg == 1) bwd_pz_products<T, KeyHalf::kHigh>(acc, Pq, sm.k(n) + 64 * 128);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(acc);
        fence_regs(Pq);
        walk_push_partial<kParts>(sm.red(), vb, acc, r0, row_lo, row_hi, 64 * n, t);
      }
      // the queries' gate term of this block: W_τ + Σ_σ Z_τσ (the column sums of every warp whose
      // rows reach τ: warpgroup 0's for τ < 64, both warpgroups' above)
      w_lo = quad_sum(w_lo);
      w_hi = quad_sum(w_hi);
      auto put = [&](int row, float w) {
        const int nw = row < 64 ? 4 : 8;
        float z = 0.f;
        for (int k = 0; k < nw; ++k) z += sm.col_sum()[k * L + row];
        p.q_terms[vb * part_stride + at.scratch_tok(p, row)] = w + z;
      };
      if (t == 0 && r0 + row_lo < Lc) put(r0 + row_lo, w_lo);
      if (t == 0 && r0 + row_hi < Lc) put(r0 + row_hi, w_hi);
    }
    cluster_sync();  // every block's dq partial has landed; K, C, V are dead in this CTA
    load_kcv(c - 1);
    cp_async_commit();
    walk_reduce<T, kParts>(sm.red(), vb, ptr<T>(p.dq) + at.tok(p.st_dq, 0), p.st_dq.t, Lc);

    // ---- 5. dC^(c) = γ_c dC^(c+1) + Q_wᵀ (w ⊙ dH) ------------------------------------------------------
    scale_rows_sw128<T>(sm.dh(), sm.dh(), causal.row_scale(), L, tid, NT);  // (w = 0 past Lc)
    fence_async_smem();
    __syncthreads();
#pragma unroll
    for (int e = 0; e < 32; ++e) acc_dc[e] *= gamma;
    fence_regs(acc_dc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
      wgmma_ss<T, Major::kMN, Major::kMN>(acc_dc, sw128_desc_mn(sm.q(wg) + 2048 * kk, 1024),
                                          sw128_desc_mn(sm.dh() + 2048 * kk, 1024), 1);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(acc_dc);
    __syncthreads();  // both warpgroups' products have read Q and dH
    load_qh(c - 1);
    cp_async_commit();
  }
  if (p.dC0 != nullptr) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) p.dC0[sbase + dc_at(j, e)] = acc_dc[4 * j + e];
  }
  cluster_sync();  // (the cluster ends together: no CTA leaves while another may still reach it)
#else
  __trap();
#endif
}

}  // namespace tfla
