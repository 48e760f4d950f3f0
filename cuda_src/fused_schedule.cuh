// tfla_cupy — the tile scheduler of the Hopper forward (fwd_fused_sm90.cuh and any kernel that
// walks the same items): a work item is (segment, sequence·head, DV block), and a persistent grid
// walks the items in a fixed order (docs/architecture.md, "Kernel families").
#pragma once
#include "coords.cuh"

namespace tfla {

// Work item w of a fused launch: (segment, sequence·head, DV block), DV blocks fastest (the CTAs
// of one head run side by side and share its Q and K in L2). Segment g (segments.cuh; p.seg_chunks
// > 0) covers chunks [g·seg_chunks, (g + 1)·seg_chunks) of its sequence, without segments all.
struct FusedItem {
  SeqCoords sq;
  int vb, seg, cb, ce;  // DV block, segment, its chunks [cb, ce)
  bool valid;           // false: a segment past a short sequence's end (nothing to do)
  __device__ __forceinline__ FusedItem(const Params& p, int w, int nvb)
      : FusedItem(p, w % nvb, (w / nvb) % (p.NSEQ * p.NH), w / (nvb * p.NSEQ * p.NH)) {}
  __device__ __forceinline__ bool last() const { return ce == sq.nc; }
  __device__ __forceinline__ bool owns_nm() const { return vb == 0; }  // writes n, m, N, M

 private:
  __device__ __forceinline__ FusedItem(const Params& p, int vb_, int sh, int seg_)
      : sq(p, sh / p.NH, sh % p.NH), vb(vb_), seg(seg_) {
    cb = p.seg_chunks > 0 ? seg * p.seg_chunks : 0;
    ce = p.seg_chunks > 0 ? min(cb + p.seg_chunks, sq.nc) : sq.nc;
    valid = seg == 0 || cb < sq.nc;
  }
};

// A persistent grid walks the items w = blockIdx.x, + gridDim.x, ... (bv: the item's DV columns).
struct FusedSchedule {
  int nvb, items;  // DV blocks per head, work items of the launch
  __device__ __forceinline__ FusedSchedule(const Params& p, bool summary, int bv) : nvb(p.DV / bv) {
    const i64 nsh = i64(p.NSEQ) * p.NH;
    items = nvb * int(nsh) * (summary ? p.nseg - 1 : p.nseg);
  }
  __device__ __forceinline__ int first() const { return blockIdx.x; }
  __device__ __forceinline__ bool has(int w) const { return w < items; }
  __device__ __forceinline__ int next(int w) const { return w + gridDim.x; }
  __device__ __forceinline__ FusedItem item(const Params& p, int w) const { return FusedItem(p, w, nvb); }
};

}  // namespace tfla
