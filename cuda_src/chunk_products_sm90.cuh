// tfla_cupy — the Hopper backward's chunk products on warpgroup MMA, the pieces its kernels
// (bwd_chunks_sm90.cuh, bwd_walk_sm90.cuh) compose: for one warpgroup's 64 rows of a chunk of 128
// and the two key halves (KeyHalf) of the chunk,
//   bwd_score_products   S_h (+)= X_b · Y_{b,h}ᵀ over one 64-column block of the contraction
//   bwd_p_half           P = W ⊙ S of one key half as A fragments in registers (triangle, chunk end);
//                        bwd_p_half_parts: also its rounding residual
//   bwd_inter_products   acc (+)= X_b · D_b, the inter-chunk term, D K-major or MN-major
//   bwd_pz_products      acc += P_h · Z_h, A from registers
// Tiles are 128-byte swizzled (swizzle.cuh), 64 rows × 128 bytes; W[r][u] = exp2(row_log[r] +
// col_log[u]) (gate_terms.cuh).
#pragma once
#include "common.cuh"
#include "gates.cuh"
#include "wgmma.cuh"

namespace tfla {

// Score half h (keys 64h .. 64h + 63) of one thread's rows -> the A fragments P[4h .. 4h + 3]:
// W ⊙ S where the triangle (u <= r causal, u >= r anti-causal) and the chunk (u < Lc) keep it. With
// kResidual, also its rounding residual W ⊙ S − P in the compute dtype into Plo (the same layout):
// P + Plo carries W ⊙ S to about twice the dtype's digits.
template <typename T, bool kCausal, KeyHalf kHalf, bool kResidual>
__device__ __forceinline__ void bwd_p_half_parts(const float (&S)[32], const float2* col_log, float2 rl_lo,
                                                 float2 rl_hi, int row_lo, int row_hi, int t, int Lc, u32 (&P)[8][4],
                                                 u32 (&Plo)[8][4]) {
  constexpr int h = int(kHalf);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = (e & 2) ? row_hi : row_lo, u = 64 * h + 8 * j + 2 * t + (e & 1);
      const bool keep = u < Lc && (kCausal ? u <= r : u >= r);
      w[e] = keep ? exp2f(add_split((e & 2) ? rl_hi : rl_lo, col_log[u])) * S[4 * j + e] : 0.f;
    }
    const int kk = 4 * h + (j >> 1), hh = (j & 1) * 2;
    P[kk][hh] = pack2<T>(w[0], w[1]);
    P[kk][hh + 1] = pack2<T>(w[2], w[3]);
    if constexpr (kResidual) {
      const float2 a = unpack2<T>(P[kk][hh]), b = unpack2<T>(P[kk][hh + 1]);
      Plo[kk][hh] = pack2<T>(w[0] - a.x, w[1] - a.y);
      Plo[kk][hh + 1] = pack2<T>(w[2] - b.x, w[3] - b.y);
    }
  }
}
template <typename T, bool kCausal, KeyHalf kHalf>
__device__ __forceinline__ void bwd_p_half(const float (&S)[32], const float2* col_log, float2 rl_lo, float2 rl_hi,
                                           int row_lo, int row_hi, int t, int Lc, u32 (&P)[8][4]) {
  bwd_p_half_parts<T, kCausal, kHalf, false>(S, col_log, rl_lo, rl_hi, row_lo, row_hi, t, Lc, P, P);
}

// One score half of one contraction block: S_h (+)= X_b · Y_{b,h}ᵀ (x: the CTA's 64 rows of X_b, y: the
// half's 64 key rows); `on`: false for the first block (the products overwrite).
template <typename T>
__device__ __forceinline__ void bwd_score_products(float (&S)[32], const char* x, const char* y, bool on) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
    wgmma_ss<T, Major::kK, Major::kK>(S, sw128_desc(x + 32 * kk), sw128_desc(y + 32 * kk), on || kk > 0);
}

// acc (+)= X_b · D_b for one 64 × 64 block of D (K-major [z][x] or MN-major [x][z] as the role stores it).
template <typename T, bool kDStoredZX>
__device__ __forceinline__ void bwd_inter_products(float (&acc)[32], const char* x, const char* d, bool on) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const int acc_on = on || kk > 0;
    const u64 da = sw128_desc(x + 32 * kk);
    if constexpr (kDStoredZX) {
      wgmma_ss<T, Major::kK, Major::kK>(acc, da, sw128_desc(d + 32 * kk), acc_on);
    } else {
      wgmma_ss<T, Major::kK, Major::kMN>(acc, da, sw128_desc_mn(d + 2048 * kk, 1024), acc_on);
    }
  }
}

// acc += P_h · Z_h: the A fragments of key half h (P[4h .. 4h + 3]) times its 64 rows of Z (MN-major).
template <typename T, KeyHalf kHalf>
__device__ __forceinline__ void bwd_pz_products(float (&acc)[32], const u32 (&P)[8][4], const char* z) {
  constexpr int h = int(kHalf);
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_rs<T, Major::kMN>(acc, P[4 * h + kk], sw128_desc_mn(z + 2048 * kk, 1024), 1);
}

}  // namespace tfla
