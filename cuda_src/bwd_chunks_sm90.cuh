// tfla_cupy — the Hopper (sm_90a) backward token gradients dq, dk, dv (docs/math.md §6.3): the
// chunk product that chunk_mainloop.cuh computes on sm80,
//
//     acc = diag(row_scale) · X · D  +  (W ⊙ (X · Yᵀ)) · Z,   W[r][u] = exp2(row_log[r] + col_log[u])
//
// in its three backward roles (chunk_roles.cuh: which tensors X, Y, Z, D are, the direction of the
// triangle), on warpgroup MMA. The gate terms come from a per-chunk record (BwdRecord) that a pre-pass,
// bwd_terms_sm90_kernel, writes once per chunk: dq's exponents for each query half (causal_terms of
// gate_terms.cuh anchored at the half's first row) and the keys' inter-chunk factors. All three roles
// take W from the same exponents, so dq's and dk's P are the same bits by construction, and no CTA
// scans gates or waits on gate loads: the record lands with the first tile.
//
// A CTA is one warpgroup: 64 rows r0 .. r0 + 63 of a chunk (L = 128; r0 = 0 or 64) and every output
// column. Its tiles (64 rows × 64 columns) arrive as one stream of cp.async copies, kStages deep,
// into the 128-byte swizzled layout wgmma reads (rows past a ragged chunk's end zero-filled). The
// triangle reaches the key halves h (keys 64h .. 64h + 63) with causal h <= r0 / 64, anti-causal
// h >= r0 / 64; then
//   phase 1, per 64-column block b of the contraction dimension DX and reached half h:  Y_{b,h}
//            (with the first half, X_b into a resident copy of the CTA's X rows)
//            S_h += X_b · Y_{b,h}ᵀ
//            then P = W ⊙ S masked, as A fragments in registers (S is dead after it);
//   phase 2, per 64-column output block n of Z:  D_{n,b} for every b, then Z_{n,h} per reached half
//            acc (+)= X_b · D_{n,b}    inter-chunk term (D K-major or MN-major as the role stores it)
//            acc ← row_scale ⊙ acc   (dk: its dot with the CTA's rows R of k, E_σ = k_σ·acc_σ^inter)
//            acc += P_h · Z_{n,h}   (wgmma, A from registers, B MN-major; dq, dk: P and its rounding
//                                    residual Plo, so the pair products carry twice the dtype's digits)
//            and the output block's 64 columns leave (dq / dk: their dots with R, q_τ·dq_τ, k_σ·dk_σ).
// The gate gradients' per-token terms (docs/math.md §12.1): dq writes q_τ·dq_τ = W_τ + Σ_σ Z_τσ, dk
// Σ_τ Z_τσ = k_σ·dk_σ − E_σ and E_σ, where Z_τσ = P_τσ (q_τ·k_σ) are the pair terms. Their row sums
// (from dq) and column sums (from dk) cancel in the gate kernel's suffix sums to fp32 rounding because
// both kernels round the same P: the scores dS are the same products (dh·vᵀ, v·dhᵀ) and W comes from
// the same record.
// So the scores and the gate terms are formed once per half chunk, not once per output block.
// One warpgroup per CTA leaves it the registers of two score halves; three CTAs per SM (DX <= 256)
// overlap one's gate preparation and epilogue with the others' products. Shapes it does not
// cover use the sm80 kernels (tfla_cupy/config.py: bwd_sm90_unsupported).
#pragma once
#include "chunk_products_sm90.cuh"
#include "chunk_roles.cuh"
#include "coords.cuh"
#include "gate_terms.cuh"
#include "swizzle.cuh"

