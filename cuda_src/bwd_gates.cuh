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
// Grid: one CTA of kGateThreads per chunk slot and batch·head; a chunk longer than the block is
// taken kGateThreads tokens at a time.
#pragma once
#include "coords.cuh"
#include "gates.cuh"

namespace tfla {

constexpr int kGateThreads = 256;
constexpr int kGateMaxChunk = 1024;  // the largest chunk size (the prefix sums are kept in shared memory)

// (the minimum of one CTA per SM lets ptxas use the registers it needs: with the thread count alone it held
// this kernel to 32 registers and spilled)
template <typename Gate>
__global__ void __launch_bounds__(kGateThreads, 1) bwd_gates_kernel(const Params p) {
  __shared__ double warp_tot[32];
  __shared__ double total;
  __shared__ double prefix[kGateMaxChunk];  // Σ_{σ<t} E_σ
  const ChunkAt at(p, blockIdx.x % p.NC, blockIdx.x / p.NC);
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

  // B_c: the parts in index order
  float B = 0.f;
  for (int j = 0; j < p.state_parts; ++j) B += p.state_terms[i64(j) * p.BH * p.NC + at.slot(p)];

  // pass 1, forwards: the exclusive prefix sums of E; dι
  double carry = 0.0;
  for (int start = 0; start < Lc; start += blockDim.x) {
    const int t = start + int(threadIdx.x);
    double e = 0.0;
    if (t < Lc) {
      const i64 row = at.scratch_tok(p, t);
      const float z = sum_parts(kz, p.k_parts, row), ev = sum_parts(ke, p.k_parts, row);
      e = ev;
      p.di[at.tok(p.st_di, t)] = (z + ev) * Gate::d_log_input(p.i[at.tok(p.st_i, t)]);
    }
    const double incl = block_scan(e, warp_tot, &total) + carry;
    if (t < Lc) prefix[t] = incl - e;
    carry += total;
  }
  __syncthreads();

  // pass 2, backwards: the suffix sums of W + row sums − column sums; df
  carry = 0.0;
  for (int end = Lc; end > 0; end -= blockDim.x) {
    const int t = end - 1 - int(threadIdx.x);  // thread 0 takes the latest token of the piece
    double x = 0.0;
    if (t >= 0) {
      const i64 row = at.scratch_tok(p, t);
      x = double(sum_parts(p.q_terms, p.q_parts, row)) - double(sum_parts(kz, p.k_parts, row));
    }
    const double suffix = block_scan(x, warp_tot, &total) + carry;  // Σ_{u = t .. Lc−1} x_u
    if (t >= 0) {
      const double dlam = suffix + prefix[t] + double(B);
      p.df[at.tok(p.st_df, t)] = float(dlam) * d_log_forget(p.f[at.tok(p.st_f, t)]);
    }
    carry += total;
  }
}

}  // namespace tfla
