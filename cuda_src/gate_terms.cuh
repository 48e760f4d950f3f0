// tfla_cupy — the gate terms of one chunk, formed from its log gates by one CTA in shared memory
// (docs/math.md §4.1, §4.3, §6.3):
//   chunk_gate_vectors    stage 0's a − max a, b, g and max a (chunk_gates.cuh writes them to the
//                         gate arrays, stage 0b of the fused forward into its record);
//   prepare_causal, prepare_anticausal
//                         the in-chunk prefix sums anchored at a CTA's first row and the column
//                         exponents, in double;
//   causal_terms, anticausal_terms
//                         the row and column exponents of the backward roles (the sm80 chunk
//                         kernels and the Hopper backward);
//   key_scales            the keys' inter-chunk factors ā (also the Hopper backward's record);
//   FusedTerms            the per-chunk record that carries them to the fused forward and the
//                         segment combine;
//   fused_chunk_decay, fused_row_terms
//                         what a forward walk combines the record with its running stabiliser m
//                         into: the state's decay, ā's shift and each query row's terms.
#pragma once
#include "coords.cuh"
#include "gates.cuh"

namespace tfla {

// Threads of a CTA that forms a chunk's gate vectors (stage 0 and stage 0b).
constexpr int kChunkGateThreads = 128;

// The vectors of one chunk, by a CTA of kChunkGateThreads threads: λ, ι from p.i, p.f into
// `lam`, `iota` and suffix sums into `sfx` (L doubles each, shared memory; all three are
// overwritten), then a_τ − max a into a_out[τ] (τ < L), b_τ into b_out[τ] (when not null), g
// and max a into *g_out and *amax_out. Stage 0 writes them to the gate arrays; stage 0b of the
// fused forward into its FusedTerms record.
template <typename Gate>
__device__ __forceinline__ void chunk_gate_vectors(const Params& p, const ChunkAt& at, double* lam, double* sfx,
                                                   double* iota, float* a_out, float* b_out, float* g_out,
                                                   float* amax_out) {
  const int Lc = at.Lc;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __shared__ double warp_max_s[kChunkGateThreads / 32];

  load_log_gates<Gate>(p.i + at.tok(p.st_i, 0), p.st_i.t, p.f + at.tok(p.st_f, 0), p.st_f.t, 0, p.L, Lc, lam, iota);
  __syncthreads();
  for (int u = threadIdx.x; u < p.L; u += kChunkGateThreads) sfx[u] = lam[u];
  __syncthreads();
  if (warp == 0) warp_scan_suffix(sfx, p.L);
  if (warp == 1) warp_scan_inclusive(lam, p.L);
  __syncthreads();
  double amax = -1e300;
  for (int u = threadIdx.x; u < p.L; u += kChunkGateThreads) {
    const double a = (u + 1 < p.L ? sfx[u + 1] : 0.0) + iota[u];
    iota[u] = a;
    amax = fmax(amax, a);
  }
  amax = warp_max(amax);
  if (lane == 0) warp_max_s[warp] = amax;
  __syncthreads();
  amax = warp_max_s[0];
  for (int w = 1; w < kChunkGateThreads / 32; ++w) amax = fmax(amax, warp_max_s[w]);
  for (int u = threadIdx.x; u < p.L; u += kChunkGateThreads) {
    a_out[u] = u < Lc ? float(iota[u] - amax) : neg_inf();
    if (b_out != nullptr) b_out[u] = float(lam[u]);
  }
  if (threadIdx.x == 0) {
    *g_out = float(lam[p.L - 1]);
    *amax_out = float(amax);
  }
}

// ---------------------------------------------------------------------------------------------
// Gate preparation. All in-chunk sums are anchored at the CTA's first row r0 so that the
// exponents are differences of *small* partial sums (accurate in fp32 even for large L and
// strong forgetting), never differences of chunk-level cumulative sums.
// ---------------------------------------------------------------------------------------------

// Causal roles (rows τ = r0 + r, columns u <= τ). In double:
//   κ_u = ι_u + Σ_{w=u+1..r0} λ_w (u <= r0),   κ_u = ι_u − Σ_{w=r0+1..u} λ_w (u > r0)   -> lam[u]
//   p_r = Σ_{w=r0+1..r0+r} λ_w                                                         -> row_d[r]
// and col_log[u] = κ_u·log2e (split). Returns b_{r0} = Σ_{w<=r0} λ_w. Then
//   D̃[τ][u] = b_τ − b_u + ι_u = p_{τ−r0} + κ_u.
// Sm: a shared-memory view with lam(), iota(), scan(), col_log(), row_d() and kThreads, kRows
// (ChunkSmem, or stage 0b's FusedTermsSmem).
template <typename Gate, typename Sm>
__device__ __forceinline__ double prepare_causal(const Params& p, const Sm& sm, const ChunkAt& at, int r0, int Tend,
                                                 int Lc) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  load_log_gates<Gate>(p.i + at.tok(p.st_i, 0), p.st_i.t, p.f + at.tok(p.st_f, 0), p.st_f.t, 0, Tend, Lc, sm.lam(),
                       sm.iota());
  __syncthreads();
  __shared__ double b_r0;
  if (warp == 0) {
    for (int u = lane; u < Tend; u += 32) sm.scan()[u] = sm.lam()[u];
    __syncwarp();
    warp_scan_suffix(sm.scan() + 1, r0);                     // scan[u] = Σ_{w=u..r0} λ_w, 1 <= u <= r0
    warp_scan_inclusive(sm.scan() + r0 + 1, Tend - r0 - 1);  // scan[u] = Σ_{w=r0+1..u} λ_w, u > r0
    if (lane == 0) b_r0 = sm.lam()[0] + (r0 >= 1 ? sm.scan()[1] : 0.0);
  }
  __syncthreads();
  for (int u = threadIdx.x; u < Tend; u += Sm::kThreads) {
    const double rest = u < r0 ? sm.scan()[u + 1] : (u == r0 ? 0.0 : -sm.scan()[u]);
    const double kappa = sm.iota()[u] + rest;
    sm.lam()[u] = kappa;  // λ is no longer needed
    sm.col_log()[u] = split(kappa * double(kLog2e));
  }
  for (int r = threadIdx.x; r < Sm::kRows; r += Sm::kThreads)
    sm.row_d()[r] = (r == 0 || r0 + r >= Tend) ? 0.0 : sm.scan()[r0 + r];
  __syncthreads();
  return b_r0;
}

