// tfla_cupy — the Hopper (sm_90a) backward stage 1: the chunk-boundary state gradients of
// bwd_dstates.cuh (docs/math.md §6.2) on warpgroup MMA,
//
//     dC^(nc) = dC_last (or 0);   for c = nc−1 … 0:   dC^(c) = γ_c dC^(c+1) + Qᵀ_c · (w_c ⊙ dH_c),
//     γ_c = exp(g + m^(c) − m^(c+1)),   w_τ = s·exp(b_τ + m^(c) − M_τ) / (N_τ + ε)
//
// in the same single-precision arithmetic as the sm80 kernel. A CTA is one warpgroup walking one
// (sequence, head)'s chunks backwards for a 64 × 64 block of dC (DV blocks fastest in the grid, so
// the CTAs that read the same Q rows run side by side). Per chunk, with dC^(c+1) in registers:
//   1. the chunk's Q block (128 tokens × 64 features) and dH block (128 tokens × 64 columns) have
//      landed in stage c of a kStages-deep copy stream, 128-byte swizzled: with kTma bulk tensor
//      copies that thread 0 issues on the fused forward's tensor maps (FusedMaps: q, and dh in the
//      v slot), counted by an mbarrier; without, cp.async by every thread. The copies of the chunk
//      kStages − 1 further back are issued;
//   2. dC^(c+1) leaves for slot c of dC_states (compute dtype) — the dk / dv passes read it — after
//      each warp added its part of γ_c ⟨dC^(c+1), C^(c)⟩ (C^(c) from slot c of C_states, loaded a
//      chunk ahead, before the write where the two share memory) to state_terms: the gate
//      gradients' chunk term B_c;
//   3. thread τ forms w_τ from b_τ, M_τ and N_τ, which it loaded one chunk ahead (with m^(c), g);
//   4. dH ← w ⊙ dH in place (rows past a ragged end, of dH and Q, zeroed), then
//      acc ← γ_c acc + Qᵀ · dH (eight m64n64k16 wgmma, both operands MN-major from shared memory).
// dC^(0) (fp32) is the initial-state gradient. Shapes it does not cover use the sm80 kernel
// (tfla_cupy/config.py: bwd_sm90_unsupported).
#pragma once
#include "coords.cuh"
#include "swizzle.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace tfla {

// Shared-memory carve (bytes from a 1024-aligned base): kStages stages of [Q block, dH block], each
// kL rows × 128 bytes, then the chunk's weights w (kL floats).
struct BwdDStatesSm90Smem : SwizzledCarve {
  static constexpr int kL = 128, kBK = 64, kBV = 64, kThreads = 128, kStages = 3;
  static constexpr int kTile = kL * 128, kStage = 2 * kTile, kW = kStages * kStage, kEnd = kW + 4 * kL;
  static constexpr int kBytes = kEnd + 1024;  // dynamic shared memory: the carve plus alignment slack
  static_assert(kBK * 2 == 128 && kBV * 2 == 128, "blocks are whole 128-byte swizzle rows");
  static_assert(kThreads == kL, "one thread per token");

  __device__ __forceinline__ char* q(int i) const { return base + (i % kStages) * kStage; }
  __device__ __forceinline__ char* dh(int i) const { return q(i) + kTile; }
  __device__ __forceinline__ float* w() const { return at<float>(kW); }
};

