// tfla_cupy — compile-time tile configurations. Every block size lives here; the Python twin
// is tfla_cupy/config.py (KernelConfig), whose one heuristic picks them. Shared-memory budgets
// are computed by the same formulas on both sides (a CPU test compiles static_asserts that they
// agree).
#pragma once
#include "mma.cuh"

namespace tfla {

// Chunk-recurrence kernels (forward states, backward dC): each CTA owns a kBK × kBV tile of the
// state, walks the chunks in order and consumes each chunk kBT time steps at a time.
template <int BK, int BV, int BT, int WM, int WN>
struct StateTile {
  static constexpr int kBK = BK, kBV = BV, kBT = BT, kWM = WM, kWN = WN;
  static constexpr int kThreads = 32 * WM * WN;
  static constexpr int kFM = BK / (16 * WM);  // 16-row fragments per warp
  static constexpr int kFN = BV / (8 * WN);   // 8-column fragments per warp
  static constexpr int kGateRows = 3;         // per-step gate scalars per sub-tile (a; or b, M, N)
  static_assert(BK % (16 * WM) == 0 && BV % (8 * WN) == 0, "state tile must split evenly over warps");
  static_assert(BT % 16 == 0, "time sub-tile is a multiple of the mma k");
  static_assert(kThreads % (BK / 2) == 0, "n update maps threads onto column pairs");

  // Two buffers of X [kBT][kBK] and Y [kBT][kBV] (element size E, rows padded by 16 bytes) and of
  // the gate rows; floats: the weights (kBT), n (kBK) and the n partials. Independent of the
  // chunk size (the argument keeps one signature for every tile).
  __host__ __device__ static constexpr int smem_bytes(int E, int /*L*/) {
    return 2 * E * BT * ((BK + 16 / E) + (BV + 16 / E)) +
           4 * (2 * kGateRows * BT + BT + BK + (kThreads / (BK / 2)) * BK);
  }
};

// Chunk-parallel kernels (forward h, backward dq / dk / dv). A CTA owns kBM rows (positions)
// of one chunk and kBN output columns; it loops over kBL-row tiles of the other operand and
// over kBX-column blocks of the contraction dimension. kWM × kWN warps; each warp owns 16 rows.
template <int BM, int BL, int BX, int BN, int WN>
struct ChunkTile {
  static constexpr int kBM = BM, kBL = BL, kBX = BX, kBN = BN, kWM = BM / 16, kWN = WN;
  static constexpr int kThreads = 32 * kWM * WN;
  static constexpr int kMinBlocks = kThreads <= 256 ? 2 : 1;  // CTAs per SM the registers must allow
  static constexpr int kFNS = BL / (8 * WN);  // fragments per warp of the BM × BL score tile
  static constexpr int kFNO = BN / (8 * WN);  // fragments per warp of the BM × BN output tile
  static_assert(BM % 16 == 0 && BL % (16 * WN) == 0 && BN % (16 * WN) == 0, "tile must split over warps");
  static_assert(BX % 16 == 0, "contraction block is a multiple of the mma k");

  // Tiles in element size E (rows padded by 16 bytes): X [BM][BX], Y [BL][BX], Z [BL][BN],
  // D [BX][BN] or [BN][BX], W [BM][BL]; then 4 gate vectors of length L and 2 row vectors of
  // 8-byte entries (double or float2), 4 float row vectors, WN·BM float row partials and a BX
  // float block of n.
  __host__ __device__ static constexpr int d_elems(int E) {
    return BX * (BN + 16 / E) > BN * (BX + 16 / E) ? BX * (BN + 16 / E) : BN * (BX + 16 / E);
  }
  __host__ __device__ static constexpr int smem_bytes(int E, int L) {
    return E * (BM * (BX + 16 / E) + BL * (BX + 16 / E) + BL * (BN + 16 / E) + d_elems(E) +
                BM * (BL + 16 / E)) +
           8 * (4 * L + 2 * BM) + 4 * (4 * BM + WN * BM + BX);
  }
};

}  // namespace tfla
