"""The training-step example of the README runs, learns, and its hand-written gradients match
finite differences of its loss (NumPy path, float64)."""

import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("train_step", Path(__file__).parent.parent / "examples" / "train_step.py")
train_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_step)


def test_training_reduces_the_loss():
    losses = train_step.train(steps=8, xp=np, dtype=np.float64, verbose=False)
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0]


def test_manual_gradients_match_finite_differences():
    """Behind a per-(token, head) RMS norm the mLSTM's custom backward is the true gradient up
    to O(ε) terms (docs/math.md §6.4), so the whole step's gradients match finite differences
    (measured: ≤ 4.3e-5 of the largest entry, for the forget-gate bias; ≤ 1e-8 for W_v)."""
    rng = np.random.default_rng(1)
    p = train_step.init_params(np, rng, np.float64)
    x = rng.standard_normal((train_step.B, train_step.S, train_step.E))
    y = rng.standard_normal((train_step.B, train_step.S, train_step.E))
    _, g = train_step.loss_and_grads(np, p, x, y)
    for name in ("Wq", "Wk", "Wv", "Wi", "Wf", "bf", "Wo"):
        scale = np.abs(g[name]).max()
        for _ in range(3):
            idx = tuple(rng.integers(0, s) for s in p[name].shape)
            old, step = p[name][idx], 1e-5
            p[name][idx] = old + step
            up, _ = train_step.loss_and_grads(np, p, x, y)
            p[name][idx] = old - step
            down, _ = train_step.loss_and_grads(np, p, x, y)
            p[name][idx] = old
            fd = (up - down) / (2 * step)
            assert abs(fd - g[name][idx]) <= 1e-4 * scale, (name, idx, fd, g[name][idx])