namespace tfla {

// A chunk's gate record (byte offsets), for chunk size kL = 128 in query halves of 64 rows:
//   row_log[τ]     query τ's row exponent (p_r − M_τ)·log2e + log2 fac_τ, anchored at its half's first row;
//   row_scale[τ]   query τ's inter-chunk factor fac_τ · exp(b_τ + m^(c) − M_τ)     (causal_terms, per half);
//   col_log[h][u]  κ_u·log2e anchored at half h's first row (keys u < that half's end; −inf past it);
//   key_scale[σ]   key σ's inter-chunk factor ā_σ = exp(R_σ + ι_σ − m^(c+1))        (key_scales).
// The weight of pair (τ, σ), σ <= τ, is exp2(row_log[τ] + col_log[τ / 64][σ]) in every role.
struct BwdRecord {
  static constexpr int kL = 128, kHalf = 64;
  static constexpr int kRowLog = 0, kRowScale = kRowLog + 8 * kL, kColLog = kRowScale + 4 * kL,
                       kKeyScale = kColLog + 2 * 8 * kL, kBytes = kKeyScale + 4 * kL;
  static_assert(kBytes % 16 == 0 && kL == 2 * kHalf, "16-byte pieces; two query halves");
};

// The record at `rec` as the gate preparation's view (gate_terms.cuh) of query half h (kRows = 64:
// causal_terms) or of all keys (kRows = 128, h = 0: prepare_anticausal, key_scales' row_scale is
// key_scale), with a scratch of 4·L doubles (λ, ι, scans, row sums).
template <int kRowsV>
struct BwdRecordView {
  static constexpr int kThreads = 128, kRows = kRowsV, kL = BwdRecord::kL;
  char* rec;
  double* scratch;
  int h;
  __device__ __forceinline__ float2* row_log() const {
    return reinterpret_cast<float2*>(rec + BwdRecord::kRowLog) + BwdRecord::kHalf * h;
  }
  __device__ __forceinline__ float* row_scale() const {
    return reinterpret_cast<float*>(rec + (kRows == kL ? BwdRecord::kKeyScale : BwdRecord::kRowScale)) +
           BwdRecord::kHalf * h;
  }
  __device__ __forceinline__ float2* col_log() const {
    return reinterpret_cast<float2*>(rec + BwdRecord::kColLog) + kL * h;
  }
  __device__ __forceinline__ double* lam() const { return scratch; }
  __device__ __forceinline__ double* iota() const { return scratch + kL; }
  __device__ __forceinline__ double* scan() const { return scratch + 2 * kL; }
  __device__ __forceinline__ double* row_d() const { return scratch + 3 * kL; }
};

// The pre-pass: every chunk slot's BwdRecord. Grid: chunk slots × B·NH, flattened.
template <typename Gate>
__global__ void __launch_bounds__(BwdRecordView<64>::kThreads) bwd_terms_sm90_kernel(const Params p) {
  constexpr int L = BwdRecord::kL, HB = BwdRecord::kHalf, NT = BwdRecordView<64>::kThreads;
  __shared__ __align__(16) char rec[BwdRecord::kBytes];
  __shared__ double scratch[4 * L];
  const ChunkAt at(p, blockIdx.x % p.NC, blockIdx.x / p.NC);
  const int Lc = at.Lc;
  if (Lc == 0) return;  // a surplus slot of packed input
  // what no preparation writes (rows and keys past the chunk's or a half's end) stays as here
  for (int u = threadIdx.x; u < L; u += NT) {
    const float2 none = make_float2(neg_inf(), 0.f);
    reinterpret_cast<float2*>(rec + BwdRecord::kRowLog)[u] = none;
    reinterpret_cast<float*>(rec + BwdRecord::kRowScale)[u] = 0.f;
    reinterpret_cast<float2*>(rec + BwdRecord::kColLog)[u] = none;
    reinterpret_cast<float2*>(rec + BwdRecord::kColLog)[L + u] = none;
  }
  __syncthreads();
  for (int h = 0; h * HB < Lc; ++h) causal_terms<Gate>(p, BwdRecordView<64>{rec, scratch, h}, at, h * HB);
  const BwdRecordView<L> keys{rec, scratch, 0};
  prepare_anticausal<Gate>(p, keys, at, 0, Lc);
  key_scales<Gate>(p, keys, at, 0);
  __syncthreads();
  uint4* dst = reinterpret_cast<uint4*>(p.gate_terms + at.slot(p) * (BwdRecord::kBytes / 4));
  for (int i = threadIdx.x; i < BwdRecord::kBytes / 16; i += NT) dst[i] = reinterpret_cast<const uint4*>(rec)[i];
}

// Shared-memory carve (bytes from a 1024-aligned base): the chunk's record, kStages stream slots of
// 8 KB (a tile: 64 rows × 128 bytes), then the resident X rows (DX / 64 blocks of 64 rows × 128 bytes).
struct BwdSm90Smem : SwizzledCarve {
  static constexpr int kL = 128, kBM = 64, kBX = 64, kBN = 64, kThreads = 128, kStages = 4;
  static constexpr int kRec = 0, kSlot = 64 * 128, kXBlk = kBM * 128;
  static constexpr int kStream = (kRec + BwdRecord::kBytes + 1023) / 1024 * 1024, kX = kStream + kStages * kSlot;
  // dynamic shared memory for a contraction dimension DX: the carve plus alignment slack
  __host__ __device__ static constexpr int bytes(int DX) { return kX + (DX / kBX) * kXBlk + 1024; }
  static_assert(kBX * 2 == 128 && kBN * 2 == 128, "blocks are whole 128-byte swizzle rows");
  static_assert(kThreads == 128 && kBM == 64 && kL == 2 * kBM, "one warpgroup, half a chunk");
  static_assert(kL == BwdRecord::kL && kBM == BwdRecord::kHalf, "the record's halves are the CTAs' rows");

