// tfla_cupy — warp specialisation on Hopper (sm_90a): warpgroups that take roles (a producer that
// issues the bulk copies, consumers that run the products) hand each other buffers through
// mbarriers (tma.cuh: init, expect_tx, wait; here the plain arrival) and trade registers with
// setmaxnreg, so that the producer gives up what the consumers' accumulators need.
//
// setmaxnreg: every thread of a warpgroup executes it (.sync.aligned); the count is a multiple of
// 8 in [24, 256]; .dec releases registers to the CTA's pool, .inc waits until the pool holds
// enough. A kernel's roles must sum to at most the registers it was launched with (65536 / SM
// for one CTA per SM).
#pragma once
#include "common.cuh"

namespace tfla {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <int kRegs> __device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs> __device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
// A register budget for a warpgroup that started with kLaunch per thread: raise or lower it.
template <int kRegs, int kLaunch> __device__ __forceinline__ void setmaxnreg_to() {
  if constexpr (kRegs > kLaunch) {
    setmaxnreg_inc<kRegs>();
  } else if constexpr (kRegs < kLaunch) {
    setmaxnreg_dec<kRegs>();
  }
}
// One arrival on an mbarrier in this CTA's shared memory (release: this thread's earlier writes are
// visible to the threads that see the phase complete).
__device__ __forceinline__ void mbar_arrive(u64* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace tfla
