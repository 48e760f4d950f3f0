// tfla_cupy — the addressing layer: sequences, chunks and token offsets (docs/math.md §4).
//
// A *sequence* is what the recurrence runs over: batch entry b of length S (NSEQ = B), or with
// packed variable-length input (cu_seqlens, B = 1) the tokens [cu[s], cu[s+1]) of the batch.
// Chunks never straddle a sequence boundary; each sequence's ragged last chunk is masked.
// Every kernel finds its place through SeqCoords and forms token offsets only through
// SeqCoords::tok with the tensor's Strides: no kernel computes an offset by hand.
//
// Chunk slots. Per batch·head there are p.NC chunk slots; sequence s owns slots fc .. fc+nc−1.
// Fixed length: one sequence per batch entry, fc = 0, NC = ceil(S / L). Packed: slots are
// handed out in sequence order and NC = floor(S / L) + NSEQ bounds Σ_s ceil(len_s / L) (host-
// known without reading cu_seqlens), so grids are sized by NC and surplus CTAs exit.
// m-state slots: sequence s owns fm .. fm+nc (state entering each chunk, then its last), fm =
// fc + (its index within the batch entry); p.NM = NC + sequences per batch entry.
#pragma once
#include "params.cuh"

namespace tfla {

// seq_table sections (see Params::seq_table; seq_table.cuh builds them)
__device__ __forceinline__ const int* seq_tokens(const Params& p) { return p.seq_table; }
__device__ __forceinline__ const int* seq_chunks(const Params& p) { return p.seq_table + p.NSEQ + 1; }
__device__ __forceinline__ const int* chunk_sequence(const Params& p) { return p.seq_table + 2 * (p.NSEQ + 1); }

struct SeqCoords {
  int b, h;      // batch entry and head of the sequence's tokens
  int t0, len;   // first token (within batch entry b) and length
  int fc, nc;    // first chunk slot and number of chunks
  int fm;        // first m-state slot
  int state;     // (sequence, head) index of the initial / last state: s·NH + h

  // Sequence s, head h.
  __device__ __forceinline__ SeqCoords(const Params& p, int s, int h_) : h(h_), state(s * p.NH + h_) {
    if (p.seq_table == nullptr) {
      b = s;
      t0 = 0;
      len = p.S;
      fc = 0;
      nc = p.NC;
      fm = 0;
    } else {
      b = 0;
      t0 = seq_tokens(p)[s];
      len = max(seq_tokens(p)[s + 1] - t0, 0);
      fc = seq_chunks(p)[s];
      nc = seq_chunks(p)[s + 1] - fc;
      fm = fc + s;
    }
  }
  // Element offset of token t (relative to the sequence start) of a sequence tensor.
  __device__ __forceinline__ i64 tok(const Strides& st, int t) const {
    return i64(b) * st.b + i64(h) * st.h + i64(t0 + t) * st.t;
  }
  __device__ __forceinline__ int bh(const Params& p) const { return b * p.NH + h; }
  // Packed scratch: chunk slot of chunk c, m-state slot of boundary c, per-token scratch row.
  __device__ __forceinline__ i64 chunk_slot(const Params& p, int c) const { return i64(bh(p)) * p.NC + fc + c; }
  __device__ __forceinline__ i64 m_slot(const Params& p, int c) const { return i64(bh(p)) * p.NM + fm + c; }
  __device__ __forceinline__ i64 scratch_tok(const Params& p, int t) const { return i64(bh(p)) * p.S + t0 + t; }
  __device__ __forceinline__ int chunk_len(const Params& p, int c) const { return min(p.L, len - c * p.L); }
};

// The sequence and chunk of chunk slot gc of batch entry b (head h); valid = false for a
// surplus slot of packed input.
struct ChunkOfSlot {
  int s, c;
  bool valid;
  __device__ __forceinline__ ChunkOfSlot(const Params& p, int b, int gc) {
    if (p.seq_table == nullptr) {
      s = b;
      c = gc;
      valid = true;
    } else {
      s = chunk_sequence(p)[gc];
      valid = s >= 0;
      c = valid ? gc - seq_chunks(p)[s] : 0;
      if (!valid) s = 0;
    }
  }
};

// Chunk slot gc of batch·head bh: its sequence, its chunk index c within it, the number of
// valid positions Lc (0 for a surplus slot: the CTA exits) and its first position u0 = c·L.
struct ChunkAt {
  SeqCoords seq;
  int c, Lc, u0;
  __device__ __forceinline__ ChunkAt(const Params& p, int gc, int bh)
      : ChunkAt(p, ChunkOfSlot(p, bh / p.NH, gc), bh % p.NH) {}
  // offset of position u of this chunk in a sequence tensor
  __device__ __forceinline__ i64 tok(const Strides& st, int u) const { return seq.tok(st, u0 + u); }
  __device__ __forceinline__ i64 scratch_tok(const Params& p, int u) const { return seq.scratch_tok(p, u0 + u); }
  __device__ __forceinline__ i64 slot(const Params& p) const { return seq.chunk_slot(p, c); }
  __device__ __forceinline__ i64 m_slot(const Params& p, int next) const { return seq.m_slot(p, c + next); }

 private:
  __device__ __forceinline__ ChunkAt(const Params& p, const ChunkOfSlot& o, int h)
      : seq(p, o.s, h), c(o.c), Lc(o.valid ? seq.chunk_len(p, o.c) : 0), u0(o.c * p.L) {}
};

}  // namespace tfla