// Anti-causal roles (rows σ = r0 + r, columns u >= σ, up to Lc). In double:
//   scan[u] = P_u = Σ_{w=r0+1..u} λ_w  for r0 <= u < Lc  (P_{r0} = 0),
//   row_d[r] = R_σ = Σ_{w=σ+1..Lc−1} λ_w (by its own suffix scan, not P_end − P_σ).
// Then D̃[u][σ] = P_u − P_σ + ι_σ.
// Sm: as for prepare_causal.
template <typename Gate, typename Sm>
__device__ __forceinline__ void prepare_anticausal(const Params& p, const Sm& sm, const ChunkAt& at, int r0, int Lc) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  load_log_gates<Gate>(p.i + at.tok(p.st_i, 0), p.st_i.t, p.f + at.tok(p.st_f, 0), p.st_f.t, r0, Lc, Lc, sm.lam(),
                       sm.iota());
  __syncthreads();
  if (warp == 0) {
    for (int u = r0 + lane; u < Lc; u += 32) sm.scan()[u] = u == r0 ? 0.0 : sm.lam()[u];
    __syncwarp();
    warp_scan_inclusive(sm.scan() + r0, Lc - r0);
    warp_scan_suffix(sm.lam() + r0, Lc - r0);  // lam[w] = Σ_{w'=w..Lc−1} λ
  }
  __syncthreads();
  for (int r = threadIdx.x; r < Sm::kRows; r += Sm::kThreads) {
    const int s = r0 + r;
    sm.row_d()[r] = (s + 1 < Lc) ? sm.lam()[s + 1] : 0.0;
  }
  __syncthreads();
}

