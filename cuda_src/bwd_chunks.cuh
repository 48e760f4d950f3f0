// tfla_cupy — backward stage 2: dq, dk, dv per chunk (docs/math.md §6.3, §7).
//
//   dq_τ = Σ_{u<=τ} dS[τ][u] k_u + s β̄_τ C^(c) Ĝ_τ                  (causal rows τ)
//   dk_σ = Σ_{τ>=σ} dS[τ][σ] q_τ + ā_σ dC^(c+1) v_σ                 (anti-causal rows σ)
//   dv_σ = Σ_{τ>=σ} P[τ][σ] A[τ][σ] Ĝ_τ + ā_σ dC^(c+1)ᵀ k_σ
// with Ĝ = dh / (N + ε) (dh without normalizer), P = exp(D̃ − M), A = s q·k, dS = s P ⊙ (Ĝ vᵀ),
// ā_σ = exp(a_σ − m^(c+1)), β̄_τ = exp(b_τ + m^(c) − M_τ). The 1/(N + ε) of Ĝ is folded into the
// gate weights, so Ĝ is never materialised. dq and dk also write the per-token terms of the gate
// gradients' direct form (docs/math.md §12.1), one part per DK block: with the pair terms
// Z_τσ = dS_τσ (q_τ·k_σ) over this block's columns of q·k,
//   dq:  W_τ + Σ_{σ<=τ} Z_τσ,   W_τ = q_τ·dq_τ^inter          (q_terms)
//   dk:  Σ_{τ>=σ} Z_τσ  and  E_σ = k_σ·dk_σ^inter             (k_terms, two planes)
// so that no gate gradient is a difference of long dot products.
// Grids: (output blocks × row tiles × chunk slots × B·NH), flattened (ChunkCoords).
#pragma once
#include "chunk_mainloop.cuh"
#include "gate_terms.cuh"

