// tfla_cupy — the chunk recurrence shared by the forward state pass and the backward dC pass.
//
// Both kernels keep a kBK × kBV tile of a DK × DV state in registers (fp32) and, per chunk,
//     acc ← γ · acc + Σ_τ X_τᵀ (w_τ · Y_τ)
// forward (docs/math.md §4.2): X = K, Y = V, w = ā (and n ← γ n + Σ ā_τ k_τ);
// backward (§6.2):              X = Q, Y = dH, w = s·β̄ / (N + ε).
// Chunks are consumed kBT steps at a time from a double-buffered stream: the cp.async loads of
// the next sub-tile (of this chunk or of the next chunk in walking order) are in flight while
// the current one is multiplied. The gate vectors come precomputed from stage 0
// (chunk_gates.cuh), so the sequential path has one exp per step and no scans.
// Grid: one CTA per (DK block, DV block, sequence·head), flattened into blockIdx.x.
#pragma once
#include "config.cuh"
#include "coords.cuh"
#include "gates.cuh"
#include "tile.cuh"

namespace tfla {

template <typename Tile>
struct StateCoords {
  int kb, vb;       // DK block, DV block
  int k0, v0;       // tile origin in (DK, DV)
  int row0, col0;   // this warp's origin inside the tile
  SeqCoords seq;    // the sequence and head this CTA walks
  // seq.state, recomputed from the block index where it is used (saves a register in the loop)
  __device__ __forceinline__ int state(const Params& p) const {
    return blockIdx.x / (cdiv(p.DK, Tile::kBK) * cdiv(p.DV, Tile::kBV));
  }
  __device__ StateCoords(const Params& p)
      : kb(blockIdx.x % cdiv(p.DK, Tile::kBK)),
        vb((blockIdx.x / cdiv(p.DK, Tile::kBK)) % cdiv(p.DV, Tile::kBV)),
        seq(p, (blockIdx.x / (cdiv(p.DK, Tile::kBK) * cdiv(p.DV, Tile::kBV))) / p.NH,
            (blockIdx.x / (cdiv(p.DK, Tile::kBK) * cdiv(p.DV, Tile::kBV))) % p.NH) {
    k0 = kb * Tile::kBK;
    v0 = vb * Tile::kBV;
    const int warp = threadIdx.x >> 5;
    row0 = (warp / Tile::kWN) * 16 * Tile::kFM;
    col0 = (warp % Tile::kWN) * 8 * Tile::kFN;
  }
};

// The two source pointers of the stream live in shared memory, not in registers: the sequential
// kernels run at the register limit and read them once per sub-tile.
__shared__ const void* state_stream_src[2];

// Shared memory of a state pass (see StateTile::smem_bytes) and its sub-tile stream. Each
// sub-tile brings kBT steps of X, Y and up to kGateRows per-step gate scalars (G rows); after
// it lands, the per-step weights w are computed from G and the X rows are scaled by them.
template <typename Mma, typename Tile>
struct StateStream {
  using T = typename Mma::T;
  static constexpr int BT = Tile::kBT, BK = Tile::kBK, NT = Tile::kThreads;
  static constexpr int ldx = smem_stride<T>(BK), ldy = smem_stride<T>(Tile::kBV);
  static constexpr int kXElems = BT * ldx, kYElems = BT * ldy, kGateRows = Tile::kGateRows;
  static constexpr int kPairs = BK / 2, kGroups = NT / kPairs;  // n update: column pairs × row groups
  static_assert(NT % kPairs == 0, "n update maps threads onto column pairs");
  // the carve (every take a multiple of 16 bytes) is the size
  static constexpr int kCarveBytes =
      int(sizeof(T)) * (2 * kXElems + 2 * kYElems) + 4 * (2 * kGateRows * BT + BT + BK + kGroups * BK);
  static_assert((int(sizeof(T)) * kXElems) % 16 == 0 && (int(sizeof(T)) * kYElems) % 16 == 0 && BT % 4 == 0 &&
                    BK % 4 == 0 && kCarveBytes == Tile::smem_bytes(int(sizeof(T)), 0),
                "StateStream carve and StateTile::smem_bytes disagree");
  T* Xs0;      // two X buffers, kXElems apart, and two Y buffers
  T* Ys0;
  float* G0;   // two gate-row buffers of kGateRows × BT floats
  float* w;    // weights of the landed sub-tile
  float* n_s;  // n slice (forward only)
  float* n_part;
  int ldX, ldY;  // token strides (elements; the host keeps them below 2^31)
  int x_cols, y_cols;
  // this CTA's column block of X and Y at the sequence's first token
  __device__ __forceinline__ const T* X() const { return static_cast<const T*>(state_stream_src[0]); }
  __device__ __forceinline__ const T* Y() const { return static_cast<const T*>(state_stream_src[1]); }

