// tfla_cupy — backward stage 3: gate gradients, fp32 (docs/math.md §6.3, §6.5, §7).
//
//   dι_t = k_t·dk_t,            dĩ_t = dι_t (exp) or dι_t·σ(−ĩ_t) (sig)
//   dλ_t = Σ_{u>=t} (q_u·dq_u − k_u·dk_u) + ⟨dC_last, C_last⟩,   df̃_t = dλ_t·dλ/df̃ (σ(−f̃_t) above the floor)
// The reverse sum runs over the WHOLE sequence (not per chunk; never across a packed boundary). The dots arrive as partial
// sums over DK blocks from the dq / dk kernels; every reduction has a fixed order, so two runs
// give bit-identical gradients. The ⟨dC_last, C_last⟩ term (absent upstream) makes df exact
// when a gradient flows into the last state (truncated BPTT / state passing).
// Grid: one CTA of kThreads per sequence·head, walking the sequence backwards kThreads at a time.
#pragma once
#include "coords.cuh"
#include "gates.cuh"

namespace tfla {

constexpr int kGateThreads = 512;

template <typename Gate>
__global__ void __launch_bounds__(kGateThreads) bwd_gates_kernel(const Params p) {
  __shared__ float warp_tot[32];
  __shared__ float total;
  const SeqCoords sq(p, blockIdx.x / p.NH, blockIdx.x % p.NH);

  // ⟨dC_last, C_last⟩: per-thread strided sums, then a fixed-order block sum
  float carry = 0.f;
  if (p.dC_last != nullptr) {
    const i64 n = i64(p.DK) * p.DV, base = i64(sq.state) * n;
    float s = 0.f;
    for (i64 j = threadIdx.x; j < n; j += blockDim.x) s = fmaf(p.dC_last[base + j], p.C_last[base + j], s);
    block_scan(s, warp_tot, &total);
    carry = total;
  }

  const i64 part = i64(p.BH) * p.S;
  for (int end = sq.len; end > 0; end -= blockDim.x) {
    const int t = end - 1 - int(threadIdx.x);  // thread 0 takes the latest step of the segment
    float d = 0.f, kdk = 0.f;
    if (t >= 0) {
      const i64 row = sq.scratch_tok(p, t);
      for (int j = 0; j < p.qdq_parts; ++j) d += p.qdq[j * part + row];
      for (int j = 0; j < p.kdk_parts; ++j) kdk += p.kdk[j * part + row];
      d -= kdk;
    }
    const float suffix = block_scan(d, warp_tot, &total) + carry;  // Σ_{u = t .. end−1} d_u + later segments
    if (t >= 0) {
      p.di[sq.tok(p.st_di, t)] = kdk * Gate::d_log_input(p.i[sq.tok(p.st_i, t)]);
      p.df[sq.tok(p.st_df, t)] = suffix * d_log_forget(p.f[sq.tok(p.st_f, t)]);
    }
    carry += total;
  }
}

}  // namespace tfla
