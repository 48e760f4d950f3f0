"""Training a small mLSTM layer in JAX: ``tfla_cupy.jax.mlstm`` inside a ``jax.jit``-compiled step.

    python examples/train_jax.py             # needs JAX with a CUDA device and CuPy; says so otherwise

The layer maps x (B, S, E) to per-head q, k, v and gate pre-activations, runs the mLSTM
(the CUDA kernels, forward and backward through ``jax.custom_vjp``), normalises each (token,
head) output by its RMS and reads out to E. A teacher layer of the same shape with other random
weights makes the targets; the student starts from its own weights and follows plain SGD on the
squared error, the whole step — forward, ``jax.value_and_grad``, update — one ``jax.jit``
function. The loss goes down (to about a quarter of its first value in 60 steps).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

B, S, E, NH, DK, DV = 2, 128, 64, 4, 32, 32
NORM_EPS = 1e-6


def cuda_jax():
    """(jax, None) where JAX has a CUDA device and CuPy can run the kernels, else (None, why not)."""
    try:
        import jax
    except ImportError:
        return None, "JAX is not installed (pip install 'tfla-cupy[jax]' and JAX's CUDA plugin)"
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices:
        return None, f"JAX {jax.__version__} has no CUDA device (backend: {jax.default_backend()})"
    try:
        import cupy
        if not cupy.cuda.is_available():
            return None, "CuPy sees no CUDA device"
    except ImportError:
        return None, "CuPy is not installed (pip install 'tfla-cupy[cuda12]')"
    return jax, None


def init_params(rng, *, E=E, NH=NH, DK=DK, DV=DV, dtype=np.float32):
    """Projection weights scaled by 1/sqrt(fan-in); a forget-gate bias of 3 (long memory at start)."""
    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype)
    return dict(Wq=w(E, NH * DK), Wk=w(E, NH * DK), Wv=w(E, NH * DV), Wi=w(E, NH), Wf=w(E, NH),
                bf=np.full((NH,), 3.0, dtype), Wo=w(NH * DV, E))


def make_model(jax, mlstm, *, NH=NH, DK=DK, DV=DV, chunk_size=64):
    """model(params, x) -> y, x (B, S, E); ``mlstm`` is tfla_cupy.jax.mlstm."""
    jnp = jax.numpy

    def heads(t, d):                       # (B, S, NH·d) -> (B, NH, S, d)
        b, s, _ = t.shape
        return t.reshape(b, s, NH, d).transpose(0, 2, 1, 3)

    def model(p, x):
        b, s, _ = x.shape
        q, k, v = heads(x @ p["Wq"], DK), heads(x @ p["Wk"], DK), heads(x @ p["Wv"], DV)
        i = (x @ p["Wi"]).transpose(0, 2, 1)                       # (B, NH, S)
        f = (x @ p["Wf"] + p["bf"]).transpose(0, 2, 1)
        h = mlstm(q, k, v, i, f, chunk_size=chunk_size)            # (B, NH, S, DV)
        h = h / jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + NORM_EPS)
        return h.transpose(0, 2, 1, 3).reshape(b, s, NH * DV) @ p["Wo"]

    return model


def train(jax, mlstm, *, steps=60, lr=0.5, seed=0, shape=(B, S, E), heads=(NH, DK, DV), chunk_size=64,
          verbose=True):
    """SGD on a fixed batch towards a teacher's outputs; returns the losses (floats)."""
    jnp = jax.numpy
    b, s, e = shape
    nh, dk, dv = heads
    rng = np.random.default_rng(seed)
    model = make_model(jax, mlstm, NH=nh, DK=dk, DV=dv, chunk_size=chunk_size)
    x = jnp.asarray(rng.standard_normal((b, s, e)).astype(np.float32))
    y = model(jax.tree_util.tree_map(jnp.asarray, init_params(rng, E=e, NH=nh, DK=dk, DV=dv)), x)   # the teacher
    params = jax.tree_util.tree_map(jnp.asarray, init_params(rng, E=e, NH=nh, DK=dk, DV=dv))

    def loss_fn(p):
        return jnp.mean((model(p, x) - y) ** 2)

    @jax.jit
    def step(p):
        loss, g = jax.value_and_grad(loss_fn)(p)
        return loss, jax.tree_util.tree_map(lambda w, d: w - lr * d, p, g)

    losses = []
    for t in range(steps):
        loss, params = step(params)
        losses.append(float(loss))
        if verbose and (t % 10 == 0 or t == steps - 1):
            print(f"step {t:3d}  loss {losses[-1]:.5f}")
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    jax, why = cuda_jax()
    if jax is None:
        print(f"train_jax: needs JAX with a CUDA device and CuPy: {why}. Nothing to run.")
        return 0
    import tfla_cupy.jax as tj
    print(f"training one mLSTM layer with tfla_cupy.jax under jax.jit on {jax.devices('gpu')[0]}")
    losses = train(jax, tj.mlstm, steps=args.steps)
    print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f}")
    if not all(np.isfinite(losses)) or losses[-1] >= losses[0]:
        print("train_jax: the loss did not go down")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