  // Call with every thread (synchronises).
  __device__ StateStream(const T* X_, int ldX_, int x_cols_, const T* Y_, int ldY_, int y_cols_)
      : ldX(ldX_), ldY(ldY_), x_cols(x_cols_), y_cols(y_cols_) {
    if (threadIdx.x == 0) {
      state_stream_src[0] = X_;
      state_stream_src[1] = Y_;
    }
    __syncthreads();
    SmemCarver sm{dynamic_smem()};
    Xs0 = sm.take<T>(2 * kXElems);
    Ys0 = sm.take<T>(2 * kYElems);
    G0 = sm.take<float>(2 * kGateRows * BT);
    w = sm.take<float>(BT);
    n_s = sm.take<float>(BK);
    n_part = sm.take<float>(kGroups * BK);
  }
  __device__ __forceinline__ T* Xs(int b) const { return Xs0 + b * kXElems; }
  __device__ __forceinline__ T* Ys(int b) const { return Ys0 + b * kYElems; }
  __device__ __forceinline__ float* G(int b) const { return G0 + b * kGateRows * BT; }

  // Start the copy of steps [t, t + rows) of X and Y (t relative to the sequence start) into
  // buffer b; `gates(G(b), rows)` issues the gate rows. One commit group.
  template <typename IssueGates>
  __device__ __forceinline__ void issue(int b, int t, int rows, IssueGates&& gates) const {
    load_tile_async<T, BT, BK, NT>(Xs(b), ldx, X() + i64(t) * ldX, ldX, rows, x_cols);
    load_tile_async<T, BT, Tile::kBV, NT>(Ys(b), ldy, Y() + i64(t) * ldY, ldY, rows, y_cols);
    gates(G(b), rows);
    cp_async_commit();
  }

  // acc += (w ⊙ X_sub)ᵀ Y_sub for the landed buffer b; with kUpdateN also n_s += Σ_τ w_τ X_τ
  // (fp32, from X before rounding w ⊙ X, fixed summation order). One pass over X does both: the
  // thread that reads an element for n also writes it back scaled. Ends synchronised.
  template <bool kUpdateN, typename Weight>
  __device__ __forceinline__ void consume(float (&acc)[Tile::kFM][Tile::kFN][4], int b, int rows, int row0,
                                          int col0, Weight&& weight) const {
    for (int r = threadIdx.x; r < BT; r += NT) w[r] = r < rows ? weight(G(b), r) : 0.f;
    __syncthreads();
    {
      const int pair = threadIdx.x % kPairs, grp = threadIdx.x / kPairs;
      float s0 = 0.f, s1 = 0.f;
      for (int r = grp; r < rows; r += kGroups) {
        T* x = Xs(b) + r * ldx + 2 * pair;
        const float x0 = to_float(x[0]), x1 = to_float(x[1]), wr = w[r];
        if constexpr (kUpdateN) {
          s0 = fmaf(wr, x0, s0);
          s1 = fmaf(wr, x1, s1);
        }
        store2(x, wr * x0, wr * x1);
      }
      if constexpr (kUpdateN) {
        n_part[grp * BK + 2 * pair] = s0;
        n_part[grp * BK + 2 * pair + 1] = s1;
      }
    }
    __syncthreads();
    // acc[dk][dv] += Σ_τ (w_τ X[τ][dk]) · Y[τ][dv]:  A = (w ⊙ X)ᵀ (stored [τ][dk]), B = Y (stored [τ][dv])
    warp_gemm<Mma, Tile::kFM, Tile::kFN, Major::kMN, Major::kMN>(acc, Xs(b), ldx, row0, Ys(b), ldy, col0, BT);
    if constexpr (kUpdateN) {
      for (int d = threadIdx.x; d < BK; d += NT) {
        float s = 0.f;
        for (int j = 0; j < kGroups; ++j) s += n_part[j * BK + d];
        n_s[d] += s;
      }
    }
    __syncthreads();
  }