// Grid: DV blocks × DK blocks × sequences·NH, flattened, DV blocks fastest.
template <typename T, typename Gate, bool kTma>
__global__ void __launch_bounds__(BwdDStatesSm90Smem::kThreads, 2)
    bwd_dstates_sm90_kernel(const Params p, const __grid_constant__ FusedMaps maps) {  // (maps: kTma only)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Sm = BwdDStatesSm90Smem;
  constexpr int L = Sm::kL, kStages = Sm::kStages;
  const int nvb = p.DV / Sm::kBV, nkb = p.DK / Sm::kBK;
  const int vb = blockIdx.x % nvb, kb = (blockIdx.x / nvb) % nkb, sh = blockIdx.x / (nvb * nkb);
  const int k0 = kb * Sm::kBK, v0 = vb * Sm::kBV;
  const SeqCoords sq(p, sh / p.NH, sh % p.NH);
  const Sm sm;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row_lo = 16 * warp + g, row_hi = row_lo + 8;  // this thread's dC rows (k0 + row), columns v0 + 8j + 2t
  const int nc = sq.nc;
  const T* Q = ptr<T>(p.q) + sq.tok(p.st_q, 0) + k0;
  const T* dH = ptr<T>(p.dh) + sq.tok(p.st_dh, 0) + v0;
  __shared__ __align__(8) u64 full[kStages];  // kTma: stage i % kStages landed
  if (kTma && tid == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(&full[s], 1);
  }
  __syncthreads();
  // chunk c = nc − 1 − i (the i-th of the walk) into stage i; past the walk's end, nothing
  auto issue = [&](int i) {
    const int c = nc - 1 - i;
    if (c < 0) return;
    const int Lc = sq.chunk_len(p, c), u0 = c * L;
    if constexpr (kTma) {
      if (tid != 0) return;
      const int tok = sq.t0 + u0;
      auto load = [&](char* dst, const TensorMap& map, const int (&order)[3], int x) {
        tma_load_4d(dst, &map, x, map_coord(order[0], tok, sq.h, sq.b), map_coord(order[1], tok, sq.h, sq.b),
                    map_coord(order[2], tok, sq.h, sq.b), &full[i % kStages]);
      };
      fence_async_smem();  // the stage's generic-proxy writes (w ⊙ dH, zeroed rows) before the copies
      mbar_expect_tx(&full[i % kStages], 2 * Sm::kTile);
      load(sm.q(i), maps.q, maps.order[0], k0);
      load(sm.dh(i), maps.v, maps.order[2], v0);
    } else {
      load_sw128_async<T, Sm::kThreads>(sm.q(i), Q + i64(u0) * p.st_q.t, p.st_q.t, L, Lc);
      load_sw128_async<T, Sm::kThreads>(sm.dh(i), dH + i64(u0) * p.st_dh.t, p.st_dh.t, L, Lc);
    }
  };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    issue(i);
    if (!kTma) cp_async_commit();
  }

  // chunk c's scalars m^(c) and g, and this thread's token of it: b_τ, M_τ, N_τ (registers, loaded
  // a chunk ahead so that no load latency sits in the walk)
  float m_chunk = 0.f, g_chunk = 0.f, b_tok = 0.f, M_tok = 0.f, N_tok = 0.f;
  auto load_chunk = [&](int c) {
    if (c < 0) return;
    const i64 slot = sq.chunk_slot(p, c);
    if (Gate::kStabilized) m_chunk = p.m_states[sq.m_slot(p, c)];
    g_chunk = p.gate_g[slot];
    if (tid >= sq.chunk_len(p, c)) return;
    const int u = c * L + tid;
    b_tok = p.gate_b[slot * L + tid];
    if (Gate::kStabilized) M_tok = p.M[sq.tok(p.st_M, u)];
    if (Gate::kNormalize) N_tok = p.N[sq.tok(p.st_N, u)];
  };
  load_chunk(nc - 1);

  float acc[32];
  const i64 sbase = i64(sq.state) * p.DK * p.DV + i64(k0) * p.DV + v0;  // dC_last / dC0
  auto acc_at = [&](int j, int e) { return i64((e & 2) ? row_hi : row_lo) * p.DV + 8 * j + 2 * t + (e & 1); };
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[4 * j + e] = p.dC_last != nullptr ? p.dC_last[sbase + acc_at(j, e)] : 0.f;

  // B_c's operand: this thread's elements of C^(c), loaded a chunk ahead (slot c − 1 still holds
  // C^(c−1) then: this thread overwrites exactly these elements with dC^(c) one iteration later)
  u32 c_pre[8][2];
  auto load_state = [&](int c) {
    if (p.state_terms == nullptr || c < 0) return;
    const T* Cc = ptr<T>(p.C_states) + sq.chunk_slot(p, c) * p.DK * p.DV + i64(k0) * p.DV + v0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      c_pre[j][0] = *reinterpret_cast<const u32*>(Cc + acc_at(j, 0));
      c_pre[j][1] = *reinterpret_cast<const u32*>(Cc + acc_at(j, 2));
    }
  };
  load_state(nc - 1);

  float m_n = (Gate::kStabilized && nc > 0) ? p.m_states[sq.m_slot(p, nc)] : 0.f;  // m^(c+1)
  for (int i = 0; i < nc; ++i) {
    const int c = nc - 1 - i, Lc = sq.chunk_len(p, c);
    const i64 slot = sq.chunk_slot(p, c);
    const float m_c = m_chunk, gch = g_chunk;
    const float gamma = expf(gch + m_c - m_n);
    // ---- B_c's part, then dC^(c+1) into slot c, while chunk c's copies land -------------------------
    if (p.state_terms != nullptr) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 lo = unpack2<T>(c_pre[j][0]), hi = unpack2<T>(c_pre[j][1]);
        s += acc[4 * j] * lo.x + acc[4 * j + 1] * lo.y + acc[4 * j + 2] * hi.x + acc[4 * j + 3] * hi.y;
      }
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0) p.state_terms[i64((kb * nvb + vb) * 4 + warp) * p.BH * p.NC + slot] = gamma * s;
    }
    T* out = ptr<T>(p.dC_states) + slot * p.DK * p.DV + i64(k0) * p.DV + v0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      store2(out + acc_at(j, 0), acc[4 * j], acc[4 * j + 1]);
      store2(out + acc_at(j, 2), acc[4 * j + 2], acc[4 * j + 3]);
    }
    // ---- the weights of chunk c, and the next chunk's token terms in flight ----------------------
    {
      const float Mr = Gate::kStabilized ? M_tok : 0.f;
      const float x = p.scale * expf(b_tok + m_c - Mr);
      sm.w()[tid] = tid < Lc ? (Gate::kNormalize ? x / (N_tok + p.eps) : x) : 0.f;
    }
    load_chunk(c - 1);
    load_state(c - 1);
    char* dh = sm.dh(i);
    if constexpr (kTma) {
      mbar_wait(&full[i % kStages], (i / kStages) & 1);  // chunk c's stage landed
      if (Lc < L) {  // rows past a ragged end: the bulk copies bring the next sequence's tokens there
        zero_rows_sw128(sm.q(i), Lc, L, tid, Sm::kThreads);
        zero_rows_sw128(dh, Lc, L, tid, Sm::kThreads);
      }
    } else {
      cp_async_wait<kStages - 2>();  // chunk c's stage (this thread's copies; they zero-fill past Lc) ...
    }
    __syncthreads();         // ... every thread's, the zeroed rows and the weights
    issue(i + kStages - 1);  // into the stage chunk c + 1 used (its products completed)
    if (!kTma) cp_async_commit();

    // ---- dH ← w ⊙ dH in place (w = 0 past Lc), then acc ← γ acc + Qᵀ · dH on the tensor cores ------
    scale_rows_sw128<T>(dh, dh, sm.w(), L, tid, Sm::kThreads);
    fence_async_smem();  // the generic-proxy writes (w ⊙ dH, zeroed rows; cp.async copies) visible to wgmma
    __syncthreads();
#pragma unroll
    for (int e = 0; e < 32; ++e) acc[e] *= gamma;
    fence_regs(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
      wgmma_ss<T, Major::kMN, Major::kMN>(acc, sw128_desc_mn(sm.q(i) + 2048 * kk, 1024),
                                          sw128_desc_mn(dh + 2048 * kk, 1024), 1);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(acc);
    m_n = m_c;  // (the next iteration's first barrier orders its writes of w and stage i − 1 after these reads)
  }
  if (p.dC0 != nullptr) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) p.dC0[sbase + acc_at(j, e)] = acc[4 * j + e];
  }
#else
  __trap();
#endif
}

}  // namespace tfla
