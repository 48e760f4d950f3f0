"""examples/train_jax.py: without JAX on a CUDA device it says what it needs and exits 0; its
training loop (jax.jit of value_and_grad through tfla_cupy.jax.mlstm) runs on XLA's CPU backend
with the NumPy path behind the pass callbacks and its loss goes down; on a GPU the example
itself trains."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from test_adapters_cpu import fake_gpu  # noqa: F401  (the fixture: GPU entry points on the NumPy path)

_spec = importlib.util.spec_from_file_location("train_jax", Path(__file__).parent.parent / "examples" / "train_jax.py")
train_jax = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_jax)

HAS_CUDA_JAX = train_jax.cuda_jax()[0] is not None


@pytest.mark.skipif(HAS_CUDA_JAX, reason="JAX has a CUDA device here: the GPU test runs the example")
def test_without_a_cuda_jax_it_says_so_and_exits_0(capsys):
    assert train_jax.main([]) == 0
    out = capsys.readouterr().out
    assert "train_jax: needs JAX with a CUDA device and CuPy: " in out and "Nothing to run." in out


def test_the_training_loop_learns_on_the_numpy_path(fake_gpu):  # noqa: F811
    jax, tj, _ = fake_gpu
    losses = train_jax.train(jax, tj.mlstm, steps=15, shape=(2, 32, 16), heads=(2, 8, 8), chunk_size=16,
                             verbose=False)
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_JAX, reason="needs JAX with a CUDA device and CuPy")
def test_the_example_trains_on_the_gpu(capsys):
    assert train_jax.main([]) == 0
    out = capsys.readouterr().out
    first, last = (float(x) for x in out.strip().splitlines()[-1].split()[1::2])
    assert last < 0.6 * first, out
