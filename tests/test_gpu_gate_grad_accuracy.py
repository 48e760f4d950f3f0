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

float32 inputs run the sm80 kernels on every GPU (the Hopper backward takes 16-bit inputs only)."""

import numpy as np
import pytest

import gate_grad_model as gm
from gpu_utils import cp, gpu, rel_err

pytestmark = gpu

EPS = 1e-6
RATIO = 3.0
#: The forget-gate parameters, whose gradients come from the identity form of bwd_gates.cuh (a reverse
#: sum of q·dq − k·dk over the whole sequence) and miss the bar on the H100 (2026-12-07, docs/math.md
#: §12.1: the direct form designed there is not in the kernels yet). Their cases are expected
#: failures, reported with the measured numbers; every other parameter must meet the bar.
FORGET_GATE = {"Wf", "bf"}
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
    over = []
    for n in names:
        assert np.isfinite(gpu_err[n]) and base_err[n] > 0, report
        if gpu_err[n] > RATIO * base_err[n]:
            over.append(n)
    assert not set(over) - FORGET_GATE, (over, report)
    if over:  # the known defect of the identity-form gate gradients: docs/math.md §12.1
        pytest.xfail(f"forget-gate gradients above {RATIO}x the fp32 chain rule's error: "
                     + ", ".join(f"{n} {report[n]}" for n in over))
