// tfla_cupy — the Hopper (sm_90a) forward: one fused pass per (sequence, head, DV block) whose
// chunk state never leaves the SM (docs/performance.md, road B; docs/math.md §4.2, §4.3).
//
// A CTA of two warpgroups walks its sequence's chunks in order. For chunk c (L = 128 tokens,
// DK = 128, a 64-column block of DV) with the state C^(c) in registers:
//   1. the next chunk's Q, K, V tiles are already streaming into the other stage (cp.async into
//      128-byte swizzled tiles, the layout wgmma reads);
//   2. gate preparation (prepare_causal anchored at row 0, the same double arithmetic as the
//      output kernel) gives M_τ, the row and column exponent terms and β̄; stage 0's vectors give
//      the state-update weights ā and γ exactly as the state pass uses them;
//   3. Cᵀ (compute dtype) and V ⊙ ā go to shared memory;
//   4. warpgroup w (query rows 64w .. 64w + 63, state rows 64w .. 64w + 63):
//        H  = s·β̄ ⊙ (Q_w · C^(c))                 wgmma, A = Q, B = Cᵀ   (both K-major)
//        S  = Q_w · K_{0..w}ᵀ                       wgmma, causal blocks only
//        P  = exp2(row + col) ⊙ S, masked            registers -> A fragments, no shared memory
//        H += P · V                                 wgmma, A from registers, B = V MN-major
//        C ← γ C + Kᵀ · (ā ⊙ V)                     wgmma, A = K MN-major, B = ā ⊙ V MN-major
//   5. h = H / (N + ε), N = max(|s·β̄ q·n + Σ P|, e^{−M}); n ← γ n + Σ ā k (CUDA cores).
// Writes h, N, M as the two-pass forward does, the last state in fp32, and — when requested
// (keep_states) — the chunk-boundary states. Shapes it does not cover use the sm_80 family
// (tfla_cupy/config.py: fused_fwd_supported).
#pragma once
#include "chunk_mainloop.cuh"
#include "wgmma.cuh"

namespace tfla {

// Shared-memory carve (bytes from a 1024-aligned base; swizzle atoms need that alignment).
// Q and K tiles are two 64-column blocks of kL rows × 128 bytes; V and ā ⊙ V one block; Cᵀ two
// blocks of kBV rows.
struct FusedFwdSmem {
  static constexpr int kL = 128, kDK = 128, kBV = 64, kWarpgroups = 2, kThreads = 128 * kWarpgroups, kRows = kL;
  static constexpr int kBlk = kL * 128, kCtBlk = kBV * 128;
  static constexpr int kQ = 0, kK = 2 * kBlk, kV = 4 * kBlk, kStage = 5 * kBlk, kStages = 2;
  static constexpr int kCt = kStages * kStage, kVw = kCt + 2 * kCtBlk;
  static constexpr int kLam = kVw + kBlk, kIota = kLam + 8 * kL, kScan = kIota + 8 * kL, kRowD = kScan + 8 * kL,
                       kColLog = kRowD + 8 * kL, kRowLog = kColLog + 8 * kL, kRowScale = kRowLog + 8 * kL,
                       kRowM = kRowScale + 4 * kL, kRowQn = kRowM + 4 * kL, kAbar = kRowQn + 4 * kL,
                       kNvec = kAbar + 4 * kL, kNpart = kNvec + 4 * kDK, kNparts = kL / 8,
                       kGateIn = kNpart + 4 * kNparts * kDK, kGateStage = 4 * (3 * kL + 4),
                       kEnd = kGateIn + kStages * kGateStage;
  static constexpr int kBytes = kEnd + 1024;  // dynamic shared memory: the carve plus alignment slack
  static_assert(kBV * 2 == 128 && kDK == 2 * 64, "tiles are whole 128-byte swizzle rows");

