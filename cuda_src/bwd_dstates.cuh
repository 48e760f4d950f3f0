// tfla_cupy — backward stage 1: chunk-boundary state gradients (docs/math.md §6.2, §7).
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
__global__ void __launch_bounds__(Tile::kThreads, 2) bwd_dstates_kernel(const Params p) {
  using T = typename Mma::T;
  using Stream = StateStream<Mma, Tile>;
  constexpr int NT = Tile::kThreads, BT = Tile::kBT;
  const StateCoords<Tile> at(p.DK, p.DV);
  const Stream st(ptr<T>(p.q) + i64(at.bh) * p.S * p.DK + at.k0, p.DK, p.DK - at.k0,
                  ptr<T>(p.dh) + i64(at.bh) * p.S * p.DV + at.v0, p.DV, p.DV - at.v0);
  const float* m_states = p.m_states + i64(at.bh) * (p.NC + 1);
  const float* gate_b = p.gate_b + i64(at.bh) * p.NC * p.L;
  const float* gate_g = p.gate_g + i64(at.bh) * p.NC;
  const i64 tok0 = i64(at.bh) * p.S;
  // gate rows of a sub-tile: b_τ, then M_τ and N_τ (per-step arrays, not 16-byte aligned)
  auto issue_at = [&](int b, int c, int ts) {
    const int rows = min(BT, chunk_len(p, c) - ts);
    const i64 t = i64(c) * p.L + ts;
    st.issue(b, t, rows, [&](float* G, int n) {
      load_row_async<BT, NT>(G, gate_b + t, n);
      if (Gate::kStabilized) load_row_async4<BT, NT>(G + BT, p.M + tok0 + t, n);
      if (Gate::kNormalize) load_row_async4<BT, NT>(G + 2 * BT, p.N + tok0 + t, n);
    });
  };

  float acc[Tile::kFM][Tile::kFN][4];
  load_state_acc(acc, p.dC_last, at, p.DK, p.DV);

  int buf = 0;
  issue_at(buf, p.NC - 1, 0);
  // per-chunk scalars, loaded one chunk ahead
  float m_n = Gate::kStabilized ? m_states[p.NC] : 0.f;
  float m_c_next = Gate::kStabilized ? m_states[p.NC - 1] : 0.f, g_next = gate_g[p.NC - 1];
  for (int c = p.NC - 1; c >= 0; --c) {
    store_state_acc<T>(acc, ptr<T>(p.dC_states), i64(at.bh) * p.NC + c, at, p.DK, p.DV);
    const float m_c = m_c_next, g = g_next;
    if (c > 0) {
      m_c_next = Gate::kStabilized ? m_states[c - 1] : 0.f;
      g_next = gate_g[c - 1];
    }
    scale_acc(acc, expf(g + m_c - m_n));  // γ_c
    // w_τ = s·β̄_τ / (N_τ + ε),  β̄_τ = exp(b_τ + m^(c) − M_τ)
    auto weight = [&](const float* G, int r) {
      const float M = Gate::kStabilized ? G[BT + r] : 0.f;
      const float x = p.scale * expf(G[r] + m_c - M);
      return Gate::kNormalize ? x / (G[2 * BT + r] + p.eps) : x;
    };
    buf = st.template walk_chunk<false>(acc, p, c, c - 1, buf, at.row0, at.col0, issue_at, weight);
    m_n = m_c;
  }
  if (p.dC0 != nullptr) store_state_acc<float>(acc, p.dC0, at.bh, at, p.DK, p.DV);
}

}  // namespace tfla
