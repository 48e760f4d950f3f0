// tfla_cupy — stage 0: the per-chunk log-gate vectors of docs/math.md §4.1, for all chunks in
// parallel, so the sequential state passes only do one exp per step.
//
//   a_τ = Σ_{u>τ} λ_u + ι_τ  (reverse scan, never g − b),   g = Σ_τ λ_τ,   b_τ = Σ_{u<=τ} λ_u
// Sums are double; stored in fp32 as gate_a = a_τ − max a (<= 0, −inf past the sequence end:
// small where it matters), gate_b = b_τ, gate_g = g, gate_amax = max_τ a_τ.
// Grid: one CTA per (chunk slot, batch·head); surplus slots of packed input exit.
#pragma once
#include "coords.cuh"
#include "gate_terms.cuh"
#include "tile.cuh"

namespace tfla {

// dynamic shared memory: λ, suffix sums and ι, L doubles each (the carve below)
__host__ __device__ constexpr int chunk_gates_smem_bytes(int L) { return 3 * 8 * L; }

template <typename Gate>
__global__ void __launch_bounds__(kChunkGateThreads) chunk_gates_kernel(const Params p) {
  const ChunkAt at(p, blockIdx.x % p.NC, blockIdx.x / p.NC);
  if (at.Lc <= 0) return;
  SmemCarver sm{dynamic_smem()};
  double* lam = sm.take<double>(p.L);   // λ, then b
  double* sfx = sm.take<double>(p.L);   // suffix sums of λ
  double* iota = sm.take<double>(p.L);  // ι, then a
  const i64 slot = at.slot(p), row = slot * p.L;
  chunk_gate_vectors<Gate>(p, at, lam, sfx, iota, p.gate_a + row, p.gate_b + row, p.gate_g + slot,
                           p.gate_amax + slot);
}

}  // namespace tfla