namespace tfla {

// Σ over this CTA's output columns of acc[r][z] · src[row r][z], reduced per row into
// row_part[r] (deterministic): the inter-chunk dots W (dq) and E (dk).
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

// The tensors of a backward role at one chunk (chunk_roles.cuh): X, Y, Z at the chunk's first token
// with their token strides (elements), and D, the boundary state in the chunk's slot (DK × DV,
// compute dtype): C^(c) for dq, dC^(c+1) for dk and dv.
template <typename T, typename Role>
struct BwdTensors {
  const T *X, *Y, *Z, *D;
  i64 ldX, ldY, ldZ;
  __device__ __forceinline__ BwdTensors(const Params& p, const ChunkAt& at) {
    if constexpr (is_same<Role, RoleDQ>::value) {
      X = ptr<T>(p.dh) + at.tok(p.st_dh, 0), ldX = p.st_dh.t;
      Y = ptr<T>(p.v) + at.tok(p.st_v, 0), ldY = p.st_v.t;
      Z = ptr<T>(p.k) + at.tok(p.st_k, 0), ldZ = p.st_k.t;
    } else if constexpr (is_same<Role, RoleDK>::value) {
      X = ptr<T>(p.v) + at.tok(p.st_v, 0), ldX = p.st_v.t;
      Y = ptr<T>(p.dh) + at.tok(p.st_dh, 0), ldY = p.st_dh.t;
      Z = ptr<T>(p.q) + at.tok(p.st_q, 0), ldZ = p.st_q.t;
    } else {
      static_assert(is_same<Role, RoleDV>::value, "a backward role");
      X = ptr<T>(p.k) + at.tok(p.st_k, 0), ldX = p.st_k.t;
      Y = ptr<T>(p.q) + at.tok(p.st_q, 0), ldY = p.st_q.t;
      Z = ptr<T>(p.dh) + at.tok(p.st_dh, 0), ldZ = p.st_dh.t;
    }
    D = ptr<T>(Role::kCausal ? p.C_states : p.dC_states) + at.slot(p) * p.DK * p.DV;
  }
};

// One chunk CTA of a backward role (chunk_roles.cuh): the role's gate terms, the main loop, its
// output rows and, for dq and dk, the per-token partial dots of this CTA's DK block.
template <typename Mma, typename Gate, typename Tile, typename Role>
__device__ __forceinline__ void bwd_chunk(const Params& p) {
  using T = typename Mma::T;
  constexpr int NT = Tile::kThreads;
  constexpr bool kDQ = is_same<Role, RoleDQ>::value, kDK = is_same<Role, RoleDK>::value;
  static_assert(kDQ || kDK || is_same<Role, RoleDV>::value, "a backward role");
  const int& DX = kDQ || kDK ? p.DV : p.DK;  // the contraction dimension
  const int& DZ = kDQ || kDK ? p.DK : p.DV;  // the output columns
  const ChunkCoords<Tile> at(p, DZ);
  if (at.r0 >= at.Lc) return;
  const ChunkSmem<T, Tile> sm(p.L);
  const int warp = threadIdx.x >> 5;
  const int rows = min(Tile::kBM, at.Lc - at.r0);
  const BwdTensors<T, Role> tn(p, at);
  constexpr bool kTerms = kDQ || kDK;  // the gate terms' rows: q for dq, k for dk
  const T* R = kTerms ? ptr<T>(kDQ ? p.q : p.k) + at.tok(kDQ ? p.st_q : p.st_k, 0) : nullptr;
  const i64 ldR = kDQ ? p.st_q.t : p.st_k.t;
  const ChunkOperands<Mma, Tile, Role> ops(sm, tn.X, tn.ldX, tn.Y, tn.ldY, tn.Z, tn.ldZ, tn.D, DX, DZ, at.n0, at.r0,
                                           at.Lc, nullptr, R, ldR);
  ops.prologue();
  if constexpr (Role::kCausal) {
    causal_terms<Gate>(p, sm, at, at.r0);
  } else {
    anticausal_terms<Gate>(p, sm, at, at.r0);
  }
  float acc[1][Tile::kFNO][4], rowsum[2], zsum[2];
  float inter_dot = 0.f;  // thread r < rows: W_r (dq) or E_r (dk), this block's columns
  auto on_inter = [&](const float (&a)[1][Tile::kFNO][4]) {
    if constexpr (kTerms) {
      row_dots<Tile>(a, R + at.r0 * ldR + at.n0, ldR, rows, p.DK - at.n0, sm.row_part());
      if (threadIdx.x < Tile::kBM) inter_dot = sm.row_part()[threadIdx.x];
    }
  };
  chunk_mainloop<Mma, Tile, Role, false, kTerms>(acc, rowsum, zsum, ops, [](int) {}, on_inter);

  const int wrow = (warp / Tile::kWN) * 16, wcol = (warp % Tile::kWN) * (Tile::kBN / Tile::kWN);
  const Strides& st_out = kDQ ? p.st_dq : kDK ? p.st_dk : p.st_dv;
  T* out = ptr<T>(kDQ ? p.dq : kDK ? p.dk : p.dv) + at.tok(st_out, at.r0 + wrow) + at.n0 + wcol;
  store_acc<T>(acc, out, st_out.t, rows - wrow, DZ - at.n0 - wcol);
  if constexpr (kTerms) {
    reduce_rows<Tile>(zsum, sm.row_part());
    static_assert(NT >= Tile::kBM, "a thread per row");
    const int r = threadIdx.x;
    if (r < rows) {
      const i64 part = i64(p.BH) * p.S, at_r = i64(at.jn) * part + at.scratch_tok(p, at.r0 + r);
      if constexpr (kDQ) {
        p.q_terms[at_r] = inter_dot + sm.row_part()[r];
      } else {
        p.k_terms[at_r] = sm.row_part()[r];
        p.k_terms[i64(p.k_parts) * part + at_r] = inter_dot;
      }
    }
  }
}

// The three roles' entry points (tfla_cupy/config.py names them).
template <typename Mma, typename Gate, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks) bwd_dq_kernel(const Params p) {
  bwd_chunk<Mma, Gate, Tile, RoleDQ>(p);
}
template <typename Mma, typename Gate, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks) bwd_dk_kernel(const Params p) {
  bwd_chunk<Mma, Gate, Tile, RoleDK>(p);
}
template <typename Mma, typename Gate, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks) bwd_dv_kernel(const Params p) {
  bwd_chunk<Mma, Gate, Tile, RoleDV>(p);
}

}  // namespace tfla
