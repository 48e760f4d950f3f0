// tfla_cupy — backward stage 1: chunk-boundary state gradients (MLSTM_SPEC.md §6.2, §7).
//
//     dC^(NC) = dC_last (or 0);   for c = NC−1 … 0:
//     dC^(c) = γ_c dC^(c+1) + Σ_τ (s β̄_τ / (N_τ + ε)) q_τ dh_τᵀ,
//     γ_c = exp(g + m^(c) − m^(c+1)),  β̄_τ = exp(b_τ + m^(c) − M_τ)
// using exactly the boundary stabilizers of chunk c (the upstream indexing defect of §5.4
// cannot occur: every chunk has its own m slot). Writes dC^(c+1) into slot c of dC_states
// (compute dtype) for the dk / dv passes, and dC^(0) (fp32) as the initial-state gradient.
// Grid: (DK blocks × DV blocks × B·NH), walking the chunks backwards.
#pragma once
#include "recurrence.cuh"

namespace tfla {

template <typename Mma, typename Gate, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, 1) bwd_dstates_kernel(const Params p) {
  using T = typename Mma::T;
  constexpr int NT = Tile::kThreads;
  const StateCoords<Tile> at(p.DK, p.DV);
  const int warp = threadIdx.x >> 5;

  SmemCarver sm{dynamic_smem()};
  T* Xs = sm.take<T>(Tile::kBT * smem_stride<T>(Tile::kBK));
  T* Ys = sm.take<T>(Tile::kBT * smem_stride<T>(Tile::kBV));
  float* lam = sm.take<float>(p.L);  // λ, then b (inclusive prefix sums)
  float* iota = sm.take<float>(p.L);
  float* w = sm.take<float>(p.L);    // s β̄_τ / (N_τ + ε)

  float acc[Tile::kFM][Tile::kFN][4];
  load_state_acc(acc, p.dC_last, at, p.DK, p.DV);

  const T* Q = ptr<T>(p.q) + i64(at.bh) * p.S * p.DK + at.k0;
  const T* dH = ptr<T>(p.dh) + i64(at.bh) * p.S * p.DV + at.v0;
  const float* m_states = p.m_states + i64(at.bh) * (p.NC + 1);

  for (int c = p.NC - 1; c >= 0; --c) {
    const int t0 = c * p.L, Lc = min(p.L, p.S - t0);
    store_state_acc<T>(acc, ptr<T>(p.dC_states), i64(at.bh) * p.NC + c, at, p.DK, p.DV);

    load_log_gates<Gate>(p.i, p.f, i64(at.bh) * p.S + t0, 0, p.L, Lc, lam, iota);
    __syncthreads();
    if (warp == 0) warp_scan_inclusive(lam, p.L);  // b_τ
    __syncthreads();
    const float m_c = Gate::kStabilized ? m_states[c] : 0.f;
    const float m_n = Gate::kStabilized ? m_states[c + 1] : 0.f;
    const float gamma = expf(lam[p.L - 1] + m_c - m_n);
    const i64 tok = i64(at.bh) * p.S + t0;
    for (int u = threadIdx.x; u < p.L; u += NT) {
      float x = 0.f;
      if (u < Lc) {
        const float M = Gate::kStabilized ? p.M[tok + u] : 0.f;
        x = p.scale * expf(lam[u] + m_c - M);
        if constexpr (Gate::kNormalize) x /= p.N[tok + u] + p.eps;
      }
      w[u] = x;
    }
    scale_acc(acc, gamma);
    __syncthreads();
    accumulate_chunk<Mma, Tile, false>(acc, Q + i64(t0) * p.DK, p.DK, p.DK - at.k0, dH + i64(t0) * p.DV, p.DV,
                                       p.DV - at.v0, w, Lc, Xs, Ys, nullptr, at.row0, at.col0);
  }
  if (p.dC0 != nullptr) store_state_acc<float>(acc, p.dC0, at.bh, at, p.DK, p.DV);
}

}  // namespace tfla
