// tfla_cupy — forward stage 1: chunk-boundary states (MLSTM_SPEC.md §4.2, §7).
//
// For c = 0 .. NC−1 (chunk c = tokens [cL, min(cL + L, S)), the last one possibly ragged):
//     m^(c+1) = max(g + m^(c), max_τ a_τ)        (exp; m ≡ 0 for sig)
//     γ = exp(g + m^(c) − m^(c+1)),  ā_τ = exp(a_τ − m^(c+1))
//     C^(c+1) = γ C^(c) + Σ_τ ā_τ k_τ v_τᵀ,    n^(c+1) = γ n^(c) + Σ_τ ā_τ k_τ
// with b, g, a the in-chunk log-gate sums of §4.1 (a by a reverse scan, never g − b).
// Writes C^(c) (compute dtype) and n^(c), m^(c) for the output pass, and the true last state
// after step S in fp32. The backward reuses this kernel to recompute C^(c) and m^(c).
// Grid: (DK blocks × DV blocks × B·NH); the state tile stays in registers for the whole sequence.
#pragma once
#include "recurrence.cuh"

namespace tfla {

template <typename Mma, typename Gate, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, 1) fwd_states_kernel(const Params p) {
  using T = typename Mma::T;
  constexpr int NT = Tile::kThreads;
  const StateCoords<Tile> at(p.DK, p.DV);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // This CTA carries n when the variant normalizes and it owns DV block 0.
  const bool owns_n = Gate::kNormalize && at.vb == 0;
  const bool owns_m = at.kb == 0 && at.vb == 0 && threadIdx.x == 0;
  const StateStream<Mma, Tile> st(p, ptr<T>(p.k) + i64(at.bh) * p.S * p.DK + at.k0, p.DK, p.DK - at.k0,
                                  ptr<T>(p.v) + i64(at.bh) * p.S * p.DV + at.v0, p.DV, p.DV - at.v0);
  __shared__ double g_amax[2];

  float acc[Tile::kFM][Tile::kFN][4];
  load_state_acc(acc, p.C0, at, p.DK, p.DV);
  for (int d = threadIdx.x; d < Tile::kBK; d += NT)
    st.n_s[d] = (p.n0 != nullptr && at.k0 + d < p.DK) ? p.n0[i64(at.bh) * p.DK + at.k0 + d] : 0.f;
  float m = (Gate::kStabilized && p.m0 != nullptr) ? p.m0[at.bh] : 0.f;

  int buf = 0;
  st.issue(buf, 0, min(Tile::kBT, chunk_len(p, 0)));
  for (int c = 0; c < p.NC; ++c) {
    const int Lc = chunk_len(p, c);
    // 1. the state entering chunk c
    const i64 slot = i64(at.bh) * p.NC + c;
    if (p.C_states != nullptr) store_state_acc<T>(acc, ptr<T>(p.C_states), slot, at, p.DK, p.DV);
    if (owns_n && p.n_states != nullptr)
      for (int d = threadIdx.x; d < Tile::kBK && at.k0 + d < p.DK; d += NT) p.n_states[slot * p.DK + at.k0 + d] = st.n_s[d];
    if (owns_m && p.m_states != nullptr) p.m_states[i64(at.bh) * (p.NC + 1) + c] = m;

    // 2. gates: a_τ = Σ_{u>τ} λ_u + ι_τ, g = Σ λ (double), the new stabilizer and ā
    load_log_gates<Gate>(p.i, p.f, i64(at.bh) * p.S + i64(c) * p.L, 0, p.L, Lc, st.lam, st.iota);
    __syncthreads();
    if (warp == 0) {
      warp_scan_suffix(st.lam, p.L);  // lam[u] = Σ_{u' >= u} λ
      double amax = -1e300;
      for (int u = lane; u < p.L; u += 32) {
        const double a = (u + 1 < p.L ? st.lam[u + 1] : 0.0) + st.iota[u];
        st.iota[u] = a;
        amax = fmax(amax, a);
      }
      amax = warp_max(amax);
      if (lane == 0) {
        g_amax[0] = st.lam[0];
        g_amax[1] = amax;
      }
    }
    __syncthreads();
    const double g = g_amax[0];
    // the stabilizer is stored in fp32: use the rounded value, so states and m stay consistent
    const float m_next = Gate::kStabilized ? float(fmax(g + m, g_amax[1])) : 0.f;
    const float gamma = expf(float(g + double(m) - double(m_next)));
    for (int u = threadIdx.x; u < p.L; u += NT) st.w[u] = expf(float(st.iota[u] - double(m_next)));  // ā
    scale_acc(acc, gamma);
    if (owns_n)
      for (int d = threadIdx.x; d < Tile::kBK; d += NT) st.n_s[d] *= gamma;
    __syncthreads();

    // 3. C ← γ C + (K ⊙ ā)ᵀ V,  n ← γ n + Σ ā k
    const int next = c + 1 < p.NC ? c + 1 : -1;
    buf = owns_n ? st.template walk_chunk<true>(acc, p, c, next, buf, at.row0, at.col0)
                 : st.template walk_chunk<false>(acc, p, c, next, buf, at.row0, at.col0);
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
