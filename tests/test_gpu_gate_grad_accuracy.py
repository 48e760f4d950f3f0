"""GPU path, float32: parameter gradients of a model-shaped problem (projections → mLSTM → per-head
norm → loss, gate_grad_model.py) within 3× the error of a float32 chain-rule baseline, both against
the float64 chain-rule reference (docs/math.md §12.1, the FlashAttention rule).

The reference is the NumPy path in float64 composed with the model's own gradients; the baseline
is the same model in float32 with the cell differentiated by the float32 chain rule of the
chunkwise form (gate_grad_model.chain_rule_fp32: the computation the kernels do, each gate gradient
collected from the products it enters). The GPU run computes the projections, the norm and the
parameter gradients by the same float32 host code; only the cell is the library's. Errors are
max|g − g64| / max|g64| per parameter, averaged over SEEDS independent problems (a single bias
gradient is a sum with heavy cancellation, so one draw is noisy). Checked: the gate biases (and
gate weights) with the default backward; every parameter with normalizer_grad=True. Long memory
(f̃ bias 3) and short (0), S up to 2048, the main head size.

float32 inputs run the sm80 kernels on every GPU (the Hopper backward takes 16-bit inputs only). The
Hopper family is checked in bfloat16: its gate-parameter sums against float64 on the same rounded
inputs, within 3× the sm80 family's error on the same problem (both form the direct-form terms, the
Hopper kernels from the compute-dtype dS their products use, the sm80 ones from fp32)."""

import numpy as np
import pytest

import gate_grad_model as gm
import tfla_cupy
from gpu_utils import BF16, cp, gpu, launched_kernels, rel_err
from tfla_cupy import config
from tfla_cupy._gpu import launch as gpu_launch

pytestmark = gpu

EPS = 1e-6
RATIO = 3.0
SEEDS = 3
#: (B, S, E, NH, DK, DV, L, forget-gate bias): the issue's model shape, longer sequences, the main heads
CASES = [(2, 320, 64, 4, 32, 64, 64, 3.0), (2, 320, 64, 4, 32, 64, 64, 0.0), (1, 2048, 64, 4, 32, 64, 64, 3.0),
         (1, 2048, 64, 4, 32, 64, 64, 0.0), (1, 1024, 64, 2, 128, 256, 128, 0.0)]


def _errors(case, normalizer_grad, seed):
    B, S, E, NH, DK, DV, L, f_bias = case
    rng = np.random.default_rng(seed)
    model = gm.make_model(rng, E, NH, DK, DV, f_bias=f_bias)
    x, T1, T2 = gm.model_inputs(rng, B, S, E, NH, DV)
    opts = dict(L=L, eps=EPS, normalizer_grad=normalizer_grad)
    _, ref = gm.model_grads_library(model, x, T1, T2, dtype=np.float64, **opts)
    _, base = gm.model_grads_fp32_chain_rule(model, x, T1, T2, **opts)
    _, got = gm.model_grads_library(model, x, T1, T2, dtype=np.float32, to_device=cp.asarray,
                                    to_host=cp.asnumpy, **opts)
    return ({n: rel_err(got[n], ref[n]) for n in gm.Model.NAMES},
            {n: rel_err(base[n], ref[n]) for n in gm.Model.NAMES})


