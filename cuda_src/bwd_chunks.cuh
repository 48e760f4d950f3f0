// tfla_cupy — backward stage 2: dq, dk, dv per chunk (docs/math.md §6.3, §7).
//
//   dq_τ = Σ_{u<=τ} dS[τ][u] k_u + s β̄_τ C^(c) Ĝ_τ                  (causal rows τ)
//   dk_σ = Σ_{τ>=σ} dS[τ][σ] q_τ + ā_σ dC^(c+1) v_σ                 (anti-causal rows σ)
//   dv_σ = Σ_{τ>=σ} P[τ][σ] A[τ][σ] Ĝ_τ + ā_σ dC^(c+1)ᵀ k_σ
// with Ĝ = dh / (N + ε) (dh without normalizer), P = exp(D̃ − M), A = s q·k, dS = s P ⊙ (Ĝ vᵀ),
// ā_σ = exp(a_σ − m^(c+1)), β̄_τ = exp(b_τ + m^(c) − M_τ). The 1/(N + ε) of Ĝ is folded into the
// gate weights, so Ĝ is never materialised. dq and dk also write their per-token partial dots
// q·dq and k·dk (one part per DK block) for the gate gradients.
// Grids: (output blocks × row tiles × chunk slots × B·NH), flattened (ChunkCoords).
#pragma once
#include "chunk_mainloop.cuh"
#include "gate_terms.cuh"

namespace tfla {

// Σ over this CTA's output columns of acc[r][z] · src[row r][z], reduced per row into
// row_part[r] (deterministic), for the gate-gradient dots.
template <typename Tile, typename T>
__device__ __forceinline__ void row_dots(const float (&acc)[1][Tile::kFNO][4], const T* src, i64 ld, int rows,
                                         int cols, float* row_part) {
  const int warp = threadIdx.x >> 5;
  const int wrow = (warp / Tile::kWN) * 16, wcol = (warp % Tile::kWN) * (Tile::kBN / Tile::kWN);
  float part[2] = {0.f, 0.f};
  for_each_acc<1, Tile::kFNO>([&](int, int fn, int e, int r, int c) {
    if (wrow + r < rows && wcol + c < cols) part[e >> 1] += acc[0][fn][e] * to_float(src[(wrow + r) * ld + wcol + c]);
  });
  reduce_rows<Tile>(part, row_part);
}

template <typename Mma, typename Gate, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks) bwd_dq_kernel(const Params p) {
  using T = typename Mma::T;
  constexpr int BM = Tile::kBM, NT = Tile::kThreads;
  const ChunkCoords<Tile> at(p, p.DK);
  if (at.r0 >= at.Lc) return;
  const ChunkSmem<T, Tile> sm(p.L);
  const int warp = threadIdx.x >> 5;
  const int rows = min(at.r0 + BM, at.Lc) - at.r0;

  const T* dH = ptr<T>(p.dh) + at.tok(p.st_dh, 0);
  const T* V = ptr<T>(p.v) + at.tok(p.st_v, 0);
  const T* K = ptr<T>(p.k) + at.tok(p.st_k, 0);
  const T* C = ptr<T>(p.C_states) + at.slot(p) * p.DK * p.DV;
  const ChunkOperands<Mma, Tile, RoleDQ> ops(sm, dH, p.st_dh.t, V, p.st_v.t, K, p.st_k.t, C, p.DV, p.DK, at.n0,
                                                 at.r0, at.Lc);
  ops.prologue();

  causal_terms<Gate>(p, sm, at, at.r0);

  float acc[1][Tile::kFNO][4], rowsum[2];
  chunk_mainloop<Mma, Tile, RoleDQ, false>(acc, rowsum, ops, [](int) {});

  const int wrow = (warp / Tile::kWN) * 16, wcol = (warp % Tile::kWN) * (Tile::kBN / Tile::kWN);
  store_acc<T>(acc, ptr<T>(p.dq) + at.tok(p.st_dq, at.r0 + wrow) + at.n0 + wcol, p.st_dq.t, rows - wrow,
               p.DK - at.n0 - wcol);
  row_dots<Tile>(acc, ptr<T>(p.q) + at.tok(p.st_q, at.r0) + at.n0, p.st_q.t, rows, p.DK - at.n0, sm.row_part());
  for (int r = threadIdx.x; r < rows; r += NT)
    p.qdq[i64(at.jn) * p.BH * p.S + at.scratch_tok(p, at.r0 + r)] = sm.row_part()[r];
}

