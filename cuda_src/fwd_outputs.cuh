// tfla_cupy — forward stage 2: outputs h and the per-step N, M (docs/math.md §4.3, §7).
//
// For query τ of chunk c (anchored at the CTA's first row r0, see prepare_causal):
//     μ_τ = max(−10, max_{u<=τ} D̃[τ][u]),   M_τ = max(b_τ + m^(c), μ_τ)     (exp; M ≡ 0 for sig)
//     num_τ = s·β̄_τ C^(c)ᵀ q_τ + Σ_{u<=τ} s·exp(D̃[τ][u] − M_τ) (q_τ·k_u) v_u,   β̄_τ = e^{b_τ + m^(c) − M_τ}
//     den_τ = s·β̄_τ q_τ·n^(c) + Σ_{u<=τ} s·exp(D̃[τ][u] − M_τ) (q_τ·k_u)
//     N_τ = max(|den_τ|, e^{−M_τ}),  h_τ = num_τ / (N_τ + ε)          (h = num without normalizer)
// μ depends on the gates only (a prefix max of κ), so M is final before the first product.
// Grid: (DV blocks × row tiles × chunk slots × B·NH), flattened (ChunkCoords).
#pragma once
#include "chunk_mainloop.cuh"
#include "gate_terms.cuh"

namespace tfla {

template <typename Mma, typename Gate, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks) fwd_h_kernel(const Params p) {
  using T = typename Mma::T;
  using Sm = ChunkSmem<T, Tile>;
  constexpr int BM = Tile::kBM, NT = Tile::kThreads;
  const ChunkCoords<Tile> at(p, p.DV);
  if (at.r0 >= at.Lc) return;  // row tile past the ragged end of the last chunk
  const Sm sm(p.L);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int Tend = min(at.r0 + BM, at.Lc), rows = Tend - at.r0;
  const i64 slot = at.slot(p);

  const T* Q = ptr<T>(p.q) + at.tok(p.st_q, 0);
  const T* K = ptr<T>(p.k) + at.tok(p.st_k, 0);
  const T* V = ptr<T>(p.v) + at.tok(p.st_v, 0);
  const T* C = ptr<T>(p.C_states) + slot * p.DK * p.DV;
  const float* n = Gate::kNormalize ? p.n_states + slot * p.DK : nullptr;
  const ChunkOperands<Mma, Tile, RoleH> ops(sm, Q, p.st_q.t, K, p.st_k.t, V, p.st_v.t, C, p.DK, p.DV, at.n0,
                                                  at.r0, at.Lc, n);
  ops.prologue();

  const double b_r0 = prepare_causal<Gate>(p, sm, at, at.r0, Tend, at.Lc);
  const double m_c = Gate::kStabilized ? double(p.m_states[at.m_slot(p, 0)]) : 0.0;
  const double A0 = b_r0 + m_c;  // log weight of the incoming state at row r0
  __shared__ double kappa_max;   // max_{u<=r0} κ_u
  if constexpr (Gate::kStabilized) {
    if (warp == 0) {
      double mx = -1e300;
      for (int u = lane; u <= at.r0; u += 32) mx = fmax(mx, sm.lam()[u]);
      mx = warp_max(mx);
      if (lane == 0) kappa_max = mx;
      // scan[u] = max_{r0 < u' <= u} κ_u' for the rows of this tile (scan is free again)
      warp_scan_max(sm.scan() + at.r0 + 1, sm.lam() + at.r0 + 1, Tend - at.r0 - 1);
    }
    __syncthreads();
  }
  const double log2_scale = double(log2f(p.scale));
  for (int r = threadIdx.x; r < BM; r += NT) {
    if (r < rows) {
      const double pr = sm.row_d()[r];
      double M = 0.0;
      if constexpr (Gate::kStabilized) {
        const double pm = r == 0 ? kappa_max : fmax(kappa_max, sm.scan()[at.r0 + r]);  // max_{u<=τ} κ_u
        // M is stored in fp32 for the backward: use the rounded value here too
        M = double(float(fmax(A0 + pr, fmax(double(kRowMaxFloor), pr + pm))));
      }
      sm.row_M()[r] = float(M);
      sm.row_scale()[r] = p.scale * expf(float(A0 + pr - M));
      sm.row_log()[r] = split((pr - M) * double(kLog2e) + log2_scale);
    } else {
      sm.row_M()[r] = 0.f;
      sm.row_scale()[r] = 0.f;
      sm.row_log()[r] = make_float2(neg_inf(), 0.f);
    }
    sm.row_aux()[r] = 0.f;  // q·n^(c)
  }
  __syncthreads();

  // q_τ · n^(c), accumulated per X block from shared memory (the n block arrives with X; zero
  // past DK like X); kTPR consecutive lanes share a row.
  auto q_dot_n = [&](int) {
    if constexpr (Gate::kNormalize) {
      constexpr int kTPR = NT / BM;
      static_assert(NT % BM == 0 && 32 % kTPR == 0, "rows must map onto lane groups");
      const int r = threadIdx.x / kTPR, part = threadIdx.x % kTPR;
      const T* xr = sm.Xs() + r * Sm::ldx;
      const float* nb = sm.nvec();
      float s = 0.f;
#pragma unroll 4
      for (int x = 2 * part; x < Tile::kBX; x += 2 * kTPR) {
        s = fmaf(to_float(xr[x]), nb[x], s);
        s = fmaf(to_float(xr[x + 1]), nb[x + 1], s);
      }
#pragma unroll
      for (int o = kTPR / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (part == 0) sm.row_aux()[r] += s;
    }
  };
  float acc[1][Tile::kFNO][4], rowsum[2], unused[2];
  chunk_mainloop<Mma, Tile, RoleH, Gate::kNormalize, false>(acc, rowsum, unused, ops, q_dot_n,
                                                            [](const float (&)[1][Tile::kFNO][4]) {});

  const int wrow = (warp / Tile::kWN) * 16, wcol = (warp % Tile::kWN) * (Tile::kBN / Tile::kWN);
  if constexpr (Gate::kNormalize) {
    reduce_rows<Tile>(rowsum, sm.row_part());
    for (int r = threadIdx.x; r < BM; r += NT) {
      const float den = sm.row_scale()[r] * sm.row_aux()[r] + sm.row_part()[r];
      const float N = fmaxf(fabsf(den), expf(-sm.row_M()[r]));
      sm.row_N()[r] = N;
      if (at.jn == 0 && r < rows) {
        p.N[at.tok(p.st_N, at.r0 + r)] = N;
        if (Gate::kStabilized) p.M[at.tok(p.st_M, at.r0 + r)] = sm.row_M()[r];
      }
    }
    __syncthreads();
    const float inv0 = 1.f / (sm.row_N()[wrow + (lane >> 2)] + p.eps);  // rows g and g + 8 of the warp
    const float inv1 = 1.f / (sm.row_N()[wrow + (lane >> 2) + 8] + p.eps);
    for_each_acc<1, Tile::kFNO>([&](int, int fn, int e, int, int) { acc[0][fn][e] *= (e < 2 ? inv0 : inv1); });
  }
  T* H = ptr<T>(p.h) + at.tok(p.st_h, at.r0 + wrow) + at.n0 + wcol;
  store_acc<T>(acc, H, p.st_h.t, rows - wrow, p.DV - at.n0 - wcol);
}

}  // namespace tfla
