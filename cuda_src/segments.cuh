// tfla_cupy — segments of the fused Hopper forward (docs/architecture.md, "Segments").
//
// When a call has too few (sequence, head, DV block) walks to fill the GPU, each sequence is cut
// into nseg segments of seg_chunks chunks. Pass 1 (the fused kernel in summary mode) gives the
// end state of segments 0 .. nseg − 2: segment 0 from the initial state, the others from the
// empty state (C = 0, n = 0, m = kEmptyM). With G_g = Σ λ over segment g and the summary
// (C_g, n_g, m_g), the state entering segment g + 1 is, from the one entering g (docs/math.md §2.2):
//     m' = max(G_g + m, m_g),   C' = e^{G_g + m − m'} C + e^{m_g − m'} C_g    (n alike)
// and for mLSTMsig (no stabiliser) C' = e^{G_g} C + C_g. segment_combine_kernel folds them in
// place (seg_C[g] becomes the state entering segment g + 1); pass 2 (the fused forward) then runs
// every segment at once from its incoming state.
#pragma once
#include "coords.cuh"
#include "gate_terms.cuh"

namespace tfla {

constexpr int kSegCombineThreads = 256, kMaxSegments = 64;

// One CTA per (sequence, head) (nseg <= kMaxSegments): G_g from stage 0b's records (the chunk log forget sums g), the
// stabiliser chain in double, then every C and n element folded over the segments.
template <typename Gate>
__global__ void __launch_bounds__(kSegCombineThreads) segment_combine_kernel(const Params p) {
  __shared__ double G[kMaxSegments];
  __shared__ float alpha[kMaxSegments], beta[kMaxSegments];
  const int st = blockIdx.x, nsh = p.NSEQ * p.NH;
  const SeqCoords sq(p, st / p.NH, st % p.NH);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int g = 1 + warp; g < p.nseg - 1; g += kSegCombineThreads / 32) {
    const int c0 = g * p.seg_chunks, c1 = min(c0 + p.seg_chunks, sq.nc);
    double sum = 0.0;
    for (int c = c0 + lane; c < c1; c += 32) sum += double(p.gate_terms[sq.chunk_slot(p, c) * FusedTerms::kFloats + FusedTerms::kG]);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) G[g] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double m = Gate::kStabilized ? double(p.seg_m[st]) : 0.0;  // entering segment 1
    for (int g = 1; g < p.nseg - 1; ++g) {
      if constexpr (Gate::kStabilized) {
        const double mg = double(p.seg_m[i64(g) * nsh + st]);
        const double m_new = fmax(G[g] + m, mg);
        alpha[g] = float(exp(G[g] + m - m_new));
        beta[g] = float(exp(mg - m_new));
        p.seg_m[i64(g) * nsh + st] = float(m_new);
        m = m_new;
      } else {
        alpha[g] = float(exp(G[g]));
        beta[g] = 1.f;
      }
    }
  }
  __syncthreads();
  const i64 DKV = i64(p.DK) * p.DV;
  for (i64 e = threadIdx.x; e < DKV; e += kSegCombineThreads) {
    float x = p.seg_C[i64(st) * DKV + e];
    for (int g = 1; g < p.nseg - 1; ++g) {
      float* y = p.seg_C + (i64(g) * nsh + st) * DKV + e;
      x = alpha[g] * x + beta[g] * *y;
      *y = x;
    }
  }
  if (Gate::kNormalize) {
    for (int d = threadIdx.x; d < p.DK; d += kSegCombineThreads) {
      float x = p.seg_n[i64(st) * p.DK + d];
      for (int g = 1; g < p.nseg - 1; ++g) {
        float* y = p.seg_n + (i64(g) * nsh + st) * p.DK + d;
        x = alpha[g] * x + beta[g] * *y;
        *y = x;
      }
    }
  }
}

}  // namespace tfla
