// tfla_cupy — the tiled chunk-parallel main loop shared by the forward output pass and the
// backward dq / dk / dv passes (docs/math.md §4.3, §5.3, §5.5, §6.3).
//
// One CTA owns kBM rows (positions r0 .. r0+kBM of chunk c) and kBN output columns n0 .. n0+kBN
// of the "Z" head dimension. It computes
//
//     acc = diag(row_scale) · X_rows · D  +  Σ_{column tiles j} (W_j ⊙ (X_rows · Y_jᵀ)) · Z_j
//     W[r][u] = exp2(row_log[r] + col_log[u])  for u ≤ r (causal) or u ≥ r (anti-causal)
//
// where X, Y, Z are token tensors of the chunk, D is a DX × DZ boundary state (C or dC), and
// all gate information is folded into the two log2 vectors (plus the per-row inter scale):
//
//   role     rows  X    Y    Z    D                    direction
//   fwd h    τ     q    k    v    C^(c)   [DK][DV]     causal       (+ row sums: denominator)
//   bwd dq   τ     dh   v    k    C^(c)   [DK][DV]ᵀ    causal
//   bwd dv   σ     k    q    dh   dC^(c+1)[DK][DV]     anti-causal
//   bwd dk   σ     v    dh   q    dC^(c+1)[DK][DV]ᵀ    anti-causal
//
// The stabilizer of the exp variant depends only on the gates, never on q·k, so M is known
// before the first product: no online rescaling of acc is needed (unlike softmax attention).
// The contraction dimension DX is processed in kBX-column blocks; when DX <= kBX the X tile
// stays in shared memory for the whole CTA. Loads use cp.async: the Z tile of step j is in
// flight while the score tile of step j is computed.
#pragma once
#include "chunk_roles.cuh"
#include "config.cuh"
#include "coords.cuh"
#include "gates.cuh"
#include "tile.cuh"

namespace tfla {

// Grid (output-column blocks × row tiles × chunk slots × batch·head), flattened: this CTA's
// output block n0, first row r0 (position inside the chunk) and chunk (ChunkAt: sequence,
// chunk index, valid positions Lc; Lc = 0 for a surplus slot of packed input).
template <typename Tile>
struct ChunkCoords : ChunkAt {
  int jn, n0, r0;
  __device__ ChunkCoords(const Params& p, int DZ)
      : ChunkAt(p, (blockIdx.x / (cdiv(DZ, Tile::kBN) * cdiv(p.L, Tile::kBM))) % p.NC,
                blockIdx.x / (cdiv(DZ, Tile::kBN) * cdiv(p.L, Tile::kBM) * p.NC)) {
    const int nN = cdiv(DZ, Tile::kBN);
    jn = blockIdx.x % nN;
    n0 = jn * Tile::kBN;
    r0 = ((blockIdx.x / nN) % cdiv(p.L, Tile::kBM)) * Tile::kBM;
  }
};

// Shared-memory layout of a chunk CTA (see ChunkTile::smem_bytes). Every address is the
// dynamic shared-memory symbol plus an offset that is a compile-time constant for the tiles and
// row vectors, and a multiple of L for the gate vectors: no pointer registers are spent on it.
template <typename T, typename Tile>
struct ChunkSmem {
  static constexpr int E = int(sizeof(T));
  static constexpr int ldx = smem_stride<T>(Tile::kBX), ldz = smem_stride<T>(Tile::kBN),
                       ldw = smem_stride<T>(Tile::kBL);
  static constexpr int kXs = 0, kYs = kXs + Tile::kBM * ldx * E, kZs = kYs + Tile::kBL * ldx * E,
                       kDs = kZs + Tile::kBL * ldz * E, kWs = kDs + Tile::d_elems(E) * E,
                       kRowLog = kWs + Tile::kBM * ldw * E, kRowD = kRowLog + 8 * Tile::kBM,
                       kRowScale = kRowD + 8 * Tile::kBM, kRowM = kRowScale + 4 * Tile::kBM,
                       kRowN = kRowM + 4 * Tile::kBM, kRowAux = kRowN + 4 * Tile::kBM,
                       kRowPart = kRowAux + 4 * Tile::kBM, kNvec = kRowPart + 4 * Tile::kWN * Tile::kBM,
                       kGates = kNvec + 4 * Tile::kBX;
  static_assert(kGates % 16 == 0, "gate vectors must stay 16-byte aligned");
  // the carve is the size: fixed part, then 4 gate vectors of L 8-byte entries
  static_assert(kGates + 32 == Tile::smem_bytes(E, 1) && kGates + 32 * 1024 == Tile::smem_bytes(E, 1024),
                "ChunkSmem carve and ChunkTile::smem_bytes disagree");
  static constexpr int kThreads = Tile::kThreads, kRows = Tile::kBM;  // what prepare_causal needs
  int L;
  __device__ explicit ChunkSmem(int L_) : L(L_) {}
  template <typename U> __device__ __forceinline__ U* at(int off) const {
    return reinterpret_cast<U*>(dynamic_smem() + off);
  }
  __device__ __forceinline__ T* Xs() const { return at<T>(kXs); }
  __device__ __forceinline__ T* Ys() const { return at<T>(kYs); }
  __device__ __forceinline__ T* Zs() const { return at<T>(kZs); }
  __device__ __forceinline__ T* Ds() const { return at<T>(kDs); }
  __device__ __forceinline__ T* Ws() const { return at<T>(kWs); }
  __device__ __forceinline__ float2* row_log() const { return at<float2>(kRowLog); }  // row exponent terms
  __device__ __forceinline__ double* row_d() const { return at<double>(kRowD); }      // p_τ or R_σ
  __device__ __forceinline__ float* row_scale() const { return at<float>(kRowScale); }
  __device__ __forceinline__ float* row_M() const { return at<float>(kRowM); }
  __device__ __forceinline__ float* row_N() const { return at<float>(kRowN); }
  __device__ __forceinline__ float* row_aux() const { return at<float>(kRowAux); }
  __device__ __forceinline__ float* row_part() const { return at<float>(kRowPart); }  // kWN × kBM
  __device__ __forceinline__ float* nvec() const { return at<float>(kNvec); }  // n^(c) block (forward)
  __device__ __forceinline__ double* lam() const { return at<double>(kGates); }       // gate scratch, length L
  __device__ __forceinline__ double* iota() const { return at<double>(kGates + 8 * L); }
  __device__ __forceinline__ double* scan() const { return at<double>(kGates + 16 * L); }
  __device__ __forceinline__ float2* col_log() const { return at<float2>(kGates + 24 * L); }  // column terms
};

// Sum the per-thread row partials (rows g and g+8 of each warp) over the quad and the kWN
// warps of a row band, in a fixed order (deterministic). Result in row_part[0][r]; call with
// every thread, ends synchronised.
template <typename Tile>
__device__ __forceinline__ void reduce_rows(float (&part)[2], float* row_part) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / Tile::kWN, wn = warp % Tile::kWN;
  const float a = quad_sum(part[0]), b = quad_sum(part[1]);
  if ((lane & 3) == 0) {
    row_part[wn * Tile::kBM + wm * 16 + (lane >> 2)] = a;
    row_part[wn * Tile::kBM + wm * 16 + (lane >> 2) + 8] = b;
  }
  __syncthreads();
  if (threadIdx.x < Tile::kBM) {
    float s = row_part[threadIdx.x];
    for (int j = 1; j < Tile::kWN; ++j) s += row_part[j * Tile::kBM + threadIdx.x];
    row_part[threadIdx.x] = s;
  }
  __syncthreads();
}

