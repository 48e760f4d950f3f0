// tfla_cupy — gate policies and the in-chunk scans of the log gates (MLSTM_SPEC.md §1.2, §4.1, §7).
//
// GateExp (mLSTMexp): ι = ĩ, max-stabilized (m, M, the −10 row-max floor).
// GateSig<kNormalize> (mLSTMsig): ι = logσ(ĩ) <= 0, so no stabilizer: m ≡ 0, M ≡ 0, no floor;
// with kNormalize = false there is no normalizer N and h is the numerator.
// λ = logσ(f̃) for both. Gate arithmetic is fp32.
#pragma once
#include "common.cuh"

namespace tfla {

struct GateExp {
  static constexpr bool kStabilized = true;
  static constexpr bool kNormalize = true;
  __device__ static float log_input(float i) { return i; }
  // dĩ = dι · d(ι)/d(ĩ)
  __device__ static float d_log_input(float) { return 1.f; }
};

template <bool Normalize>
struct GateSig {
  static constexpr bool kStabilized = false;
  static constexpr bool kNormalize = Normalize;
  __device__ static float log_input(float i) { return logsigmoid(i); }
  __device__ static float d_log_input(float i) { return sigmoid(-i); }
};

constexpr float kRowMaxFloor = -10.f;  // MINIMUM_MAX_VAL of the exp variant

// ---------------------------------------------------------------------------------------------
// In-place inclusive scans of x[0, n) in shared memory by ONE warp (all 32 lanes call).
// Each lane sums a contiguous run sequentially, then the run totals are scanned across lanes:
// a sum of same-sign log gates keeps fp32 rounding proportional to the (small) partial sums.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void warp_scan_inclusive(float* x, int n) {
  const int lane = threadIdx.x & 31;
  const int per = cdiv(n, 32);
  const int lo = min(lane * per, n), hi = min(lo + per, n);
  float run = 0.f;
  for (int j = lo; j < hi; ++j) run += x[j];
  float incl = run;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  float acc = __shfl_up_sync(0xffffffffu, incl, 1);  // exclusive offset of this lane's run
  if (lane == 0) acc = 0.f;
  for (int j = lo; j < hi; ++j) {
    acc += x[j];
    x[j] = acc;
  }
  __syncwarp();
}

// Suffix (reverse inclusive) scan: x[j] <- Σ_{j' >= j} x[j'].
__device__ __forceinline__ void warp_scan_suffix(float* x, int n) {
  const int lane = threadIdx.x & 31;
  const int per = cdiv(n, 32);
  // lane 0 takes the last run, so shfl_up accumulates from the end
  const int hi = max(n - lane * per, 0), lo = max(hi - per, 0);
  float run = 0.f;
  for (int j = hi - 1; j >= lo; --j) run += x[j];
  float incl = run;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  float acc = __shfl_up_sync(0xffffffffu, incl, 1);  // exclusive offset of this lane's run
  if (lane == 0) acc = 0.f;
  for (int j = hi - 1; j >= lo; --j) {
    acc += x[j];
    x[j] = acc;
  }
  __syncwarp();
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Load λ_u = logσ(f̃) and ι_u for positions u in [lo, hi) of the chunk starting at token t0 of
// head bh; positions at or beyond `valid` (past the sequence end) get λ = 0, ι = −inf: they
// decay nothing and contribute nothing.
template <typename Gate>
__device__ __forceinline__ void load_log_gates(const float* i, const float* f, i64 base, int lo, int hi,
                                               int valid, float* lam, float* iota) {
  for (int u = lo + threadIdx.x; u < hi; u += blockDim.x) {
    const bool ok = u < valid;
    lam[u] = ok ? logsigmoid(f[base + u]) : 0.f;
    iota[u] = ok ? Gate::log_input(i[base + u]) : neg_inf();
  }
}

}  // namespace tfla
