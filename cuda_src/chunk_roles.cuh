// tfla_cupy — the four roles of the chunk product
//
//     acc = diag(row_scale) · X · D  +  (W ⊙ (X · Yᵀ)) · Z,   W[r][u] = exp2(row_log[r] + col_log[u])
//
// that the sm80 main loop (chunk_mainloop.cuh) and the Hopper backward (bwd_chunks_sm90.cuh) compute:
// which tensors X, Y, Z and the boundary state D are, the direction of the intra-chunk triangle
// (causal: keys u <= row, anti-causal: u >= row) and how D is stored relative to the (X, Z)
// columns (docs/math.md §4.3, §6.3).
#pragma once

namespace tfla {

struct RoleH {   // fwd h:  X = q,  Y = k,  Z = v,  D = C^(c)   [DK][DV]
  static constexpr bool kCausal = true, kDStoredZX = false;
};
struct RoleDQ {  // bwd dq: X = dh, Y = v,  Z = k,  D = C^(c)   [DK][DV] read as [Z][X]
  static constexpr bool kCausal = true, kDStoredZX = true;
};
struct RoleDV {  // bwd dv: X = k,  Y = q,  Z = dh, D = dC^(c+1) [DK][DV]
  static constexpr bool kCausal = false, kDStoredZX = false;
};
struct RoleDK {  // bwd dk: X = v,  Y = dh, Z = q,  D = dC^(c+1) [DK][DV] read as [Z][X]
  static constexpr bool kCausal = false, kDStoredZX = true;
};

}  // namespace tfla
