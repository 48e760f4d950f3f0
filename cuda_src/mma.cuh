// tfla_cupy — matrix-multiply policies and the warp-level GEMM on shared-memory tiles.
//
// Every product in the kernels is  acc[16·FM × 8·FN] += A · B  computed by one warp, with
// A and B in shared memory and the accumulator in registers in the m16n8 layout of mma.sync:
// lane = 4·g + t holds rows {g, g+8} × columns {2t, 2t+1} of each 16×8 fragment,
//   acc[fm][fn][0..1] = (row 16fm+g,   cols 8fn+2t, 8fn+2t+1)
//   acc[fm][fn][2..3] = (row 16fm+g+8, cols 8fn+2t, 8fn+2t+1).
// The policy decides how the products are done:
//   MmaBF16 / MmaF16   mma.sync m16n8k16, operands through ldmatrix (x4 / x4.trans)
//   MmaTF32            mma.sync m16n8k8 on TF32-rounded fp32 (opt-in, precision="tf32")
//   MmaF32             true fp32: FFMA outer products producing the same register layout
// Operand layouts (Major, common.cuh): A is stored [M][K] (Major::kK) or [K][M] (Major::kMN); B is
// stored [N][K] (kK) or [K][N] (kMN); below warp_gemm, kATrans / kBTrans say "kMN". Shared-memory
// rows are padded by 16 bytes, which makes the 8-row ldmatrix phases and the scalar fragment loads
// conflict-free.
#pragma once
#include "common.cuh"

