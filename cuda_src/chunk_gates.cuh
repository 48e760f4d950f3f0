// tfla_cupy — stage 0: the per-chunk log-gate vectors of docs/math.md §4.1, for all chunks in
// parallel, so the sequential state passes only do one exp per step.
//
//   a_τ = Σ_{u>τ} λ_u + ι_τ  (reverse scan, never g − b),   g = Σ_τ λ_τ,   b_τ = Σ_{u<=τ} λ_u
// Sums are double; stored in fp32 as gate_a = a_τ − max a (<= 0, −inf past the sequence end:
// small where it matters), gate_b = b_τ, gate_g = g, gate_amax = max_τ a_τ.
// Grid: one CTA per (chunk slot, batch·head); surplus slots of packed input exit.
#pragma once
#include "coords.cuh"
#include "gates.cuh"
#include "tile.cuh"

namespace tfla {

constexpr int kChunkGateThreads = 128;
// dynamic shared memory: λ, suffix sums and ι, L doubles each (the carve below)
__host__ __device__ constexpr int chunk_gates_smem_bytes(int L) { return 3 * 8 * L; }

// The vectors of one chunk, by a CTA of kChunkGateThreads threads: λ, ι from p.i, p.f into
// `lam`, `iota` and suffix sums into `sfx` (L doubles each, shared memory; all three are
// overwritten), then a_τ − max a into a_out[τ] (τ < L), b_τ into b_out[τ] (when not null), g
// and max a into *g_out and *amax_out. Stage 0 writes them to the gate arrays; stage 0b of the
// fused forward into its FusedTerms record.
template <typename Gate>
__device__ __forceinline__ void chunk_gate_vectors(const Params& p, const ChunkAt& at, double* lam, double* sfx,
                                                   double* iota, float* a_out, float* b_out, float* g_out,
                                                   float* amax_out) {
  const int Lc = at.Lc;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __shared__ double warp_max_s[kChunkGateThreads / 32];

  load_log_gates<Gate>(p.i + at.tok(p.st_i, 0), p.st_i.t, p.f + at.tok(p.st_f, 0), p.st_f.t, 0, p.L, Lc, lam, iota);
  __syncthreads();
  for (int u = threadIdx.x; u < p.L; u += kChunkGateThreads) sfx[u] = lam[u];
  __syncthreads();
  if (warp == 0) warp_scan_suffix(sfx, p.L);
  if (warp == 1) warp_scan_inclusive(lam, p.L);
  __syncthreads();
  double amax = -1e300;
  for (int u = threadIdx.x; u < p.L; u += kChunkGateThreads) {
    const double a = (u + 1 < p.L ? sfx[u + 1] : 0.0) + iota[u];
    iota[u] = a;
    amax = fmax(amax, a);
  }
  amax = warp_max(amax);
  if (lane == 0) warp_max_s[warp] = amax;
  __syncthreads();
  amax = warp_max_s[0];
  for (int w = 1; w < kChunkGateThreads / 32; ++w) amax = fmax(amax, warp_max_s[w]);
  for (int u = threadIdx.x; u < p.L; u += kChunkGateThreads) {
    a_out[u] = u < Lc ? float(iota[u] - amax) : neg_inf();
    if (b_out != nullptr) b_out[u] = float(lam[u]);
  }
  if (threadIdx.x == 0) {
    *g_out = float(lam[p.L - 1]);
    *amax_out = float(amax);
  }
}

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
