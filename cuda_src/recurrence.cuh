// tfla_cupy — the chunk recurrence shared by the forward state pass and the backward dC pass.
//
// Both kernels keep a kBK × kBV tile of a DK × DV state in registers (fp32) and, per chunk,
//     acc ← γ · acc + Σ_τ X_τᵀ (w_τ · Y_τ)
// forward (MLSTM_SPEC.md §4.2): X = K, Y = V, w = ā (and n ← γ n + Σ ā_τ k_τ);
// backward (§6.2):              X = Q, Y = dH, w = s·β̄ / (N + ε).
// Grid: one CTA per (DK block, DV block, batch·head), flattened into blockIdx.x.
#pragma once
#include "config.cuh"
#include "gates.cuh"
#include "params.cuh"
#include "tile.cuh"

namespace tfla {

template <typename Tile>
struct StateCoords {
  int kb, vb, bh;   // DK block, DV block, batch·head
  int k0, v0;       // tile origin in (DK, DV)
  int row0, col0;   // this warp's origin inside the tile
  __device__ StateCoords(int DK, int DV) {
    const int nKb = cdiv(DK, Tile::kBK), nVb = cdiv(DV, Tile::kBV);
    int blk = blockIdx.x;
    kb = blk % nKb;
    blk /= nKb;
    vb = blk % nVb;
    bh = blk / nVb;
    k0 = kb * Tile::kBK;
    v0 = vb * Tile::kBV;
    const int warp = threadIdx.x >> 5;
    row0 = (warp / Tile::kWN) * 16 * Tile::kFM;
    col0 = (warp % Tile::kWN) * 8 * Tile::kFN;
  }
};

// acc += Σ_{τ < Lc} X_τᵀ (w_τ Y_τ) over one chunk, kBT steps per shared-memory round.
// X points at the chunk's first row and this CTA's first DK column (row stride DX), Y likewise
// for DV. With kUpdateN, also n_s[d] += Σ_τ w_τ X_τ[d] (fp32, unrounded X).
template <typename Mma, typename Tile, bool kUpdateN>
__device__ __forceinline__ void accumulate_chunk(float (&acc)[Tile::kFM][Tile::kFN][4], const typename Mma::T* X,
                                                 int DX, int x_cols, const typename Mma::T* Y, int DY, int y_cols,
                                                 const float* w, int Lc, typename Mma::T* Xs,
                                                 typename Mma::T* Ys, float* n_s, int row0, int col0) {
  using T = typename Mma::T;
  constexpr int BT = Tile::kBT, BK = Tile::kBK, BV = Tile::kBV, NT = Tile::kThreads;
  constexpr int ldx = smem_stride<T>(BK), ldy = smem_stride<T>(BV);
  for (int ts = 0; ts < Lc; ts += BT) {
    const int rows = min(BT, Lc - ts);
    load_tile_async<T, BT, BK, NT>(Xs, ldx, X + i64(ts) * DX, DX, rows, x_cols);
    load_tile_async<T, BT, BV, NT>(Ys, ldy, Y + i64(ts) * DY, DY, rows, y_cols);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if constexpr (kUpdateN) {
      for (int d = threadIdx.x; d < BK; d += NT) {
        float s = 0.f;
        for (int r = 0; r < rows; ++r) s = fmaf(w[ts + r], to_float(Xs[r * ldx + d]), s);
        n_s[d] += s;
      }
    }
    for (int idx = threadIdx.x; idx < rows * BV; idx += NT) {  // Y rows ← w_τ · Y_τ
      const int r = idx / BV, d = idx % BV;
      Ys[r * ldy + d] = from_float<T>(w[ts + r] * to_float(Ys[r * ldy + d]));
    }
    __syncthreads();
    // acc[dk][dv] += Σ_τ X[τ][dk] · Y[τ][dv]:  A = Xᵀ (stored [τ][dk]), B = Y (stored [τ][dv])
    warp_gemm<Mma, Tile::kFM, Tile::kFN, true, true>(acc, Xs, ldx, row0, Ys, ldy, col0, BT);
    __syncthreads();
  }
}

template <int FM, int FN> __device__ __forceinline__ void scale_acc(float (&acc)[FM][FN][4], float s) {
#pragma unroll
  for (int fm = 0; fm < FM; ++fm)
#pragma unroll
    for (int fn = 0; fn < FN; ++fn)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[fm][fn][e] *= s;
}

// Load a DK × DV fp32 state tile into the accumulator (zeros where src is null or out of range).
template <typename Tile>
__device__ __forceinline__ void load_state_acc(float (&acc)[Tile::kFM][Tile::kFN][4], const float* src,
                                               const StateCoords<Tile>& at, int DK, int DV) {
  for_each_acc<Tile::kFM, Tile::kFN>([&](int fm, int fn, int e, int r, int c) {
    const int dk = at.k0 + at.row0 + r, dv = at.v0 + at.col0 + c;
    acc[fm][fn][e] = (src != nullptr && dk < DK && dv < DV) ? src[i64(at.bh) * DK * DV + i64(dk) * DV + dv] : 0.f;
  });
}

// Store the accumulator tile into slot `slot` of a (BH, slots, DK, DV) array of element type T.
template <typename T, typename Tile>
__device__ __forceinline__ void store_state_acc(const float (&acc)[Tile::kFM][Tile::kFN][4], T* dst, i64 slot,
                                                const StateCoords<Tile>& at, int DK, int DV) {
  const int r0 = at.k0 + at.row0, c0 = at.v0 + at.col0;
  store_acc<T>(acc, dst + slot * DK * DV + i64(r0) * DV + c0, DV, DK - r0, DV - c0);
}

}  // namespace tfla
