"""tfla_cupy.torch on the GPU: forward and autograd against the float64 reference and the CuPy call,
PyTorch's current (non-default) stream, normalizer_grad, state passing through autograd, the
in-place check, the step, torch.compile(fullgraph=True) against eager and the reference, and
torch.library.opcheck of the custom operators on CUDA tensors."""

import numpy as np
import pytest

import tfla_cupy
from gpu_utils import (BWD_TOL, DF_TOL, DTYPES, FWD_TOL, GATE_MODES, HAS_GPU, cp, gpu, make_inputs, reference,
                       rel_err, seed_of)

torch = pytest.importorskip("torch")

pytestmark = gpu + [pytest.mark.skipif(not (HAS_GPU and torch.cuda.is_available()), reason="needs PyTorch with CUDA")]

TORCH_DTYPE = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def _tt():
    import tfla_cupy.torch as tt
    return tt


def _t(a, dt=None, grad=False):
    """A CUDA tensor from a host array (bf16 through float32, cast on the device)."""
    t = torch.from_numpy(np.asarray(a, dtype=np.float32)).cuda()
    if dt is not None:
        t = t.to(TORCH_DTYPE[dt])
    return t.requires_grad_(grad)


def _np(t):
    return t.detach().float().cpu().numpy().astype(np.float64)


CASES = [(1, 2, 200, 64, 128, 64, mode, dt, init) for mode in GATE_MODES for dt in ("f32", "bf16")
         for init in (False, True)] + [(2, 3, 37, 16, 32, 16, "exp", "f16", True)]


def _setup(case, grad=True):
    B, NH, S, DK, DV, L, mode, dt, init = case
    rng = np.random.default_rng(seed_of("torch", *case))
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], init=init)
    dh = rng.standard_normal((B, NH, S, DV)).astype(DTYPES[dt])
    dC = rng.standard_normal((B, NH, DK, DV)).astype(np.float32)
    x = {n: _t(host[n].astype(np.float32), dt if n in "qkv" else None, grad) for n in "qkvif"}
    st = None
    if init:
        st = tfla_cupy.MLSTMState(*(_t(host[n], None, grad) for n in ("C0", "n0", "m0")))
    return host, ref, dh, dC, x, st


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_backward_match_reference_and_cupy(case):
    tt = _tt()
    B, NH, S, DK, DV, L, mode, dt, init = case
    gate, normalize = GATE_MODES[mode]
    host, ref, dh, dC, x, st = _setup(case)
    want = reference(ref, gate=gate, normalize=normalize, L=L, dh=dh.astype(np.float64), dC_last=dC.astype(np.float64))
    h, last = tt.mlstm(*(x[n] for n in "qkvif"), gate=gate, normalize=normalize, initial_state=st, chunk_size=L,
                       return_state=True)
    assert h.dtype == TORCH_DTYPE[dt] and h.is_cuda and h.is_contiguous()
    assert rel_err(_np(h), want["h"]) < FWD_TOL[dt]
    assert rel_err(_np(last.C), want["C"]) < FWD_TOL[dt]
    # the same kernels as the CuPy call, bit for bit
    xc = {n: cp.asarray(host[n]) for n in host}
    stc = tfla_cupy.MLSTMState(xc["C0"], xc["n0"], xc["m0"]) if init else None
    h_cp = tfla_cupy.mlstm(*(xc[n] for n in "qkvif"), gate=gate, normalize=normalize, initial_state=stc, chunk_size=L)
    assert cp.array_equal(cp.from_dlpack(h.detach()), h_cp)

    loss = (h.float() * _t(dh)).sum() + (last.C * _t(dC)).sum()
    loss.backward()
    for n in "qkv":
        assert x[n].grad.dtype == TORCH_DTYPE[dt]
        assert rel_err(_np(x[n].grad), want["d" + n]) < BWD_TOL[dt], n
    assert rel_err(_np(x["i"].grad), want["di"]) < BWD_TOL[dt]
    assert rel_err(_np(x["f"].grad), want["df"]) < DF_TOL[dt]
    if init:
        assert rel_err(_np(st.C.grad), want["dC0"]) < BWD_TOL[dt]


def test_runs_on_the_current_stream():
    tt = _tt()
    case = (1, 4, 1000, 64, 128, 128, "exp", "bf16", True)
    host, ref, dh, dC, x, st = _setup(case, grad=False)
    want = reference(ref, gate="exp", normalize=True, L=128)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        h = tt.mlstm(*(x[n] for n in "qkvif"), initial_state=st, chunk_size=128)
        h2 = h.float() * 2          # PyTorch work ordered after the kernels on the same stream
    s.synchronize()
    assert rel_err(_np(h2) / 2, want["h"]) < FWD_TOL["bf16"]


