// tfla_cupy — the one by-value argument of every kernel.
//
// Mirrored field for field by tfla_cupy/_params.py (a NumPy structured dtype); a CPU test parses
// this struct and checks the two layouts agree, and NVRTC checks sizeof. Arrays are contiguous,
// batch and heads flattened: row-major (BH, S, D) for tokens, (BH, S) for per-step scalars.
// A null pointer means "not present" (no initial state) or "not wanted" (no last state).
#pragma once
#include "common.cuh"

namespace tfla {

struct Params {
  // ---- token inputs: q, k (BH, S, DK), v (BH, S, DV) in the compute dtype; gates fp32 (BH, S)
  const void* q;
  const void* k;
  const void* v;
  const float* i;
  const float* f;
  // ---- initial state, fp32: C0 (BH, DK, DV), n0 (BH, DK), m0 (BH); null = zeros
  const float* C0;
  const float* n0;
  const float* m0;
  // ---- forward outputs: h (BH, S, DV) compute dtype; N, M (BH, S) fp32
  void* h;
  float* N;
  float* M;
  // ---- last state, fp32: C_last (BH, DK, DV), n_last (BH, DK), m_last (BH)
  float* C_last;
  float* n_last;
  float* m_last;
  // ---- chunk-boundary states: C_states (BH, NC, DK, DV) compute dtype (slot c enters chunk c),
  //      n_states (BH, NC, DK) fp32, m_states (BH, NC + 1) fp32 (slot NC = last)
  void* C_states;
  float* n_states;
  float* m_states;
  // ---- per-chunk log-gate vectors (stage 0), fp32, chunk-aligned: gate_a, gate_b (BH, NC, L):
  //      a_τ − max_τ a_τ (−inf past the end) and the in-chunk cumsum b_τ; gate_g, gate_amax (BH, NC)
  float* gate_a;
  float* gate_b;
  float* gate_g;
  float* gate_amax;
  // ---- backward: dh (BH, S, DV); dC_last (BH, DK, DV) fp32 or null;
  //      dC_states (BH, NC, DK, DV) compute dtype, slot c holds dC^(c+1)
  const void* dh;
  const float* dC_last;
  void* dC_states;
  // ---- gradients: dq, dk, dv compute dtype; di, df (BH, S) fp32; dC0 (BH, DK, DV) fp32 or null
  void* dq;
  void* dk;
  void* dv;
  float* di;
  float* df;
  float* dC0;
  // ---- per-token partial dots of the gate gradients: (parts, BH, S) fp32, one part per
  //      DK block of the dq / dk kernels
  float* qdq;
  float* kdk;
  // ---- sizes and scalars
  int BH;       // B * NH
  int S;        // sequence length
  int DK;       // head dim of q, k
  int DV;       // head dim of v
  int L;        // chunk size
  int NC;       // number of chunks, ceil(S / L)
  int qdq_parts;
  int kdk_parts;
  float scale;  // query scale s
  float eps;    // ε of the normalizer
};

template <typename T> __device__ __forceinline__ const T* ptr(const void* p) { return static_cast<const T*>(p); }
template <typename T> __device__ __forceinline__ T* ptr(void* p) { return static_cast<T*>(p); }

}  // namespace tfla
