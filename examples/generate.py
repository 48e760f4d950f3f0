"""Token generation with a small mLSTM language model: prefill with mlstm, decode with a StepPlan
inside a CUDA graph.

    python examples/generate.py                # CuPy on the GPU if there is one, else NumPy (says so)
    python examples/generate.py --batch 64 --new-tokens 256

The model (random weights): token embedding; per layer a pre-norm residual block — RMS norm,
projections to q, k, v (NH heads) and the gate pre-activations ĩ, f̃, the mLSTM cell, an RMS norm
of its output, an output projection; a final RMS norm and a read-out to the vocabulary.

1. Prefill: the prompt goes through ``mlstm(..., return_state=True)`` in every layer; the
   returned states (float32 on the GPU) are the decode states as they are.
2. Decode: one token step reads the current token, runs every layer with a
   :func:`tfla_cupy.mlstm_step_plan` (state updated in place) and writes the greedy next token.
   All of it goes into preallocated buffers, so on the GPU the step is captured once in a CUDA
   graph (``Stream.begin_capture`` / ``end_capture``; an allocator that raises is installed
   while capturing, proving that nothing is allocated) and replayed per token.
3. Check: the prompt plus the generated tokens go through the sequence model once; its logits
   at the generated positions must agree with the decode loop's.

On a machine without a GPU it runs the NumPy (float64 reference) path on a tiny model, without
graphs, and says so.
"""

from __future__ import annotations

import argparse
import os
import time

# CuPy's CUB reductions take temporary storage from the memory pool, and the captured decode step
# must allocate nothing: the step takes its means as matrix products, and, when this script is
# the program, CUB is off altogether.
if __name__ == "__main__":
    os.environ.setdefault("CUPY_ACCELERATORS", "")

import numpy as np  # noqa: E402

import tfla_cupy  # noqa: E402

NORM_EPS = 1e-6


def array_module():
    try:
        import cupy
        if cupy.cuda.is_available():
            return cupy
    except ImportError:
        pass
    return np


def init_params(xp, rng, *, vocab, E, NH, DK, DV, layers, dtype):
    def w(*shape):
        return xp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), dtype=dtype)
    blocks = [dict(norm=xp.ones(E, dtype), Wq=w(E, NH * DK), Wk=w(E, NH * DK), Wv=w(E, NH * DV), Wi=w(E, NH),
                   bi=xp.zeros(NH, dtype), Wf=w(E, NH), bf=xp.full(NH, 3.0, dtype), out_norm=xp.ones(NH * DV, dtype),
                   Wo=w(NH * DV, E)) for _ in range(layers)]
    return dict(emb=xp.asarray(rng.standard_normal((vocab, E)), dtype=dtype), blocks=blocks,
                norm=xp.ones(E, dtype), Wout=w(E, vocab), dims=(NH, DK, DV))


# ------------------------------------------------------------------------------------------
# Ops with an optional out= (the decode step passes preallocated buffers; the sequence model
# lets them allocate): one definition of the model for both.
# ------------------------------------------------------------------------------------------


# cuBLAS calls cannot be captured into a CUDA graph by CuPy, so the decode step's small products
# (into preallocated ``out``, float32 on the GPU) go through this plain kernel instead: one thread
# per output element, a fixed summation order.
_SMALL_KERNELS = r"""
extern "C" __global__ void small_matmul(const float* x, const float* W, float* out, int B, int I, int O) {
  const int o = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
  if (o >= O) return;
  float s = 0.f;
  for (int i = 0; i < I; ++i) s = fmaf(x[b * I + i], W[i * O + o], s);
  out[b * O + o] = s;
}

// out[b] = the first index of the largest x[b, :] (as argmax), one block of 128 threads per row
extern "C" __global__ void row_argmax(const float* x, long long* out, int O) {
  __shared__ float best_v[128];
  __shared__ int best_i[128];
  const int b = blockIdx.x, t = threadIdx.x;
  float v = -3.402823466e38f;
  int j = 0;
  for (int o = t; o < O; o += 128)
    if (x[b * O + o] > v) { v = x[b * O + o]; j = o; }
  best_v[t] = v;
  best_i[t] = j;
  __syncthreads();
  for (int h = 64; h > 0; h >>= 1) {
    if (t < h && (best_v[t + h] > best_v[t] || (best_v[t + h] == best_v[t] && best_i[t + h] < best_i[t]))) {
      best_v[t] = best_v[t + h];
      best_i[t] = best_i[t + h];
    }
    __syncthreads();
  }
  if (t == 0) out[b] = best_i[0];
}
"""
_kernels = {}