namespace tfla {

struct MmaBF16 {
  using T = bf16;
  static constexpr int kK = 16;
  static constexpr bool kSimt = false;
};
struct MmaF16 {
  using T = f16;
  static constexpr int kK = 16;
  static constexpr bool kSimt = false;
};
struct MmaTF32 {
  using T = float;
  static constexpr int kK = 8;
  static constexpr bool kSimt = false;
};
struct MmaF32 {
  using T = float;
  static constexpr int kK = 4;
  static constexpr bool kSimt = true;
};

// Row stride (elements) of a shared-memory tile with `cols` columns: 16 bytes of padding.
template <typename T> __host__ __device__ constexpr int smem_stride(int cols) { return cols + 16 / int(sizeof(T)); }

// ---- 16-bit operands: ldmatrix -------------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// A fragment (16 rows from row0, 16 k from k0) of a 16-bit tile.
template <bool kATrans, typename T>
__device__ __forceinline__ void load_a16(u32 (&a)[4], const T* s, int ld, int row0, int k0, int lane) {
  if constexpr (!kATrans) {  // stored [M][K]: matrices (rows 0-7|8-15) x (k 0-7|8-15), row-major order
    ldmatrix_x4(a, s + (row0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
  } else {                   // stored [K][M]: matrix j = lane/8 covers m-block j&1, k-block j>>1
    const int j = lane >> 3;
    ldmatrix_x4_trans(a, s + (k0 + (j >> 1) * 8 + (lane & 7)) * ld + row0 + (j & 1) * 8);
  }
}

// B fragments of two adjacent n-blocks (16 columns from col0, 16 k from k0): b[0..1], b[2..3].
template <bool kBTrans, typename T>
__device__ __forceinline__ void load_b16x2(u32 (&b)[4], const T* s, int ld, int col0, int k0, int lane) {
  const int j = lane >> 3;  // matrix j: n-block j>>1, k-block j&1
  if constexpr (!kBTrans) {  // stored [N][K]
    ldmatrix_x4(b, s + (col0 + (j >> 1) * 8 + (lane & 7)) * ld + k0 + (j & 1) * 8);
  } else {                   // stored [K][N]
    ldmatrix_x4_trans(b, s + (k0 + (j & 1) * 8 + (lane & 7)) * ld + col0 + (j >> 1) * 8);
  }
}

template <typename Mma>
__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  if constexpr (sizeof(typename Mma::T) == 2 && Mma::kK == 16) {
    if constexpr (is_same<Mma, MmaBF16>::value) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
  }
}

// ---- TF32 -------------------------------------------------------------------------------
__device__ __forceinline__ u32 to_tf32(float x) {
  u32 r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma1688_tf32(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Element (m, k) of A stored [M][K] or [K][M]; element (k, n) of B stored [N][K] or [K][N].
template <bool kATrans, typename T>
__device__ __forceinline__ float a_elem(const T* s, int ld, int m, int k) {
  return to_float(kATrans ? s[k * ld + m] : s[m * ld + k]);
}
template <bool kBTrans, typename T>
__device__ __forceinline__ float b_elem(const T* s, int ld, int k, int n) {
  return to_float(kBTrans ? s[k * ld + n] : s[n * ld + k]);
}

// ---------------------------------------------------------------------------------------------
// acc[FM][FN] += A[row0 : row0+16FM, 0:K] · B[0:K, col0 : col0+8FN]
// ---------------------------------------------------------------------------------------------
template <typename Mma, int FM, int FN, Major kA, Major kB>
__device__ __forceinline__ void warp_gemm(float (&acc)[FM][FN][4], const typename Mma::T* A, int lda, int row0,
                                          const typename Mma::T* B, int ldb, int col0, int K) {
  constexpr bool kATrans = kA == Major::kMN, kBTrans = kB == Major::kMN;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  if constexpr (Mma::kSimt) {
    // True fp32: per k, each lane multiplies its 2 rows by its 2 columns of every fragment.
#pragma unroll 1
    for (int k = 0; k < K; ++k) {
      float a[FM][2], b[FN][2];
#pragma unroll
      for (int fm = 0; fm < FM; ++fm) {
        a[fm][0] = a_elem<kATrans>(A, lda, row0 + 16 * fm + g, k);
        a[fm][1] = a_elem<kATrans>(A, lda, row0 + 16 * fm + g + 8, k);
      }
#pragma unroll
      for (int fn = 0; fn < FN; ++fn) {
        b[fn][0] = b_elem<kBTrans>(B, ldb, k, col0 + 8 * fn + 2 * t);  // B[k][n]
        b[fn][1] = b_elem<kBTrans>(B, ldb, k, col0 + 8 * fn + 2 * t + 1);
      }
#pragma unroll
      for (int fm = 0; fm < FM; ++fm)
#pragma unroll
        for (int fn = 0; fn < FN; ++fn) {
          acc[fm][fn][0] = fmaf(a[fm][0], b[fn][0], acc[fm][fn][0]);
          acc[fm][fn][1] = fmaf(a[fm][0], b[fn][1], acc[fm][fn][1]);
          acc[fm][fn][2] = fmaf(a[fm][1], b[fn][0], acc[fm][fn][2]);
          acc[fm][fn][3] = fmaf(a[fm][1], b[fn][1], acc[fm][fn][3]);
        }
    }
  } else if constexpr (Mma::kK == 8) {
    // TF32: A frag a0=(g,t) a1=(g+8,t) a2=(g,t+4) a3=(g+8,t+4); B frag b0=(k=t,n=g) b1=(k=t+4,n=g).
    for (int k0 = 0; k0 < K; k0 += 8) {
      u32 a[FM][4];
#pragma unroll
      for (int fm = 0; fm < FM; ++fm) {
        const int r = row0 + 16 * fm + g;
        a[fm][0] = to_tf32(a_elem<kATrans>(A, lda, r, k0 + t));
        a[fm][1] = to_tf32(a_elem<kATrans>(A, lda, r + 8, k0 + t));
        a[fm][2] = to_tf32(a_elem<kATrans>(A, lda, r, k0 + t + 4));
        a[fm][3] = to_tf32(a_elem<kATrans>(A, lda, r + 8, k0 + t + 4));
      }
#pragma unroll
      for (int fn = 0; fn < FN; ++fn) {
        const int n = col0 + 8 * fn + g;
        const u32 b0 = to_tf32(b_elem<kBTrans>(B, ldb, k0 + t, n));
        const u32 b1 = to_tf32(b_elem<kBTrans>(B, ldb, k0 + t + 4, n));
#pragma unroll
        for (int fm = 0; fm < FM; ++fm) mma1688_tf32(acc[fm][fn], a[fm], b0, b1);
      }
    }
  } else {
    static_assert(FN % 2 == 0, "16-bit B fragments are loaded in pairs of n-blocks");
#pragma unroll 2
    for (int k0 = 0; k0 < K; k0 += 16) {
      u32 a[FM][4];
#pragma unroll
      for (int fm = 0; fm < FM; ++fm) load_a16<kATrans>(a[fm], A, lda, row0 + 16 * fm, k0, lane);
#pragma unroll
      for (int fn = 0; fn < FN; fn += 2) {
        u32 b[4];
        load_b16x2<kBTrans>(b, B, ldb, col0 + 8 * fn, k0, lane);
#pragma unroll
        for (int fm = 0; fm < FM; ++fm) {
          mma16816<Mma>(acc[fm][fn], a[fm], b[0], b[1]);
          mma16816<Mma>(acc[fm][fn + 1], a[fm], b[2], b[3]);
        }
      }
    }
  }
}

template <int FM, int FN> __device__ __forceinline__ void zero(float (&acc)[FM][FN][4]) {
#pragma unroll
  for (int fm = 0; fm < FM; ++fm)
#pragma unroll
    for (int fn = 0; fn < FN; ++fn)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[fm][fn][e] = 0.f;
}

// Visit every accumulator element: fn(fm, fn, e, row, col) with row/col relative to the
// warp's tile origin.
template <int FM, int FN, typename F> __device__ __forceinline__ void for_each_acc(F&& fn_) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int fm = 0; fm < FM; ++fm)
#pragma unroll
    for (int fn = 0; fn < FN; ++fn)
#pragma unroll
      for (int e = 0; e < 4; ++e) fn_(fm, fn, e, 16 * fm + g + 8 * (e >> 1), 8 * fn + 2 * t + (e & 1));
}

}  // namespace tfla