  // Walk chunk c (Lc steps) sub-tile by sub-tile. On entry its first sub-tile is in flight in buffer b;
  // `issue_next(b, c', ts, rows)` requests a sub-tile; next_c is the chunk that follows in
  // walking order (−1: none), whose first sub-tile is prefetched during this chunk's last one.
  // Returns the buffer where that prefetch lands.
  template <bool kUpdateN, typename IssueAt, typename Weight>
  __device__ __forceinline__ int walk_chunk(float (&acc)[Tile::kFM][Tile::kFN][4], int c, int Lc,
                                            int next_c, int b, int row0, int col0, IssueAt&& issue_at,
                                            Weight&& weight) const {
    for (int ts = 0; ts < Lc; ts += BT) {
      const bool more = ts + BT < Lc;
      if (more) {
        issue_at(b ^ 1, c, ts + BT);
      } else if (next_c >= 0) {
        issue_at(b ^ 1, next_c, 0);
      }
      if (more || next_c >= 0) {
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      consume<kUpdateN>(acc, b, min(BT, Lc - ts), row0, col0, weight);
      b ^= 1;
    }
    return b;
  }
};

// cp.async of `rows` consecutive fp32 scalars (16-byte aligned source, zero-filled past `rows`
// in whole 16-byte chunks; every chunk started lies inside the source chunk of length L).
template <int BT, int NT>
__device__ __forceinline__ void load_row_async(float* dst, const float* src, int rows) {
  load_tile_async<float, 1, BT, NT>(dst, BT, src, 0, 1, ((rows + 3) / 4) * 4);
}

// 4-byte cp.async of `rows` fp32 scalars src[(t + r)·stride] (any alignment, any stride); zero past `rows`.
template <int BT, int NT>
__device__ __forceinline__ void load_row_async4(float* dst, const float* src, int t, int stride, int rows) {
  for (int r = threadIdx.x; r < BT; r += NT) cp_async4(dst + r, src + i64(r < rows ? t + r : t) * stride, r < rows);
}

template <int FM, int FN> __device__ __forceinline__ void scale_acc(float (&acc)[FM][FN][4], float s) {
#pragma unroll
  for (int fm = 0; fm < FM; ++fm)
#pragma unroll
    for (int fn = 0; fn < FN; ++fn)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[fm][fn][e] *= s;
}

// Load the DK × DV fp32 state of this CTA's (sequence, head) into the accumulator (zeros where
// src is null or out of range).
template <typename Tile>
__device__ __forceinline__ void load_state_acc(float (&acc)[Tile::kFM][Tile::kFN][4], const float* src,
                                               const StateCoords<Tile>& at, const Params& p) {
  const int DK = p.DK, DV = p.DV;
  for_each_acc<Tile::kFM, Tile::kFN>([&](int fm, int fn, int e, int r, int c) {
    const int dk = at.k0 + at.row0 + r, dv = at.v0 + at.col0 + c;
    acc[fm][fn][e] =
        (src != nullptr && dk < DK && dv < DV) ? src[i64(at.state(p)) * DK * DV + i64(dk) * DV + dv] : 0.f;
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
