// tfla_cupy — the single translation unit: every kernel family, instantiated by name through
// NVRTC name expressions (see tfla_cupy/_loader.py). Stages:
//   seq_table_kernel     chunk table of packed sequences          (seq_table.cuh)
//   chunk_gates_kernel   per-chunk log-gate vectors (stage 0)     (chunk_gates.cuh)
//   fwd_states_kernel    forward chunk-boundary states            (fwd_states.cuh)
//   fwd_h_kernel         forward outputs h, N, M                  (fwd_outputs.cuh)
//   fwd_fused_sm90_kernel  Hopper forward: states on chip, h, N, M (fwd_fused_sm90.cuh);
//                        its summary mode and segment_combine_kernel split long sequences (segments.cuh)
//   fwd_ws_sm90_kernel   Hopper forward, warp-specialised: a producer, a scores warpgroup and two
//                        consumers holding the state transposed; also the backward's state
//                        recompute (fwd_ws_sm90.cuh)
//   bwd_dstates_kernel   backward boundary-state gradients dC     (bwd_dstates.cuh)
//   bwd_dq/dk/dv_kernel  backward token gradients                 (bwd_chunks.cuh)
//   bwd_chunk_sm90_kernel  Hopper backward token gradients, one role per instantiation (bwd_chunks_sm90.cuh)
//   bwd_dstates_sm90_kernel  Hopper backward boundary-state gradients dC (bwd_dstates_sm90.cuh)
//   bwd_walk_sm90_kernel  Hopper fused backward: the reverse dC walk with dq, dk, dv and the gate
//                        terms of every chunk, one cluster per sequence·head (bwd_walk_sm90.cuh)
//   bwd_gates_kernel     backward gate gradients di, df           (bwd_gates.cuh)
//   step_kernel          one-token recurrence for inference       (step.cuh)
//   wgmma_probe_kernel, tma_probe_kernel  the sm_90a primitives, checked by a GPU test (wgmma_probes.cuh)
#include "seq_table.cuh"
#include "chunk_gates.cuh"
#include "fwd_states.cuh"
#include "fwd_outputs.cuh"
#include "bwd_dstates.cuh"
#include "bwd_chunks.cuh"
#include "bwd_gates.cuh"
#include "step.cuh"
#include "wgmma_probes.cuh"
#include "fwd_fused_sm90.cuh"
#include "fwd_ws_sm90.cuh"
#include "bwd_chunks_sm90.cuh"
#include "bwd_dstates_sm90.cuh"
#include "bwd_walk_sm90.cuh"
#include "segments.cuh"
