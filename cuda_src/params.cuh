// tfla_cupy — the one by-value argument of every kernel.
//
// Mirrored field for field by tfla_cupy/_params.py (a NumPy structured dtype); a CPU test parses
// this struct and checks the two layouts agree, and NVRTC checks sizeof.
//
// Sequence tensors (q, k, v, i, f, h, dh, dq, dk, dv, di, df, N, M) are addressed through their
// own Strides (batch, head, token; in elements; the feature dimension contiguous), so any
// layout, (B, NH, S, D), (B, S, NH, D) or a strided view, is read and written in place. Kernels
// never form a token offset themselves: coords.cuh maps (sequence, head, token) to an offset.
// Internal scratch (chunk states, gate vectors, gate-gradient terms) is packed, indexed by
// (batch·head, chunk slot) as described per field below.
// A null pointer means "not present" (no initial state) or "not wanted" (no last state).
#pragma once
#include "common.cuh"

namespace tfla {

// Element strides of one sequence tensor: offset of (batch b, head h, token t) = b·b + h·h + t·t.
struct Strides {
  i64 b;
  i64 h;
  i64 t;
};

struct Params {
  // ---- token inputs: q, k (.., DK), v (.., DV) in the compute dtype; gates fp32
  const void* q;
  const void* k;
  const void* v;
  const float* i;
  const float* f;
  // ---- initial state, fp32, one per (sequence, head): C0 (NSEQ·NH, DK, DV), n0 (NSEQ·NH, DK),
  //      m0 (NSEQ·NH); null = zeros
  const float* C0;
  const float* n0;
  const float* m0;
  // ---- forward outputs: h (.., DV) compute dtype; N, M fp32 (per step)
  void* h;
  float* N;
  float* M;
  // ---- last state, fp32, per (sequence, head): C_last (NSEQ·NH, DK, DV), n_last, m_last
  float* C_last;
  float* n_last;
  float* m_last;
  // ---- chunk-boundary states: C_states (BH, NC, DK, DV) compute dtype (chunk slot fc + c holds
  //      the state entering chunk c of a sequence), n_states (BH, NC, DK) fp32, m_states (BH, NM)
  //      fp32 (m slot fm + c enters chunk c, fm + nc is the sequence's last; see SeqCoords)
  void* C_states;
  float* n_states;
  float* m_states;
  // ---- per-chunk log-gate vectors (stage 0), fp32, chunk-aligned: gate_a, gate_b (BH, NC, L):
  //      a_τ − max_τ a_τ (−inf past the end) and the in-chunk cumsum b_τ; gate_g, gate_amax (BH, NC)
  float* gate_a;
  float* gate_b;
  float* gate_g;
  float* gate_amax;
  // per-chunk gate records (BH, NC, ·) of a Hopper kernel: the fused forward's FusedTerms (stage 0b),
  // or the backward walk's WalkRecord (walk_terms_kernel); else null
  float* gate_terms;
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
  // ---- the terms of the gate gradients' direct form (docs/math.md §12.1), fp32 packed, partial
  //      sums the gate kernel adds in a fixed order: q_terms (q_parts, BH, S) from the dq kernel,
  //      W_τ + Σ_{σ<=τ} Z_τσ; k_terms (2, k_parts, BH, S) from the dk kernel, Σ_{τ>=σ} Z_τσ then
  //      E_σ (one part per DK block on sm80, one on sm90); state_terms (state_parts, BH, NC) from
  //      the reverse dC pass, γ_c ⟨dC^(c+1), C^(c)⟩ by chunk slot (one part per warp and dC block;
  //      null: not wanted)
  float* q_terms;
  float* k_terms;
  float* state_terms;
  // ---- packed variable-length sequences (null: NSEQ = B sequences of length S). cu_seqlens
  //      (NSEQ + 1 offsets, int32 or int64) is read by seq_table_kernel only, which writes
  //      seq_table = [token offsets (NSEQ + 1) | first chunk slots (NSEQ + 1) | sequence of each
  //      chunk slot (NC), −1 = surplus] (int32); every other kernel reads seq_table.
  const void* cu_seqlens;
  int* seq_table;
  // ---- segments of the fused Hopper forward (segments.cuh; null / 0 without): seg_C
  //      (nseg − 1, NSEQ·NH, DK, DV), seg_n (.., DK), seg_m (..) fp32 hold the summary of segment
  //      g (its end state from the empty state; segment 0 from the initial state), which
  //      segment_combine_kernel turns into the state entering segment g + 1
  float* seg_C;
  float* seg_n;
  float* seg_m;
  // ---- element strides of the sequence tensors
  Strides st_q;
  Strides st_k;
  Strides st_v;
  Strides st_i;
  Strides st_f;
  Strides st_h;
  Strides st_dh;
  Strides st_dq;
  Strides st_dk;
  Strides st_dv;
  Strides st_di;
  Strides st_df;
  Strides st_N;
  Strides st_M;
  // ---- sizes and scalars
  int BH;       // B * NH
  int S;        // tokens per batch entry (the packed total with cu_seqlens)
  int DK;       // head dim of q, k
  int DV;       // head dim of v
  int L;        // chunk size
  int NC;       // chunk slots per batch·head: ceil(S / L), or floor(S / L) + NSEQ with cu_seqlens
  int NH;       // heads
  int NSEQ;     // sequences: B, or the number of cu_seqlens intervals
  int NM;       // m-state slots per batch·head: NC + sequences per batch entry
  int q_parts;
  int k_parts;
  int seg_chunks;  // chunks per segment (0: one segment per sequence)
  int nseg;        // segments per sequence (1 without)
  float scale;  // query scale s
  float eps;    // ε of the normalizer
  int state_parts;
};

template <typename T> __device__ __forceinline__ const T* ptr(const void* p) { return static_cast<const T*>(p); }
template <typename T> __device__ __forceinline__ T* ptr(void* p) { return static_cast<T*>(p); }

}  // namespace tfla