// A query's stabiliser M_τ and factor fac_τ = s / (N_τ + ε) (normalized) or s.
template <typename Gate>
__device__ __forceinline__ double query_max(const Params& p, const ChunkAt& at, int tau) {
  return Gate::kStabilized ? double(p.M[at.tok(p.st_M, tau)]) : 0.0;
}
template <typename Gate>
__device__ __forceinline__ float query_factor(const Params& p, const ChunkAt& at, int tau) {
  return Gate::kNormalize ? p.scale / (p.N[at.tok(p.st_N, tau)] + p.eps) : p.scale;
}
// dq's row exponent of query τ: (p_r − M_τ)·log2e + log2 fac_τ, split (one explicit fma: the same
// bits wherever it is compiled).
__device__ __forceinline__ float2 causal_row_log(double pr, double M, float fac) {
  return split(__fma_rn(pr - M, double(kLog2e), double(log2f(fac))));
}

// Row and column gate terms of the causal role dq (rows τ = r0 + r of the chunk):
//   row_scale[r] = fac_τ · exp(b_{r0} + m^(c) + p_r − M_τ),  row_log[r] = (p_r − M_τ)·log2e + log2 fac_τ,
// fac_τ = s / (N_τ + ε) (normalized) or s, and prepare_causal's column terms. Sm: a shared-memory
// view as for prepare_causal with row_scale() and row_log(); ends synchronised.
template <typename Gate, typename Sm>
__device__ __forceinline__ void causal_terms(const Params& p, const Sm& sm, const ChunkAt& at, int r0) {
  const int Tend = min(r0 + Sm::kRows, at.Lc), rows = Tend - r0;
  const double b_r0 = prepare_causal<Gate>(p, sm, at, r0, Tend, at.Lc);
  const double m_c = Gate::kStabilized ? double(p.m_states[at.m_slot(p, 0)]) : 0.0;
  const double A0 = b_r0 + m_c;
  for (int r = threadIdx.x; r < Sm::kRows; r += Sm::kThreads) {
    if (r < rows) {
      const double M = query_max<Gate>(p, at, r0 + r);
      const float fac = query_factor<Gate>(p, at, r0 + r);
      const double pr = sm.row_d()[r];
      sm.row_scale()[r] = fac * expf(float(A0 + pr - M));
      sm.row_log()[r] = causal_row_log(pr, M, fac);
    } else {
      sm.row_scale()[r] = 0.f;
      sm.row_log()[r] = make_float2(neg_inf(), 0.f);
    }
  }
  __syncthreads();
}

// The keys' inter-chunk factors ā_σ = exp(R_σ + ι_σ − m^(c+1)) of rows σ = r0 + r (0 past Lc) into
// row_scale[r], from prepare_anticausal's row_d and iota (Sm as there, with row_scale()).
template <typename Gate, typename Sm>
__device__ __forceinline__ void key_scales(const Params& p, const Sm& sm, const ChunkAt& at, int r0) {
  const double m_next = Gate::kStabilized ? double(p.m_states[at.m_slot(p, 1)]) : 0.0;
  for (int r = threadIdx.x; r < Sm::kRows; r += Sm::kThreads) {
    const int s = r0 + r;
    sm.row_scale()[r] = s < at.Lc ? expf(float(sm.row_d()[r] + sm.iota()[s] - m_next)) : 0.f;
  }
}

// Row and column gate terms of the anti-causal roles:
//   row_log[r] = (ι_σ − P_σ)·log2e,  row_scale[r] = ā_σ = exp(R_σ + ι_σ − m^(c+1)),
//   col_log[u] = (P_u − M_u)·log2e + log2(s / (N_u + ε))      (log terms split hi/lo).
// (rows σ = r0 + r; Sm as for causal_terms).
template <typename Gate, typename Sm>
__device__ __forceinline__ void anticausal_terms(const Params& p, const Sm& sm, const ChunkAt& at, int r0) {
  constexpr int BM = Sm::kRows, NT = Sm::kThreads;
  prepare_anticausal<Gate>(p, sm, at, r0, at.Lc);
  key_scales<Gate>(p, sm, at, r0);
  for (int r = threadIdx.x; r < BM; r += NT) {
    const int s = r0 + r;
    sm.row_log()[r] = s < at.Lc ? split((sm.iota()[s] - sm.scan()[s]) * double(kLog2e)) : make_float2(neg_inf(), 0.f);
  }
  for (int u = r0 + threadIdx.x; u < at.Lc; u += NT) {
    const double M = query_max<Gate>(p, at, u);
    const float fac = query_factor<Gate>(p, at, u);
    sm.col_log()[u] = split((sm.scan()[u] - M) * double(kLog2e) + double(log2f(fac)));
  }
  __syncthreads();
}

