// tfla_cupy — common device helpers: storage types, conversions, PTX wrappers, small maths.
//
// The sources include no CUDA header at all (no cuda_bf16.h / cuda_fp16.h / <cstdint>), so
// NVRTC compiles them with no include path, with or without a GPU: 16-bit floats are stored
// as raw `unsigned short` and converted with PTX `cvt`.
#pragma once

namespace tfla {

using u16 = unsigned short;
using u32 = unsigned int;
using i64 = long long;
using u64 = unsigned long long;

template <typename A, typename B> struct is_same { static constexpr bool value = false; };
template <typename A> struct is_same<A, A> { static constexpr bool value = true; };

// ---------------------------------------------------------------------------------------------
// Storage types. Each has: the raw storage type, to_float / from_float, and its name for errors.
// ---------------------------------------------------------------------------------------------
struct bf16 { u16 bits; };
struct f16 { u16 bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(u32(x.bits) << 16); }
__device__ __forceinline__ float to_float(f16 x) {
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x.bits));
  return r;
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return bf16{r};
}
template <> __device__ __forceinline__ f16 from_float<f16>(float x) {
  u16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return f16{r};
}

// Two floats -> one 32-bit register of two 16-bit values (low half = first element).
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<bf16>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <> __device__ __forceinline__ u32 pack2<f16>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// The two 16-bit values of one register (pack2's layout) as floats: low half first.
template <typename T> __device__ __forceinline__ float2 unpack2(u32 r) {
  const u16 lo = u16(r & 0xffffu), hi = u16(r >> 16);
  return make_float2(to_float(T{lo}), to_float(T{hi}));
}

// Store two consecutive elements (from fp32) to global or shared memory.
template <typename T> __device__ __forceinline__ void store2(T* p, float a, float b) {
  if constexpr (sizeof(T) == 2) {
    *reinterpret_cast<u32*>(p) = pack2<T>(a, b);
  } else {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  }
}

// ---------------------------------------------------------------------------------------------
// Maths. Log gates use logσ(x) = min(x, 0) − log1p(exp(−|x|)), stable for every x.
// ---------------------------------------------------------------------------------------------
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

__device__ __forceinline__ float logsigmoid(float x) { return fminf(x, 0.f) - log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T> __host__ __device__ constexpr T cdiv(T a, T b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Matrix operand layouts in shared memory, named for mma.sync (mma.cuh) and wgmma (wgmma.cuh):
// kK — K contiguous (A stored [M][K], B stored [N][K]); kMN — M or N contiguous (A stored [K][M],
// B stored [K][N]), transposed on the way into the MMA.
// ---------------------------------------------------------------------------------------------
enum class Major { kK = 0, kMN = 1 };

// ---------------------------------------------------------------------------------------------
// Asynchronous copies (sm_80+). A 16-byte chunk is copied, or zero-filled when !valid.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
// 4-byte copy (for per-step scalars whose rows are not 16-byte aligned).
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Hardware barrier `id` (1..15; 0 is __syncthreads) among `threads` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---------------------------------------------------------------------------------------------
// Warp reductions over the 4 lanes of an mma "quad" (lanes sharing one accumulator row).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// Inclusive prefix sum over the threads of the block, in thread order (float or integer T):
// returns this thread's value and writes the block total to *total; warp_tot holds 32 entries.
// Ends synchronised.
template <typename T>
__device__ __forceinline__ T block_scan(T x, T* warp_tot, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_tot[warp] = x;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nw ? warp_tot[lane] : T(0);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    if (lane < nw) warp_tot[lane] = w;
    if (lane == nw - 1) *total = w;
  }
  __syncthreads();
  const T r = x + (warp > 0 ? warp_tot[warp - 1] : T(0));
  __syncthreads();
  return r;
}

}  // namespace tfla
