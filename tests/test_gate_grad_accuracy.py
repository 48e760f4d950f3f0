"""Gate-gradient accuracy on the CPU (docs/math.md §6.6, §12.1): the model-shaped problem of
gate_grad_model.py with the NumPy path's normalizer_grad=True against central finite
differences of the whole model loss at ε = 1e-6 and 1e-3 (float64: exact), and the float32
chain-rule baseline that tests/test_gpu_gate_grad_accuracy.py measures the GPU against — in
float64 it is the NumPy path to rounding (the same gradient), in float32 its errors are those of
a float32 computation. Fresh random inputs, float64 references."""

from __future__ import annotations

import numpy as np
import pytest

import tfla_cupy
import gate_grad_model as gm
from conftest import rel_err

STEP = 1e-6
TOL = 1e-6


@pytest.mark.parametrize("normalizer_grad", [False, True], ids=["default", "normgrad"])
def test_chain_rule_in_float64_is_the_library_gradient(rng, normalizer_grad):
    """chain_rule_backward in float64 equals the NumPy path (custom backward, or with
    normalizer_grad=True the gradient of h as computed, stabilizer part included) to rounding."""
    H, S, DK, DV, L = 3, 70, 8, 6, 16
    q, k = rng.standard_normal((2, 1, H, S, DK))
    v = rng.standard_normal((1, H, S, DV))
    i = 2.0 + rng.standard_normal((1, H, S))
    f = 3.0 + rng.standard_normal((1, H, S))
    dh = rng.standard_normal((1, H, S, DV))
    h, vjp = tfla_cupy.mlstm_vjp(q, k, v, i, f, chunk_size=L, eps=1e-3, normalizer_grad=normalizer_grad)
    want = vjp(dh)
    h64, cache = gm.chunkwise_forward(q[0], k[0], v[0], i[0], f[0], L=L, eps=1e-3, dtype=np.float64)
    got = gm.chain_rule_backward(cache, dh[0], normalizer_grad=normalizer_grad)
    assert rel_err(h64, h[0]) < 1e-13
    for name, a, b in zip(("dq", "dk", "dv", "di", "df"), got, want[:5]):
        assert rel_err(a, b[0]) < 1e-12, name


@pytest.mark.parametrize("normalizer_grad", [False, True], ids=["default", "normgrad"])
def test_chain_rule_in_float32(rng, normalizer_grad):
    """The float32 baseline: float32 results with float32-sized errors (not exact, not broken)."""
    B, S, E, NH, DK, DV, L = 1, 200, 16, 2, 16, 16, 32
    model = gm.make_model(rng, E, NH, DK, DV, f_bias=3.0)
    x, T1, T2 = gm.model_inputs(rng, B, S, E, NH, DV)
    _, ref = gm.model_grads_library(model, x, T1, T2, L=L, eps=1e-6, normalizer_grad=normalizer_grad,
                                    dtype=np.float64)
    _, got = gm.model_grads_fp32_chain_rule(model, x, T1, T2, L=L, eps=1e-6, normalizer_grad=normalizer_grad)
    for name in gm.Model.NAMES:
        assert got[name].dtype == np.float32
        assert 0 < rel_err(got[name], ref[name]) < 1e-4, name


def _model_loss(model, x, T1, T2, L, eps):
    (q, k, v, i, f), _ = gm.cell_inputs(model, x, np.float64)
    h = tfla_cupy.mlstm(q, k, v, i, f, chunk_size=L, eps=eps)
    return gm.loss_and_dh(h, T1, T2, np.float64)[0]


@pytest.mark.parametrize("eps", [pytest.param(1e-6, id="eps1e-6"), pytest.param(1e-3, id="eps1e-3")])
def test_model_normalizer_grad_matches_finite_differences(rng, eps):
    """Every parameter gradient of the model with the NumPy path's normalizer_grad=True against
    central differences of the model loss (sampled entries and a random direction per parameter);
    S not a multiple of the chunk. At ε = 1e-3 the ε·e^{M} term through the running maximum is
    needed (the gradient without it misses by far more than the tolerance)."""
    B, S, E, NH, DK, DV, L = 2, 41, 6, 2, 4, 6, 16
    model = gm.make_model(rng, E, NH, DK, DV, f_bias=1.0)
    model.bi = model.bi + 2.0        # stabilizer well above 0: ε·e^{M} is not negligible
    x, T1, T2 = gm.model_inputs(rng, B, S, E, NH, DV)
    _, grads = gm.model_grads_library(model, x, T1, T2, L=L, eps=eps, normalizer_grad=True, dtype=np.float64)

    def loss():
        return _model_loss(model, x, T1, T2, L, eps)

    for name in gm.Model.NAMES:
        arr, grad = getattr(model, name), grads[name]
        got, want = [], []
        for flat in rng.choice(arr.size, size=min(6, arr.size), replace=False):
            idx = np.unravel_index(flat, arr.shape)
            old = arr[idx]
            arr[idx] = old + STEP
            up = loss()
            arr[idx] = old - STEP
            down = loss()
            arr[idx] = old
            want.append((up - down) / (2 * STEP))
            got.append(grad[idx])
        assert rel_err(np.array(got), np.array(want)) < TOL, name
        u = rng.standard_normal(arr.shape)
        base = arr.copy()
        arr[...] = base + STEP * u
        up = loss()
        arr[...] = base - STEP * u
        down = loss()
        arr[...] = base
        scale = np.sqrt(np.sum(grad ** 2) * np.sum(u ** 2))
        assert abs(np.sum(grad * u) - (up - down) / (2 * STEP)) < TOL * scale, name


@pytest.mark.parametrize("gate,normalize", [("exp", True), ("sig", True), ("sig", False)], ids=["exp", "sig", "sig-nonorm"])
@pytest.mark.parametrize("L", [16, 32])
def test_direct_gate_gradients_equal_the_identity(rng, gate, normalize, L):
    """reference.chunkwise.bwd_gates_direct (chunk-local pair sums, §12.1: the form the kernels are
    to compute) equals bwd_gates (the reverse sum of q·dq − k·dk plus ⟨dC_last, C_last⟩) in float64,
    with an initial state, a last-state gradient and a ragged last chunk."""
    from tfla_cupy.reference import chunkwise
    from tfla_cupy.reference.gates import log_gates
    from conftest import Shape, random_inputs, random_state
    shape = Shape(2, 2, 75, 8, 6, L)
    x = random_inputs(rng, shape, f_offset=1.0)
    C0, n0, m0 = random_state(rng, shape, gate)
    dh = rng.standard_normal((2, 2, 75, 6))
    dC_last = rng.standard_normal((2, 2, 8, 6))
    opts = dict(L=L, scale=8 ** -0.5, eps=1e-6, normalize=normalize)
    q, k, v, i, f = (x[n] for n in "qkvif")
    *_, di, df, _ = chunkwise.bwd(q, k, v, i, f, C0, n0, m0, dh, dC_last, gate=gate, **opts)
    h, N, M, (C, n, m) = chunkwise.fwd(q, k, v, i, f, C0, n0, m0, gate=gate, **opts)
    log_i, log_f = log_gates(i, f, gate)
    dC = chunkwise.bwd_dstates(q, log_i, log_f, m, N, M, dh, dC_last, **opts)
    parts = chunkwise.gate_grad_parts(q, k, v, log_i, log_f, C, m, dC, N, M, dh, **opts)
    di2, df2 = chunkwise.bwd_gates_direct(parts, i, f, gate=gate, L=L)
    assert rel_err(di2, di) < 1e-12 and rel_err(df2, df) < 1e-12