@pytest.mark.parametrize("mode", ["exp", "sig"])
def test_normalizer_grad_matches_reference(mode):
    tt = _tt()
    gate, normalize = GATE_MODES[mode]
    B, NH, S, DK, DV, L = 1, 2, 300, 32, 64, 64
    rng = np.random.default_rng(seed_of("torch-normgrad", mode))
    host, ref = make_inputs(rng, B, NH, S, DK, DV, np.float32, f_mean=1.0, init=True)
    dh = rng.standard_normal((B, NH, S, DV))
    dC = rng.standard_normal((B, NH, DK, DV))
    dn = rng.standard_normal((B, NH, DK))
    opts = dict(gate=gate, normalize=normalize, chunk_size=L, normalizer_grad=True)
    _, _, ctx = tfla_cupy.mlstm_fwd(*(ref[n] for n in "qkvif"),
                                    initial_state=tfla_cupy.MLSTMState(ref["C0"], ref["n0"], ref["m0"]), **opts)
    want = tfla_cupy.mlstm_bwd(ctx, dh, (dC, dn, None))
    x = {n: _t(host[n], None, True) for n in "qkvif"}
    st = tfla_cupy.MLSTMState(*(_t(host[n], None, True) for n in ("C0", "n0", "m0")))
    h, last = tt.mlstm(*(x[n] for n in "qkvif"), initial_state=st, return_state=True, **opts)
    ((h * _t(dh)).sum() + (last.C * _t(dC)).sum() + (last.n * _t(dn)).sum()).backward()
    for n, w in zip("qkvif", want[:5]):
        assert rel_err(_np(x[n].grad), w) < (DF_TOL if n == "f" else BWD_TOL)["f32"], n
    assert rel_err(_np(st.C.grad), want.d_initial_state.C) < BWD_TOL["f32"]
    assert rel_err(_np(st.n.grad), want.d_initial_state.n) < BWD_TOL["f32"]


@pytest.mark.parametrize("normalizer_grad", [False, True])
def test_state_passing_through_autograd(normalizer_grad):
    """Two chained calls, the state carried as a tensor, give the gradients of one call."""
    tt = _tt()
    case = (1, 2, 300, 32, 64, 64, "exp", "f32", True)
    host, ref, dh, dC, x, st = _setup(case)
    opts = dict(chunk_size=64, normalizer_grad=normalizer_grad)
    h = tt.mlstm(*(x[n] for n in "qkvif"), initial_state=st, **opts)
    (h * _t(dh)).sum().backward()
    one = [x[n].grad.clone() for n in "qkvif"] + [st.C.grad.clone()]
    for t in list(x.values()) + list(st):
        t.grad = None
    cut = 150
    h1, mid = tt.mlstm(*(x[n][:, :, :cut] for n in "qkvif"), initial_state=st, return_state=True, **opts)
    h2 = tt.mlstm(*(x[n][:, :, cut:] for n in "qkvif"), initial_state=mid, **opts)
    ((h1 * _t(dh[:, :, :cut])).sum() + (h2 * _t(dh[:, :, cut:])).sum()).backward()
    two = [x[n].grad for n in "qkvif"] + [st.C.grad]
    for a, b, name in zip(two, one, ("dq", "dk", "dv", "di", "df", "dC0")):
        assert rel_err(_np(a), _np(b)) < 1e-4, name


def test_in_place_edit_before_backward_is_reported():
    tt = _tt()
    case = (1, 2, 64, 16, 16, 16, "exp", "f32", False)
    _, _, _, _, x, _ = _setup(case)
    q = x["q"].detach().clone().requires_grad_(False)
    h = tt.mlstm(q, x["k"], x["v"], x["i"], x["f"])
    q.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()


def test_step_matches_cupy_step():
    tt = _tt()
    rng = np.random.default_rng(seed_of("torch-step"))
    host, _ = make_inputs(rng, 2, 3, 1, 32, 64, DTYPES["bf16"], init=True)
    x = {n: (a[:, :, 0] if n in "qkvif" else a) for n, a in host.items()}
    xc = {n: cp.asarray(a) for n, a in x.items()}
    h_cp, st_cp = tfla_cupy.mlstm_step(*(xc[n] for n in "qkvif"), (xc["C0"], xc["n0"], xc["m0"]))
    xt = {n: _t(a.astype(np.float32), "bf16" if n in "qkv" else None) for n, a in x.items()}
    h, st = tt.mlstm_step(*(xt[n] for n in "qkvif"), (xt["C0"], xt["n0"], xt["m0"]))
    assert cp.array_equal(cp.from_dlpack(h), h_cp)
    assert cp.array_equal(cp.from_dlpack(st.C), st_cp.C)


# ------------------------------------------------------------------------------------------
# torch.compile and the custom operators on CUDA tensors
# ------------------------------------------------------------------------------------------