// Operands of one chunk CTA and the cp.async requests of its tiles. X, Y, Z point at the
// chunk's first token, with token strides ldX, ldY, ldZ (elements; X and Y have DX columns, Z
// has DZ); D is a packed DX × DZ state.
template <typename Mma, typename Tile, typename Role>
struct ChunkOperands {
  static constexpr bool kCausal = Role::kCausal, kDStoredZX = Role::kDStoredZX;
  using T = typename Mma::T;
  using Sm = ChunkSmem<T, Tile>;
  static constexpr int BM = Tile::kBM, BL = Tile::kBL, BX = Tile::kBX, BN = Tile::kBN, NT = Tile::kThreads;
  const Sm& sm;
  const T *X, *Y, *Z, *D;
  const float* nvec;  // forward: n^(c) (length DX), copied block by block beside X
  const T* R;         // backward dq / dk: the rows whose products with Z weight the gate terms (q or k)
  i64 ldX, ldY, ldZ, ldR;
  int DX, DZ, n0, r0, Lc, rows, nXb, j_lo, j_hi;
  __device__ ChunkOperands(const Sm& sm_, const T* X_, i64 ldX_, const T* Y_, i64 ldY_, const T* Z_, i64 ldZ_,
                           const T* D_, int DX_, int DZ_, int n0_, int r0_, int Lc_, const float* nvec_ = nullptr,
                           const T* R_ = nullptr, i64 ldR_ = 0)
      : sm(sm_), X(X_), Y(Y_), Z(Z_), D(D_), nvec(nvec_), R(R_), ldX(ldX_), ldY(ldY_), ldZ(ldZ_), ldR(ldR_), DX(DX_),
        DZ(DZ_), n0(n0_), r0(r0_), Lc(Lc_) {
    rows = min(BM, Lc - r0);
    nXb = cdiv(DX, BX);
    j_lo = kCausal ? 0 : r0 / BL;
    j_hi = kCausal ? (r0 + rows - 1) / BL : (Lc - 1) / BL;
  }
  __device__ __forceinline__ bool resident() const { return nXb == 1; }  // X stays in shared memory
  __device__ __forceinline__ void issue_X(int x0) const {
    load_tile_async<T, BM, BX, NT>(sm.Xs(), Sm::ldx, X + r0 * ldX + x0, ldX, rows, DX - x0);
  }
  __device__ __forceinline__ void issue_Y(int j, int x0) const {
    load_tile_async<T, BL, BX, NT>(sm.Ys(), Sm::ldx, Y + (j * BL) * ldY + x0, ldY, min(BL, Lc - j * BL), DX - x0);
  }
  __device__ __forceinline__ void issue_Z(int j) const {
    load_tile_async<T, BL, BN, NT>(sm.Zs(), Sm::ldz, Z + (j * BL) * ldZ + n0, ldZ, min(BL, Lc - j * BL), DZ - n0);
  }
  __device__ __forceinline__ void issue_XD(int x0) const {
    issue_X(x0);
    if constexpr (!kDStoredZX) {  // D[x][z]: a BX × BN block, B operand stored [K][N]
      load_tile_async<T, BX, BN, NT>(sm.Ds(), Sm::ldz, D + i64(x0) * DZ + n0, DZ, DX - x0, DZ - n0);
    } else {                      // D[z][x]: a BN × BX block, B operand stored [N][K]
      load_tile_async<T, BN, BX, NT>(sm.Ds(), Sm::ldx, D + i64(n0) * DX + x0, DX, DZ - n0, DX - x0);
    }
    if (nvec != nullptr) load_tile_async<float, 1, BX, NT>(sm.nvec(), BX, nvec + x0, 0, 1, DX - x0);
    cp_async_commit();
  }
  // The CTA's rows of R (columns n0 .. n0 + BN) into the D tile, which the inter-chunk term has
  // finished with: the A operand of the gate terms' products R · Z_jᵀ.
  static_assert(Tile::d_elems(int(sizeof(T))) >= BM * Sm::ldz, "the R rows must fit the D tile");
  __device__ __forceinline__ void issue_R() const {
    load_tile_async<T, BM, BN, NT>(sm.Ds(), Sm::ldz, R + r0 * ldR + n0, ldR, rows, DZ - n0);
  }
  // The first requests, issued before the gate preparation so that they overlap it: groups
  // {X, D} (first contraction block) and, with X resident, {Y_jlo} and {Z_jlo}.
  __device__ __forceinline__ void prologue() const {
    issue_XD(0);
    if (resident()) {
      issue_Y(j_lo, 0);
      cp_async_commit();
      issue_Z(j_lo);
      cp_async_commit();
    }
  }
};

