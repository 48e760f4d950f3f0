// tfla_cupy — the sequence table of packed input (coords.cuh reads it), built on the device from
// cu_seqlens (no host sync; graph-capturable). One CTA. Offsets are clamped to [0, S] and chunk
// slots to [0, NC], so even a cu_seqlens the host could not check (a CuPy array) never makes a
// kernel leave its buffers.
#pragma once
#include "coords.cuh"

namespace tfla {

constexpr int kSeqTableThreads = 1024;

template <typename Index>
__global__ void __launch_bounds__(kSeqTableThreads) seq_table_kernel(const Params p) {
  __shared__ i64 warp_tot[32];
  __shared__ i64 total;
  const Index* cu = static_cast<const Index*>(p.cu_seqlens);
  int* tokens = p.seq_table;
  int* chunks = p.seq_table + p.NSEQ + 1;
  int* owner = p.seq_table + 2 * (p.NSEQ + 1);
  auto offset = [&](int j) { return int(min(max(cu[j], Index(0)), Index(p.S))); };
  i64 carry = 0;
  for (int base = 0; base <= p.NSEQ; base += blockDim.x) {
    const int j = base + int(threadIdx.x);
    i64 nc = 0;
    if (j <= p.NSEQ) {
      const int t = offset(j);
      tokens[j] = t;
      if (j < p.NSEQ) nc = cdiv(max(offset(j + 1) - t, 0), p.L);
    }
    const i64 first = carry + (block_scan(nc, warp_tot, &total) - nc);  // exclusive prefix
    if (j <= p.NSEQ) chunks[j] = int(min(first, i64(p.NC)));
    carry += total;
  }
  __syncthreads();  // chunks[] (global) visible to the block
  const int used = chunks[p.NSEQ];
  for (int g = threadIdx.x; g < p.NC; g += blockDim.x) {
    int s = -1;
    if (g < used) {  // the last sequence whose first slot is <= g (it owns g: empty ones own nothing)
      int lo = 0, hi = p.NSEQ - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (chunks[mid] <= g) lo = mid; else hi = mid - 1;
      }
      s = lo;
    }
    owner[g] = s;
  }
}

}  // namespace tfla