COMPILE_CASES = [  # B, NH, S, DK, DV, L, mode, dtype, initial state, normalizer_grad
    (1, 2, 200, 64, 128, 64, "exp", "f32", True, False),
    (1, 2, 200, 64, 128, 64, "exp", "bf16", True, True),
    (2, 3, 37, 16, 32, 16, "signn", "f16", False, False),
]


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_compile_fullgraph_equals_eager_and_the_reference(case):
    """torch.compile(fullgraph=True) (Inductor) of a loss around tt.mlstm: the same h as eager (the
    same kernels on the same inputs), the same gradients, and both against the float64 API."""
    tt = _tt()
    torch._dynamo.reset()
    B, NH, S, DK, DV, L, mode, dt, init, exact = case
    gate, normalize = GATE_MODES[mode]
    rng = np.random.default_rng(seed_of("torch-compile", *case))
    host, ref = make_inputs(rng, B, NH, S, DK, DV, DTYPES[dt], init=init)
    dh = rng.standard_normal((B, NH, S, DV)).astype(DTYPES[dt])
    dC = rng.standard_normal((B, NH, DK, DV)).astype(np.float32)
    opts = dict(gate=gate, normalize=normalize, chunk_size=L, normalizer_grad=exact)
    st_ref = tfla_cupy.MLSTMState(ref["C0"], ref["n0"], ref["m0"]) if init else None
    h_ref, _, ctx = tfla_cupy.mlstm_fwd(*(ref[n] for n in "qkvif"), initial_state=st_ref, **opts)
    want = tfla_cupy.mlstm_bwd(ctx, dh.astype(np.float64), (dC.astype(np.float64), None, None))
    DH, DC = _t(dh), _t(dC)

    def fn(q, k, v, i, f, C0, n0, m0):
        state = None if C0 is None else tfla_cupy.MLSTMState(C0, n0, m0)
        h, last = tt.mlstm(q, k, v, i, f, initial_state=state, return_state=True, **opts)
        return h, (h.float() * DH).sum() + (last.C * DC).sum()

    def run(f):
        x = {n: _t(host[n].astype(np.float32), dt if n in "qkv" else None, True) for n in "qkvif"}
        st = [_t(host[n], None, True) for n in ("C0", "n0", "m0")] if init else [None] * 3
        h, loss = f(*(x[n] for n in "qkvif"), *st)
        leaves = [x[n] for n in "qkvif"] + ([st[0]] if init else [])
        return h, torch.autograd.grad(loss, leaves)

    h_e, g_e = run(fn)
    h_c, g_c = run(torch.compile(fn, fullgraph=True))
    assert h_c.dtype == TORCH_DTYPE[dt] and h_c.is_cuda
    assert torch.equal(h_c, h_e)
    assert rel_err(_np(h_e), h_ref) < FWD_TOL[dt]
    names = ["dq", "dk", "dv", "di", "df"] + (["dC0"] if init else [])
    refs = list(want[:5]) + ([want.d_initial_state.C] if init else [])
    for got, eager, w, name in zip(g_c, g_e, refs, names):
        assert got.dtype == eager.dtype, name
        assert rel_err(_np(got), _np(eager)) < 1e-6, name
        assert rel_err(_np(eager), w) < (DF_TOL if name == "df" else BWD_TOL)[dt], name


def test_opcheck_on_cuda_tensors():
    """torch.library.opcheck of the three operators on CUDA tensors: the fake implementations
    against the kernels' outputs (shapes, dtypes, strides, device), schema, autograd registration."""
    _tt()
    ops = torch.ops.tfla_cupy
    rng = np.random.default_rng(seed_of("torch-opcheck"))
    for mode, dt, exact in (("exp", "bf16", True), ("signn", "f32", False)):
        gate, normalize = GATE_MODES[mode]
        host, _ = make_inputs(rng, 2, 2, 40, 16, 32, DTYPES[dt], init=True)
        x = [_t(host[n].astype(np.float32), dt if n in "qkv" else None, True) for n in "qkvif"]
        C0 = _t(host["C0"], None, True)
        n0 = _t(host["n0"], None, True) if normalize else None
        m0 = _t(host["m0"], None, True) if gate == "exp" else None
        opts = (gate, normalize, 16, 1e-6, None, "default", "", exact)
        torch.library.opcheck(ops.mlstm_fwd.default, (*x, C0, n0, m0, *opts))
        with torch.no_grad():
            h, C, n, m, N, M, C_inner, sign = ops.mlstm_fwd(*x, C0, n0, m0, *opts)
        assert C_inner.shape == ((2, 2, 16, 32 + 8) if exact else (0,))
        d = [None if t is None else t.detach() for t in (*x, C0, n0, m0)]
        present = [N if normalize else None, M if gate == "exp" else None, C_inner if exact else C,
                   h if exact else None, sign if exact else None]
        dh = torch.randn(h.shape, device="cuda").to(h.dtype)
        torch.library.opcheck(ops.mlstm_bwd.default, (*d, *present, dh, torch.randn_like(C), None, *opts))
    step = [t.detach()[:, :, 0] for t in x]
    torch.library.opcheck(ops.mlstm_step.default, (*step, C0.detach(), None, None, "sig", False, 1e-6, None))