// Expects ops.prologue() to have been issued. kRowSum: rowsum gets the row sums of the weighted
// scores (the forward's denominator). kZSum (backward dq / dk): zsum gets the row sums of the
// pair terms Z = (W ⊙ S) ⊙ (R · Zᵀ) over the triangle, this CTA's columns of the contraction
// R · Zᵀ (docs/math.md §12.1), and on_inter(acc) sees the inter-chunk term alone, scaled.
template <typename Mma, typename Tile, typename Role, bool kRowSum, bool kZSum, typename OnXBlock, typename OnInter>
__device__ __forceinline__ void chunk_mainloop(float (&acc)[1][Tile::kFNO][4], float (&rowsum)[2], float (&zsum)[2],
                                               const ChunkOperands<Mma, Tile, Role>& ops, OnXBlock&& on_x_block,
                                               OnInter&& on_inter) {
  constexpr bool kCausal = Role::kCausal, kDStoredZX = Role::kDStoredZX;
  constexpr Major kDMajor = kDStoredZX ? Major::kK : Major::kMN;  // D as the B operand: [Z][X] or [X][Z]
  using T = typename Mma::T;
  using Sm = ChunkSmem<T, Tile>;
  constexpr int BL = Tile::kBL, BX = Tile::kBX, BN = Tile::kBN;
  constexpr int FNS = Tile::kFNS, FNO = Tile::kFNO;
  const Sm& sm = ops.sm;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / Tile::kWN, wn = warp % Tile::kWN;
  const int wrow = wm * 16;                 // warp's first row in the CTA tile
  const int wcol_s = wn * (BL / Tile::kWN);  // warp's first column of the score tile
  const int wcol_o = wn * (BN / Tile::kWN);  // warp's first column of the output tile
  const bool resident = ops.resident();
  const int r0 = ops.r0, Lc = ops.Lc, j_lo = ops.j_lo, j_hi = ops.j_hi;

  // ---- inter-chunk term: acc = X_rows · D, then scaled per row --------------------------------
  zero(acc);
  for (int xb = 0; xb < ops.nXb; ++xb) {
    if (xb > 0) ops.issue_XD(xb * BX);
    if (resident) {
      cp_async_wait<2>();  // {X, D} landed; Y_jlo, Z_jlo may be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    // acc[r][z] += Σ_x X[r][x] · D[x][z]
    warp_gemm<Mma, 1, FNO, Major::kK, kDMajor>(acc, sm.Xs(), Sm::ldx, wrow, sm.Ds(), kDStoredZX ? Sm::ldx : Sm::ldz,
                                               wcol_o, BX);
    on_x_block(xb * BX);
    __syncthreads();
  }
  for_each_acc<1, FNO>([&](int, int fn, int e, int r, int) { acc[0][fn][e] *= sm.row_scale()[wrow + r]; });
  on_inter(acc);
  if constexpr (kZSum) {  // (lands by the first Z_j: the waits below leave at most the newest group out)
    ops.issue_R();
    cp_async_commit();
  }

  // ---- intra-chunk term over column tiles ------------------------------------------------------
  rowsum[0] = rowsum[1] = 0.f;
  zsum[0] = zsum[1] = 0.f;
  for (int j = j_lo; j <= j_hi; ++j) {
    const int u0 = j * BL;
    float s[1][FNS][4];
    zero(s);
    if (resident) {  // Y_j and Z_j are in flight (Z newest): wait for Y_j only
      cp_async_wait<1>();
      __syncthreads();
      // s[r][u] = Σ_x X[r][x] · Y[u][x]
      warp_gemm<Mma, 1, FNS, Major::kK, Major::kK>(s, sm.Xs(), Sm::ldx, wrow, sm.Ys(), Sm::ldx, wcol_s, BX);
      __syncthreads();
      if (j < j_hi) {  // Y_{j+1} streams in during the weights and W·Z_j
        ops.issue_Y(j + 1, 0);
        cp_async_commit();
      }
    } else {         // contraction streamed in BX blocks; Z_j overlaps the first block
      for (int xb = 0; xb < ops.nXb; ++xb) {
        ops.issue_X(xb * BX);
        ops.issue_Y(j, xb * BX);
        cp_async_commit();
        if (xb == 0) {
          ops.issue_Z(j);
          cp_async_commit();
          cp_async_wait<1>();
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();
        warp_gemm<Mma, 1, FNS, Major::kK, Major::kK>(s, sm.Xs(), Sm::ldx, wrow, sm.Ys(), Sm::ldx, wcol_s, BX);
        __syncthreads();
      }
    }
    // W ⊙ S, masked to the causal (or anti-causal) triangle and to the valid positions
    for_each_acc<1, FNS>([&](int, int fn, int e, int r, int cc) {
      const int pr = r0 + wrow + r, pu = u0 + wcol_s + cc;
      const bool keep = pu < Lc && (kCausal ? pu <= pr : pu >= pr);
      const float w = keep ? exp2f(add_split(sm.row_log()[wrow + r], sm.col_log()[pu])) * s[0][fn][e] : 0.f;
      s[0][fn][e] = w;
      if constexpr (kRowSum) rowsum[e >> 1] += w;
    });
    {
      const int g = lane >> 2, t = lane & 3;
#pragma unroll
      for (int fn = 0; fn < FNS; ++fn) {
        store2(sm.Ws() + (wrow + g) * Sm::ldw + wcol_s + 8 * fn + 2 * t, s[0][fn][0], s[0][fn][1]);
        store2(sm.Ws() + (wrow + g + 8) * Sm::ldw + wcol_s + 8 * fn + 2 * t, s[0][fn][2], s[0][fn][3]);
      }
    }
    if (resident && j < j_hi) {
      cp_async_wait<1>();  // Z_j landed; Y_{j+1} may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (kZSum) {  // zsum[r] += Σ_u (W ⊙ S)[r][u] · Σ_z R[r][z] · Z[u][z]
      float a[1][FNS][4];
      zero(a);
      warp_gemm<Mma, 1, FNS, Major::kK, Major::kK>(a, sm.Ds(), Sm::ldz, wrow, sm.Zs(), Sm::ldz, wcol_s, BN);
      for_each_acc<1, FNS>([&](int, int fn, int e, int, int) { zsum[e >> 1] = fmaf(s[0][fn][e], a[0][fn][e], zsum[e >> 1]); });
    }
    // acc[r][z] += Σ_u W[r][u] · Z[u][z]
    warp_gemm<Mma, 1, FNO, Major::kK, Major::kMN>(acc, sm.Ws(), Sm::ldw, wrow, sm.Zs(), Sm::ldz, wcol_o, BL);
    __syncthreads();
    if (resident && j < j_hi) {
      ops.issue_Z(j + 1);
      cp_async_commit();
    }
  }
}

}  // namespace tfla
