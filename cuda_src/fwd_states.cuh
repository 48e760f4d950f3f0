// tfla_cupy — forward stage 1: chunk-boundary states (docs/math.md §4.2, §7).
//
// Per sequence, for c = 0 .. nc−1 (chunk c = its tokens [cL, min(cL + L, len)), the last one
// possibly ragged):
//     m^(c+1) = max(g + m^(c), max_τ a_τ)        (exp; m ≡ 0 for sig)
//     γ = exp(g + m^(c) − m^(c+1)),  ā_τ = exp(a_τ − m^(c+1))
//     C^(c+1) = γ C^(c) + Σ_τ ā_τ k_τ v_τᵀ,    n^(c+1) = γ n^(c) + Σ_τ ā_τ k_τ
// with g and a the in-chunk log-gate sums of §4.1, precomputed for all chunks by stage 0.
// Writes C^(c) (compute dtype) and n^(c), m^(c) for the output pass, and the true last state
// after the sequence's last step in fp32. The backward reuses this kernel to recompute C^(c), m^(c).
// Grid: (DK blocks × DV blocks × sequences·NH); the state tile stays in registers for the whole
// sequence.
#pragma once
#include "recurrence.cuh"

namespace tfla {

template <typename Mma, typename Gate, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, 2) fwd_states_kernel(const Params p) {
  using T = typename Mma::T;
  using Stream = StateStream<Mma, Tile>;
  constexpr int NT = Tile::kThreads, BT = Tile::kBT;
  const StateCoords<Tile> at(p);
  const SeqCoords& sq = at.seq;
  // This CTA carries n when the variant normalizes and it owns DV block 0.
  const bool owns_n = Gate::kNormalize && at.vb == 0;
  const bool owns_m = at.kb == 0 && at.vb == 0 && threadIdx.x == 0;
  const Stream st(ptr<T>(p.k) + sq.tok(p.st_k, 0) + at.k0, int(p.st_k.t), p.DK - at.k0,
                  ptr<T>(p.v) + sq.tok(p.st_v, 0) + at.v0, int(p.st_v.t), p.DV - at.v0);
  // first chunk slot and m slot (slot counts fit in int: the gate vectors hold L floats per slot)
  const int slot0 = int(sq.chunk_slot(p, 0)), mslot0 = int(sq.m_slot(p, 0));
  const int nc = sq.nc;
  auto issue_at = [&](int b, int c, int ts) {
    const int rows = min(BT, sq.chunk_len(p, c) - ts);
    st.issue(b, c * p.L + ts, rows,
             [&](float* G, int n) { load_row_async<BT, NT>(G, p.gate_a + i64(slot0 + c) * p.L + ts, n); });
  };

  float acc[Tile::kFM][Tile::kFN][4];
  load_state_acc(acc, p.C0, at, p);
  for (int d = threadIdx.x; d < Tile::kBK; d += NT)
    st.n_s[d] = (p.n0 != nullptr && at.k0 + d < p.DK) ? p.n0[i64(at.state(p)) * p.DK + at.k0 + d] : 0.f;
  float m = (Gate::kStabilized && p.m0 != nullptr) ? p.m0[at.state(p)] : 0.f;

  int buf = 0;
  float g_next = 0.f, amax_next = 0.f;
  if (nc > 0) {
    issue_at(buf, 0, 0);
    g_next = p.gate_g[slot0];
    amax_next = p.gate_amax[slot0];
  }
  for (int c = 0; c < nc; ++c) {
    // 1. the state entering chunk c
    const i64 slot = i64(slot0) + c;
    if (p.C_states != nullptr) store_state_acc<T>(acc, ptr<T>(p.C_states), slot, at, p.DK, p.DV);
    if (owns_n && p.n_states != nullptr)
      for (int d = threadIdx.x; d < Tile::kBK && at.k0 + d < p.DK; d += NT) p.n_states[slot * p.DK + at.k0 + d] = st.n_s[d];
    if (owns_m && p.m_states != nullptr) p.m_states[mslot0 + c] = m;

    // 2. m^(c+1) = max(g + m^(c), max a);  γ = e^{g + m − m^(c+1)};  ā_τ = e^{(a_τ − max a) + (max a − m^(c+1))}
    const float g = g_next, amax = amax_next;
    if (c + 1 < nc) {
      g_next = p.gate_g[slot0 + c + 1];
      amax_next = p.gate_amax[slot0 + c + 1];
    }
    const float m_next = Gate::kStabilized ? fmaxf(g + m, amax) : 0.f;
    const float gamma = expf(g + m - m_next), shift = amax - m_next;
    scale_acc(acc, gamma);
    for (int d = threadIdx.x; d < Tile::kBK; d += NT) st.n_s[d] *= gamma;  // same thread owns d below

    // 3. C ← γ C + (K ⊙ ā)ᵀ V,  n ← γ n + Σ ā k
    auto weight = [&](const float* G, int r) { return expf(G[r] + shift); };
    const int next = c + 1 < nc ? c + 1 : -1, Lc = sq.chunk_len(p, c);
    buf = owns_n ? st.template walk_chunk<true>(acc, c, Lc, next, buf, at.row0, at.col0, issue_at, weight)
                 : st.template walk_chunk<false>(acc, c, Lc, next, buf, at.row0, at.col0, issue_at, weight);
    m = m_next;
  }

  // 4. the state after the sequence's last step, fp32
  if (owns_m && p.m_states != nullptr) p.m_states[mslot0 + nc] = m;
  if (owns_m && p.m_last != nullptr) p.m_last[at.state(p)] = m;
  if (p.C_last != nullptr) store_state_acc<float>(acc, p.C_last, at.state(p), at, p.DK, p.DV);
  if (owns_n && p.n_last != nullptr)
    for (int d = threadIdx.x; d < Tile::kBK && at.k0 + d < p.DK; d += NT)
      p.n_last[i64(at.state(p)) * p.DK + at.k0 + d] = st.n_s[d];
}

}  // namespace tfla
