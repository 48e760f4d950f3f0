// tfla_cupy — one token of the recurrence for inference (docs/math.md §2.1, §8), fp32 states.
//
//   m' = max(λ + m, ι) (exp; 0 for sig),  α = e^{λ + m − m'},  β = e^{ι − m'}
//   C' = α C + β k vᵀ,  n' = α n + β k,  h = C'ᵀ(s q) / (max(|n'·(s q)|, e^{−m'}) + ε)
//
// Decode is a stream of the state C through HBM (read once, written once; docs/performance.md §2a),
// so step_kernel is laid out like a copy kernel:
//   grid  = B·NH × (DV slabs); a CTA owns one DV slab of 4·lanes columns of one head and walks all
//           DK rows of it; thread (row group g, lane c) owns float4 column c of rows g, g + G, ...
//           (G = kStepThreads / lanes row groups): 16-byte loads and stores, kStepUnroll rows'
//           loads in flight per thread before the first store.
//   h     = Σ_rows (s q_row) C'_row: per-thread partial sums, then a fixed-order tree over the row
//           groups in shared memory — deterministic, no atomics.
//   n', den are DK values: every CTA recomputes den = (s q)·(α n + β k) from the OLD n.
// In place (C_last == C0 etc.) is safe: every element of C is loaded and stored by the same
// thread, the load first. n and m are read by every CTA of a head, so when they are updated in
// place a second, tiny kernel (step_nm_kernel, launched after this one on the same stream)
// writes n' and m'; with separate output buffers step_kernel writes them itself (nm_here).
//
// State slots (continuous batching): with state_indices, batch row b reads and updates pool row
// state_indices[b] (rows of (P, NH, ...) pools); −1 skips the row (state untouched, h = 0) and an
// index outside [−1, P) also skips it but writes h = NaN, so the bug is visible.
//
// lanes (a power of two in [2, 32]) is picked on the host (tfla_cupy/config.py step_lanes) so
// that small batches still launch enough CTAs to fill the SMs.
#pragma once
#include "gates.cuh"

namespace tfla {

// Mirrored field for field by tfla_cupy/_params.py (STEP_FIELDS); a CPU test checks the layout.
// Token arrays are contiguous (B·NH, D); states are contiguous rows of (rows, DK, DV) / (rows, DK)
// / (rows) where rows is B·NH, or P·NH for a pool addressed through state_indices.
struct StepParams {
  const void* q;              // (BH, DK), dtype T
  const void* k;              // (BH, DK), dtype T
  const void* v;              // (BH, DV), dtype T
  const float* i;             // (BH) input-gate pre-activation
  const float* f;             // (BH) forget-gate pre-activation
  const float* C0;            // state before the token; null = zeros (m0 = 0)
  const float* n0;
  const float* m0;
  void* h;                    // (BH, DV), dtype T
  float* C_last;              // state after the token; may alias C0, n0, m0
  float* n_last;
  float* m_last;
  const int* state_indices;   // (B) pool rows, or null: row bh of the state is batch row bh
  int BH;                     // B * NH
  int NH;
  int DK;
  int DV;
  int P;                      // pool rows (only with state_indices)
  int lanes;                  // float4 columns per DV slab
  int nm_here;                // 1: step_kernel writes n_last, m_last (they alias nothing)
  float scale;
  float eps;
};

constexpr int kStepThreads = 256;
constexpr int kStepUnroll = 8;     // float4 loads of C in flight per thread
constexpr int kStepNmThreads = 128;
constexpr int kStepMaxDK = 512;

// The state row of head bh: >= 0, or −1 (skip, h = 0), or −2 (bad index: skip, h = NaN).
__device__ __forceinline__ i64 step_state_row(const StepParams& p, int bh) {
  if (p.state_indices == nullptr) return bh;
  const int b = bh / p.NH, head = bh - b * p.NH;
  const int slot = p.state_indices[b];
  if (slot == -1) return -1;
  if (slot < -1 || slot >= p.P) return -2;
  return i64(slot) * p.NH + head;
}

// α, β, m' of one head from the gates and the old m (docs/math.md §2.1).
template <typename Gate>
struct StepGates {
  float alpha, beta, m_new;
  __device__ __forceinline__ StepGates(const StepParams& p, int bh, i64 row) {
    const float lam = log_forget(p.f[bh]), iota = Gate::log_input(p.i[bh]);
    const float m = (Gate::kStabilized && p.m0 != nullptr) ? p.m0[row] : 0.f;
    m_new = Gate::kStabilized ? fmaxf(lam + m, iota) : 0.f;
    alpha = expf(lam + m - m_new);
    beta = expf(iota - m_new);
  }
};

template <typename T>
__device__ __forceinline__ float4 load4(const T* x) {
  if constexpr (sizeof(T) == 4) {
    return *reinterpret_cast<const float4*>(x);
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(x);  // 4 × 16 bit, 8-byte aligned (DV % 8 == 0)
    const u16* e = reinterpret_cast<const u16*>(&raw);
    return make_float4(to_float(T{e[0]}), to_float(T{e[1]}), to_float(T{e[2]}), to_float(T{e[3]}));
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* x, float4 y) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(x) = y;
  } else {
    *reinterpret_cast<uint2*>(x) = make_uint2(pack2<T>(y.x, y.y), pack2<T>(y.z, y.w));
  }
}

