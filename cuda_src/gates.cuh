// tfla_cupy — gate policies and the in-chunk scans of the log gates (docs/math.md §1.2, §4.1, §7).
//
// GateExp (mLSTMexp): ι = ĩ, max-stabilized (m, M, the −10 row-max floor).
// GateSig<kNormalize> (mLSTMsig): ι = logσ(ĩ) <= 0, so no stabilizer: m ≡ 0, M ≡ 0, no floor;
// with kNormalize = false there is no normalizer N and h is the numerator.
// λ = logσ(f̃) for both. Gate transcendentals are fp32; in-chunk sums of log gates are double.
#pragma once
#include "common.cuh"

namespace tfla {

// Special gate values (docs/math.md §1.2). The log gates are floored, NaN kept as NaN:
//   λ = max(logσ(f̃), −10⁴): e^{−10⁴} is exactly 0 in every floating format, so the floor
//       changes no output; it makes f̃ = −∞ a defined reset (the state before the token is
//       dropped) instead of −∞ − (−∞) = NaN in the in-chunk sums. dλ/df̃ = 0 where it is active.
//   ι = max(ι, −10³⁰): ĩ = −∞ makes the token write nothing (weight exactly 0), with dι/dĩ = 0.
// The same floors are in tfla_cupy/reference/gates.py.
constexpr float kLogForgetFloor = -1e4f;
constexpr float kLogInputFloor = -1e30f;

// max(x, lo) that keeps NaN (fmaxf would turn a NaN gate into a silent reset).
__device__ __forceinline__ float floor_keep_nan(float x, float lo) { return x < lo ? lo : x; }

__device__ __forceinline__ float log_forget(float f) { return floor_keep_nan(logsigmoid(f), kLogForgetFloor); }
// df̃ = dλ · dλ/df̃
// (logσ(f̃) = f̃ exactly in fp32 below −88, so the floor is active exactly where f̃ < −10⁴)
__device__ __forceinline__ float d_log_forget(float f) { return f < kLogForgetFloor ? 0.f : sigmoid(-f); }

struct GateExp {
  static constexpr bool kStabilized = true;
  static constexpr bool kNormalize = true;
  __device__ static float log_input(float i) { return floor_keep_nan(i, kLogInputFloor); }
  // dĩ = dι · d(ι)/d(ĩ)
  __device__ static float d_log_input(float i) { return i < kLogInputFloor ? 0.f : 1.f; }
};

template <bool Normalize>
struct GateSig {
  static constexpr bool kStabilized = false;
  static constexpr bool kNormalize = Normalize;
  __device__ static float log_input(float i) { return floor_keep_nan(logsigmoid(i), kLogInputFloor); }
  __device__ static float d_log_input(float i) { return i < kLogInputFloor ? 0.f : sigmoid(-i); }
};

constexpr float kRowMaxFloor = -10.f;  // MINIMUM_MAX_VAL of the exp variant
// The stabiliser of the empty state (C = 0, n = 0): −∞ in effect (every stabiliser reached from it
// is a log gate sum of at least one token), finite so that no ∞ − ∞ appears in an exponent.
// tfla_cupy.distributed.EMPTY_M is the same number.
constexpr float kEmptyM = -1e30f;

// ---------------------------------------------------------------------------------------------
// In-place scans of x[0, n) in shared memory by ONE warp (all 32 lanes call), in double: a long
// sum of log gates (|Σλ| reaches hundreds for strong forgetting or large chunks) must keep the
// *differences* of partial sums exact, which fp32 running sums do not (their rounding grows with
// the sum's magnitude and was measured at 1e-5..2e-4 relative in h). Each lane sums a
// contiguous run, the run totals are scanned across lanes.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ double shfl_up(double x, int o) { return __shfl_up_sync(0xffffffffu, x, o); }

__device__ __forceinline__ void warp_scan_inclusive(double* x, int n) {
  const int lane = threadIdx.x & 31;
  const int per = cdiv(n, 32);
  const int lo = min(lane * per, n), hi = min(lo + per, n);
  double run = 0.0;
  for (int j = lo; j < hi; ++j) run += x[j];
  double incl = run;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double y = shfl_up(incl, o);
    if (lane >= o) incl += y;
  }
  double acc = shfl_up(incl, 1);  // exclusive offset of this lane's run
  if (lane == 0) acc = 0.0;
  for (int j = lo; j < hi; ++j) {
    acc += x[j];
    x[j] = acc;
  }
  __syncwarp();
}

// Suffix (reverse inclusive) scan: x[j] <- Σ_{j' >= j} x[j'].
__device__ __forceinline__ void warp_scan_suffix(double* x, int n) {
  const int lane = threadIdx.x & 31;
  const int per = cdiv(n, 32);
  // lane 0 takes the last run, so shfl_up accumulates from the end
  const int hi = max(n - lane * per, 0), lo = max(hi - per, 0);
  double run = 0.0;
  for (int j = hi - 1; j >= lo; --j) run += x[j];
  double incl = run;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double y = shfl_up(incl, o);
    if (lane >= o) incl += y;
  }
  double acc = shfl_up(incl, 1);
  if (lane == 0) acc = 0.0;
  for (int j = hi - 1; j >= lo; --j) {
    acc += x[j];
    x[j] = acc;
  }
  __syncwarp();
}

// dst[j] = max_{j' <= j} src[j'] for j in [0, n), by ONE warp.
__device__ __forceinline__ void warp_scan_max(double* dst, const double* src, int n) {
  const int lane = threadIdx.x & 31;
  const int per = cdiv(n, 32);
  const int lo = min(lane * per, n), hi = min(lo + per, n);
  double run = -1e300;
  for (int j = lo; j < hi; ++j) run = fmax(run, src[j]);
  double incl = run;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double y = shfl_up(incl, o);
    if (lane >= o) incl = fmax(incl, y);
  }
  double acc = shfl_up(incl, 1);
  if (lane == 0) acc = -1e300;
  for (int j = lo; j < hi; ++j) {
    acc = fmax(acc, src[j]);
    dst[j] = acc;
  }
  __syncwarp();
}

// A double as an unevaluated sum hi + lo of two floats. Exponents of the gate matrix are formed
// as (row.hi + col.hi) + (row.lo + col.lo): the large, opposite parts cancel in the first sum
// with an error relative to the (small) result, so fp32 keeps the accuracy of the double terms.
__device__ __forceinline__ float2 split(double x) {
  const float hi = float(x);
  return make_float2(hi, float(x - double(hi)));
}
__device__ __forceinline__ float add_split(float2 a, float2 b) { return (a.x + b.x) + (a.y + b.y); }

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Load λ_u = log_forget(f̃) and ι_u for positions u in [lo, hi) of a chunk: the gates of position u
// are i[u·si], f[u·sf] (element strides of the token axis); positions at or beyond `valid` (past
// the sequence end) get λ = 0, ι = −inf: they decay nothing and contribute nothing.
template <typename Gate>
__device__ __forceinline__ void load_log_gates(const float* i, i64 si, const float* f, i64 sf, int lo, int hi,
                                               int valid, double* lam, double* iota) {
  for (int u = lo + threadIdx.x; u < hi; u += blockDim.x) {
    const bool ok = u < valid;
    lam[u] = ok ? double(log_forget(f[u * sf])) : 0.0;
    iota[u] = ok ? double(Gate::log_input(i[u * si])) : double(neg_inf());
  }
}

}  // namespace tfla
