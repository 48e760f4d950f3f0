"""The GPU backward (docs/math.md §6): the chunk-boundary states again unless the forward kept
them → dq (and the per-token gate terms of the queries) → the reverse dC pass (and the per-chunk
term) → dk, dv (and the gate terms of the keys) → the gate gradients di, df from those terms
(the direct form of docs/math.md §12.1). On Hopper, where they cover the call, dq, dk, dv and the dC
pass are the wgmma kernels (bwd_chunk_sm90, bwd_dstates_sm90; dq, dk and dv read one gate record per
chunk that a pre-pass, bwd_terms_sm90, writes first) and the state recompute is the fused forward's
states mode; elsewhere the sm80 kernels. With TFLA_CUPY_BWD_WALK=1, where the fused
backward covers a Hopper call (family.backward_walk), one kernel (bwd_walk_sm90) replaces dq, the
dC pass, dk and dv: the states → the walk → the gate gradients.
"""

from __future__ import annotations

from .. import _arrays, _tma
from .._types import MLSTMGrads, MLSTMState
from ..config import BWD_SM90_RECORD_BYTES, WALK_RECORD_BYTES
from . import family, launch
from .fwd import out_or_new, recompute_states
from .operands import F32, operand, sequence_operand

#: the Hopper chunk kernel's role per sm80 kernel kind
_ROLES = {"bwd_dq": "RoleDQ", "bwd_dk": "RoleDK", "bwd_dv": "RoleDV"}


def _saved_gates(g, saved):
    """The context's gate vectors ({name: array or device address}); a fused forward keeps none,
    so stage 0 runs here then (B·NH·S work) and the context keeps them, as (what holds their
    memory, the vectors), for a later backward."""
    if saved["gates"] is None:
        mem, parts = launch.Arena(g.gate_layout()).allocate()
        launch.chunk_gates(g)(g.params(i=saved["i"], f=saved["f"], **parts))
        saved["gates"] = (mem, parts)
    return saved["gates"][1]


def _common(g, s):
    """The Params fields every backward launch shares."""
    return dict(q=s["q"], k=s["k"], v=s["v"], i=s["i"], f=s["f"], C0=s["C0"], n0=s["n0"], m0=s["m0"], N=s["N"],
                M=s["M"], **_saved_gates(g, s))


def _dstates(g, hopper, params, q, dh):  # (params: with state_terms, also C_states and state_parts)
    """The reverse dC pass (dC_states, and dC0 where given) on the Hopper kernel (bulk tensor
    copies where q and dh take tensor maps, else cp.async) or the sm80 state kernel."""
    if not hopper:
        return launch.states(g, "bwd_dstates_kernel")(params)
    p = g.p
    st = g.strides(q=q, dh=dh)
    tma = family.operands_reason(p, (st["st_q"], st["st_dh"]), True) is None
    maps = (_tma.fused_maps(((q, st["st_q"]), (q, st["st_q"]), (dh, st["st_dh"])), p.S, p.NH, p.B) if tma
            else launch.no_maps())
    launch.dstates_sm90(g, tma)(params, maps)


def _term_parts(g, kind):
    """Parts of the gate-gradient terms: per token from dq and dk (sm80: one per output block; sm90:
    one each, the CTA owns every output column; the walk: one per value block), per chunk from the
    reverse dC pass (one per warp and dC block). ``kind``: "sm80", "sm90" or "walk"."""
    if kind == "walk":
        q = k = launch.walk_parts(g)
    elif kind == "sm90":
        q, k = 1, 1
    else:
        q, k = launch.term_parts(g, "bwd_dq"), launch.term_parts(g, "bwd_dk")
    return q, k, launch.state_term_parts(g, kind != "sm80")


def _arena(g, kind, kept):
    """The backward's scratch layout (memoised in the Geometry): the chunk states (recomputed unless
    the forward kept them) and then, in the same bytes, their gradients (not in the walk, whose dC
    stays on chip); the stabilisers at the chunk boundaries; the gate-gradient terms (per token:
    planes from dq and dk, per chunk: from the reverse dC pass)."""
    key = ("bwd_arena", kind, kept)
    arena = g.specs.get(key)
    if arena is None:
        p = g.p
        qp, kp, sp = _term_parts(g, kind)
        parts = [("states", g.BH * g.NC * p.DK * p.DV * g.e), ("q_terms", qp * g.BH * p.S * 4),
                 ("k_terms", 2 * kp * g.BH * p.S * 4), ("state_terms", sp * g.BH * g.NC * 4)]
        if p.has_m and not kept:
            parts.append(("m_states", g.BH * g.NM * 4))
        if kind == "walk":
            parts.append(("walk_terms", g.BH * g.NC * WALK_RECORD_BYTES))
        elif kind == "sm90":
            parts.append(("gate_record", g.BH * g.NC * BWD_SM90_RECORD_BYTES))
        arena = g.specs[key] = launch.Arena(parts)
    return arena


