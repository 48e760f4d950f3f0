// tfla_cupy — thread-block clusters (sm_90): the CTAs of a cluster run at once on one GPC and
// reach each other's shared memory (distributed shared memory). A kernel declares its cluster
// size at compile time (TFLA_CLUSTER_DIMS), so an ordinary launch of a grid that is a multiple
// of it forms the clusters; CTA i of a cluster is blockIdx.x % size.
//
// Everything here compiles only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL), where the kernels that
// use it have their bodies; elsewhere the attribute is empty and the helpers are absent.
#pragma once
#include "common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TFLA_CLUSTER_DIMS(n) __cluster_dims__(n, 1, 1)
#else
#define TFLA_CLUSTER_DIMS(n)
#endif

namespace tfla {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Every thread of every CTA of the cluster arrives, then waits for all: the shared-memory writes
// before it (release) are visible to every CTA's reads after it (acquire). Also a barrier of the
// CTA's own threads.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
}
// The address in CTA `rank`'s shared memory of the same byte as `smem` (a shared-memory address of
// this CTA, smem_addr), for ld.shared::cluster.
__device__ __forceinline__ u32 cluster_map(u32 smem, int rank) {
  u32 out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(smem), "r"(rank));
  return out;
}
// Two floats to a cluster shared-memory address (cluster_map), 8-byte aligned: visible to the
// owning CTA after the next cluster_sync.
__device__ __forceinline__ void st_cluster_f2(u32 addr, float a, float b) {
  asm volatile("st.shared::cluster.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(a), "f"(b) : "memory");
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace tfla
