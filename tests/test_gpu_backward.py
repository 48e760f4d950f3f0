"""CUDA backward (dC pass, dq/dk/dv passes, gate gradients) against the float64 reference."""

import numpy as np
import pytest

import tfla_cupy
from gpu_utils import (BWD_TOL, DF_TOL, DTYPES, GATE_MODES, case_id, cp, gpu, make_inputs, poisoned_allocations,
                       reference, rel_err, seed_of, to_gpu)

pytestmark = gpu


def _cases():
    out = []
    for dt in DTYPES:
        for mode in GATE_MODES:
            out.append((1, 2, 100, 48, 96, 64, mode, dt, 3.0, True, True))
            out.append((1, 2, 1000, 64, 128, 128, mode, dt, -2.0, False, False))
            out.append((2, 1, 7, 16, 16, 16, mode, dt, 3.0, True, True))
    for S in (1, 7, 64, 100, 128, 1000, 4109):
        out.append((1, 1, S, 64, 128, 64, "exp", "f32", 3.0, S % 2 == 1, S % 2 == 1))
    # every chunk size, and chunk 256 / 512 with S >= 4 L (upstream's gradients are wrong there)
    for L in (16, 64, 128, 256, 512):
        for dt, mode, fm in (("f32", "exp", -2.0), ("bf16", "sig", 3.0)):
            out.append((1, 1, max(1000, 4 * L + 37), 32, 64, L, mode, dt, fm, True, True))
    for DK, DV in ((16, 16), (48, 96), (64, 128), (128, 256), (256, 512)):
        for dt in ("f32", "bf16"):
            out.append((1, 1, 300, DK, DV, 128, "exp", dt, 3.0, True, True))
    return [pytest.param(*c, id=case_id(*c[:8], f"f{c[8]:+g}", "init" if c[9] else "noinit",
                                        "dlast" if c[10] else "nodlast")) for c in out]


def _run_backward(host, ref, *, gate, normalize, L, dt, init, d_last, keep_states=False, seed=0):
    rng = np.random.default_rng(seed)
    B, NH, S, DV = host["v"].shape
    DK = host["q"].shape[-1]
    dh = rng.standard_normal((B, NH, S, DV)).astype(DTYPES[dt])
    dC = rng.standard_normal((B, NH, DK, DV)).astype(np.float32) if d_last else None
    want = reference(ref, gate=gate, normalize=normalize, L=L, dh=dh.astype(np.float64),
                     dC_last=None if dC is None else dC.astype(np.float64))
    x = to_gpu(host)
    state = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"]) if init else None
    with poisoned_allocations():
        h, _, ctx = tfla_cupy.mlstm_fwd(x["q"], x["k"], x["v"], x["i"], x["f"], gate=gate, normalize=normalize,
                                        initial_state=state, chunk_size=L, keep_states=keep_states,
                                        precision="tf32" if dt == "tf32" else "default")
        d_state = None if dC is None else tfla_cupy.MLSTMState(cp.asarray(dC))
        g = tfla_cupy.mlstm_bwd(ctx, cp.asarray(dh), d_state)
    return g, want


@pytest.mark.parametrize("B,NH,S,DK,DV,L,mode,dt,f_mean,init,d_last", _cases())
def test_backward_matches_reference(B, NH, S, DK, DV, L, mode, dt, f_mean, init, d_last):
    rng = np.random.default_rng(seed_of(B, NH, S, DK, DV, L, mode, dt, f_mean, init, d_last))
    gate, normalize = GATE_MODES[mode]
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], f_mean=f_mean, init=init)
    g, want = _run_backward(host, ref, gate=gate, normalize=normalize, L=L, dt=dt, init=init, d_last=d_last)
    for name, got in zip(("dq", "dk", "dv"), g[:3]):
        assert got.dtype == DTYPES[dt], name
    errs = {n: rel_err(got, want[n]) for n, got in zip(("dq", "dk", "dv", "di", "df"), g[:5])}
    if init:
        errs["dC0"] = rel_err(g.d_initial_state.C, want["dC0"])
        assert float(abs(g.d_initial_state.n).max()) == 0.0 if normalize else g.d_initial_state.n is None
    else:
        assert g.d_initial_state is None
    bad = {n: e for n, e in errs.items() if e > (DF_TOL[dt] if n == "df" else BWD_TOL[dt])}
    assert not bad, f"errors {errs}"


def test_kept_states_give_the_same_gradients():
    rng = np.random.default_rng(5)
    host, ref = make_inputs(rng, 1, 2, 300, 64, 64, DTYPES["bf16"], init=True)
    opts = dict(gate="exp", normalize=True, L=64, dt="bf16", init=True, d_last=True)
    g1, _ = _run_backward(host, ref, **opts)
    g2, _ = _run_backward(host, ref, keep_states=True, **opts)
    for a, b in zip(g1[:5], g2[:5]):
        assert bool(cp.all(a == b))


@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_backward_is_deterministic(mode):
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(9)
    host, ref = make_inputs(rng, 2, 2, 700, 64, 128, DTYPES["bf16"], init=True)
    opts = dict(gate=gate, normalize=normalize, L=128, dt="bf16", init=True, d_last=True)
    g1, _ = _run_backward(host, ref, **opts)
    g2, _ = _run_backward(host, ref, **opts)
    for a, b in zip(list(g1[:5]) + [g1.d_initial_state.C], list(g2[:5]) + [g2.d_initial_state.C]):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_state_passing_gives_the_gradients_of_one_call(mode):
    """A sequence split at arbitrary points, state carried forward and state gradients carried
    backward, gives the same h, last state and gradients as one call (fp32)."""
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(21)
    S, cuts = 300, (0, 77, 200, 300)
    host, _ = make_inputs(rng, 1, 2, S, 32, 64, np.float32, init=True)
    x = to_gpu(host)
    dh = cp.asarray(rng.standard_normal((1, 2, S, 64)).astype(np.float32))
    init = tfla_cupy.MLSTMState(x["C0"], x["n0"], x["m0"])
    opts = dict(gate=gate, normalize=normalize, chunk_size=64)
    h_full, last_full, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), initial_state=init, **opts)
    g_full = tfla_cupy.mlstm_bwd(ctx, dh)
    ctxs, hs, state = [], [], init
    for a, b in zip(cuts[:-1], cuts[1:]):
        h, state, c = tfla_cupy.mlstm_fwd(*(x[n][:, :, a:b] for n in "qkvif"), initial_state=state, **opts)
        hs.append(h), ctxs.append(c)
    assert rel_err(cp.concatenate(hs, axis=2), cp.asnumpy(h_full)) <= 1e-5
    assert rel_err(state.C, cp.asnumpy(last_full.C)) <= 1e-5
    grads, d_state = [], None
    for (a, b), c in reversed(list(zip(zip(cuts[:-1], cuts[1:]), ctxs))):
        g = tfla_cupy.mlstm_bwd(c, dh[:, :, a:b], d_state)
        grads.insert(0, g)
        d_state = g.d_initial_state
    for j, name in enumerate(("dq", "dk", "dv", "di", "df")):
        pieces = cp.concatenate([g[j] for g in grads], axis=2)
        tol = 3e-5 if name == "df" else 1e-5
        assert rel_err(pieces, cp.asnumpy(g_full[j])) <= tol, name
    assert rel_err(grads[0].d_initial_state.C, cp.asnumpy(g_full.d_initial_state.C)) <= 1e-5