def matmul(xp, x, W, out=None):
    """x (B, I) @ W (I, O); on the GPU into a given float32 ``out`` without cuBLAS (capturable)."""
    if out is None or xp is np or x.dtype != np.float32 or not (x.flags.c_contiguous and W.flags.c_contiguous):
        return xp.matmul(x, W, out=out)
    if "mm" not in _kernels:
        _kernels["mm"] = xp.RawKernel(_SMALL_KERNELS, "small_matmul")
    (B, I), O = x.shape, W.shape[1]
    _kernels["mm"](((O + 127) // 128, B), (128,), (x, W, out, np.int32(B), np.int32(I), np.int32(O)))
    return out


def argmax_rows(xp, x, out):
    """argmax over the last axis into ``out`` (int64); on the GPU without CuPy's reductions, whose
    temporary storage would be an allocation inside the captured step."""
    if xp is np or x.dtype != np.float32 or out.dtype != np.int64:
        return xp.argmax(x, axis=-1, out=out)
    if "argmax" not in _kernels:
        _kernels["argmax"] = xp.RawKernel(_SMALL_KERNELS, "row_argmax")
    _kernels["argmax"]((x.shape[0],), (128,), (x, out, np.int32(x.shape[1])))
    return out


def rms_norm(xp, x, w, out=None, sq=None, r=None, mean=None):
    """x / sqrt(mean(x², last axis) + eps) · w; ``mean``: a (D, 1) column of 1/D (the mean as a
    matrix product, which allocates nothing with ``out=``)."""
    sq = xp.multiply(x, x, out=sq)
    r = xp.mean(sq, axis=-1, keepdims=True) if mean is None else matmul(xp, sq, mean, out=r)
    r += NORM_EPS
    xp.sqrt(r, out=r)
    out = xp.divide(x, r, out=out)
    return xp.multiply(out, w, out=out)


def linear(xp, x, W, b=None, out=None):
    out = matmul(xp, x, W, out=out)
    return out if b is None else xp.add(out, b, out=out)


def sequence_model(xp, params, tokens):
    """Logits (B, S, vocab) of the whole sequence and the last state of every layer."""
    NH, DK, DV = params["dims"]
    B, S = tokens.shape
    x = params["emb"][tokens]                                     # (B, S, E)
    states = []
    for p in params["blocks"]:
        xn = rms_norm(xp, x, p["norm"])
        heads = lambda t, d: t.reshape(B, S, NH, d).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = heads(linear(xp, xn, p["Wq"]), DK), heads(linear(xp, xn, p["Wk"]), DK), heads(linear(xp, xn, p["Wv"]), DV)
        i = linear(xp, xn, p["Wi"], p["bi"]).transpose(0, 2, 1)  # (B, NH, S)
        f = linear(xp, xn, p["Wf"], p["bf"]).transpose(0, 2, 1)
        h, state = tfla_cupy.mlstm(q, k, v, i, f, return_state=True)
        states.append(state)
        h = h.transpose(0, 2, 1, 3).reshape(B, S, NH * DV)
        x = x + linear(xp, rms_norm(xp, h, p["out_norm"]), p["Wo"])
    return linear(xp, rms_norm(xp, x, params["norm"]), params["Wout"]), states


class Decoder:
    """One greedy decode step on preallocated buffers: token (B,) -> logits (B, vocab), next token."""

    def __init__(self, xp, params, states, token):
        self.xp, self.params, self.states = xp, params, states
        NH, DK, DV = params["dims"]
        B, E = token.shape[0], params["emb"].shape[1]
        dt = params["emb"].dtype
        z = lambda *s: xp.zeros(s, dt)  # noqa: E731
        self.token = token                                            # (B,) int64, read and rewritten
        self.x, self.xn, self.sq, self.r = z(B, E), z(B, E), z(B, E), z(B, 1)
        self.q, self.k, self.v = z(B, NH * DK), z(B, NH * DK), z(B, NH * DV)
        self.i, self.f = z(B, NH), z(B, NH)                          # float32 on the GPU (what a plan reads)
        self.h = xp.zeros((B, NH, DV), dt)
        self.hn, self.hsq, self.y = z(B, NH * DV), z(B, NH * DV), z(B, E)
        self.logits = z(B, params["Wout"].shape[1])
        self.mean_E, self.mean_H = xp.full((E, 1), 1.0 / E, dt), xp.full((NH * DV, 1), 1.0 / (NH * DV), dt)
        self.tok_args = (self.q.reshape(B, NH, DK), self.k.reshape(B, NH, DK), self.v.reshape(B, NH, DV), self.i, self.f)
        self.plans = [tfla_cupy.mlstm_step_plan(*self.tok_args, st) for st in states]

    def step(self):
        xp, P = self.xp, self.params
        xp.take(P["emb"], self.token, axis=0, out=self.x)
        for p, plan, st in zip(P["blocks"], self.plans, self.states):
            rms_norm(xp, self.x, p["norm"], self.xn, self.sq, self.r, self.mean_E)
            linear(xp, self.xn, p["Wq"], out=self.q)
            linear(xp, self.xn, p["Wk"], out=self.k)
            linear(xp, self.xn, p["Wv"], out=self.v)
            linear(xp, self.xn, p["Wi"], p["bi"], out=self.i)
            linear(xp, self.xn, p["Wf"], p["bf"], out=self.f)
            plan(*self.tok_args, st, h=self.h)                        # the state is updated in place
            rms_norm(xp, self.h.reshape(self.hn.shape), p["out_norm"], self.hn, self.hsq, self.r, self.mean_H)
            linear(xp, self.hn, p["Wo"], out=self.y)
            xp.add(self.x, self.y, out=self.x)
        rms_norm(xp, self.x, P["norm"], self.xn, self.sq, self.r, self.mean_E)
        linear(xp, self.xn, P["Wout"], out=self.logits)
        argmax_rows(xp, self.logits, self.token)


def _capture(cp, stream, fn):
    """fn captured in a CUDA graph on `stream`, with an allocator that raises meanwhile."""
    def no_alloc(size):
        raise RuntimeError(f"allocation of {size} bytes inside the captured decode step")
    pool = cp.get_default_memory_pool()
    stream.begin_capture()
    cp.cuda.set_allocator(no_alloc)
    try:
        fn()
    except Exception:
        cp.cuda.set_allocator(pool.malloc)
        try:
            stream.end_capture()
        except Exception:  # noqa: BLE001 — the capture is invalid already; report fn's error
            pass
        raise
    cp.cuda.set_allocator(pool.malloc)
    return stream.end_capture()


def generate(xp=None, *, batch=4, prompt=32, new_tokens=64, vocab=256, E=256, NH=4, DK=64, DV=128, layers=2,
             seed=0, use_graph=None, verbose=True):
    """Prefill + greedy decode. Returns dict(tokens (B, new_tokens), max_rel_diff, tokens_per_s, graph)."""
    xp = xp or array_module()
    on_gpu = xp is not np
    use_graph = on_gpu if use_graph is None else use_graph
    dtype = np.float32 if on_gpu else np.float64
    rng = np.random.default_rng(seed)
    params = init_params(xp, rng, vocab=vocab, E=E, NH=NH, DK=DK, DV=DV, layers=layers, dtype=dtype)
    prompt_tokens = xp.asarray(rng.integers(0, vocab, (batch, prompt)))

    logits, states = sequence_model(xp, params, prompt_tokens)           # 1. prefill
    token = xp.argmax(logits[:, -1], axis=-1)
    first = token.copy()
    dec = Decoder(xp, params, states, token)
    gen = xp.zeros((batch, new_tokens), token.dtype)
    out_logits = xp.zeros((batch, new_tokens, vocab), dtype)
    gen[:, 0] = first
    graph = None
    if on_gpu:
        import cupy as cp
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            # warm-up (compiles every kernel, fills the memory pool) on copies of the states
            saved = [tfla_cupy.MLSTMState(*(None if a is None else a.copy() for a in st)) for st in states]
            dec.step()
            for st, s0 in zip(states, saved):
                for a, b in zip(st, s0):
                    if a is not None:
                        a[...] = b
            token[...] = first
            if use_graph:
                try:
                    graph = _capture(cp, stream, dec.step)
                except Exception as e:  # noqa: BLE001 — say why and decode eagerly
                    print(f"# CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly")
            run = graph.launch if graph is not None else (lambda s: dec.step())
            stream.synchronize()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            for t in range(new_tokens):                                   # 2. decode
                run(stream)
                out_logits[:, t] = dec.logits
                if t + 1 < new_tokens:
                    gen[:, t + 1] = token
            end.record(stream)
            end.synchronize()
            seconds = cp.cuda.get_elapsed_time(start, end) / 1e3
    else:
        t0 = time.perf_counter()
        for t in range(new_tokens):
            dec.step()
            out_logits[:, t] = dec.logits
            if t + 1 < new_tokens:
                gen[:, t + 1] = token
        seconds = time.perf_counter() - t0

    # 3. the sequence model on prompt + generated tokens: logits at position prompt + t − 1 + 1
    full, _ = sequence_model(xp, params, xp.concatenate([prompt_tokens, gen], axis=1))
    ref = full[:, prompt:prompt + new_tokens]
    diff = float(xp.abs(out_logits - ref).max() / xp.abs(ref).max())
    tps = batch * new_tokens / seconds
    if verbose:
        where = ("CuPy on the GPU, decode loop " + ("in a captured CUDA graph" if graph is not None else "eager")
                 if on_gpu else "NumPy (no GPU: float64 reference path, tiny model, no CUDA graph)")
        print(f"# {where}")
        print(f"# model: vocab {vocab}, E {E}, {layers} layers, NH {NH}, DK {DK}, DV {DV}; batch {batch}, "
              f"prompt {prompt}, {new_tokens} new tokens")
        print(f"decode: {tps:,.0f} tokens/s ({seconds / new_tokens * 1e6:.1f} µs per step of {batch} tokens)")
        print(f"decode logits vs one sequence call on the same tokens: max rel. diff {diff:.2e}")
        print("first generated tokens:", (gen[0, :12].get() if on_gpu else gen[0, :12]).tolist())
    return dict(tokens=gen, max_rel_diff=diff, tokens_per_s=tps, graph=graph is not None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--no-graph", action="store_true", help="decode eagerly (GPU)")
    ap.add_argument("--cpu", action="store_true", help="the NumPy path even when a GPU is present")
    args = ap.parse_args(argv)
    xp = np if args.cpu else array_module()
    if xp is np:   # tiny model: the float64 reference is slow
        opts = dict(batch=2, prompt=9, new_tokens=6, vocab=32, E=16, NH=2, DK=8, DV=16, layers=2)
    else:
        opts = dict(batch=4, prompt=32, new_tokens=64)
    if args.batch:
        opts["batch"] = args.batch
    if args.new_tokens:
        opts["new_tokens"] = args.new_tokens
    res = generate(xp, use_graph=not args.no_graph if xp is not np else False, **opts)
    tol = 1e-3 if xp is not np else 1e-9
    if not res["max_rel_diff"] <= tol:
        raise SystemExit(f"decode and sequence logits disagree: {res['max_rel_diff']:.2e} > {tol:g}")


if __name__ == "__main__":
    main()
