// tfla_cupy — Hopper (sm_90a) warpgroup MMA primitives: shared-memory matrix descriptors for the
// 128-byte swizzled K-major layout, wgmma.mma_async m64n64k16 bf16 with A from shared memory or
// from registers, and the fences around it. Groundwork of the Hopper kernel family; checked on the
// GPU by wgmma_probe_kernel (tests/test_gpu_wgmma.py) against NumPy.
//
// Everything here compiles only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); elsewhere the probe
// kernel is an empty trap so that one translation unit still builds for sm_80 and sm_90.
//
// Layout (one "swizzle atom" = 8 rows × 128 bytes, 1024-byte aligned): row r of a K-major tile with
// 64 16-bit elements per row lives at byte 128·r; its 16-byte chunk j is stored at chunk j ^ (r % 8).
// A descriptor addresses a 64-row (or N-row) tile of such rows: start address >> 4 (bits 0–13),
// leading byte offset (unused for swizzled K-major, 1), stride byte offset 1024 >> 4 between 8-row
// groups (bits 32–45), swizzle mode 1 = 128 B (bits 62–63). A k-step of 16 elements advances the
// start address by 32 bytes; the hardware applies the swizzle to the final address bits.
#pragma once
#include "common.cuh"
#include "params.cuh"
#include "tile.cuh"

namespace tfla {

using u64 = unsigned long long;

// Byte offset of element (r, c) of a 128B-swizzled K-major tile of 16-bit elements.
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
// overwrites D. Operands from shared-memory descriptors: kTransA / kTransB = 0 for K-major
// tiles (sw128_desc: A rows of M, B rows of N, K contiguous), 1 for MN-major tiles (sw128_desc_mn:
// rows of K, M or N contiguous) — the hardware transposes 16-bit operands on the fly.
template <typename T, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[32], u64 desc_a, u64 desc_b, int scale_d) {
  if constexpr (is_same<T, bf16>::value) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " TFLA_WGMMA_D32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
        : TFLA_WGMMA_D32_OPS(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " TFLA_WGMMA_D32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
        : TFLA_WGMMA_D32_OPS(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));
  }
}

// The same with A from registers: four 32-bit registers of 16-bit pairs in the mma.sync m16k16
// A-fragment layout, warp w of the warpgroup holding rows 16w .. 16w + 15 (the accumulator
// layout of columns 16k .. 16k + 15, so a product tile feeds the next MMA without shared memory).
template <typename T, int kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const u32 (&a)[4], u64 desc_b, int scale_d) {
  if constexpr (is_same<T, bf16>::value) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " TFLA_WGMMA_D32 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : TFLA_WGMMA_D32_OPS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(kTransB));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " TFLA_WGMMA_D32 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : TFLA_WGMMA_D32_OPS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(kTransB));
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

