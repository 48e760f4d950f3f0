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
// This CTA's rank in its cluster.
__device__ __forceinline__ int cluster_rank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return int(r);
}
// Sixteen bytes to a cluster shared-memory address (cluster_map), 16-byte aligned.
__device__ __forceinline__ void st_cluster_v4(u32 addr, uint4 x) {
  asm volatile("st.shared::cluster.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(x.x), "r"(x.y), "r"(x.z),
               "r"(x.w)
               : "memory");
}
// `bytes` (a multiple of 16, both ends 16-byte aligned) of this CTA's shared memory at `src` into
// another CTA's at `dst`, completing the transaction count of that CTA's mbarrier `bar` (dst and
// bar: cluster addresses, cluster_map). The receiver announces the bytes on its own barrier
// (mbar_expect_tx) and waits on it; one thread issues.
__device__ __forceinline__ void bulk_copy_to_cluster(u32 dst, const void* src, int bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   dst),
               "r"(smem_addr(src)), "r"(bytes), "r"(bar)
               : "memory");
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace tfla
