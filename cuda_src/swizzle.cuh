// tfla_cupy — 128-byte swizzled shared-memory tiles, the layout the Hopper kernels' wgmma
// operands (wgmma.cuh) and bulk tensor copies (tma.cuh) use: the offset of an element, the
// 1024-aligned base of a carve of such tiles, and the row operations and cp.async copies the
// kernels perform on them.
//
// Layout (one "swizzle atom" = 8 rows × 128 bytes, 1024-byte aligned): row r of a tile with 64
// 16-bit elements per row lives at byte 128·r; its 16-byte chunk j is stored at chunk j ^ (r % 8),
// so the 8 rows of an atom spread one column's chunks over all banks.
#pragma once
#include "common.cuh"
#include "tile.cuh"

namespace tfla {

// Byte offset of element (r, c) of a 128B-swizzled tile of 16-bit elements.
__host__ __device__ constexpr int sw128_offset(int r, int c) {
  return r * 128 + ((((c * 2) >> 4) ^ (r & 7)) << 4) + ((c * 2) & 15);
}

// The base of a shared-memory carve of 128-byte swizzled tiles: the dynamic shared memory rounded
// up to 1024 bytes (swizzle atoms need that alignment; each carve reserves 1024 bytes of slack for
// it), and typed views of byte offsets from there. The Hopper kernels' carves derive from it.
struct SwizzledCarve {
  char* base;
  __device__ SwizzledCarve() {
    char* b = dynamic_smem();
    base = b + ((1024 - (smem_addr(b) & 1023)) & 1023);
  }
  template <typename U> __device__ __forceinline__ U* at(int off) const { return reinterpret_cast<U*>(base + off); }
};

// Rows [r0, rows) of a 128-byte swizzled tile of 16-bit elements set to zero; the nt calling
// threads (this one: tid) share its 16-byte pieces.
__device__ __forceinline__ void zero_rows_sw128(char* tile, int r0, int rows, int tid, int nt) {
  for (int idx = 8 * r0 + tid; idx < 8 * rows; idx += nt)
    *reinterpret_cast<uint4*>(tile + sw128_offset(idx >> 3, 8 * (idx & 7))) = make_uint4(0u, 0u, 0u, 0u);
}

// Row r of dst = w[r] · row r of src for r < rows, 128-byte swizzled tiles of T (16-bit) in the same
// places (dst may be src); the nt calling threads (this one: tid) share the 16-byte pieces.
template <typename T>
__device__ __forceinline__ void scale_rows_sw128(char* dst, const char* src, const float* w, int rows, int tid,
                                                 int nt) {
  for (int idx = tid; idx < 8 * rows; idx += nt) {
    const int off = sw128_offset(idx >> 3, 8 * (idx & 7));
    const float wr = w[idx >> 3];
    uint4 x = *reinterpret_cast<const uint4*>(src + off);
    u32* xs = reinterpret_cast<u32*>(&x);
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const T* pair = reinterpret_cast<const T*>(&xs[h]);
      xs[h] = pack2<T>(wr * to_float(pair[0]), wr * to_float(pair[1]));
    }
    *reinterpret_cast<uint4*>(dst + off) = x;
  }
}

// cp.async `rows` rows of 64 16-bit elements (row r at g + r·ld) into a 128-byte swizzled tile;
// rows at or past `valid` are zero-filled (none is read when valid <= 0). NT threads share the
// 16-byte pieces; the caller commits and waits.
template <typename T, int NT>
__device__ __forceinline__ void load_sw128_async(char* s, const T* g, i64 ld, int rows, int valid) {
#pragma unroll 4
  for (int idx = threadIdx.x; idx < rows * 8; idx += NT) {
    const int r = idx >> 3, c = 8 * (idx & 7);
    const bool ok = r < valid;
    cp_async16(s + sw128_offset(r, c), ok ? g + r * ld + c : g, ok);  // (g itself is never read when !ok)
  }
}

}  // namespace tfla