def backward(ctx, dh, dC_last, *, out=None):
    """``out``: optional preallocated outputs dq, dk, dv (dtypes of q, k, v), di, df (float32),
    dC0 (float32), as for forward()."""
    cp = _arrays.cupy_module()
    p, s = ctx.problem, ctx.saved
    device = cp.cuda.Device(s["device"])
    if dh.device.id != device.id or (dC_last is not None and dC_last.device.id != device.id):
        raise ValueError(f"dh, d_state: expected arrays on GPU {device.id}, where the forward ran")
    with device:
        g = launch.geometry(p, s["cfg"], s["mma"], s["seq_table"])
        dh = sequence_operand(dh, p.layout, p.dtype)
        dC_last = None if dC_last is None else operand(dC_last)
        params = g.binder(**_common(g, s), dh=dh, dC_last=dC_last, C_last=s["C_last"])
        hopper = family.backward(p, s["cfg"], s["mma"], device) == "sm90"
        walk = hopper and family.backward_walk(p, s["mma"])
        kind = "walk" if walk else ("sm90" if hopper else "sm80")
        kept = s["C_states"] is not None
        scratch, parts = _arena(g, kind, kept).allocate()
        # the chunk states and, once dq has read them, their gradients share one part
        C_states, m_states = (s["C_states"], s["m_states"]) if kept else (parts["states"], parts.get("m_states"))
        if not kept and not recompute_states(p, device, s, C_states, m_states):  # (default: saves NC·DK·DV per head)
            launch.states(g, "fwd_states_kernel")(params(C_last=None, C_states=C_states, m_states=m_states))

        def token_grads(kind):  # dq, dk or dv on the family of this backward
            return launch.chunk_sm90(g, _ROLES[kind]) if hopper else launch.chunk(g, kind)

        dq = out_or_new(out, "dq", lambda: cp.empty(p.seq_shape(p.DK), p.dtype))
        q_parts, k_parts, state_parts = _term_parts(g, kind)
        terms = dict(q_terms=parts["q_terms"], k_terms=parts["k_terms"], state_terms=parts["state_terms"],
                     q_parts=q_parts, k_parts=k_parts, state_parts=state_parts)
        dC0 = out_or_new(out, "dC0", lambda: cp.empty((p.NSEQ, p.NH, p.DK, p.DV), F32)) if p.has_initial_state else None
        dk = out_or_new(out, "dk", lambda: cp.empty(p.seq_shape(p.DK), p.dtype))
        dv = out_or_new(out, "dv", lambda: cp.empty(p.seq_shape(p.DV), p.dtype))
        if walk:  # every chunk's gate record, then dq, dk, dv, dC0 and every gate term in one reverse walk
            records = params(m_states=m_states, gate_terms=parts["walk_terms"])
            launch.walk_terms(g)(records)
            launch.walk_sm90(g)(params(C_states=C_states, m_states=m_states, gate_terms=parts["walk_terms"], dq=dq,
                                       dk=dk, dv=dv, dC0=dC0, **terms))
        else:
            if hopper:  # every chunk's gate record, which dq, dk and dv read
                launch.terms_sm90(g)(params(m_states=m_states, gate_terms=parts["gate_record"]))
                terms["gate_terms"] = parts["gate_record"]
            token_grads("bwd_dq")(params(C_states=C_states, m_states=m_states, dq=dq, **terms))
            dC_states = parts["states"]   # over the chunk states unless the forward kept them
            # (B_c reads C^(c) from the slot it then overwrites with dC^(c+1), unless the forward kept them)
            _dstates(g, hopper, params(C_states=C_states, m_states=m_states, dC_states=dC_states, dC0=dC0, **terms),
                     s["q"], dh)
            rec = params(m_states=m_states, dC_states=dC_states, dk=dk, dv=dv, **terms)
            token_grads("bwd_dk")(rec)
            token_grads("bwd_dv")(rec)

        di = out_or_new(out, "di", lambda: cp.empty(p.seq_shape(), F32))
        df = out_or_new(out, "df", lambda: cp.empty(p.seq_shape(), F32))
        launch.gates_grad(g)(params(di=di, df=df, **terms))
        del scratch  # the stream orders its reuse after the kernels
        di_dtype, df_dtype = s["dtypes"]
        di, df = di.astype(di_dtype, copy=False), df.astype(df_dtype, copy=False)
        d_initial = None
        if p.has_initial_state:
            d_initial = MLSTMState(dC0, cp.zeros((p.NSEQ, p.NH, p.DK), F32) if p.has_n else None,
                                   cp.zeros((p.NSEQ, p.NH), F32) if p.has_m else None)
    return MLSTMGrads(dq, dk, dv, di, df, d_initial)


def initial_state_grad(ctx, dh, dC_last):
    """d(initial C) alone (docs/distributed.md §2): the reverse dC pass of backward() without the
    token gradients, after recomputing the boundary stabilizers (a state pass, exp only) unless
    the forward kept them. Returns (B, NH, DK, DV) float32."""
    cp = _arrays.cupy_module()
    p, s = ctx.problem, ctx.saved
    device = cp.cuda.Device(s["device"])
    with device:
        g = launch.geometry(p, s["cfg"], s["mma"], s.get("seq_table"))
        common = _common(g, s)
        m_states = s["m_states"]
        if p.has_m and m_states is None:
            m_states = cp.empty((g.BH, g.NM), F32)
            launch.states(g, "fwd_states_kernel")(g.params(**common, m_states=m_states))
        dC0 = cp.empty((p.NSEQ, p.NH, p.DK, p.DV), F32)
        scratch = cp.empty((g.BH, g.NC, p.DK, p.DV), p.dtype)  # the kernel also writes every dC^(c)
        hopper = family.backward(p, s["cfg"], s["mma"], device) == "sm90"
        dh = sequence_operand(dh, p.layout, p.dtype)
        _dstates(g, hopper, g.params(**common, dh=dh, dC_last=None if dC_last is None else operand(dC_last),
                                     m_states=m_states, dC_states=scratch, dC0=dC0), s["q"], dh)
    return dC0