@pytest.mark.parametrize("normalizer_grad", [False, True], ids=["default", "normgrad"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-S{}-E{}-NH{}-DK{}-DV{}-L{}-fbias{}".format(*c))
def test_parameter_gradients_within_3x_of_fp32_chain_rule(case, normalizer_grad):
    runs = [_errors(case, normalizer_grad, 1000 * s + 23) for s in range(SEEDS)]
    gpu_err = {n: np.mean([r[0][n] for r in runs]) for n in gm.Model.NAMES}
    base_err = {n: np.mean([r[1][n] for r in runs]) for n in gm.Model.NAMES}
    names = gm.Model.NAMES if normalizer_grad else ("Wi", "bi", "Wf", "bf")
    report = {n: f"{gpu_err[n]:.2e} vs {base_err[n]:.2e}" for n in gm.Model.NAMES}
    for n in names:
        assert np.isfinite(gpu_err[n]) and base_err[n] > 0, report
    over = [n for n in names if gpu_err[n] > RATIO * base_err[n]]
    assert not over, (over, report)


def _bf16(a):
    return np.asarray(a).astype(BF16)


def _gate_sums(x, di, df):
    """The gate parameters' gradients up to the soft cap: per head Σ_{b,t} dĩ, Σ_{b,t} df̃ (biases)
    and Σ_{b,t} x_t dĩ_t, Σ_{b,t} x_t df̃_t (weights)."""
    return dict(bi=di.sum((0, 2)), bf=df.sum((0, 2)), Wi=np.einsum("bse,bhs->eh", x, di),
                Wf=np.einsum("bse,bhs->eh", x, df))


@pytest.mark.parametrize("f_bias", [3.0, 0.0])
def test_hopper_bf16_gate_sums_as_accurate_as_sm80(monkeypatch, f_bias):
    """bfloat16, the Hopper backward (L = 128, the main heads; the per-stage kernels and the fused
    walk) against the forced sm80 family: the gate-parameter sums of the same problem against
    float64 (the NumPy path on the rounded inputs), averaged over SEEDS problems, within 3× of
    each other's error."""
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("needs compute capability 9.0 (the sm90 family)")
    B, S, E, NH, DK, DV, L = 1, 2048, 64, 2, 128, 256, 128
    errs = {"sm90": [], "walk": [], "sm80": []}
    kernel = {"sm90": "bwd_chunk_sm90_kernel", "walk": "bwd_walk_sm90_kernel"}
    for seed in range(SEEDS):
        rng = np.random.default_rng(7000 + seed)
        model = gm.make_model(rng, E, NH, DK, DV, f_bias=f_bias)
        x, T1, T2 = gm.model_inputs(rng, B, S, E, NH, DV)
        (q, k, v, i, f), _ = gm.cell_inputs(model, x, np.float32)
        q, k, v = (_bf16(a) for a in (q, k, v))
        h64, vjp64 = tfla_cupy.mlstm_vjp(*(np.asarray(a, np.float64) for a in (q, k, v, i, f)), chunk_size=L, eps=EPS)
        dh = _bf16(gm.loss_and_dh(h64, T1, T2, np.float64)[1])
        ref = _gate_sums(x, *vjp64(np.asarray(dh, np.float64))[3:5])
        for family in ("sm90", "walk", "sm80"):
            monkeypatch.setenv(config.FAMILY_ENV, "sm80" if family == "sm80" else "auto")
            monkeypatch.setenv(config.BWD_WALK_ENV, "1" if family == "walk" else "0")
            dev = [cp.asarray(a) for a in (q, k, v, i, f)]
            _, vjp = tfla_cupy.mlstm_vjp(*dev, chunk_size=L, eps=EPS)
            grads = []
            # (a fresh launch-spec cache, so that the backward looks its kernels up again and they are seen)
            monkeypatch.setattr(gpu_launch, "_GEOMETRIES", {})
            names = launched_kernels(monkeypatch, lambda: grads.append(vjp(cp.asarray(dh))))
            for fam, name in kernel.items():
                assert any(name in n for n in names) == (family == fam), names
            got = _gate_sums(x, *(cp.asnumpy(g).astype(np.float64) for g in grads[0][3:5]))
            errs[family].append({n: rel_err(got[n], ref[n]) for n in ref})
    mean = {fam: {n: np.mean([e[n] for e in runs]) for n in runs[0]} for fam, runs in errs.items()}
    report = {n: f"sm90 {mean['sm90'][n]:.2e}, walk {mean['walk'][n]:.2e} vs sm80 {mean['sm80'][n]:.2e}"
              for n in mean["sm90"]}
    for fam in ("sm90", "walk"):
        assert all(np.isfinite(v) for v in mean[fam].values()), report
        assert not [n for n in mean[fam] if mean[fam][n] > RATIO * mean["sm80"][n]], (fam, report)