// Store a warpgroup's m64n64 fp32 accumulator to a row-major 64 × 64 array: warp w holds rows
// 16w .. 16w + 15 in the mma.sync C-fragment layout, repeated over the 8 column blocks.
__device__ __forceinline__ void store_m64n64(const float (&d)[32], float* D) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = 16 * warp + (lane >> 2), c0 = 2 * (lane & 3);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    D[r * 64 + 8 * j + c0] = d[4 * j];
    D[r * 64 + 8 * j + c0 + 1] = d[4 * j + 1];
    D[(r + 8) * 64 + 8 * j + c0] = d[4 * j + 2];
    D[(r + 8) * 64 + 8 * j + c0 + 1] = d[4 * j + 3];
  }
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Probe of the operand forms (one warpgroup; q, k: 64 × 64 bf16 row-major, h: 64 × 64 fp32; both
// arrays are stored in the sw128_offset layout as they are, only descriptors and flags differ):
//   kMode 0  h = q · kᵀ   A = q K-major (descriptor), B = k K-major
//   kMode 1  h = q · kᵀ   A = q from registers (the P-tile path of the fused forward)
//   kMode 2  h = q · k    B = k MN-major (rows of k are K indices)
//   kMode 3  h = q · k    A from registers, B MN-major (P · V of the fused forward)
//   kMode 4  h = qᵀ · k   A = q MN-major, B MN-major (Kᵀ · V of the state update)
template <int kMode>
__global__ void __launch_bounds__(128) wgmma_probe_kernel(const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(1024) unsigned char sA[64 * 128];
  __shared__ __align__(1024) unsigned char sB[64 * 128];
  const u16* A = ptr<u16>(p.q);
  const u16* B = ptr<u16>(p.k);
  for (int e = threadIdx.x; e < 64 * 64; e += 128) {
    const int r = e / 64, c = e % 64;
    *reinterpret_cast<u16*>(sA + sw128_offset(r, c)) = A[e];
    *reinterpret_cast<u16*>(sB + sw128_offset(r, c)) = B[e];
  }
  fence_async_smem();
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  constexpr bool kRegA = kMode == 1 || kMode == 3, kMnB = kMode >= 2;
  float d[32] = {};
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const u64 db = kMnB ? sw128_desc_mn(sB + 2048 * kk, 1024) : sw128_desc(sB + 32 * kk);
    if constexpr (kRegA) {
      u32 a[4];
      const int r = 16 * warp + g, c = 16 * kk + 2 * t;
      a[0] = *reinterpret_cast<const u32*>(sA + sw128_offset(r, c));
      a[1] = *reinterpret_cast<const u32*>(sA + sw128_offset(r + 8, c));
      a[2] = *reinterpret_cast<const u32*>(sA + sw128_offset(r, c + 8));
      a[3] = *reinterpret_cast<const u32*>(sA + sw128_offset(r + 8, c + 8));
      wgmma_rs<bf16, kMnB>(d, a, db, kk > 0);
    } else if constexpr (kMode == 4) {
      wgmma_ss<bf16, 1, 1>(d, sw128_desc_mn(sA + 2048 * kk, 1024), db, kk > 0);
    } else {
      wgmma_ss<bf16, 0, kMnB>(d, sw128_desc(sA + 32 * kk), db, kk > 0);
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  store_m64n64(d, ptr<float>(p.h));
#else
  __trap();
#endif
}


// ---------------------------------------------------------------------------------------------
// Bulk tensor copies (TMA) completing on an mbarrier. The tensor map (CUtensorMap, 128 bytes,
// encoded on the host by cuTensorMapEncodeTiled) lives in device memory.
// ---------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void tensormap_acquire(const void* tmap) {
  asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(tmap) : "memory");
}
__device__ __forceinline__ void mbar_init(u64* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u64* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
// Copy the box at (x = column, y = row) of a 2-D tensor map into shared memory.
__device__ __forceinline__ void tma_load_2d(void* smem, const void* tmap, int x, int y, u64* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_addr(smem)),
      "l"(tmap), "r"(x), "r"(y), "r"(smem_addr(bar))
      : "memory");
}
// Copy the box at (x, c1, c2, c3) of a 4-D tensor map into shared memory (128-byte swizzle per
// the map), completing `bar`'s transaction count.
__device__ __forceinline__ void tma_load_4d(void* smem, const void* tmap, int x, int c1, int c2, int c3, u64* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_addr(smem)),
      "l"(tmap), "r"(x), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
      : "memory");
}
// Copy `bytes` (a multiple of 16, both ends 16-byte aligned) of global memory into shared memory.
__device__ __forceinline__ void bulk_load(void* smem, const void* gmem, int bytes, u64* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_addr(smem)),
               "l"(gmem), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
#endif

// A CUtensorMap as a kernel sees it: 128 opaque bytes, 64-byte aligned (encoded on the host by the
// driver's cuTensorMapEncodeTiled, tfla_cupy/_tma.py).
struct alignas(64) TensorMap {
  unsigned long long raw[16];
};

// Probe: as wgmma_probe_kernel<false>, but A and B arrive by TMA (64 × 64 boxes, 128-byte swizzle)
// through tensor maps at p.C0 (A) and p.n0 (B).
template <int kUnused>
__global__ void __launch_bounds__(128) tma_probe_kernel(const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(1024) unsigned char sA[64 * 128];
  __shared__ __align__(1024) unsigned char sB[64 * 128];
  __shared__ __align__(8) u64 bar;
  if (threadIdx.x == 0) {
    tensormap_acquire(p.C0);
    tensormap_acquire(p.n0);
    mbar_init(&bar, 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbar_expect_tx(&bar, 2 * 64 * 128);
    tma_load_2d(sA, p.C0, 0, 0, &bar);
    tma_load_2d(sB, p.n0, 0, 0, &bar);
  }
  mbar_wait(&bar, 0);
  float d[32] = {};
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_ss<bf16, 0, 0>(d, sw128_desc(sA + 32 * kk), sw128_desc(sB + 32 * kk), kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
  store_m64n64(d, ptr<float>(p.h));
#else
  __trap();
#endif
}

}  // namespace tfla