template <typename Mma, typename Gate, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks) bwd_dv_kernel(const Params p) {
  using T = typename Mma::T;
  const ChunkCoords<Tile> at(p, p.DV);
  if (at.r0 >= at.Lc) return;
  const ChunkSmem<T, Tile> sm(p.L);
  const int warp = threadIdx.x >> 5;
  const int rows = min(Tile::kBM, at.Lc - at.r0);
  const T* K = ptr<T>(p.k) + at.tok(p.st_k, 0);
  const T* Q = ptr<T>(p.q) + at.tok(p.st_q, 0);
  const T* dH = ptr<T>(p.dh) + at.tok(p.st_dh, 0);
  const T* dC = ptr<T>(p.dC_states) + at.slot(p) * p.DK * p.DV;
  const ChunkOperands<Mma, Tile, RoleDV> ops(sm, K, p.st_k.t, Q, p.st_q.t, dH, p.st_dh.t, dC, p.DK, p.DV,
                                                   at.n0, at.r0, at.Lc);
  ops.prologue();
  anticausal_terms<Gate>(p, sm, at, at.r0);
  float acc[1][Tile::kFNO][4], rowsum[2];
  chunk_mainloop<Mma, Tile, RoleDV, false>(acc, rowsum, ops, [](int) {});
  const int wrow = (warp / Tile::kWN) * 16, wcol = (warp % Tile::kWN) * (Tile::kBN / Tile::kWN);
  T* out = ptr<T>(p.dv) + at.tok(p.st_dv, at.r0 + wrow) + at.n0 + wcol;
  store_acc<T>(acc, out, p.st_dv.t, rows - wrow, p.DV - at.n0 - wcol);
}

template <typename Mma, typename Gate, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks) bwd_dk_kernel(const Params p) {
  using T = typename Mma::T;
  constexpr int NT = Tile::kThreads;
  const ChunkCoords<Tile> at(p, p.DK);
  if (at.r0 >= at.Lc) return;
  const ChunkSmem<T, Tile> sm(p.L);
  const int warp = threadIdx.x >> 5;
  const int rows = min(Tile::kBM, at.Lc - at.r0);
  const T* V = ptr<T>(p.v) + at.tok(p.st_v, 0);
  const T* dH = ptr<T>(p.dh) + at.tok(p.st_dh, 0);
  const T* Q = ptr<T>(p.q) + at.tok(p.st_q, 0);
  const T* dC = ptr<T>(p.dC_states) + at.slot(p) * p.DK * p.DV;
  const ChunkOperands<Mma, Tile, RoleDK> ops(sm, V, p.st_v.t, dH, p.st_dh.t, Q, p.st_q.t, dC, p.DV, p.DK,
                                                  at.n0, at.r0, at.Lc);
  ops.prologue();
  anticausal_terms<Gate>(p, sm, at, at.r0);
  float acc[1][Tile::kFNO][4], rowsum[2];
  chunk_mainloop<Mma, Tile, RoleDK, false>(acc, rowsum, ops, [](int) {});
  const int wrow = (warp / Tile::kWN) * 16, wcol = (warp % Tile::kWN) * (Tile::kBN / Tile::kWN);
  store_acc<T>(acc, ptr<T>(p.dk) + at.tok(p.st_dk, at.r0 + wrow) + at.n0 + wcol, p.st_dk.t, rows - wrow,
               p.DK - at.n0 - wcol);
  row_dots<Tile>(acc, ptr<T>(p.k) + at.tok(p.st_k, at.r0) + at.n0, p.st_k.t, rows, p.DK - at.n0, sm.row_part());
  for (int r = threadIdx.x; r < rows; r += NT)
    p.kdk[i64(at.jn) * p.BH * p.S + at.scratch_tok(p, at.r0 + r)] = sm.row_part()[r];
}

}  // namespace tfla
