// tfla_cupy — backward stage 1: chunk-boundary state gradients (docs/math.md §6.2, §7).
//
// Per sequence:  dC^(nc) = dC_last (or 0);   for c = nc−1 … 0:
//     dC^(c) = γ_c dC^(c+1) + Σ_τ (s β̄_τ / (N_τ + ε)) q_τ dh_τᵀ,
//     γ_c = exp(g + m^(c) − m^(c+1)),  β̄_τ = exp(b_τ + m^(c) − M_τ)
// using exactly the boundary stabilizers of chunk c (the upstream indexing defect of §5.4
// cannot occur: every chunk has its own m slot). Writes dC^(c+1) into slot c of dC_states
// (compute dtype) for the dk / dv passes, and dC^(0) (fp32) as the initial-state gradient.
// Before it does, each warp adds its elements of γ_c ⟨dC^(c+1), C^(c)⟩ (C^(c): slot c of
// C_states, read before the write where the two share memory) into state_terms, one part per warp
// and tile: the gate gradients' chunk term B_c (docs/math.md §12.1).
// Grid: (DK blocks × DV blocks × sequences·NH), walking the chunks backwards.
#pragma once
#include "recurrence.cuh"

namespace tfla {

// One warp's part of γ ⟨acc, C⟩ over its elements of the state tile (C: slot `slot` of a
// (BH, slots, DK, DV) array of element type T) into state_terms[part][slot]; fixed order.
template <typename T, typename Tile>
__device__ __forceinline__ void state_term(const float (&acc)[Tile::kFM][Tile::kFN][4], const T* C, i64 slot,
                                           const StateCoords<Tile>& at, const Params& p, float gamma) {
  const int r0 = at.k0 + at.row0, c0 = at.v0 + at.col0;
  const T* Cs = C + slot * p.DK * p.DV + i64(r0) * p.DV + c0;
  float s = 0.f;
  for_each_acc<Tile::kFM, Tile::kFN>([&](int fm, int fn, int e, int r, int c) {
    if (r0 + r < p.DK && c0 + c < p.DV) s = fmaf(acc[fm][fn][e], to_float(Cs[i64(r) * p.DV + c]), s);
  });
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  constexpr int kWarps = Tile::kThreads / 32;
  const int part = (at.vb * cdiv(p.DK, Tile::kBK) + at.kb) * kWarps + (threadIdx.x >> 5);
  if ((threadIdx.x & 31) == 0) p.state_terms[i64(part) * p.BH * p.NC + slot] = gamma * s;
}

// CTAs per SM the registers must allow: two; one for 4-byte operands, whose walk with the chunk term
// B_c needs more than the 128 registers two CTAs leave (it spilled on sm_80).
template <typename Mma> struct DStatesMinCtas {
  static constexpr int value = sizeof(typename Mma::T) == 4 ? 1 : 2;
};

template <typename Mma, typename Gate, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, DStatesMinCtas<Mma>::value) bwd_dstates_kernel(const Params p) {
  using T = typename Mma::T;
  using Stream = StateStream<Mma, Tile>;
  constexpr int NT = Tile::kThreads, BT = Tile::kBT;
  const StateCoords<Tile> at(p);
  const SeqCoords& sq = at.seq;
  const Stream st(ptr<T>(p.q) + sq.tok(p.st_q, 0) + at.k0, int(p.st_q.t), p.DK - at.k0,
                  ptr<T>(p.dh) + sq.tok(p.st_dh, 0) + at.v0, int(p.st_dh.t), p.DV - at.v0);
  // first chunk slot and m slot (slot counts fit in int: the gate vectors hold L floats per slot)
  const int slot0 = int(sq.chunk_slot(p, 0)), mslot0 = int(sq.m_slot(p, 0));
  // the M and N rows of this sequence: pointers kept in shared memory, not in registers
  __shared__ const float* MN[2];
  if (threadIdx.x == 0) {
    MN[0] = p.M + sq.tok(p.st_M, 0);
    MN[1] = p.N + sq.tok(p.st_N, 0);
  }
  __syncthreads();
  auto m_states = [&](int c) { return p.m_states[mslot0 + c]; };
  auto gate_g = [&](int c) { return p.gate_g[slot0 + c]; };
  const int nc = sq.nc;
  // gate rows of a sub-tile: b_τ, then M_τ and N_τ (per-step arrays, not 16-byte aligned)
  auto issue_at = [&](int b, int c, int ts) {
    const int rows = min(BT, sq.chunk_len(p, c) - ts);
    const int t = c * p.L + ts;
    st.issue(b, t, rows, [&](float* G, int n) {
      load_row_async<BT, NT>(G, p.gate_b + i64(slot0) * p.L + t, n);
      if (Gate::kStabilized) load_row_async4<BT, NT>(G + BT, MN[0], t, int(p.st_M.t), n);
      if (Gate::kNormalize) load_row_async4<BT, NT>(G + 2 * BT, MN[1], t, int(p.st_N.t), n);
    });
  };

  float acc[Tile::kFM][Tile::kFN][4];
  load_state_acc(acc, p.dC_last, at, p);

  int buf = 0;
  // per-chunk scalars, loaded one chunk ahead
  float m_n = 0.f, m_c_next = 0.f, g_next = 0.f;
  if (nc > 0) {
    issue_at(buf, nc - 1, 0);
    m_n = Gate::kStabilized ? m_states(nc) : 0.f;
    m_c_next = Gate::kStabilized ? m_states(nc - 1) : 0.f;
    g_next = gate_g(nc - 1);
  }
  for (int c = nc - 1; c >= 0; --c) {
    const float m_c = m_c_next, g = g_next;
    const float gamma = expf(g + m_c - m_n);  // γ_c
    if (p.state_terms != nullptr) state_term<T>(acc, ptr<T>(p.C_states), i64(slot0) + c, at, p, gamma);
    store_state_acc<T>(acc, ptr<T>(p.dC_states), i64(slot0) + c, at, p.DK, p.DV);
    if (c > 0) {
      m_c_next = Gate::kStabilized ? m_states(c - 1) : 0.f;
      g_next = gate_g(c - 1);
    }
    scale_acc(acc, gamma);
    // w_τ = s·β̄_τ / (N_τ + ε),  β̄_τ = exp(b_τ + m^(c) − M_τ)
    auto weight = [&](const float* G, int r) {
      const float Mr = Gate::kStabilized ? G[BT + r] : 0.f;
      const float x = p.scale * expf(G[r] + m_c - Mr);
      return Gate::kNormalize ? x / (G[2 * BT + r] + p.eps) : x;
    };
    buf = st.template walk_chunk<false>(acc, c, sq.chunk_len(p, c), c - 1, buf, at.row0, at.col0, issue_at, weight);
    m_n = m_c;
  }
  if (p.dC0 != nullptr) store_state_acc<float>(acc, p.dC0, at.state(p), at, p.DK, p.DV);
}

}  // namespace tfla