  char* base;
  __device__ FusedFwdSmem() {
    char* b = dynamic_smem();
    base = b + ((1024 - (smem_addr(b) & 1023)) & 1023);
  }
  template <typename U> __device__ __forceinline__ U* at(int off) const { return reinterpret_cast<U*>(base + off); }
  __device__ __forceinline__ char* q(int s) const { return base + s * kStage + kQ; }
  __device__ __forceinline__ char* k(int s) const { return base + s * kStage + kK; }
  __device__ __forceinline__ char* v(int s) const { return base + s * kStage + kV; }
  __device__ __forceinline__ char* ct() const { return base + kCt; }
  __device__ __forceinline__ char* vw() const { return base + kVw; }
  __device__ __forceinline__ double* lam() const { return at<double>(kLam); }
  __device__ __forceinline__ double* iota() const { return at<double>(kIota); }
  __device__ __forceinline__ double* scan() const { return at<double>(kScan); }
  __device__ __forceinline__ double* row_d() const { return at<double>(kRowD); }
  __device__ __forceinline__ float2* col_log() const { return at<float2>(kColLog); }
  __device__ __forceinline__ float2* row_log() const { return at<float2>(kRowLog); }
  __device__ __forceinline__ float* row_scale() const { return at<float>(kRowScale); }
  __device__ __forceinline__ float* row_M() const { return at<float>(kRowM); }
  __device__ __forceinline__ float* row_qn() const { return at<float>(kRowQn); }
  __device__ __forceinline__ float* abar() const { return at<float>(kAbar); }
  __device__ __forceinline__ float* nvec() const { return at<float>(kNvec); }
  __device__ __forceinline__ float* npart() const { return at<float>(kNpart); }  // kNparts × kDK
  // staged gates of a stage: i[kL], f[kL] (raw), a[kL] (stage 0's gate_a), then g, max a
  __device__ __forceinline__ float* gate_in(int s) const { return at<float>(kGateIn + s * kGateStage); }
};

template <typename T, typename Gate>
__global__ void __launch_bounds__(FusedFwdSmem::kThreads, 1) fwd_fused_sm90_kernel(const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Sm = FusedFwdSmem;
  constexpr int L = Sm::kL, DK = Sm::kDK, BV = Sm::kBV, NT = Sm::kThreads;
  const Sm sm;
  const int nvb = p.DV / BV;
  const int vb = blockIdx.x % nvb, v0 = vb * BV;
  const SeqCoords sq(p, (blockIdx.x / nvb) / p.NH, (blockIdx.x / nvb) % p.NH);
  const int tid = threadIdx.x, warp = (tid >> 5) & 3, lane = tid & 31;
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);  // warp-uniform: the wgmma branches are not divergent
  const int g = lane >> 2, t = lane & 3;
  const int row_lo = 64 * wg + 16 * warp + g, row_hi = row_lo + 8;  // this thread's accumulator rows
  const bool owns_nm = vb == 0;                                       // writes n, m, N, M

  const T* Qg = ptr<T>(p.q) + sq.tok(p.st_q, 0);
  const T* Kg = ptr<T>(p.k) + sq.tok(p.st_k, 0);
  const T* Vg = ptr<T>(p.v) + sq.tok(p.st_v, 0) + v0;
  // Chunk c into stage s: 16-byte chunks to their swizzled places, rows past the end zero-filled.
  auto issue = [&](int c, int s) {
    const int rows = sq.chunk_len(p, c), u0 = c * L;
#pragma unroll 2
    for (int idx = tid; idx < L * 16; idx += NT) {
      const int r = idx >> 4, j = idx & 15;
      const int off = (j >> 3) * Sm::kBlk + sw128_offset(r, 8 * (j & 7));
      const bool ok = r < rows;
      cp_async16(sm.q(s) + off, Qg + (ok ? i64(u0 + r) * p.st_q.t + 8 * j : 0), ok);
      cp_async16(sm.k(s) + off, Kg + (ok ? i64(u0 + r) * p.st_k.t + 8 * j : 0), ok);
    }
#pragma unroll 2
    for (int idx = tid; idx < L * 8; idx += NT) {
      const int r = idx >> 3, j = idx & 7;
      const bool ok = r < rows;
      cp_async16(sm.v(s) + sw128_offset(r, 8 * j), Vg + (ok ? i64(u0 + r) * p.st_v.t + 8 * j : 0), ok);
    }
    float* gi = sm.gate_in(s);
    const i64 slot = sq.chunk_slot(p, c);
    for (int u = tid; u < L; u += NT) {
      const bool ok = u < rows;
      cp_async4(gi + u, p.i + sq.tok(p.st_i, ok ? u0 + u : 0), ok);
      cp_async4(gi + L + u, p.f + sq.tok(p.st_f, ok ? u0 + u : 0), ok);
      cp_async4(gi + 2 * L + u, p.gate_a + slot * L + u, true);
    }
    if (tid == 0) {
      cp_async4(gi + 3 * L, p.gate_g + slot, true);
      cp_async4(gi + 3 * L + 1, p.gate_amax + slot, true);
    }
    cp_async_commit();
  };

