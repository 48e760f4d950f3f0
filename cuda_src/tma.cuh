// tfla_cupy — Hopper (sm_90a) bulk copies into shared memory: tensor maps and their copies
// (TMA), plain bulk copies, and the mbarriers that count their bytes.
//
// A copy is issued by one thread and completes on an mbarrier in shared memory: the issuing
// thread announces the stage's bytes (mbar_expect_tx), the copies add what they deliver, and
// every thread waits on the barrier's phase parity (mbar_wait). A tensor map (CUtensorMap, 128
// bytes, encoded on the host by cuTensorMapEncodeTiled: tfla_cupy/_tma.py) describes a tensor in
// global memory, the box a copy moves and the swizzle it lands in (swizzle.cuh).
#pragma once
#include "common.cuh"

namespace tfla {

// A CUtensorMap as a kernel sees it: 128 opaque bytes, 64-byte aligned.
struct alignas(64) TensorMap {
  unsigned long long raw[16];
};

// The tensor maps of a kernel argument (by value, so a launch needs no device memory and stays
// capturable in a CUDA graph): q, k, v as 4-D maps whose dimension 0 is the feature and dimensions
// 1..3 are token, head and batch in the order of increasing stride; order[m][i] names the
// coordinate of map m's dimension 1 + i (0 token, 1 head, 2 batch). Boxes of 64 features × one
// chunk of tokens, 128-byte swizzle, zeros outside the tensor (tfla_cupy/_tma.py). The fused
// forward reads q, k, v through them; the Hopper dC pass reads q, and dh in the v slot.
struct FusedMaps {
  TensorMap q, k, v;
  int order[3][3];
};

// (token, head, batch) -> the coordinates of dimensions 1..3 of a map with the given order.
__device__ __forceinline__ int map_coord(int which, int t, int h, int b) { return which == 0 ? t : which == 1 ? h : b; }

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
#if defined(TFLA_WAIT_LIMIT)
// Debug builds (TFLA_CUPY_NVRTC_OPTIONS="-DTFLA_WAIT_LIMIT=<polls>"): a wait that is still open
// after that many polls traps (with a line naming the block and thread, where the printf buffer
// reaches the host), so that a protocol that can deadlock fails the launch instead of hanging it.
// Such builds may spill registers: not for timing.
static_assert((long long)(TFLA_WAIT_LIMIT) >= 1024, "TFLA_WAIT_LIMIT: a number of polls, at least 1024");
__device__ __forceinline__ void mbar_wait(u64* bar, int parity) {
  for (long long polls = 0;; ++polls) {
    u32 done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    if (done) return;
    if (polls >= (long long)(TFLA_WAIT_LIMIT)) {
      printf("tfla: mbarrier wait of block %d, thread %d still open after %lld polls\n", int(blockIdx.x),
             int(threadIdx.x), polls);
      __trap();
    }
  }
}
#else
__device__ __forceinline__ void mbar_wait(u64* bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
#endif
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
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace tfla
