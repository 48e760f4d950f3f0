"""Sequence-parallel mLSTM: the per-rank phases and their two drivers (docs/distributed.md).

Forward, on every rank r of P:
  1. summary of the local slice (a states-only pass; rank P−1 has none to give),
  2. exchange the summaries (one all-gather),
  3. fold summaries 0 … r−1 into the incoming state (``_algebra``), then the ordinary
     chunkwise forward of the slice from it (:func:`tfla_cupy.mlstm_fwd`).
Backward, the mirror image:
  1. a_r = d(incoming C) of the slice for a zero slice-end gradient (the dC pass alone; rank
     P−1 uses the gradient of the last state; rank 0 has nothing to give),
  2. exchange the a_r (one all-gather),
  3. reverse scan of (a_j, D_j), j > r, into the slice-end gradient, then the ordinary
     backward with it (:func:`tfla_cupy.mlstm_bwd`), whose ⟨dC_last, C_last⟩ term carries the
     gate gradient across ranks.
The virtual driver runs the P ranks of one process one after another with the exchange being
a list (through the same byte packing NCCL sends); the NCCL driver runs one rank per process.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .. import _arrays, _validate, api
from .._types import MLSTMGrads, MLSTMState
from . import _algebra, _local
from ._comm import NcclComm

_F32 = np.dtype(np.float32)


class DistContext:
    """What :func:`mlstm_bwd` needs from :func:`mlstm_fwd` on one rank. Opaque to users."""

    __slots__ = ("rank", "size", "local", "decays", "has_initial_state", "comm")

    def __init__(self, rank, size, local, decays, has_initial_state, comm):
        self.rank, self.size, self.local = rank, size, local
        self.decays, self.has_initial_state, self.comm = decays, has_initial_state, comm

    def __repr__(self):
        return f"DistContext(rank={self.rank}, size={self.size}, local={self.local!r})"


class VirtualContext:
    """What :func:`virtual_mlstm_bwd` needs: the P rank contexts and the slice bounds."""

    __slots__ = ("ranks", "bounds")

    def __init__(self, ranks, bounds):
        self.ranks, self.bounds = ranks, bounds


def _fwd_opts(gate, normalize, chunk_size, eps, scale, precision, config, keep_states):
    return dict(gate=gate, normalize=normalize, chunk_size=chunk_size, eps=eps, scale=scale,
                precision=precision, config=config, keep_states=keep_states)


def _validate_slice(arrays, opts, initial_state):
    q, k, v, i, f = arrays
    return _validate.inputs(q, k, v, i, f, initial_state=initial_state, **opts)


# ------------------------------------------------------------------------------------------
# Byte packing of the forward summary (one all-gather carries all of it)
# ------------------------------------------------------------------------------------------


def _summary_layout(p):
    sd = _F32 if p.kind == "cuda" else np.dtype(np.float64)
    f64 = np.dtype(np.float64)
    out = [("C", sd, (p.B, p.NH, p.DK, p.DV))]
    if p.has_n:
        out.append(("n", sd, (p.B, p.NH, p.DK)))
    if p.has_m:
        out.append(("m", f64, (p.B, p.NH)))
    out.append(("G", f64, (p.B, p.NH)))
    return out


def _xp(kind):
    if kind == "numpy":
        return np
    import cupy
    return cupy


def _layout_bytes(layout):
    return sum(dt.itemsize * int(np.prod(shape)) for _, dt, shape in layout)


def _pack(s, layout, xp):
    """A Summary as one uint8 vector (zeros for None: rank P−1 sends a placeholder)."""
    if s is None:
        return xp.zeros(_layout_bytes(layout), np.uint8)
    parts = [xp.ascontiguousarray(getattr(s, name), dtype=dt).reshape(-1).view(np.uint8)
             for name, dt, _ in layout]
    return xp.concatenate(parts)


def _unpack(buf, layout):
    fields, off = {}, 0
    for name, dt, shape in layout:
        nbytes = dt.itemsize * int(np.prod(shape))
        fields[name] = buf[off:off + nbytes].view(dt).reshape(shape)
        off += nbytes
    return _algebra.Summary(fields["C"], fields.get("n"), fields.get("m"), fields["G"])


# ------------------------------------------------------------------------------------------
# The per-rank phases, shared by both drivers
# ------------------------------------------------------------------------------------------


def _forward_summary(rank, size, problem, arrays, state):
    if rank == size - 1:
        return None
    return _local.summary(problem, arrays, state if rank == 0 else None, empty=rank > 0)


def _forward_local(rank, size, summaries, problem, arrays, state, opts, comm):
    stabilized = problem.stabilized
    if size > 1:
        chain = _algebra.stabilizer_chain(summaries, stabilized=stabilized)
        decays = _algebra.decays(summaries, chain, stabilized=stabilized)
    else:
        decays = [None]
    if rank == 0:
        incoming = state
    else:
        st = _algebra.incoming_state(summaries, rank, stabilized=stabilized)
        m = None
        if st.m is not None:
            m = st.m.astype(_F32) if problem.kind == "cuda" else st.m
        incoming = MLSTMState(st.C, st.n, m)
    h, last, ctx = api.mlstm_fwd(*arrays, initial_state=incoming, **opts)
    return h, last, DistContext(rank, size, ctx, decays, state is not None, comm)


def _backward_args(ctx, dh, d_state):
    if not isinstance(ctx, DistContext):
        raise TypeError(f"ctx: expected the context returned by tfla_cupy.distributed.mlstm_fwd, "
                        f"got {type(ctx).__name__}")
    if d_state is not None and ctx.rank != ctx.size - 1:
        raise ValueError(f"d_state: only the last rank ({ctx.size - 1}) holds the last state; rank {ctx.rank} "
                         "got a d_state (pass None)")
    dh, dC_last, _, _ = _validate.backward_args(ctx.local, dh, d_state)  # dn, dm of the last state: see below
    return dh, dC_last


def _backward_summary(ctx, dh, dC_last):
    if ctx.rank == 0:
        return None
    return _local.initial_state_grad(ctx.local, dh, dC_last)


def _backward_local(ctx, a, dh, dC_last):
    dC_end = dC_last if ctx.size == 1 else _algebra.slice_end_grad(a, ctx.decays, ctx.rank, dC_last)
    g = api.mlstm_bwd(ctx.local, dh, None if dC_end is None else MLSTMState(dC_end))
    d_initial = g.d_initial_state if (ctx.rank == 0 and ctx.has_initial_state) else None
    return g._replace(d_initial_state=d_initial)


# ------------------------------------------------------------------------------------------
# NCCL: one rank per process
# ------------------------------------------------------------------------------------------


def _check_comm(comm):
    """A communicator: ``rank``, ``size`` and ``all_gather(x) -> (size,) + x.shape`` (an
    :class:`NcclComm`, or any object with these, e.g. one that gathers host arrays)."""
    if not all(hasattr(comm, a) for a in ("rank", "size", "all_gather")):
        raise TypeError("comm: expected a communicator with rank, size and all_gather (a "
                        f"tfla_cupy.distributed.NcclComm from init()), got {type(comm).__name__}")


def _device(comm, kind):
    """The device context of a rank: its GPU on the GPU path, nothing on NumPy."""
    if kind != "cuda":
        return contextlib.nullcontext()
    import cupy
    return cupy.cuda.Device(getattr(comm, "device", None))


def mlstm_fwd(q, k, v, i, f, *, comm, gate="exp", normalize=True, initial_state=None, chunk_size=None,
              eps=1e-6, scale=None, precision="default", config=None, keep_states=False):
    """Sequence-parallel forward of this rank's slice (one process per GPU).

    Every rank of ``comm`` (an :class:`NcclComm` from :func:`init`) calls it with its
    contiguous slice of the sequence, ranks in sequence order (rank 0 first); slice lengths may
    differ (at least one token each). Options, the same on every rank, as
    :func:`tfla_cupy.mlstm_fwd`; ``initial_state`` only on rank 0.

    Returns ``(h, state, ctx)``: h of the slice, the state at the slice end (on rank
    ``comm.size − 1`` the last state of the whole sequence), and a context for :func:`mlstm_bwd`.
    """
    _check_comm(comm)
    opts = _fwd_opts(gate, normalize, chunk_size, eps, scale, precision, config, keep_states)
    problem, arrays, state = _validate_slice((q, k, v, i, f), opts, initial_state)
    if problem.kind != "cuda" and isinstance(comm, NcclComm):
        raise TypeError("q: the NCCL path needs GPU arrays (CuPy or a CUDA DLPack producer), got host arrays; "
                        "use virtual_mlstm_fwd for NumPy")
    if state is not None and comm.rank != 0:
        raise ValueError(f"initial_state: only rank 0 takes the initial state; rank {comm.rank} got one")
    layout = _summary_layout(problem)
    with _device(comm, problem.kind):
        s = _forward_summary(comm.rank, comm.size, problem, arrays, state)
        gathered = comm.all_gather(_pack(s, layout, _xp(problem.kind)))
        summaries = [_unpack(gathered[j], layout) for j in range(comm.size)]
        summaries[-1] = None
        return _forward_local(comm.rank, comm.size, summaries, problem, arrays, state, opts, comm)


def mlstm_bwd(ctx, dh, d_state=None):
    """Sequence-parallel backward of this rank's slice: ``MLSTMGrads`` of the slice, with
    ``d_initial_state`` on rank 0 when the forward had an initial state (None elsewhere).
    ``d_state`` (the gradient of the last state) only on the last rank."""
    dh, dC_last = _backward_args(ctx, dh, d_state)
    comm, p = ctx.comm, ctx.local.problem
    with _device(comm, p.kind):
        a_r = _backward_summary(ctx, dh, dC_last)
        if a_r is None:  # rank 0 sends a placeholder
            a_r = _xp(p.kind).zeros((p.B, p.NH, p.DK, p.DV), _F32 if p.kind == "cuda" else np.float64)
        a = list(comm.all_gather(a_r))
        return _backward_local(ctx, a, dh, dC_last)


# ------------------------------------------------------------------------------------------
# Virtual ranks: P ranks in one process (NumPy or one GPU)
# ------------------------------------------------------------------------------------------


def _bounds(S, ranks, lengths):
    if (ranks is None) == (lengths is None):
        raise TypeError("ranks, lengths: expected exactly one of them (a number of ranks, or the slice lengths)")
    if lengths is None:
        if isinstance(ranks, bool) or not isinstance(ranks, (int, np.integer)) or not 1 <= ranks <= S:
            raise ValueError(f"ranks: expected an int in [1, S = {S}], got {ranks!r}")
        base, extra = divmod(S, int(ranks))
        lengths = [base + (r < extra) for r in range(int(ranks))]
    lengths = list(lengths)
    if (not lengths or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in lengths)
            or sum(lengths) != S):
        raise ValueError(f"lengths: expected positive ints summing to S = {S}, got {lengths!r}")
    return np.concatenate([[0], np.cumsum(lengths)]).astype(int).tolist()


def virtual_mlstm_fwd(q, k, v, i, f, *, ranks=None, lengths=None, gate="exp", normalize=True, initial_state=None,
                      chunk_size=None, eps=1e-6, scale=None, precision="default", config=None, keep_states=False):
    """The sequence-parallel forward with P virtual ranks in this process (NumPy or one GPU).

    The sequence (arrays as :func:`tfla_cupy.mlstm_fwd`) is cut into ``ranks`` near-equal
    slices or slices of the given ``lengths``; each rank is run as it would be on its own GPU,
    the exchange being a list. Returns ``(h, state, ctx)`` like one call: h of the whole
    sequence, the last state, and a context for :func:`virtual_mlstm_bwd`.
    """
    opts = _fwd_opts(gate, normalize, chunk_size, eps, scale, precision, config, keep_states)
    problem, arrays, state = _validate_slice((q, k, v, i, f), opts, initial_state)
    bounds = _bounds(problem.S, ranks, lengths)
    P = len(bounds) - 1
    xp = _xp(problem.kind)
    parts = []
    for r in range(P):
        sl = slice(bounds[r], bounds[r + 1])
        parts.append(_validate_slice(tuple(x[:, :, sl] for x in arrays), opts, state if r == 0 else None))
    summaries = [_forward_summary(r, P, pr, ar, st) for r, (pr, ar, st) in enumerate(parts)]
    layout = _summary_layout(problem)
    summaries = [_unpack(_pack(s, layout, xp), layout) for s in summaries]  # what NCCL would carry
    summaries[-1] = None
    outs = [_forward_local(r, P, summaries, pr, ar, st, opts, None) for r, (pr, ar, st) in enumerate(parts)]
    h = xp.concatenate([o[0] for o in outs], axis=2)
    return h, outs[-1][1], VirtualContext([o[2] for o in outs], bounds)


def virtual_mlstm_bwd(ctx, dh, d_state=None):
    """Backward of :func:`virtual_mlstm_fwd`: ``MLSTMGrads`` of the whole sequence, as one
    :func:`tfla_cupy.mlstm_bwd` call would return them."""
    if not isinstance(ctx, VirtualContext):
        raise TypeError(f"ctx: expected the context returned by virtual_mlstm_fwd, got {type(ctx).__name__}")
    P, b = len(ctx.ranks), ctx.bounds
    p0 = ctx.ranks[0].local.problem
    dh = _arrays.to_module("dh", dh, p0.kind, ctx_kind=True)
    expected = (p0.B, p0.NH, b[-1], p0.DV)
    if dh.ndim != 4 or tuple(dh.shape) != expected:
        raise ValueError(f"dh: expected shape {expected} (B, NH, S, DV) of h, got {tuple(dh.shape)}")
    args = []
    for r, rc in enumerate(ctx.ranks):
        args.append(_backward_args(rc, dh[:, :, b[r]:b[r + 1]], d_state if r == P - 1 else None))
    a = [_backward_summary(rc, dh_r, dC) for rc, (dh_r, dC) in zip(ctx.ranks, args)]
    grads = [_backward_local(rc, a, dh_r, dC) for rc, (dh_r, dC) in zip(ctx.ranks, args)]
    xp = _xp(p0.kind)
    cat = [xp.concatenate([g[j] for g in grads], axis=2) for j in range(5)]  # dq dk dv di df
    return MLSTMGrads(*cat, grads[0].d_initial_state)
