"""The GPU path: buffers, launch order and grids of the TFLA kernels.

Forward: fwd_states (chunk-boundary states) -> fwd_h (outputs, N, M).
Backward: [fwd_states again, unless the forward kept its states] -> bwd_dq -> bwd_dstates ->
bwd_dk, bwd_dv -> bwd_gates. Everything is launched on CuPy's current stream with no host
synchronisation, so a warmed-up call can be captured in a CUDA graph.

Inputs that are not C-contiguous (or not 16-byte aligned) are copied once; gates are read as
float32 (other dtypes are converted, a copy of B·NH·S values).
"""

from __future__ import annotations

import numpy as np

from . import _arrays, _loader
from ._params import make_params
from ._types import MLSTMContext, MLSTMGrads, MLSTMState
from .config import (ELEMENT_BYTES, GATE_POLICY, MMA, chunk_gates_kernel, chunk_kernel, gates_kernel, pick_config,
                     state_kernels)

MAX_DK, MAX_DV = 512, 1024
_F32 = np.dtype(np.float32)
_GATE_THREADS = 512   # kGateThreads in bwd_gates.cuh
_CHUNK_GATE_THREADS = 128  # kChunkGateThreads in chunk_gates.cuh


def _cdiv(a, b):
    return -(-a // b)


def _mma(problem):
    key = (np.dtype(problem.dtype), problem.precision if np.dtype(problem.dtype) == _F32 else "default")
    if key not in MMA:
        raise TypeError(f"q: the GPU path supports float16, bfloat16 and float32, got {_arrays.dtype_name(problem.dtype)}")
    return MMA[key]


def _check_head_dims(DK, DV, *, where="q"):
    if DK % 8 or DK > MAX_DK:
        raise ValueError(f"{where}: the GPU path needs DK to be a multiple of 8 and <= {MAX_DK}, got DK={DK}")
    if DV % 8 or DV > MAX_DV:
        raise ValueError(f"v: the GPU path needs DV to be a multiple of 8 and <= {MAX_DV}, got DV={DV}")


def _same_device(named):
    cp = _arrays.cupy_module()
    ids = {n: x.device.id for n, x in named.items() if x is not None}
    if len(set(ids.values())) > 1:
        raise ValueError("inputs live on different GPUs: " + ", ".join(f"{n}: device {d}" for n, d in ids.items()))
    return cp.cuda.Device(next(iter(ids.values())))


def _operand(x, dtype=None):
    """C-contiguous, 16-byte aligned, of ``dtype`` (copies only when needed)."""
    cp = _arrays.cupy_module()
    if dtype is not None and x.dtype != dtype:
        x = x.astype(dtype)
    if not x.flags.c_contiguous:
        x = cp.ascontiguousarray(x)
    if x.data.ptr % 16:
        x = x.copy()
    return x


def _state_f32(state, problem):
    if state is None:
        return None, None, None
    C0 = _operand(state.C)
    n0 = _operand(state.n) if problem.has_n else None
    m0 = _operand(state.m) if problem.has_m else None
    return C0, n0, m0


def _gpu_inputs(problem, arrays, state):
    """GPU-specific checks, then the kernel operands: (mma, device, (q, k, v, i32, f32), (C0, n0, m0)).
    q, k, v are made contiguous and aligned; gates and states are float32. Runs under `device`."""
    q, k, v, i, f = arrays
    mma = _mma(problem)
    _check_head_dims(problem.DK, problem.DV)
    device = _same_device(dict(q=q, k=k, v=v, i=i, f=f, **({} if state is None else state._asdict())))
    with device:
        operands = (_operand(q), _operand(k), _operand(v), _operand(i, _F32), _operand(f, _F32))
        return mma, device, operands, _state_f32(state, problem)


class _Launch:
    """Grids of one problem under one config."""

    def __init__(self, problem, cfg, mma):
        self.p, self.cfg, self.mma = problem, cfg, mma
        self.gate = GATE_POLICY[(problem.gate, problem.normalize)]
        self.e = ELEMENT_BYTES[mma]
        self.BH = problem.B * problem.NH
        self.NC = _cdiv(problem.S, problem.chunk_size)

    def gate_vectors(self, i32, f32):
        """Stage 0: the per-chunk log-gate vectors (chunk-aligned) every later stage reads."""
        cp = _arrays.cupy_module()
        p, L = self.p, self.p.chunk_size
        g = dict(gate_a=cp.empty((self.BH, self.NC, L), _F32), gate_b=cp.empty((self.BH, self.NC, L), _F32),
                 gate_g=cp.empty((self.BH, self.NC), _F32), gate_amax=cp.empty((self.BH, self.NC), _F32))
        params = make_params(i=i32, f=f32, BH=self.BH, S=p.S, L=L, NC=self.NC, **g)
        _loader.get_kernel(chunk_gates_kernel(self.gate))(self.NC * self.BH, _CHUNK_GATE_THREADS, params, 24 * L)
        return g

    def states(self, kind, params):
        t, p = self.cfg.states, self.p
        grid = _cdiv(p.DK, t.bk) * _cdiv(p.DV, t.bv) * self.BH
        name = state_kernels(self.mma, self.gate, t)[kind]
        _loader.get_kernel(name)(grid, t.threads, params, t.smem_bytes(self.e, p.chunk_size))

    def chunk(self, kind, params):
        t, p = getattr(self.cfg, kind), self.p
        DZ = p.DV if kind in ("fwd_h", "bwd_dv") else p.DK
        grid = _cdiv(DZ, t.bn) * _cdiv(p.chunk_size, t.bm) * self.NC * self.BH
        name = chunk_kernel(f"{kind}_kernel", self.mma, self.gate, t)
        _loader.get_kernel(name)(grid, t.threads, params, t.smem_bytes(self.e, p.chunk_size))

    def parts(self, kind):
        return _cdiv(self.p.DK, getattr(self.cfg, kind).bn)


def _config(problem, mma, device):
    """The caller's KernelConfig (type checked at the boundary) or the heuristic's, checked
    against this device's shared-memory limit."""
    cfg = problem.config or pick_config(mma, problem.DK, problem.DV, problem.chunk_size)
    cfg.check(ELEMENT_BYTES[mma], problem.chunk_size, _loader.device_limits(device.id)[1])
    return cfg


def _private(x, user):
    """``x`` when the conversion already copied it, else a copy: the saved context must not alias
    an input that the caller may later edit in place (that would change the gradients)."""
    return x.copy() if x is not None and x is user else x


def _out(out, name, empty):
    """The caller's preallocated ``out[name]`` (the JAX / PyTorch adapters write straight into
    their framework's buffers), else a new array from ``empty()``."""
    return out[name] if out is not None and name in out else empty()


def forward(problem, arrays, state, *, out=None, copy_saved=True):
    """``out``: optional preallocated outputs h, N, M, C_last, n_last, m_last (C-contiguous, of the
    shapes and dtypes below). ``copy_saved=False`` lets the context alias the inputs (for callers
    that never run the backward, or whose inputs are immutable)."""
    cp = _arrays.cupy_module()
    if out is not None:
        from ._step_plan import check_disjoint, check_state_buffers
        check_state_buffers("out_state", out, problem)
        check_disjoint(out, state)
    mma, device, (q, k, v, i32, f32), (C0, n0, m0) = _gpu_inputs(problem, arrays, state)
    with device:
        if copy_saved:
            q, k, v, i32, f32 = (_private(x, u) for x, u in zip((q, k, v, i32, f32), arrays))
            if state is not None:
                C0, n0, m0 = (_private(x, u) for x, u in zip((C0, n0, m0), state))
        cfg = _config(problem, mma, device)
        run = _Launch(problem, cfg, mma)
        p, BH, NC = problem, run.BH, run.NC
        shape = (p.B, p.NH)
        h = _out(out, "h", lambda: cp.empty(shape + (p.S, p.DV), p.dtype))
        N = _out(out, "N", lambda: cp.empty(shape + (p.S,), _F32)) if p.has_n else None
        M = _out(out, "M", lambda: cp.empty(shape + (p.S,), _F32)) if p.has_m else None
        C_states = cp.empty((BH, NC, p.DK, p.DV), p.dtype)
        n_states = cp.empty((BH, NC, p.DK), _F32) if p.has_n else None
        m_states = cp.empty((BH, NC + 1), _F32) if p.has_m else None
        C_last = _out(out, "C_last", lambda: cp.empty(shape + (p.DK, p.DV), _F32))
        n_last = _out(out, "n_last", lambda: cp.empty(shape + (p.DK,), _F32)) if p.has_n else None
        m_last = _out(out, "m_last", lambda: cp.empty(shape, _F32)) if p.has_m else None
        gates = run.gate_vectors(i32, f32)
        params = make_params(q=q, k=k, v=v, i=i32, f=f32, C0=C0, n0=n0, m0=m0, h=h, N=N, M=M, C_last=C_last,
                             n_last=n_last, m_last=m_last, C_states=C_states, n_states=n_states, m_states=m_states,
                             BH=BH, S=p.S, DK=p.DK, DV=p.DV, L=p.chunk_size, NC=NC, scale=p.scale, eps=p.eps,
                             **gates)
        run.states("fwd_states_kernel", params)
        run.chunk("fwd_h", params)
    saved = dict(q=q, k=k, v=v, i=i32, f=f32, C0=C0, n0=n0, m0=m0, N=N, M=M, C_last=C_last, gates=gates,
                 C_states=C_states if p.keep_states else None, m_states=m_states if p.keep_states else None,
                 dtypes=(arrays[3].dtype, arrays[4].dtype), mma=mma, cfg=cfg, device=device.id)
    return h, MLSTMState(C_last, n_last, m_last), MLSTMContext("cuda", problem, saved)


def backward(ctx, dh, dC_last, *, out=None):
    """``out``: optional preallocated outputs dq, dk, dv (dtypes of q, k, v), di, df (float32),
    dC0 (float32), as for :func:`forward`."""
    cp = _arrays.cupy_module()
    p, s = ctx.problem, ctx.saved
    device = cp.cuda.Device(s["device"])
    if dh.device.id != device.id or (dC_last is not None and dC_last.device.id != device.id):
        raise ValueError(f"dh, d_state: expected arrays on GPU {device.id}, where the forward ran")
    with device:
        run = _Launch(p, s["cfg"], s["mma"])
        BH, NC = run.BH, run.NC
        dh = _operand(dh, p.dtype)
        dC_last = None if dC_last is None else _operand(dC_last)
        common = dict(q=s["q"], k=s["k"], v=s["v"], i=s["i"], f=s["f"], C0=s["C0"], n0=s["n0"], m0=s["m0"],
                      N=s["N"], M=s["M"], dh=dh, dC_last=dC_last, C_last=s["C_last"], BH=BH, S=p.S, DK=p.DK,
                      DV=p.DV, L=p.chunk_size, NC=NC, scale=p.scale, eps=p.eps, **s["gates"])
        C_states, m_states = s["C_states"], s["m_states"]
        if C_states is None:  # recompute the boundary states (default: saves NC·DK·DV per head)
            C_states = cp.empty((BH, NC, p.DK, p.DV), p.dtype)
            m_states = cp.empty((BH, NC + 1), _F32) if p.has_m else None
            recompute = make_params(**{**common, "C_last": None}, C_states=C_states, m_states=m_states)
            run.states("fwd_states_kernel", recompute)
        dq = _out(out, "dq", lambda: cp.empty_like(s["q"]))
        qdq = cp.empty((run.parts("bwd_dq"), BH, p.S), _F32)
        run.chunk("bwd_dq", make_params(**common, C_states=C_states, m_states=m_states, dq=dq, qdq=qdq))
        del C_states  # dq was its last reader (unless the forward keeps it)

        dC_states = cp.empty((BH, NC, p.DK, p.DV), p.dtype)
        dC0 = _out(out, "dC0", lambda: cp.empty((p.B, p.NH, p.DK, p.DV), _F32)) if p.has_initial_state else None
        run.states("bwd_dstates_kernel", make_params(**common, m_states=m_states, dC_states=dC_states, dC0=dC0))
        dk, dv = _out(out, "dk", lambda: cp.empty_like(s["k"])), _out(out, "dv", lambda: cp.empty_like(s["v"]))
        kdk = cp.empty((run.parts("bwd_dk"), BH, p.S), _F32)
        params = make_params(**common, m_states=m_states, dC_states=dC_states, dk=dk, dv=dv, kdk=kdk)
        run.chunk("bwd_dk", params)
        run.chunk("bwd_dv", params)
        del dC_states

        di = _out(out, "di", lambda: cp.empty((p.B, p.NH, p.S), _F32))
        df = _out(out, "df", lambda: cp.empty((p.B, p.NH, p.S), _F32))
        gp = make_params(**common, qdq=qdq, kdk=kdk, di=di, df=df, qdq_parts=qdq.shape[0], kdk_parts=kdk.shape[0])
        _loader.get_kernel(gates_kernel(run.gate))(BH, _GATE_THREADS, gp)
        di_dtype, df_dtype = s["dtypes"]
        di, df = di.astype(di_dtype, copy=False), df.astype(df_dtype, copy=False)
        d_initial = None
        if p.has_initial_state:
            d_initial = MLSTMState(dC0, cp.zeros((p.B, p.NH, p.DK), _F32) if p.has_n else None,
                                   cp.zeros((p.B, p.NH), _F32) if p.has_m else None)
    return MLSTMGrads(dq, dk, dv, di, df, d_initial)


def step(problem, arrays, state, out=None, indices=None, *, h_out=None):
    """One token: out-of-place (new buffers), into ``out`` (may be the input state) or, with
    ``indices``, in place on the rows of the pool ``state``. ``h_out``: a preallocated h (the
    JAX adapter writes into XLA's buffer)."""
    from ._step_plan import check_state_buffers, step_launch
    if indices is not None:
        check_state_buffers("state", state, problem)   # updated in place: never copied
    if out is not None:
        check_state_buffers("out_state", out, problem)
    mma, device, (q, k, v, i32, f32), (C0, n0, m0) = _gpu_inputs(problem, arrays, state)
    cp = _arrays.cupy_module()
    with device:
        p = problem
        if indices is not None and indices.device.id != device.id:
            raise ValueError(f"state_indices: expected an array on GPU {device.id}, got one on GPU {indices.device.id}")
        h = h_out if h_out is not None else cp.empty((p.B, p.NH, p.DV), p.dtype)
        if out is None:
            out = MLSTMState(cp.empty((p.B, p.NH, p.DK, p.DV), _F32),
                             cp.empty((p.B, p.NH, p.DK), _F32) if p.has_n else None,
                             cp.empty((p.B, p.NH), _F32) if p.has_m else None)
        run = step_launch(problem, mma, device.id, 0 if indices is None else state.C.shape[0])
        run(q, k, v, i32, f32, (C0, n0, m0), out, h, indices, private=True)
    return h, out


def segment_summary(problem, arrays, state, *, empty_m=None):
    """States-only forward for sequence parallelism (docs/distributed.md §1): stage 0 and the
    state pass with no outputs, no boundary states written. Returns (last state, G) with G
    (B, NH) float64 the sum of the slice's floored λ, from stage 0's per-chunk sums (the λ the
    state pass used). ``empty_m`` starts from the empty state C = 0, n = 0, m = empty_m
    instead of ``state``."""
    cp = _arrays.cupy_module()
    mma, device, (q, k, v, i32, f32), (C0, n0, m0) = _gpu_inputs(problem, arrays, state)
    with device:
        p = problem
        run = _Launch(p, _config(p, mma, device), mma)
        shape = (p.B, p.NH)
        if empty_m is not None:
            C0, n0 = None, None
            m0 = cp.full(shape, empty_m, _F32) if p.has_m else None
        C_last = cp.empty(shape + (p.DK, p.DV), _F32)
        n_last = cp.empty(shape + (p.DK,), _F32) if p.has_n else None
        m_last = cp.empty(shape, _F32) if p.has_m else None
        gates = run.gate_vectors(i32, f32)
        run.states("fwd_states_kernel", make_params(k=k, v=v, C0=C0, n0=n0, m0=m0, C_last=C_last, n_last=n_last,
                                                    m_last=m_last, BH=run.BH, S=p.S, DK=p.DK, DV=p.DV,
                                                    L=p.chunk_size, NC=run.NC, **gates))
        G = gates["gate_g"].sum(axis=1, dtype=cp.float64).reshape(shape)
    return MLSTMState(C_last, n_last, m_last), G


def initial_state_grad(ctx, dh, dC_last):
    """d(initial C) alone (docs/distributed.md §2): the reverse dC pass of :func:`backward`
    without the token gradients, after recomputing the boundary stabilizers (a state pass,
    exp only) unless the forward kept them. Returns (B, NH, DK, DV) float32."""
    cp = _arrays.cupy_module()
    p, s = ctx.problem, ctx.saved
    with cp.cuda.Device(s["device"]):
        run = _Launch(p, s["cfg"], s["mma"])
        BH, NC = run.BH, run.NC
        common = dict(q=s["q"], k=s["k"], v=s["v"], i=s["i"], f=s["f"], C0=s["C0"], n0=s["n0"], m0=s["m0"],
                      N=s["N"], M=s["M"], BH=BH, S=p.S, DK=p.DK, DV=p.DV, L=p.chunk_size, NC=NC, scale=p.scale,
                      eps=p.eps, **s["gates"])
        m_states = s["m_states"]
        if p.has_m and m_states is None:
            m_states = cp.empty((BH, NC + 1), _F32)
            run.states("fwd_states_kernel", make_params(**common, m_states=m_states))
        dC0 = cp.empty((p.B, p.NH, p.DK, p.DV), _F32)
        scratch = cp.empty((BH, NC, p.DK, p.DV), p.dtype)  # the kernel also writes every dC^(c)
        run.states("bwd_dstates_kernel", make_params(**common, dh=_operand(dh, p.dtype),
                                                     dC_last=None if dC_last is None else _operand(dC_last),
                                                     m_states=m_states, dC_states=scratch, dC0=dC0))
    return dC0


def context(problem, arrays, state, N, M, C_last):
    """The backward context of a forward whose outputs N, M, C_last were kept elsewhere (the JAX
    adapter keeps them as residuals of XLA): nothing is copied, the gate vectors are recomputed
    (stage 0, B·NH·S work). ``arrays`` are (q, k, v, i, f) with float32 gates."""
    mma, device, (q, k, v, i32, f32), (C0, n0, m0) = _gpu_inputs(problem, arrays, state)
    with device:
        cfg = _config(problem, mma, device)
        gates = _Launch(problem, cfg, mma).gate_vectors(i32, f32)
    saved = dict(q=q, k=k, v=v, i=i32, f=f32, C0=C0, n0=n0, m0=m0, N=N, M=M, C_last=C_last, gates=gates,
                 C_states=None, m_states=None, dtypes=(_F32, _F32), mma=mma, cfg=cfg, device=device.id)
    return MLSTMContext("cuda", problem, saved)