  __device__ __forceinline__ char* slot(int i) const { return base + kStream + (i % kStages) * kSlot; }
  __device__ __forceinline__ char* x(int b) const { return base + kX + b * kXBlk; }
  __device__ __forceinline__ char* rec() const { return base + kRec; }
  // the record's fields (BwdRecord): per query τ, per key σ, and the keys' exponents of query half h
  __device__ __forceinline__ const float2* query_log() const { return at<float2>(kRec + BwdRecord::kRowLog); }
  __device__ __forceinline__ const float* query_scale() const { return at<float>(kRec + BwdRecord::kRowScale); }
  __device__ __forceinline__ const float2* key_log(int h) const {
    return at<float2>(kRec + BwdRecord::kColLog) + BwdRecord::kL * h;
  }
  __device__ __forceinline__ const float* key_scale() const { return at<float>(kRec + BwdRecord::kKeyScale); }
};

// Grid: 2 row halves × NC chunk slots × B·NH, flattened, row halves fastest; three CTAs per SM
// (168 registers).
template <typename T, typename Gate, typename Role>
__global__ void __launch_bounds__(BwdSm90Smem::kThreads, 3)
    bwd_chunk_sm90_kernel(const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Sm = BwdSm90Smem;
  constexpr bool kCausal = Role::kCausal, kDStoredZX = Role::kDStoredZX;
  constexpr bool kDQ = is_same<Role, RoleDQ>::value, kDK = is_same<Role, RoleDK>::value;
  static_assert(kDQ || kDK || is_same<Role, RoleDV>::value, "a backward role");
  constexpr int BM = Sm::kBM, kStages = Sm::kStages;
  const int DX = kDQ || kDK ? p.DV : p.DK, DZ = kDQ || kDK ? p.DK : p.DV;
  const int nXb = DX / Sm::kBX, nN = DZ / Sm::kBN;
  const int rt = blockIdx.x & 1, r0 = BM * rt;
  const ChunkAt at(p, (blockIdx.x >> 1) % p.NC, (blockIdx.x >> 1) / p.NC);
  const int Lc = at.Lc;
  if (r0 >= Lc) return;  // past a ragged chunk's end, or a surplus slot of packed input
  const Sm sm;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row_lo = 16 * warp + g, row_hi = row_lo + 8;  // this thread's rows (positions r0 + row)
  // the score halves the triangle reaches from these rows, and the key rows they need
  const int h_lo = kCausal ? 0 : rt, h_hi = kCausal ? rt : 1, nh = h_hi - h_lo + 1;
  constexpr bool kTerms = kDQ || kDK;  // phase 2's row dots of the gate gradients
  const int n1 = nXb * nh, per_n = nXb + nh, ntiles = n1 + nN * per_n;  // the stream: phase 1, per block n

  // the role's operands (chunk_roles.cuh), each at the chunk's first token
  const T *X, *Y, *Z;
  i64 ldX, ldY, ldZ;
  if constexpr (kDQ) {
    X = ptr<T>(p.dh) + at.tok(p.st_dh, 0), ldX = p.st_dh.t;
    Y = ptr<T>(p.v) + at.tok(p.st_v, 0), ldY = p.st_v.t;
    Z = ptr<T>(p.k) + at.tok(p.st_k, 0), ldZ = p.st_k.t;
  } else if constexpr (kDK) {
    X = ptr<T>(p.v) + at.tok(p.st_v, 0), ldX = p.st_v.t;
    Y = ptr<T>(p.dh) + at.tok(p.st_dh, 0), ldY = p.st_dh.t;
    Z = ptr<T>(p.q) + at.tok(p.st_q, 0), ldZ = p.st_q.t;
  } else {
    X = ptr<T>(p.k) + at.tok(p.st_k, 0), ldX = p.st_k.t;
    Y = ptr<T>(p.q) + at.tok(p.st_q, 0), ldY = p.st_q.t;
    Z = ptr<T>(p.dh) + at.tok(p.st_dh, 0), ldZ = p.st_dh.t;
  }
  const T* D = ptr<T>(kDQ ? p.C_states : p.dC_states) + at.slot(p) * p.DK * p.DV;
  // tile i of the stream (the header's order) into slot i % kStages; past the end, nothing
  auto issue = [&](int i) {
    if (i >= ntiles) return;
    char* slot = sm.slot(i);
    if (i < n1) {  // Y_{b,h}, with X_b before the first half
      const int b = i / nh, h = h_lo + i % nh, x0 = b * Sm::kBX;
      if (h == h_lo) load_sw128_async<T, Sm::kThreads>(sm.x(b), X + r0 * ldX + x0, ldX, BM, Lc - r0);
      load_sw128_async<T, Sm::kThreads>(slot, Y + (64 * h) * ldY + x0, ldY, 64, Lc - 64 * h);
      return;
    }
    const int j = i - n1, n = j / per_n, b = j % per_n, n0 = n * Sm::kBN, x0 = b * Sm::kBX;
    if (b >= nXb) {  // Z_{n,h}
      const int h = h_lo + b - nXb;
      load_sw128_async<T, Sm::kThreads>(slot, Z + (64 * h) * ldZ + n0, ldZ, 64, Lc - 64 * h);
    } else if constexpr (kDStoredZX) {  // D[z][x]: rows n0 .., K-major B
      load_sw128_async<T, Sm::kThreads>(slot, D + i64(n0) * DX + x0, DX, Sm::kBX, Sm::kBX);
    } else {                            // D[x][z]: rows x0 .., MN-major B
      load_sw128_async<T, Sm::kThreads>(slot, D + i64(x0) * DZ + n0, DZ, Sm::kBX, Sm::kBX);
    }
  };
  // the chunk's gate record, then the first kStages − 1 tiles: the record lands with tile 0
  {
    const char* rec = reinterpret_cast<const char*>(p.gate_terms + at.slot(p) * (BwdRecord::kBytes / 4));
    for (int k = tid; k < BwdRecord::kBytes / 16; k += Sm::kThreads) cp_async16(sm.rec() + 16 * k, rec + 16 * k, true);
  }
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    issue(i);
    cp_async_commit();
  }

