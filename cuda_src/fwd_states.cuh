// tfla_cupy — forward stage 1: chunk-boundary states (docs/math.md §4.2, §7).
//
// For c = 0 .. NC−1 (chunk c = tokens [cL, min(cL + L, S)), the last one possibly ragged):
//     m^(c+1) = max(g + m^(c), max_τ a_τ)        (exp; m ≡ 0 for sig)
//     γ = exp(g + m^(c) − m^(c+1)),  ā_τ = exp(a_τ − m^(c+1))
//     C^(c+1) = γ C^(c) + Σ_τ ā_τ k_τ v_τᵀ,    n^(c+1) = γ n^(c) + Σ_τ ā_τ k_τ
// with g and a the in-chunk log-gate sums of §4.1, precomputed for all chunks by stage 0.
// Writes C^(c) (compute dtype) and n^(c), m^(c) for the output pass, and the true last state
// after step S in fp32. The backward reuses this kernel to recompute C^(c) and m^(c).
// Grid: (DK blocks × DV blocks × B·NH); the state tile stays in registers for the whole sequence.
#pragma once
#include "recurrence.cuh"

namespace tfla {

template <typename Mma, typename Gate, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, 2) fwd_states_kernel(const Params p) {
  using T = typename Mma::T;
  using Stream = StateStream<Mma, Tile>;
  constexpr int NT = Tile::kThreads, BT = Tile::kBT;
  const StateCoords<Tile> at(p.DK, p.DV);
  // This CTA carries n when the variant normalizes and it owns DV block 0.
  const bool owns_n = Gate::kNormalize && at.vb == 0;
  const bool owns_m = at.kb == 0 && at.vb == 0 && threadIdx.x == 0;
  const Stream st(ptr<T>(p.k) + i64(at.bh) * p.S * p.DK + at.k0, p.DK, p.DK - at.k0,
                  ptr<T>(p.v) + i64(at.bh) * p.S * p.DV + at.v0, p.DV, p.DV - at.v0);
  const float* gate_a = p.gate_a + i64(at.bh) * p.NC * p.L;
  const float* gate_g = p.gate_g + i64(at.bh) * p.NC;
  const float* gate_amax = p.gate_amax + i64(at.bh) * p.NC;
  auto issue_at = [&](int b, int c, int ts) {
    const int rows = min(BT, chunk_len(p, c) - ts);
    st.issue(b, i64(c) * p.L + ts, rows,
             [&](float* G, int n) { load_row_async<BT, NT>(G, gate_a + i64(c) * p.L + ts, n); });
  };

  float acc[Tile::kFM][Tile::kFN][4];
  load_state_acc(acc, p.C0, at, p.DK, p.DV);
  for (int d = threadIdx.x; d < Tile::kBK; d += NT)
    st.n_s[d] = (p.n0 != nullptr && at.k0 + d < p.DK) ? p.n0[i64(at.bh) * p.DK + at.k0 + d] : 0.f;
  float m = (Gate::kStabilized && p.m0 != nullptr) ? p.m0[at.bh] : 0.f;

  int buf = 0;
  issue_at(buf, 0, 0);
  float g_next = gate_g[0], amax_next = gate_amax[0];
  for (int c = 0; c < p.NC; ++c) {
    // 1. the state entering chunk c
    const i64 slot = i64(at.bh) * p.NC + c;
    if (p.C_states != nullptr) store_state_acc<T>(acc, ptr<T>(p.C_states), slot, at, p.DK, p.DV);
    if (owns_n && p.n_states != nullptr)
      for (int d = threadIdx.x; d < Tile::kBK && at.k0 + d < p.DK; d += NT) p.n_states[slot * p.DK + at.k0 + d] = st.n_s[d];
    if (owns_m && p.m_states != nullptr) p.m_states[i64(at.bh) * (p.NC + 1) + c] = m;

    // 2. m^(c+1) = max(g + m^(c), max a);  γ = e^{g + m − m^(c+1)};  ā_τ = e^{(a_τ − max a) + (max a − m^(c+1))}
    const float g = g_next, amax = amax_next;
    if (c + 1 < p.NC) {
      g_next = gate_g[c + 1];
      amax_next = gate_amax[c + 1];
    }
    const float m_next = Gate::kStabilized ? fmaxf(g + m, amax) : 0.f;
    const float gamma = expf(g + m - m_next), shift = amax - m_next;
    scale_acc(acc, gamma);
    for (int d = threadIdx.x; d < Tile::kBK; d += NT) st.n_s[d] *= gamma;  // same thread owns d below

    // 3. C ← γ C + (K ⊙ ā)ᵀ V,  n ← γ n + Σ ā k
    auto weight = [&](const float* G, int r) { return expf(G[r] + shift); };
    const int next = c + 1 < p.NC ? c + 1 : -1;
    buf = owns_n ? st.template walk_chunk<true>(acc, p, c, next, buf, at.row0, at.col0, issue_at, weight)
                 : st.template walk_chunk<false>(acc, p, c, next, buf, at.row0, at.col0, issue_at, weight);
    m = m_next;
  }

  // 4. the state after step S, fp32
  if (owns_m && p.m_states != nullptr) p.m_states[i64(at.bh) * (p.NC + 1) + p.NC] = m;
  if (owns_m && p.m_last != nullptr) p.m_last[at.bh] = m;
  if (p.C_last != nullptr) store_state_acc<float>(acc, p.C_last, at.bh, at, p.DK, p.DV);
  if (owns_n && p.n_last != nullptr)
    for (int d = threadIdx.x; d < Tile::kBK && at.k0 + d < p.DK; d += NT) p.n_last[i64(at.bh) * p.DK + at.k0 + d] = st.n_s[d];
}

}  // namespace tfla