__device__ __forceinline__ float4 fma4(float a, float4 x, float4 y) {
  return make_float4(fmaf(a, x.x, y.x), fmaf(a, x.y, y.y), fmaf(a, x.z, y.z), fmaf(a, x.w, y.w));
}
__device__ __forceinline__ float4 add4(float4 x, float4 y) {
  return make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
}

template <typename T, typename Gate>
__global__ void __launch_bounds__(kStepThreads, 4) step_kernel(const StepParams p) {
  __shared__ float q_smem[kStepMaxDK];  // s q
  __shared__ float k_smem[kStepMaxDK];
  __shared__ float4 part_smem[kStepThreads];  // (row group, lane) partial sums of h
  __shared__ float warp_smem[kStepThreads / 32];
  __shared__ float den_floor_smem;  // e^{−m'}, the lower bound of the normalizer

  const int DV4 = p.DV / 4, lanes = p.lanes, groups = kStepThreads / lanes;
  const int slabs = cdiv(DV4, lanes);
  const int slab = blockIdx.x % slabs, bh = blockIdx.x / slabs;
  const int lane = threadIdx.x % lanes, group = threadIdx.x / lanes;
  const int col4 = slab * lanes + lane;
  const bool active = col4 < DV4;
  T* h = ptr<T>(p.h) + i64(bh) * p.DV + 4 * col4;

  const i64 row = step_state_row(p, bh);  // uniform over the CTA
  if (row < 0) {
    const float fill = row == -1 ? 0.f : __int_as_float(0x7fc00000);
    if (group == 0 && active) store4(h, make_float4(fill, fill, fill, fill));
    return;
  }
  const StepGates<Gate> g(p, bh, row);

  const T* q = ptr<T>(p.q) + i64(bh) * p.DK;
  const T* k = ptr<T>(p.k) + i64(bh) * p.DK;
  float den_part = 0.f;
  for (int d = threadIdx.x; d < p.DK; d += kStepThreads) {
    const float qd = p.scale * to_float(q[d]), kd = to_float(k[d]);
    q_smem[d] = qd;
    k_smem[d] = kd;
    if constexpr (Gate::kNormalize) {
      const float n_old = p.n0 != nullptr ? p.n0[row * p.DK + d] : 0.f;
      const float n_new = fmaf(g.alpha, n_old, g.beta * kd);
      if (p.nm_here && slab == 0) p.n_last[row * p.DK + d] = n_new;
      den_part = fmaf(qd, n_new, den_part);
    }
  }
  if (threadIdx.x == 0) {
    den_floor_smem = expf(-g.m_new);
    if (Gate::kStabilized && p.nm_here && slab == 0) p.m_last[row] = g.m_new;
  }
  if constexpr (Gate::kNormalize) {
    den_part = warp_sum(den_part);
    if ((threadIdx.x & 31) == 0) warp_smem[threadIdx.x >> 5] = den_part;
  }
  __syncthreads();

  // ---- the stream: C'[d, cols] = α C[d, cols] + (β v[cols]) k[d]; acc += (s q[d]) C'[d, cols]
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (active) {
    const float4 bv = fma4(g.beta, load4(ptr<T>(p.v) + i64(bh) * p.DV + 4 * col4), make_float4(0.f, 0.f, 0.f, 0.f));
    const i64 head_off = row * p.DK * DV4 + col4, stride = i64(groups) * DV4;
    const float4* C_in = p.C0 != nullptr ? reinterpret_cast<const float4*>(p.C0) + head_off + group * DV4 : nullptr;
    float4* C_out = reinterpret_cast<float4*>(p.C_last) + head_off + group * DV4;
    const float* q_row = q_smem + group;
    const float* k_row = k_smem + group;
    for (int d0 = group; d0 < p.DK; d0 += kStepUnroll * groups) {
      const int rows = min(kStepUnroll, cdiv(p.DK - d0, groups));  // rows d0 + u·groups < DK
      float4 c[kStepUnroll];
#pragma unroll
      for (int u = 0; u < kStepUnroll; ++u)
        c[u] = (C_in != nullptr && u < rows) ? C_in[u * stride] : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int u = 0; u < kStepUnroll; ++u) {
        if (u < rows) {
          const float kd = k_row[u * groups], qd = q_row[u * groups];
          const float4 c_new = make_float4(fmaf(g.alpha, c[u].x, kd * bv.x), fmaf(g.alpha, c[u].y, kd * bv.y),
                                           fmaf(g.alpha, c[u].z, kd * bv.z), fmaf(g.alpha, c[u].w, kd * bv.w));
          C_out[u * stride] = c_new;
          acc = fma4(qd, c_new, acc);
        }
      }
      if (C_in != nullptr) C_in += kStepUnroll * stride;
      C_out += kStepUnroll * stride;
      q_row += kStepUnroll * groups;
      k_row += kStepUnroll * groups;
    }
  }

  // ---- h = Σ over row groups, a fixed-order tree (deterministic)
  part_smem[threadIdx.x] = acc;
  __syncthreads();
  for (int half = groups / 2; half > 0; half /= 2) {
    if (group < half) part_smem[threadIdx.x] = add4(part_smem[threadIdx.x], part_smem[threadIdx.x + half * lanes]);
    __syncthreads();
  }
  if (group == 0 && active) {
    float4 num = part_smem[lane];
    if constexpr (Gate::kNormalize) {
      float den = 0.f;
      for (int w = 0; w < kStepThreads / 32; ++w) den += warp_smem[w];
      const float inv = 1.f / (fmaxf(fabsf(den), den_floor_smem) + p.eps);
      num = make_float4(num.x * inv, num.y * inv, num.z * inv, num.w * inv);
    }
    store4(h, num);
  }
}

// n' and m' when they are updated in place (after step_kernel on the same stream): one CTA per
// head, every thread reads the old m before thread 0 overwrites it; each n element is read and
// written by one thread.
template <typename T, typename Gate>
__global__ void __launch_bounds__(kStepNmThreads) step_nm_kernel(const StepParams p) {
  const int bh = blockIdx.x;
  const i64 row = step_state_row(p, bh);
  if (row < 0) return;
  const StepGates<Gate> g(p, bh, row);
  if constexpr (Gate::kNormalize) {
    const T* k = ptr<T>(p.k) + i64(bh) * p.DK;
    for (int d = threadIdx.x; d < p.DK; d += kStepNmThreads) {
      const float n_old = p.n0 != nullptr ? p.n0[row * p.DK + d] : 0.f;
      p.n_last[row * p.DK + d] = fmaf(g.alpha, n_old, g.beta * to_float(k[d]));
    }
  }
  if constexpr (Gate::kStabilized) {
    __syncthreads();
    if (threadIdx.x == 0) p.m_last[row] = g.m_new;
  }
}

}  // namespace tfla
