// tfla_cupy — global -> shared tile copies and shared-memory carving.
#pragma once
#include "mma.cuh"

namespace tfla {

// Copy a ROWS × COLS tile from global memory (row stride ldg elements; rows [0, rows_valid)
// and columns [0, cols_valid) exist) into shared memory (row stride lds), 16 bytes per
// cp.async; missing chunks are zero-filled. `g` must point at an existing element (the tile's
// origin is always inside the tensor). cols_valid is a multiple of 16 bytes (head dims are
// multiples of 8). NT threads cooperate; the caller commits and waits.
template <typename T, int ROWS, int COLS, int NT>
__device__ __forceinline__ void load_tile_async(T* s, int lds, const T* g, i64 ldg, int rows_valid,
                                                int cols_valid) {
  constexpr int E = 16 / int(sizeof(T));
  constexpr int kChunksPerRow = COLS / E;
  static_assert(COLS % E == 0, "tile columns must be whole 16-byte chunks");
#pragma unroll 1
  for (int idx = threadIdx.x; idx < ROWS * kChunksPerRow; idx += NT) {
    const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * E;
    const bool valid = r < rows_valid && c < cols_valid;
    cp_async16(s + r * lds + c, valid ? g + r * ldg + c : g, valid);
  }
}

// Bump allocator over dynamic shared memory (every request is a multiple of 16 bytes).
struct SmemCarver {
  char* p;
  template <typename T> __device__ __forceinline__ T* take(int count) {
    T* r = reinterpret_cast<T*>(p);
    p += ((count * int(sizeof(T)) + 15) / 16) * 16;
    return r;
  }
};

__device__ __forceinline__ char* dynamic_smem() {
  extern __shared__ __align__(16) char tfla_smem[];
  return tfla_smem;
}

}  // namespace tfla

namespace tfla {

// Store a warp's accumulator tile (origin `g`, row stride ld) as element type T; rows and
// columns at or beyond rows_valid / cols_valid (relative to the origin) are skipped. Column
// pairs never straddle the limit because head dims are even.
template <typename T, int FM, int FN>
__device__ __forceinline__ void store_acc(const float (&acc)[FM][FN][4], T* g, i64 ld, int rows_valid,
                                          int cols_valid) {
  const int lane = threadIdx.x & 31;
  const int gr = lane >> 2, t = lane & 3;
#pragma unroll
  for (int fm = 0; fm < FM; ++fm)
#pragma unroll
    for (int fn = 0; fn < FN; ++fn)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 16 * fm + gr + 8 * h, c = 8 * fn + 2 * t;
        if (r < rows_valid && c < cols_valid) store2(g + r * ld + c, acc[fm][fn][2 * h], acc[fm][fn][2 * h + 1]);
      }
}

}  // namespace tfla
