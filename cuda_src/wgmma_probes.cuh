// tfla_cupy — probes of the Hopper primitives: wgmma_probe_kernel (the operand forms of
// wgmma.cuh) and tma_probe_kernel (a bulk tensor copy of tma.cuh feeding wgmma), each one
// warpgroup computing one 64 × 64 product that tests/test_gpu_wgmma.py checks against NumPy; and
// cluster_probe_kernel (the exchanges of cluster.cuh between the two CTAs of a cluster, whose
// bytes tests/test_gpu_wgmma.py checks and whose cost bench/bench.py --probe-cluster prints).
// On sm_80 and sm_90 they are an empty trap.
#pragma once
#include "cluster.cuh"
#include "params.cuh"
#include "swizzle.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace tfla {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
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
//   kMode 5  h = qᵀ · kᵀ  A = q MN-major, B K-major (Vᵀ · Pᵀ of the warp-specialised forward)
//   kMode 6  h[:, :8] = q · k[:8]ᵀ, zeros beside it: the m64n8 form (q·n of that forward)
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
  constexpr bool kRegA = kMode == 1 || kMode == 3, kMnB = kMode >= 2 && kMode <= 4;
  constexpr Major kB = kMnB ? Major::kMN : Major::kK;
  float d[32] = {}, d8[4] = {};
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
      wgmma_rs<bf16, kB>(d, a, db, kk > 0);
    } else if constexpr (kMode == 4) {
      wgmma_ss<bf16, Major::kMN, Major::kMN>(d, sw128_desc_mn(sA + 2048 * kk, 1024), db, kk > 0);
    } else if constexpr (kMode == 5) {
      wgmma_ss<bf16, Major::kMN, Major::kK>(d, sw128_desc_mn(sA + 2048 * kk, 1024), sw128_desc(sB + 32 * kk), kk > 0);
    } else if constexpr (kMode == 6) {
      wgmma_ss_n8<bf16>(d8, sw128_desc(sA + 32 * kk), sw128_desc(sB + 32 * kk), kk > 0);
    } else {
      wgmma_ss<bf16, Major::kK, kB>(d, sw128_desc(sA + 32 * kk), db, kk > 0);
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  store_m64n64(d, ptr<float>(p.h));
#else
  __trap();
#endif
}

// Probe: as wgmma_probe_kernel<0>, but A and B arrive by TMA (64 × 64 boxes, 128-byte swizzle)
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
  for (int kk = 0; kk < 4; ++kk)
    wgmma_ss<bf16, Major::kK, Major::kK>(d, sw128_desc(sA + 32 * kk), sw128_desc(sB + 32 * kk), kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
  store_m64n64(d, ptr<float>(p.h));
#else
  __trap();
#endif
}

// Probe of the cluster exchanges: clusters of two CTAs of 128 threads; each CTA sends p.S bytes (a
// multiple of 16, at most kClusterProbeBytes) of its shared memory to its peer's, p.NC rounds:
//   kMode 0  nothing sent: the rounds' cluster barriers alone
//   kMode 1  remote stores (st.shared::cluster, 16 bytes per thread and step), then the barrier
//   kMode 2  one bulk copy (cp.async.bulk shared::cta -> shared::cluster) completing the peer's
//            mbarrier, which the peer waits on, then the barrier
// Round it sends the words w of its buffer as rank · 2^28 + it · 2^16 + w (mod 2^32); after the
// last round each CTA writes what it received to p.h + blockIdx.x · p.S bytes and thread 0 the
// loop's clock64 cycles to p.N[blockIdx.x].
constexpr int kClusterProbeBytes = 64 * 1024;
template <int kMode>
__global__ void __launch_bounds__(128, 1) TFLA_CLUSTER_DIMS(2) cluster_probe_kernel(const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) unsigned char probe_smem[];
  u32* send = reinterpret_cast<u32*>(probe_smem);
  u32* recv = reinterpret_cast<u32*>(probe_smem + kClusterProbeBytes);
  __shared__ __align__(8) u64 bar;
  const int tid = threadIdx.x, rank = cluster_rank(), peer = rank ^ 1, words = p.S / 4;
  if (tid == 0) mbar_init(&bar, 1);
  cluster_sync();
  const u32 peer_recv = cluster_map(smem_addr(recv), peer), peer_bar = cluster_map(smem_addr(&bar), peer);
  long long cycles = 0;
  for (int it = 0; it < p.NC; ++it) {
    for (int w = tid; w < words; w += 128) send[w] = (u32(rank) << 28) + (u32(it) << 16) + u32(w);
    if constexpr (kMode == 2) fence_async_smem();  // the send buffer, to the bulk copy's (async) proxy
    __syncthreads();
    const long long t0 = clock64();
    if constexpr (kMode == 1) {
      for (int w = 4 * tid; w < words; w += 4 * 128)
        st_cluster_v4(peer_recv + 4u * w, *reinterpret_cast<const uint4*>(send + w));
    } else if constexpr (kMode == 2) {
      if (tid == 0) {
        mbar_expect_tx(&bar, p.S);  // what the peer sends this round
        bulk_copy_to_cluster(peer_recv, send, p.S, peer_bar);
      }
      mbar_wait(&bar, it & 1);
    }
    cluster_sync();  // every round's bytes have landed; the buffers are free for the next
    cycles += clock64() - t0;
  }
  unsigned char* out = static_cast<unsigned char*>(p.h) + size_t(blockIdx.x) * p.S;
  for (int w = tid; w < words; w += 128) reinterpret_cast<u32*>(out)[w] = kMode == 0 ? 0u : recv[w];
  if (tid == 0) p.N[blockIdx.x] = float(cycles);
#else
  __trap();
#endif
}

}  // namespace tfla