  const bool ok_lo = r0 + row_lo < Lc, ok_hi = r0 + row_hi < Lc;
  // the next tile of the stream has landed for every thread, and the slot of the one before is free
  auto next_tile = [&](int i) {
    cp_async_wait<kStages - 2>();
    fence_async_smem();
    __syncthreads();
    issue(i + kStages - 1);
    cp_async_commit();
  };

  // ---- phase 1: scores, then P = W ⊙ S --------------------------------------------------------------
  // dq, dk: P + Plo, the pair products to twice the compute dtype's digits, so that the gate terms
  // (dots of the accumulators) are not P's rounding
  constexpr bool kResidual = kTerms;
  u32 P[8][4], Plo[8][4];
  {
    float S0[32], S1[32];
#pragma unroll
    for (int e = 0; e < 32; ++e) S0[e] = S1[e] = 0.f;
    for (int i = 0; i < n1; ++i) {
      next_tile(i);
      const int b = i / nh, h = h_lo + i % nh;
      fence_regs(S0);
      fence_regs(S1);
      wgmma_fence();
      if (h == 0) {
        bwd_score_products<T>(S0, sm.x(b), sm.slot(i), b > 0);
      } else {
        bwd_score_products<T>(S1, sm.x(b), sm.slot(i), b > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(S0);
      fence_regs(S1);
    }
    // W from the record: dq's rows are queries (their half's key exponents), dk's and dv's are keys
    // (their exponents in each query half they reach, against every query's row exponent)
    if (h_lo == 0) {
      const float2 *cl = kCausal ? sm.key_log(rt) : sm.query_log(), *rl = kCausal ? sm.query_log() : sm.key_log(0);
      bwd_p_half_parts<T, kCausal, KeyHalf::kLow, kResidual>(S0, cl, rl[r0 + row_lo], rl[r0 + row_hi], r0 + row_lo,
                                                             r0 + row_hi, t, Lc, P, Plo);
    }
    if (h_hi == 1) {
      const float2 *cl = kCausal ? sm.key_log(rt) : sm.query_log(), *rl = kCausal ? sm.query_log() : sm.key_log(1);
      bwd_p_half_parts<T, kCausal, KeyHalf::kHigh, kResidual>(S1, cl, rl[r0 + row_lo], rl[r0 + row_hi], r0 + row_lo,
                                                              r0 + row_hi, t, Lc, P, Plo);
    }
  }

  // ---- phase 2: output blocks ----------------------------------------------------------------------
  const float* scale = kCausal ? sm.query_scale() : sm.key_scale();
  const float sc_lo = scale[r0 + row_lo], sc_hi = scale[r0 + row_hi];
  T* out;
  i64 ldo;
  if constexpr (kDQ) {
    out = ptr<T>(p.dq) + at.tok(p.st_dq, r0), ldo = p.st_dq.t;
  } else if constexpr (kDK) {
    out = ptr<T>(p.dk) + at.tok(p.st_dk, r0), ldo = p.st_dk.t;
  } else {
    out = ptr<T>(p.dv) + at.tok(p.st_dv, r0), ldo = p.st_dv.t;
  }
  // dq / dk: the CTA's rows R of q (k), whose products the gate terms need.
  // R's columns n0 + 8jj + 2t (two values per register) of this thread's rows: the accumulator layout,
  // and the A-fragment layout of a 16-column step kk: {xs[2kk][0], xs[2kk][1], xs[2kk+1][0], xs[2kk+1][1]}
  auto load_rows = [&](u32 (&xs)[8][2], int n0) {
    // (the address is formed here from the parameters, not kept in registers through the phases)
    const T* src = kDQ ? ptr<T>(p.q) + at.tok(p.st_q, r0) : ptr<T>(p.k) + at.tok(p.st_k, r0);
    const i64 lds = kDQ ? p.st_q.t : p.st_k.t;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      xs[jj][0] = ok_lo ? *reinterpret_cast<const u32*>(src + row_lo * lds + n0 + 8 * jj + 2 * t) : 0u;
      xs[jj][1] = ok_hi ? *reinterpret_cast<const u32*>(src + row_hi * lds + n0 + 8 * jj + 2 * t) : 0u;
    }
  };
  // this thread's eight column pairs of R·acc, per row
  auto row_dots = [&](float& lo_sum, float& hi_sum, const float (&acc)[32], const u32 (&xs)[8][2]) {
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      const float2 lo = unpack2<T>(xs[jj][0]), hi = unpack2<T>(xs[jj][1]);
      lo_sum += acc[4 * jj] * lo.x + acc[4 * jj + 1] * lo.y;
      hi_sum += acc[4 * jj + 2] * hi.x + acc[4 * jj + 3] * hi.y;
    }
  };
  float dot_lo = 0.f, dot_hi = 0.f;      // dq / dk: Σ over every output block of R·acc (q·dq, k·dk), per row
  float inter_lo = 0.f, inter_hi = 0.f;  // dk: the same of the inter-chunk term alone, E_σ = k_σ·dk_σ^inter
  for (int n = 0; n < nN; ++n) {
    const int n0 = n * Sm::kBN, i0 = n1 + n * per_n;
    u32 xs[8][2];  // dq / dk: the block's columns of R, loaded where a dot needs them (registers are short)
    float acc[32];
    for (int b = 0; b < nXb; ++b) {  // acc = X · D_n
      next_tile(i0 + b);
      fence_regs(acc);
      wgmma_fence();
      bwd_inter_products<T, kDStoredZX>(acc, sm.x(b), sm.slot(i0 + b), b > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(acc);
    }
#pragma unroll
    for (int e = 0; e < 32; ++e) acc[e] *= (e & 2) ? sc_hi : sc_lo;
    if constexpr (kDK) {
      load_rows(xs, n0);
      row_dots(inter_lo, inter_hi, acc, xs);
    }
    for (int hh = 0; hh < nh; ++hh) {  // acc += P_h · Z_{n,h}
      next_tile(i0 + nXb + hh);
      fence_regs(acc);
      fence_regs(P);
      if constexpr (kResidual) fence_regs(Plo);
      wgmma_fence();
      if (h_lo + hh == 0) {
        bwd_pz_products<T, KeyHalf::kLow>(acc, P, sm.slot(i0 + nXb + hh));
        if constexpr (kResidual) bwd_pz_products<T, KeyHalf::kLow>(acc, Plo, sm.slot(i0 + nXb + hh));
      } else {
        bwd_pz_products<T, KeyHalf::kHigh>(acc, P, sm.slot(i0 + nXb + hh));
        if constexpr (kResidual) bwd_pz_products<T, KeyHalf::kHigh>(acc, Plo, sm.slot(i0 + nXb + hh));
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(acc);
      fence_regs(P);
      if constexpr (kResidual) fence_regs(Plo);
    }

    // the block's 64 columns of dq / dk / dv
    T* o = out + n0 + 2 * t;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      if (ok_lo) store2(o + row_lo * ldo + 8 * jj, acc[4 * jj], acc[4 * jj + 1]);
      if (ok_hi) store2(o + row_hi * ldo + 8 * jj, acc[4 * jj + 2], acc[4 * jj + 3]);
    }
    if constexpr (kTerms) {  // (R's block loaded here, not during the products: with Plo, no registers are left)
      load_rows(xs, n0);
      row_dots(dot_lo, dot_hi, acc, xs);
    }
  }

  // ---- the gate gradients' per-token terms (the quad's four threads hold a row's columns) ----------
  if constexpr (kTerms) {
    const i64 part = i64(p.BH) * p.S;  // one plane of per-token gate terms
    dot_lo = quad_sum(dot_lo);
    dot_hi = quad_sum(dot_hi);
    if constexpr (kDQ) {  // queries: q_τ·dq_τ = W_τ + Σ_σ Z_τσ, one plane
      if (t == 0 && ok_lo) p.q_terms[at.scratch_tok(p, r0 + row_lo)] = dot_lo;
      if (t == 0 && ok_hi) p.q_terms[at.scratch_tok(p, r0 + row_hi)] = dot_hi;
    } else {  // keys: Σ_τ Z_τσ = k_σ·dk_σ − E_σ, and E_σ; one part
      inter_lo = quad_sum(inter_lo);
      inter_hi = quad_sum(inter_hi);
      auto put = [&](int row, float dot, float e) {
        const i64 r = at.scratch_tok(p, r0 + row);
        p.k_terms[r] = dot - e;
        p.k_terms[p.k_parts * part + r] = e;
      };
      if (t == 0 && ok_lo) put(row_lo, dot_lo, inter_lo);
      if (t == 0 && ok_hi) put(row_hi, dot_hi, inter_hi);
    }
  }
#else
  __trap();
#endif
}

}  // namespace tfla
