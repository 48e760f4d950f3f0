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
  const StateStream<Mma, Tile> st(p, ptr<T>(p.q) + i64(at.bh) * p.S * p.DK + at.k0, p.DK, p.DK - at.k0,
                                  ptr<T>(p.dh) + i64(at.bh) * p.S * p.DV + at.v0, p.DV, p.DV - at.v0);
  const float* m_states = p.m_states + i64(at.bh) * (p.NC + 1);

  float acc[Tile::kFM][Tile::kFN][4];
  load_state_acc(acc, p.dC_last, at, p.DK, p.DV);

  int buf = 0;
  st.issue(buf, i64(p.NC - 1) * p.L, min(Tile::kBT, chunk_len(p, p.NC - 1)));
  for (int c = p.NC - 1; c >= 0; --c) {
    const int Lc = chunk_len(p, c);
    store_state_acc<T>(acc, ptr<T>(p.dC_states), i64(at.bh) * p.NC + c, at, p.DK, p.DV);

    const i64 tok = i64(at.bh) * p.S + i64(c) * p.L;
    load_log_gates<Gate>(p.i, p.f, tok, 0, p.L, Lc, st.lam, st.iota);
    __syncthreads();
    if (warp == 0) warp_scan_inclusive(st.lam, p.L);  // b_τ
    __syncthreads();
    const double m_c = Gate::kStabilized ? double(m_states[c]) : 0.0;
    const double m_n = Gate::kStabilized ? double(m_states[c + 1]) : 0.0;
    const float gamma = expf(float(st.lam[p.L - 1] + m_c - m_n));
    for (int u = threadIdx.x; u < p.L; u += NT) {
      float x = 0.f;
      if (u < Lc) {
        const double M = Gate::kStabilized ? double(p.M[tok + u]) : 0.0;
        x = p.scale * expf(float(st.lam[u] + m_c - M));
        if constexpr (Gate::kNormalize) x /= p.N[tok + u] + p.eps;
      }
      st.w[u] = x;
    }
    scale_acc(acc, gamma);
    __syncthreads();
    buf = st.template walk_chunk<false>(acc, p, c, c - 1, buf, at.row0, at.col0);
  }
  if (p.dC0 != nullptr) store_state_acc<float>(acc, p.dC0, at.bh, at, p.DK, p.DV);
}

}  // namespace tfla
