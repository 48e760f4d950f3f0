// tfla_cupy — the chunk recurrence shared by the forward state pass and the backward dC pass.
//
// Both kernels keep a kBK × kBV tile of a DK × DV state in registers (fp32) and, per chunk,
//     acc ← γ · acc + Σ_τ X_τᵀ (w_τ · Y_τ)
// forward (MLSTM_SPEC.md §4.2): X = K, Y = V, w = ā (and n ← γ n + Σ ā_τ k_τ);
// backward (§6.2):              X = Q, Y = dH, w = s·β̄ / (N + ε).
// Chunks are consumed kBT steps at a time from a double-buffered stream: the cp.async loads of
// the next sub-tile (of this chunk or of the next chunk in walking order) are in flight while
// the current one is multiplied and while the next chunk's gates are computed.
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

__device__ __forceinline__ int chunk_len(const Params& p, int c) { return min(p.L, p.S - c * p.L); }

// Shared memory of a state pass (see StateTile::smem_bytes) and its sub-tile stream.
template <typename Mma, typename Tile>
struct StateStream {
  using T = typename Mma::T;
  static constexpr int BT = Tile::kBT, ldx = smem_stride<T>(Tile::kBK), ldy = smem_stride<T>(Tile::kBV);
  static constexpr int kXElems = BT * ldx, kYElems = BT * ldy;
  T* Xs0;        // two X buffers, kXElems apart, and two Y buffers
  T* Ys0;
  double* lam;   // per-chunk gate scratch (length L)
  double* iota;
  float* w;      // per-step weight w_τ of the current chunk
  float* n_s;    // n slice (forward only)
  const T* X;    // this CTA's column block of X (row stride DX) and Y
  const T* Y;
  int DX, DY, x_cols, y_cols;

  __device__ StateStream(const Params& p, const T* X_, int DX_, int x_cols_, const T* Y_, int DY_, int y_cols_)
      : X(X_), Y(Y_), DX(DX_), DY(DY_), x_cols(x_cols_), y_cols(y_cols_) {
    SmemCarver sm{dynamic_smem()};
    Xs0 = sm.take<T>(2 * kXElems);
    Ys0 = sm.take<T>(2 * kYElems);
    lam = sm.take<double>(p.L);
    iota = sm.take<double>(p.L);
    w = sm.take<float>(p.L);
    n_s = sm.take<float>(Tile::kBK);
  }

  __device__ __forceinline__ T* Xs(int b) const { return Xs0 + b * kXElems; }
  __device__ __forceinline__ T* Ys(int b) const { return Ys0 + b * kYElems; }

  // Start the copy of steps [t, t + rows) into buffer b.
  __device__ __forceinline__ void issue(int b, i64 t, int rows) const {
    load_tile_async<T, BT, Tile::kBK, Tile::kThreads>(Xs(b), ldx, X + t * DX, DX, rows, x_cols);
    load_tile_async<T, BT, Tile::kBV, Tile::kThreads>(Ys(b), ldy, Y + t * DY, DY, rows, y_cols);
    cp_async_commit();
  }

  // acc += X_subᵀ (w ⊙ Y_sub) for the landed buffer b holding `rows` steps whose weights are
  // w[w0 ..]; with kUpdateN also n_s += Σ_τ w_τ X_τ (fp32, unrounded X). Ends synchronised.
  template <bool kUpdateN>
  __device__ __forceinline__ void consume(float (&acc)[Tile::kFM][Tile::kFN][4], int b, int w0, int rows,
                                          int row0, int col0) const {
    constexpr int NT = Tile::kThreads, BV = Tile::kBV;
    if constexpr (kUpdateN) {
      for (int d = threadIdx.x; d < Tile::kBK; d += NT) {
        float s = 0.f;
        for (int r = 0; r < rows; ++r) s = fmaf(w[w0 + r], to_float(Xs(b)[r * ldx + d]), s);
        n_s[d] += s;
      }
    }
    for (int idx = threadIdx.x; idx < rows * BV; idx += NT) {
      const int r = idx / BV, d = idx % BV;
      Ys(b)[r * ldy + d] = from_float<T>(w[w0 + r] * to_float(Ys(b)[r * ldy + d]));
    }
    __syncthreads();
    // acc[dk][dv] += Σ_τ X[τ][dk] · Y[τ][dv]:  A = Xᵀ (stored [τ][dk]), B = Y (stored [τ][dv])
    warp_gemm<Mma, Tile::kFM, Tile::kFN, true, true>(acc, Xs(b), ldx, row0, Ys(b), ldy, col0, BT);
    __syncthreads();
  }

  // Walk chunk c (whose gates are in w) sub-tile by sub-tile. `next_c` is the chunk that
  // follows in walking order (or −1): its first sub-tile is prefetched during the last one of
  // this chunk. On entry the first sub-tile of c is in flight in buffer `b`; returns the buffer
  // where the next chunk's first sub-tile is in flight.
  template <bool kUpdateN>
  __device__ __forceinline__ int walk_chunk(float (&acc)[Tile::kFM][Tile::kFN][4], const Params& p, int c,
                                            int next_c, int b, int row0, int col0) const {
    const int Lc = chunk_len(p, c);
    for (int ts = 0; ts < Lc; ts += BT) {
      const bool more = ts + BT < Lc;
      if (more) {
        issue(b ^ 1, i64(c) * p.L + ts + BT, min(BT, Lc - ts - BT));
      } else if (next_c >= 0) {
        issue(b ^ 1, i64(next_c) * p.L, min(BT, chunk_len(p, next_c)));
      }
      if (more || next_c >= 0) {
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      consume<kUpdateN>(acc, b, ts, min(BT, Lc - ts), row0, col0);
      b ^= 1;
    }
    return b;
  }
};

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
