// tfla_cupy — Hopper (sm_90a) warpgroup MMA primitives: shared-memory matrix descriptors for the
// 128-byte swizzled layout (swizzle.cuh), wgmma.mma_async m64n64k16 (and m64n136k16, m64n8k16) with A from
// shared memory or from registers, the fences around it, and stmatrix. Checked on the GPU by
// wgmma_probe_kernel (wgmma_probes.cuh, tests/test_gpu_wgmma.py) against NumPy.
//
// Everything here compiles only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); elsewhere the kernels
// that use it are an empty trap so that one translation unit still builds for sm_80 and sm_90.
//
// A descriptor addresses a 64-row (or N-row) tile of 128-byte swizzled K-major rows: start
// address >> 4 (bits 0–13), leading byte offset (unused for swizzled K-major, 1), stride byte
// offset 1024 >> 4 between 8-row groups (bits 32–45), swizzle mode 1 = 128 B (bits 62–63). A
// k-step of 16 elements advances the start address by 32 bytes; the hardware applies the swizzle
// to the final address bits.
#pragma once
#include "common.cuh"

namespace tfla {

// Descriptor of a K-major 128B-swizzled tile (rows of M or N, K contiguous, laid out as
// sw128_offset says), with the fields of the header.
__device__ __forceinline__ u64 sw128_desc(const void* smem_tile) {
  const u64 addr = smem_addr(smem_tile);
  return ((addr & 0x3FFFF) >> 4) | (u64(1) << 16) | (u64(1024 >> 4) << 32) | (u64(1) << 62);
}

// MN-major 128B-swizzled tile: row r holds 64 consecutive M (or N) elements of K index r, in the
// same byte layout as sw128_offset; 8-row K groups 1024 bytes apart (stride byte offset), 64-wide
// M/N blocks `lbo` bytes apart (leading byte offset; a 64-wide operand never reads it, and its callers
// pass 1024, equal to the stride byte offset, so either reading of the two fields gives the same tile). A k-step of
// 16 elements advances the start address by 16 rows = 2048 bytes.
__device__ __forceinline__ u64 sw128_desc_mn(const void* smem_tile, int lbo) {
  const u64 addr = smem_addr(smem_tile);
  return ((addr & 0x3FFFF) >> 4) | (u64((lbo >> 4) & 0x3FFF) << 16) | (u64(1024 >> 4) << 32) | (u64(1) << 62);
}

// The Hopper kernels' chunks of 128 keys as two 64-key halves, each the N extent of a score
// product X · Yᵀ or the K extent of a product P · Z (m64n64k16 steps).
enum class KeyHalf { kLow = 0, kHigh = 1 };  // keys 0 .. 63, keys 64 .. 127

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pin registers that an in-flight wgmma reads or writes: the compiler sees the asm operands only
// at issue, so accumulators are fenced before use after wgmma_wait and register A fragments are
// kept alive (not reused) until then.
template <int N> __device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N> __device__ __forceinline__ void fence_regs(u32 (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}
// Generic-proxy writes to shared memory (st.shared, cp.async) made visible to wgmma's async proxy.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

#define TFLA_WGMMA_D32                                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define TFLA_WGMMA_D32_OPS(d)                                                                              \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),           \
      "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),           \
      "+f"(d[30]), "+f"(d[31])

// D[64 × 64] (+)= A[64 × 16] · B[16 × 64], T = bf16 or f16 in, fp32 accumulate; scale_d = 0
// overwrites D. Operands from shared-memory descriptors of the layouts kA, kB (the instruction's
// transpose flags): Major::kK for K-major tiles (sw128_desc), Major::kMN for MN-major tiles
// (sw128_desc_mn) — the hardware transposes 16-bit operands on the fly.
template <typename T, Major kA, Major kB>
__device__ __forceinline__ void wgmma_ss(float (&d)[32], u64 desc_a, u64 desc_b, int scale_d) {
  if constexpr (is_same<T, bf16>::value) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " TFLA_WGMMA_D32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
        : TFLA_WGMMA_D32_OPS(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(int(kA)), "n"(int(kB)));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " TFLA_WGMMA_D32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
        : TFLA_WGMMA_D32_OPS(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(int(kA)), "n"(int(kB)));
  }
}

// The same with A from registers: four 32-bit registers of 16-bit pairs in the mma.sync m16k16
// A-fragment layout, warp w of the warpgroup holding rows 16w .. 16w + 15 (the accumulator
// layout of columns 16k .. 16k + 15, so a product tile feeds the next MMA without shared memory).
template <typename T, Major kB>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const u32 (&a)[4], u64 desc_b, int scale_d) {
  if constexpr (is_same<T, bf16>::value) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " TFLA_WGMMA_D32 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : TFLA_WGMMA_D32_OPS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(int(kB)));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " TFLA_WGMMA_D32 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : TFLA_WGMMA_D32_OPS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(int(kB)));
  }
}

// D[64 × 8] (+)= A[64 × 16] · B[16 × 8], both operands K-major in shared memory (sw128_desc; B is
// 8 rows of one swizzle atom): a matrix-vector product with the vector in B's row 0 and zero rows
// beside it. D holds rows g, g + 8 of each warp's 16 and columns 2t, 2t + 1 (as the m64n64 form's
// first block): column 0, the product, is d[0] and d[2] of the quads' first threads.
template <typename T> __device__ __forceinline__ void wgmma_ss_n8(float (&d)[4], u64 desc_a, u64 desc_b, int scale_d) {
  if constexpr (is_same<T, bf16>::value) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0, %1, %2, %3}, %4, %5, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%0, %1, %2, %3}, %4, %5, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
}

// A wide K-major product for one warpgroup: D[64 × N] (+)= A[64 × 16] · B[16 × N], N = 136, both
// operands K-major in shared memory (sw128_desc; B's N rows are consecutive 128-byte rows, so a B
// tile may span adjacent tiles), into the first N / 2 registers of d (column block j of 8 in
// d[4j .. 4j + 3], as in the m64n64 form).
#define TFLA_WGMMA_N136(TY)                                                                                     \
  asm volatile(                                                                                                 \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %70, 0;\n"                                                                \
    "wgmma.mma_async.sync.aligned.m64n136k16.f32." TY "." TY " "                                                \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                   \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                          \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                          \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                          \
    "%64, %65, %66, %67}, "                                                                                     \
    "%68, %69, p, 1, 1, 0, 0;\n}\n"                                                                             \
    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),           \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),     \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),   \
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),   \
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),   \
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),   \
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),   \
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),   \
      "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67])                                                        \
    : "l"(desc_a), "l"(desc_b), "r"(scale_d))
template <typename T, int N, int R>
__device__ __forceinline__ void wgmma_ss_wide(float (&d)[R], u64 desc_a, u64 desc_b, int scale_d) {
  static_assert(N == 136 && R >= N / 2, "N = 136, N / 2 accumulator registers");
  if constexpr (is_same<T, bf16>::value)
    TFLA_WGMMA_N136("bf16");
  else
    TFLA_WGMMA_N136("f16");
}
#undef TFLA_WGMMA_N136

// Store four 8 × 8 matrices of 16-bit pairs transposed (stmatrix .trans): register i holds matrix
// i in the mma accumulator layout; lane 8i + b gives the address of stored row b of matrix i.
__device__ __forceinline__ void stmatrix_x4_trans(void* row_addr, u32 r0, u32 r1, u32 r2, u32 r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr(row_addr)),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}
#undef TFLA_WGMMA_D32
#undef TFLA_WGMMA_D32_OPS
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace tfla
