"""A complete training step with tfla_cupy: forward, a loss, the manual gradients, an SGD update.

    python examples/train_step.py            # CuPy on the GPU if there is one, else NumPy (says so)

The model is one mLSTM layer on an input x (B, S, E): per-head projections to q, k, v and the gate
pre-activations, the mLSTM, a per-(token, head) RMS norm (the scale-invariant consumer under which
the mLSTM's custom backward is the true gradient, docs/math.md §6.4), and a linear read-out
trained to a random target with a squared error. Every gradient is written out by hand.
"""

from __future__ import annotations

import numpy as np

import tfla_cupy

B, S, E, NH, DK, DV = 2, 256, 64, 4, 32, 32
NORM_EPS = 1e-6


def array_module():
    try:
        import cupy
        if cupy.cuda.is_available():
            return cupy
    except ImportError:
        pass
    return np


def init_params(xp, rng, dtype):
    def w(*shape):
        return xp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), dtype=dtype)
    return dict(Wq=w(E, NH * DK), Wk=w(E, NH * DK), Wv=w(E, NH * DV), Wi=w(E, NH), Wf=w(E, NH),
                bf=xp.full((NH,), 3.0, dtype=dtype), Wo=w(NH * DV, E))


def heads(t, d):
    """(B, S, NH·d) -> (B, NH, S, d)"""
    return t.reshape(B, S, NH, d).transpose(0, 2, 1, 3)


def unheads(t):
    """(B, NH, S, d) -> (B, S, NH·d)"""
    return t.transpose(0, 2, 1, 3).reshape(B, S, -1)


def loss_and_grads(xp, p, x, y):
    """Forward pass, loss, and the gradient of every parameter (by hand)."""
    q, k, v = heads(x @ p["Wq"], DK), heads(x @ p["Wk"], DK), heads(x @ p["Wv"], DV)
    i = (x @ p["Wi"]).transpose(0, 2, 1)               # (B, NH, S)
    f = (x @ p["Wf"] + p["bf"]).transpose(0, 2, 1)
    h, vjp = tfla_cupy.mlstm_vjp(q, k, v, i, f, chunk_size=64)
    rms = xp.sqrt((h * h).mean(-1, keepdims=True) + NORM_EPS)
    hn = h / rms                                       # per-(token, head) RMS norm
    out = unheads(hn) @ p["Wo"]                        # (B, S, E)
    err = out - y
    loss = float((err * err).mean())

    d_out = 2 * err / err.size
    g = {"Wo": unheads(hn).reshape(-1, NH * DV).T @ d_out.reshape(-1, E)}
    d_hn = heads(d_out @ p["Wo"].T, DV)
    d_h = (d_hn - hn * (d_hn * hn).mean(-1, keepdims=True)) / rms   # RMS-norm backward
    dq, dk, dv, di, df, _ = vjp(d_h)
    xf = x.reshape(-1, E)
    g["Wq"] = xf.T @ unheads(dq).reshape(-1, NH * DK)
    g["Wk"] = xf.T @ unheads(dk).reshape(-1, NH * DK)
    g["Wv"] = xf.T @ unheads(dv).reshape(-1, NH * DV)
    g["Wi"] = xf.T @ di.transpose(0, 2, 1).reshape(-1, NH)
    g["Wf"] = xf.T @ df.transpose(0, 2, 1).reshape(-1, NH)
    g["bf"] = df.sum(axis=(0, 2))
    return loss, g


def train(steps=20, lr=0.5, xp=None, dtype=np.float32, seed=0, verbose=True):
    """Run `steps` SGD steps on a fixed batch; returns the losses."""
    xp = xp or array_module()
    rng = np.random.default_rng(seed)
    p = init_params(xp, rng, dtype)
    x = xp.asarray(rng.standard_normal((B, S, E)), dtype=dtype)
    y = xp.asarray(rng.standard_normal((B, S, E)), dtype=dtype)
    losses = []
    for step in range(steps):
        loss, g = loss_and_grads(xp, p, x, y)
        for name in p:
            p[name] -= lr * g[name]
        losses.append(loss)
        if verbose:
            print(f"step {step:3d}  loss {loss:.5f}")
    return losses


if __name__ == "__main__":
    xp = array_module()
    where = "CuPy on the GPU (CUDA kernels)" if xp is not np else "NumPy (no GPU: float64 reference path)"
    print(f"training one mLSTM layer with {where}")
    losses = train(xp=xp)
    print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f}")