  // ---- the incoming state: C rows 64·wg + (16·warp + g, +8), columns v0 + 8j + 2t (+1) ----------
  float Cacc[32];
  const i64 cbase = i64(sq.state) * DK * p.DV + v0;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = (e & 2) ? row_hi : row_lo, col = 8 * j + 2 * t + (e & 1);
      Cacc[4 * j + e] = p.C0 != nullptr ? p.C0[cbase + i64(r) * p.DV + col] : 0.f;
    }
  if (tid < DK) sm.nvec()[tid] = (Gate::kNormalize && p.n0 != nullptr) ? p.n0[i64(sq.state) * DK + tid] : 0.f;
  float m = (Gate::kStabilized && p.m0 != nullptr) ? p.m0[sq.state] : 0.f;
  const double log2_scale = double(log2f(p.scale));
  __shared__ double kappa_max;

  const int nc = sq.nc;
  if (nc > 0) issue(0, 0);
  for (int c = 0; c < nc; ++c) {
    const int s = c & 1, Lc = sq.chunk_len(p, c), u0 = c * L;
    const i64 slot = sq.chunk_slot(p, c);
    if (c + 1 < nc) issue(c + 1, s ^ 1); else cp_async_commit();

    // ---- chunk-boundary state out (keep_states) -------------------------------------------------
    if (p.C_states != nullptr) {
      T* Cs = ptr<T>(p.C_states) + slot * DK * p.DV + v0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        store2(Cs + i64(row_lo) * p.DV + 8 * j + 2 * t, Cacc[4 * j], Cacc[4 * j + 1]);
        store2(Cs + i64(row_hi) * p.DV + 8 * j + 2 * t, Cacc[4 * j + 2], Cacc[4 * j + 3]);
      }
    }
    if (owns_nm && Gate::kNormalize && p.n_states != nullptr && tid < DK) p.n_states[slot * DK + tid] = sm.nvec()[tid];
    if (owns_nm && Gate::kStabilized && p.m_states != nullptr && tid == 0) p.m_states[sq.m_slot(p, c)] = m;

    cp_async_wait<1>();  // chunk c's tiles and gates landed (c + 1 may be in flight)
    __syncthreads();

    // ---- gates: output rows (double, anchored at row 0) and state-update weights ----------------
    const float* gi = sm.gate_in(s);
    const double b0 = prepare_causal_from<Gate>(sm, gi, 1, gi + L, 1, 0, Lc, Lc);
    const double A0 = b0 + double(m);  // log weight of the incoming state at row 0
    if constexpr (Gate::kStabilized) {
      if (tid < 32) {
        if (lane == 0) kappa_max = sm.lam()[0];
        warp_scan_max(sm.scan() + 1, sm.lam() + 1, Lc - 1);  // max over (0, u] of κ
      }
      __syncthreads();
    }
    const float gch = gi[3 * L], amax = gi[3 * L + 1];
    const float m_next = Gate::kStabilized ? fmaxf(gch + m, amax) : 0.f;
    const float gamma = expf(gch + m - m_next), shift = amax - m_next;
    for (int r = tid; r < L; r += NT) {
      if (r < Lc) {
        const double pr = sm.row_d()[r];
        double M = 0.0;
        if constexpr (Gate::kStabilized) {
          const double pm = r == 0 ? kappa_max : fmax(kappa_max, sm.scan()[r]);
          M = double(float(fmax(A0 + pr, fmax(double(kRowMaxFloor), pr + pm))));
        }
        sm.row_M()[r] = float(M);
        sm.row_scale()[r] = p.scale * expf(float(A0 + pr - M));
        sm.row_log()[r] = split((pr - M) * double(kLog2e) + log2_scale);
        sm.abar()[r] = expf(gi[2 * L + r] + shift);
      } else {
        sm.row_M()[r] = 0.f;
        sm.row_scale()[r] = 0.f;
        sm.row_log()[r] = make_float2(neg_inf(), 0.f);
        sm.abar()[r] = 0.f;
      }
    }

    // ---- Cᵀ for Q·C (state rows are Cᵀ columns: block wg) ---------------------------------------
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = (e & 2) ? row_hi : row_lo, col = 8 * j + 2 * t + (e & 1);
        *reinterpret_cast<T*>(sm.ct() + (r >> 6) * Sm::kCtBlk + sw128_offset(col, r & 63)) = from_float<T>(Cacc[4 * j + e]);
      }
    fence_async_smem();  // generic-proxy writes (cp.async tiles, Cᵀ) visible to wgmma
    __syncthreads();     // and the row terms to every thread

    // ---- inter-chunk term and scores on the tensor cores ... ------------------------------------
    float H[32], Sc[2][32] = {};
    fence_regs(Cacc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const u64 da = sw128_desc(sm.q(s) + (kk >> 2) * Sm::kBlk + wg * 64 * 128 + 32 * (kk & 3));
      wgmma_ss<T, 0, 0>(H, da, sw128_desc(sm.ct() + (kk >> 2) * Sm::kCtBlk + 32 * (kk & 3)), kk > 0);
    }
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
      if (nb > wg) break;  // key block above the diagonal: fully masked
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const u64 da = sw128_desc(sm.q(s) + (kk >> 2) * Sm::kBlk + wg * 64 * 128 + 32 * (kk & 3));
        const u64 db = sw128_desc(sm.k(s) + (kk >> 2) * Sm::kBlk + nb * 64 * 128 + 32 * (kk & 3));
        wgmma_ss<T, 0, 0>(Sc[nb], da, db, kk > 0);
      }
    }
    wgmma_commit();

    // ... while the CUDA cores form ā ⊙ V (same swizzled places) and q·n^(c)
    for (int idx = tid; idx < L * 8; idx += NT) {
      const int r = idx >> 3, off = sw128_offset(r, 8 * (idx & 7));
      const float w = sm.abar()[r];
      uint4 x = *reinterpret_cast<const uint4*>(sm.v(s) + off);
      u32* xs = reinterpret_cast<u32*>(&x);
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const T* pair = reinterpret_cast<const T*>(&xs[h]);
        xs[h] = pack2<T>(w * to_float(pair[0]), w * to_float(pair[1]));
      }
      *reinterpret_cast<uint4*>(sm.vw() + off) = x;
    }
    if constexpr (Gate::kNormalize) {
      const int r = tid >> 1, half = tid & 1;  // two threads per row, 64 columns each
      const char* qrow = sm.q(s) + half * Sm::kBlk;
      const float* nb = sm.nvec() + 64 * half;
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint4 x = *reinterpret_cast<const uint4*>(qrow + sw128_offset(r, 8 * j));
        const T* e8 = reinterpret_cast<const T*>(&x);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(to_float(e8[e]), nb[8 * j + e], acc);
      }
      acc += __shfl_xor_sync(0xffffffffu, acc, 1);
      if (half == 0) sm.row_qn()[r] = acc;
    }
    wgmma_wait<0>();
    fence_regs(H);
    fence_regs(Sc[0]);
    fence_regs(Sc[1]);

    const float sc_lo = sm.row_scale()[row_lo], sc_hi = sm.row_scale()[row_hi];
