// tfla_cupy — one token of the recurrence for inference (docs/math.md §2.1, §8), fp32 states.
//
//   m' = max(λ + m, ι) (exp; 0 for sig),  α = e^{λ + m − m'},  β = e^{ι − m'}
//   C' = α C + β k vᵀ,  n' = α n + β k,  h = C'ᵀ(s q) / (max(|n'·(s q)|, e^{−m'}) + ε)
// Gates and exp(−m') stay fp32 (no rounding to the input dtype). Grid: (DV blocks × B·NH);
// thread j owns column j of its DV block and walks DK; n' and the denominator are recomputed
// per CTA (cheap) and written by DV block 0 only.
#pragma once
#include "gates.cuh"
#include "params.cuh"

namespace tfla {

constexpr int kStepThreads = 128;

template <typename T, typename Gate>
__global__ void __launch_bounds__(kStepThreads) step_kernel(const Params p) {
  __shared__ float warp_tot[kStepThreads / 32];
  const int nVb = cdiv(p.DV, kStepThreads);
  const int vb = blockIdx.x % nVb, bh = blockIdx.x / nVb;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* q = ptr<T>(p.q) + i64(bh) * p.DK;
  const T* k = ptr<T>(p.k) + i64(bh) * p.DK;
  const T* v = ptr<T>(p.v) + i64(bh) * p.DV;

  const float lam = log_forget(p.f[bh]), iota = Gate::log_input(p.i[bh]);
  const float m = (Gate::kStabilized && p.m0 != nullptr) ? p.m0[bh] : 0.f;
  const float m_new = Gate::kStabilized ? fmaxf(lam + m, iota) : 0.f;
  const float alpha = expf(lam + m - m_new), beta = expf(iota - m_new);

  float den = 0.f;
  if constexpr (Gate::kNormalize) {
    float s = 0.f;
    for (int d = threadIdx.x; d < p.DK; d += kStepThreads) {
      const float n_old = p.n0 != nullptr ? p.n0[i64(bh) * p.DK + d] : 0.f;
      const float n_new = alpha * n_old + beta * to_float(k[d]);
      if (vb == 0) p.n_last[i64(bh) * p.DK + d] = n_new;
      s = fmaf(p.scale * to_float(q[d]), n_new, s);
    }
    s = warp_sum(s);
    if (lane == 0) warp_tot[warp] = s;
    __syncthreads();
    for (int w = 0; w < kStepThreads / 32; ++w) den += warp_tot[w];
  }

  const int col = vb * kStepThreads + threadIdx.x;
  if (col < p.DV) {
    const float vc = beta * to_float(v[col]);
    float num = 0.f;
    for (int d = 0; d < p.DK; ++d) {
      const i64 at = (i64(bh) * p.DK + d) * p.DV + col;
      const float c_new = alpha * (p.C0 != nullptr ? p.C0[at] : 0.f) + to_float(k[d]) * vc;
      p.C_last[at] = c_new;
      num = fmaf(p.scale * to_float(q[d]), c_new, num);
    }
    float h = num;
    if constexpr (Gate::kNormalize) h = num / (fmaxf(fabsf(den), expf(-m_new)) + p.eps);
    ptr<T>(p.h)[i64(bh) * p.DV + col] = from_float<T>(h);
  }
  if (Gate::kStabilized && vb == 0 && threadIdx.x == 0) p.m_last[bh] = m_new;
}

}  // namespace tfla