// The per-chunk record stage 0b (fused_terms_kernel) writes for the fused forward: everything
// of the gates that does not depend on the running stabiliser m, so the chunk walk only combines
// it with m (one fmax and two exps per row) instead of scanning. Offsets in floats; one record is
// kFloats floats, a whole number of 16-byte pieces (one bulk copy beside the tiles' TMA boxes).
struct FusedTerms {
  static constexpr int kL = 128;
  static constexpr int kColLog = 0,         // float2[L]: split(κ_u · log2 e), κ_u = ι_u − Σ_{w=1..u} λ_w
      kPr = 2 * kL,                         // double[L]: p_r = Σ_{w=1..r} λ_w (p_0 = 0)
      kPrPm = 4 * kL,                       // double[L]: p_r + max_{u<=r} κ_u (stabilised gates)
      kA = 6 * kL,                          // float[L]: gate_a (stage 0)
      kG = 7 * kL, kAmax = kG + 1,          // gate_g, gate_amax of the chunk
      kB0 = kG + 2,                         // double: λ_0, the log weight of C^(c) at row 0 less m
      kFloats = kG + 4;
  static_assert(kFloats % 4 == 0 && kB0 % 2 == 0, "16-byte pieces, aligned double");
};

// Chunk c's gates from its record ``tr`` and the stabiliser m entering it: m after the chunk, the
// state's decay γ, ā's shift (ā = exp(a + shift)) and A0, row 0's log weight of C^(c).
struct FusedChunkDecay {
  float m_next, gamma, shift;
  double A0;
};
template <typename Gate> __device__ __forceinline__ FusedChunkDecay fused_chunk_decay(const float* tr, float m) {
  FusedChunkDecay d;
  d.A0 = *reinterpret_cast<const double*>(tr + FusedTerms::kB0) + double(m);
  const float gch = tr[FusedTerms::kG], amax = tr[FusedTerms::kAmax];
  d.m_next = Gate::kStabilized ? fmaxf(gch + m, amax) : 0.f;
  d.gamma = expf(gch + m - d.m_next);
  d.shift = amax - d.m_next;
  return d;
}

// Query row r of the chunk (Lc rows): its stabiliser M_r, its row scale s·exp(A0 + p_r − M_r) (the
// weight of q_r·C^(c) and q_r·n^(c)) and the split row exponent of its gate weights
// (log2 s + (p_r − M_r) log2 e); zeros and −inf past Lc.
template <typename Gate>
__device__ __forceinline__ void fused_row_terms(const Params& p, const float* tr, double A0, int r, int Lc,
                                                double log2_scale, float& M_r, float& scale_r, float2& log_r) {
  if (r < Lc) {
    const double pr = reinterpret_cast<const double*>(tr + FusedTerms::kPr)[r];
    double M = 0.0;
    if constexpr (Gate::kStabilized) {
      const double prpm = reinterpret_cast<const double*>(tr + FusedTerms::kPrPm)[r];
      M = double(float(fmax(A0 + pr, fmax(double(kRowMaxFloor), prpm))));
    }
    M_r = float(M);
    scale_r = p.scale * expf(float(A0 + pr - M));
    log_r = split((pr - M) * double(kLog2e) + log2_scale);
  } else {
    M_r = 0.f;
    scale_r = 0.f;
    log_r = make_float2(neg_inf(), 0.f);
  }
}

}  // namespace tfla
