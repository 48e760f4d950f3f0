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

  SmemCarver sm{dynamic_smem()};
  T* Xs = sm.take<T>(Tile::kBT * smem_stride<T>(Tile::kBK));
  T* Ys = sm.take<T>(Tile::kBT * smem_stride<T>(Tile::kBV));
  float* lam = sm.take<float>(p.L);
  float* iota = sm.take<float>(p.L);  // ι_τ, then a_τ
  float* w = sm.take<float>(p.L);     // suffix sums of λ, then ā_τ
  float* n_s = sm.take<float>(Tile::kBK);
  __shared__ float g_amax[2];

  float acc[Tile::kFM][Tile::kFN][4];
  load_state_acc(acc, p.C0, at, p.DK, p.DV);
  for (int d = threadIdx.x; d < Tile::kBK; d += NT)
    n_s[d] = (p.n0 != nullptr && at.k0 + d < p.DK) ? p.n0[i64(at.bh) * p.DK + at.k0 + d] : 0.f;
  float m = (Gate::kStabilized && p.m0 != nullptr) ? p.m0[at.bh] : 0.f;

  const T* K = ptr<T>(p.k) + i64(at.bh) * p.S * p.DK + at.k0;
  const T* V = ptr<T>(p.v) + i64(at.bh) * p.S * p.DV + at.v0;

  for (int c = 0; c < p.NC; ++c) {
    const int t0 = c * p.L, Lc = min(p.L, p.S - t0);
    // 1. the state entering chunk c
    const i64 slot = i64(at.bh) * p.NC + c;
    if (p.C_states != nullptr) store_state_acc<T>(acc, ptr<T>(p.C_states), slot, at, p.DK, p.DV);
    if (owns_n && p.n_states != nullptr)
      for (int d = threadIdx.x; d < Tile::kBK && at.k0 + d < p.DK; d += NT) p.n_states[slot * p.DK + at.k0 + d] = n_s[d];
    if (owns_m && p.m_states != nullptr) p.m_states[i64(at.bh) * (p.NC + 1) + c] = m;

    // 2. gates: a_τ = Σ_{u>τ} λ_u + ι_τ, g = Σ λ, the new stabilizer and ā
    load_log_gates<Gate>(p.i, p.f, i64(at.bh) * p.S + t0, 0, p.L, Lc, lam, iota);
    __syncthreads();
    if (warp == 0) {
      for (int u = lane; u < p.L; u += 32) w[u] = lam[u];
      __syncwarp();
      warp_scan_suffix(w, p.L);
      float amax = neg_inf();
      for (int u = lane; u < p.L; u += 32) {
        const float a = (u + 1 < p.L ? w[u + 1] : 0.f) + iota[u];
        iota[u] = a;
        amax = fmaxf(amax, a);
      }
      amax = warp_max(amax);
      if (lane == 0) {
        g_amax[0] = w[0];
        g_amax[1] = amax;
      }
    }
    __syncthreads();
    const float g = g_amax[0];
    const float m_next = Gate::kStabilized ? fmaxf(g + m, g_amax[1]) : 0.f;
    const float gamma = expf(g + m - m_next);
    for (int u = threadIdx.x; u < p.L; u += NT) w[u] = expf(iota[u] - m_next);  // ā (0 past the end)
    scale_acc(acc, gamma);
    if (owns_n)
      for (int d = threadIdx.x; d < Tile::kBK; d += NT) n_s[d] *= gamma;
    __syncthreads();

    // 3. C ← γ C + (K ⊙ ā)ᵀ V,  n ← γ n + Σ ā k
    if (owns_n) {
      accumulate_chunk<Mma, Tile, true>(acc, K + i64(t0) * p.DK, p.DK, p.DK - at.k0, V + i64(t0) * p.DV, p.DV,
                                        p.DV - at.v0, w, Lc, Xs, Ys, n_s, at.row0, at.col0);
    } else {
      accumulate_chunk<Mma, Tile, false>(acc, K + i64(t0) * p.DK, p.DK, p.DK - at.k0, V + i64(t0) * p.DV, p.DV,
                                         p.DV - at.v0, w, Lc, Xs, Ys, n_s, at.row0, at.col0);
    }
    m = m_next;
  }

  // 4. the state after step S, fp32
  if (owns_m && p.m_states != nullptr) p.m_states[i64(at.bh) * (p.NC + 1) + p.NC] = m;
  if (owns_m && p.m_last != nullptr) p.m_last[at.bh] = m;
  if (p.C_last != nullptr) store_state_acc<float>(acc, p.C_last, at.bh, at, p.DK, p.DV);
  if (owns_n && p.n_last != nullptr)
    for (int d = threadIdx.x; d < Tile::kBK && at.k0 + d < p.DK; d += NT) p.n_last[i64(at.bh) * p.DK + at.k0 + d] = n_s[d];
}

}  // namespace tfla
