// tfla_cupy — backward stage 3: gate gradients, fp32 (docs/math.md §6.3, §6.5, §7, §12.1).
//
// The direct form: for token t of chunk c, from the terms the dq / dk kernels and the reverse dC
// pass wrote (sums over pairs of one sign structure, nothing cancels between long sums),
//
//   dι_t = Σ_{τ>=t} Z_τt + E_t                                      (keys: k_terms' two planes)
//   dλ_t = Σ_{u>=t} (W_u + Σ_{σ<=u} Z_uσ − Σ_{τ>=u} Z_τu) + Σ_{σ<t} E_σ + B_c     (sums inside the chunk)
//   dĩ_t = dι_t (exp) or dι_t·σ(−ĩ_t) (sig),   df̃_t = dλ_t·dλ/df̃ (σ(−f̃_t) above the floor)
//
// The suffix sum collects the intra-chunk pairs that cross t and the queries at or after t whose
// keys lie before the chunk (W); the prefix sum the keys before t whose queries lie after the
// chunk (E); B_c = γ_c ⟨dC^(c+1), C^(c)⟩ the pairs that cross the whole chunk (with dC^(nc) =
// dC_last, the gradient through the last state, §6.5, is inside it). Every sum has a fixed order
// (parts in index order, scans in double), so two runs give bit-identical gradients.
// Grid: one warp per chunk slot and batch·head, kGateWarps to a CTA. Each lane takes a contiguous
// run of the chunk's tokens; the runs' totals are scanned across the lanes (shuffles, in double), so
// no shared memory and no block barrier.
#pragma once
#include "coords.cuh"
#include "gates.cuh"

namespace tfla {

constexpr int kGateThreads = 256;
constexpr int kGateWarps = kGateThreads / 32;  // chunk slots per CTA

template <typename Gate>
__global__ void __launch_bounds__(kGateThreads) bwd_gates_kernel(const Params p) {
  const int lane = threadIdx.x & 31;
  const int slot = blockIdx.x * kGateWarps + (threadIdx.x >> 5);
  if (slot >= p.NC * p.BH) return;
  const ChunkAt at(p, slot % p.NC, slot / p.NC);
  const int Lc = at.Lc;
  if (Lc == 0) return;  // a surplus slot of packed input
  const i64 part = i64(p.BH) * p.S;
  const float* kz = p.k_terms;                          // Σ_τ Z_τσ
  const float* ke = p.k_terms + i64(p.k_parts) * part;  // E_σ
  auto sum_parts = [&](const float* x, int parts, i64 row) {
    float s = 0.f;
    for (int j = 0; j < parts; ++j) s += x[j * part + row];
    return s;
  };
  // token t's E_t and x_t = (W + row sums)_t − (column sums)_t; dĩ on the way
  auto terms = [&](int t, double& e, double& x, bool write_di) {
    const i64 row = at.scratch_tok(p, t);
    const float z = sum_parts(kz, p.k_parts, row), ev = sum_parts(ke, p.k_parts, row);
    e = ev;
    x = double(sum_parts(p.q_terms, p.q_parts, row)) - double(z);
    if (write_di) p.di[at.tok(p.st_di, t)] = (z + ev) * Gate::d_log_input(p.i[at.tok(p.st_i, t)]);
  };

  // B_c: the parts in index order
  float B = 0.f;
  for (int j = 0; j < p.state_parts; ++j) B += p.state_terms[i64(j) * p.BH * p.NC + at.slot(p)];

  // this lane's run [lo, hi) and its totals; then Σ E over the runs before it, Σ x over those after it
  const int per = cdiv(Lc, 32), lo = min(lane * per, Lc), hi = min(lo + per, Lc);
  double run_e = 0.0, run_x = 0.0;
  for (int t = lo; t < hi; ++t) {
    double e, x;
    terms(t, e, x, true);
    run_e += e;
    run_x += x;
  }
  double before_e = run_e, after_x = run_x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, before_e, o), z = __shfl_down_sync(0xffffffffu, after_x, o);
    if (lane >= o) before_e += y;
    if (lane + o < 32) after_x += z;
  }
  before_e -= run_e;  // (exclusive: the scans were inclusive of this lane's run)
  after_x -= run_x;

  // backwards through the run: suffix Σ_{u>=t} x_u and prefix Σ_{σ<t} E_σ; df
  double suffix = after_x, rest_e = 0.0;
  for (int t = hi - 1; t >= lo; --t) {
    double e, x;
    terms(t, e, x, false);
    suffix += x;
    rest_e += e;  // Σ_{u=t..hi−1} E_u
    const double dlam = suffix + (before_e + (run_e - rest_e)) + double(B);
    p.df[at.tok(p.st_df, t)] = float(dlam) * d_log_forget(p.f[at.tok(p.st_f, t)]);
  }
}

}  // namespace tfla