#pragma unroll
    for (int e = 0; e < 32; ++e) H[e] *= (e & 2) ? sc_hi : sc_lo;
    const float2 rl_lo = sm.row_log()[row_lo], rl_hi = sm.row_log()[row_hi];
    float rs_lo = 0.f, rs_hi = 0.f;
    u32 P[8][4];
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = (e & 2) ? row_hi : row_lo, u = 64 * nb + 8 * j + 2 * t + (e & 1);
          const bool keep = nb <= wg && u <= r && u < Lc;
          w[e] = keep ? exp2f(add_split((e & 2) ? rl_hi : rl_lo, sm.col_log()[u])) * Sc[nb][4 * j + e] : 0.f;
        }
        rs_lo += w[0] + w[1];
        rs_hi += w[2] + w[3];
        const int kk = 4 * nb + (j >> 1), hh = (j & 1) * 2;
        P[kk][hh] = pack2<T>(w[0], w[1]);
        P[kk][hh + 1] = pack2<T>(w[2], w[3]);
      }
    fence_async_smem();  // ā ⊙ V visible to wgmma
    __syncthreads();     // both warpgroups' ā ⊙ V rows and q·n

    // ---- intra-chunk term and the state update on the tensor cores ... --------------------------
#pragma unroll
    for (int e = 0; e < 32; ++e) Cacc[e] *= gamma;
    fence_regs(Cacc);
    fence_regs(H);
    fence_regs(P);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      if (kk >= 4 * (wg + 1)) break;  // keys past this warpgroup's last row
      wgmma_rs<T, 1>(H, P[kk], sw128_desc_mn(sm.v(s) + 2048 * kk, 1024), 1);
    }
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
      wgmma_ss<T, 1, 1>(Cacc, sw128_desc_mn(sm.k(s) + wg * Sm::kBlk + 2048 * kk, 1024),
                        sw128_desc_mn(sm.vw() + 2048 * kk, 1024), 1);
    wgmma_commit();

    // ... while the CUDA cores do Σ ā k (8 keys × 8 dims per thread) and the normalizer
    if constexpr (Gate::kNormalize) {
      const int d8 = tid & 15, tg = tid >> 4;
      const char* kb = sm.k(s) + (d8 >> 3) * Sm::kBlk;
      float acc[8] = {};
#pragma unroll
      for (int uu = 0; uu < 8; ++uu) {
        const int u = 8 * tg + uu;
        const float w = sm.abar()[u];
        const uint4 x = *reinterpret_cast<const uint4*>(kb + sw128_offset(u, 8 * (d8 & 7)));
        const T* e8 = reinterpret_cast<const T*>(&x);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = fmaf(w, to_float(e8[e]), acc[e]);
      }
      float4* np = reinterpret_cast<float4*>(sm.npart() + tg * DK + 8 * d8);
      np[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      np[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
    float inv_lo = 1.f, inv_hi = 1.f;
    if constexpr (Gate::kNormalize) {
      rs_lo = quad_sum(rs_lo);
      rs_hi = quad_sum(rs_hi);
      const float den_lo = sc_lo * sm.row_qn()[row_lo] + rs_lo, den_hi = sc_hi * sm.row_qn()[row_hi] + rs_hi;
      const float N_lo = fmaxf(fabsf(den_lo), expf(-sm.row_M()[row_lo]));
      const float N_hi = fmaxf(fabsf(den_hi), expf(-sm.row_M()[row_hi]));
      inv_lo = 1.f / (N_lo + p.eps);
      inv_hi = 1.f / (N_hi + p.eps);
      if (owns_nm && t == 0) {
        if (row_lo < Lc) {
          p.N[sq.tok(p.st_N, u0 + row_lo)] = N_lo;
          if (Gate::kStabilized) p.M[sq.tok(p.st_M, u0 + row_lo)] = sm.row_M()[row_lo];
        }
        if (row_hi < Lc) {
          p.N[sq.tok(p.st_N, u0 + row_hi)] = N_hi;
          if (Gate::kStabilized) p.M[sq.tok(p.st_M, u0 + row_hi)] = sm.row_M()[row_hi];
        }
      }
    }
    wgmma_wait<0>();
    fence_regs(H);
    fence_regs(Cacc);
    fence_regs(P);

    // ---- outputs -------------------------------------------------------------------------------
    T* Hg = ptr<T>(p.h) + sq.tok(p.st_h, u0) + v0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (row_lo < Lc) store2(Hg + i64(row_lo) * p.st_h.t + 8 * j + 2 * t, H[4 * j] * inv_lo, H[4 * j + 1] * inv_lo);
      if (row_hi < Lc)
        store2(Hg + i64(row_hi) * p.st_h.t + 8 * j + 2 * t, H[4 * j + 2] * inv_hi, H[4 * j + 3] * inv_hi);
    }
    if constexpr (Gate::kNormalize) {
      __syncthreads();  // every part of Σ ā k
      if (tid < DK) {
        float sum = 0.f;
#pragma unroll
        for (int g8 = 0; g8 < Sm::kNparts; ++g8) sum += sm.npart()[g8 * DK + tid];
        sm.nvec()[tid] = gamma * sm.nvec()[tid] + sum;
      }
    }
    m = m_next;
    __syncthreads();  // stage s, Cᵀ, ā ⊙ V and the gate scratch are free again
  }

  // ---- the state after the sequence's last step, fp32 ------------------------------------------
  if (owns_nm && tid == 0 && Gate::kStabilized) {
    if (p.m_states != nullptr) p.m_states[sq.m_slot(p, nc)] = m;
    if (p.m_last != nullptr) p.m_last[sq.state] = m;
  }
  if (p.C_last != nullptr) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = (e & 2) ? row_hi : row_lo, col = 8 * j + 2 * t + (e & 1);
        p.C_last[cbase + i64(r) * p.DV + col] = Cacc[4 * j + e];
      }
  }
  if (owns_nm && Gate::kNormalize && p.n_last != nullptr && tid < DK) p.n_last[i64(sq.state) * DK + tid] = sm.nvec()[tid];
#else
  __trap();
#endif
}

}  // namespace tfla
