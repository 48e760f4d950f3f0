"""The README's Python code runs as printed and does what its comments say: on the NumPy path it
prints what it computed, and the state carried on with the next tokens reproduces one call over
all tokens. The CUDA part is skipped without a GPU (CUDA_VISIBLE_DEVICES="" hides any GPU)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def python_blocks():
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_python_code():
    assert python_blocks()


def test_readme_python_blocks_run_on_cpu_and_print_their_results():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, "-c", "\n".join(python_blocks())], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    m = re.search(r"h \(2, 4, 600, 128\) \+ \(2, 4, 400, 128\), last state C \(2, 4, 64, 128\); "
                  r"two calls vs one: (\S+)", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) <= 1e-9           # state passing: one call == two calls (float64)
    assert "no CUDA GPU: the CUDA part was skipped" in r.stdout


@pytest.mark.gpu
def test_readme_python_blocks_run_on_the_gpu():
    """On a GPU machine the README's CUDA part runs too: bf16 kernels, forward and backward.
    Its printed error compares bf16 outputs with the float64 result on the *unrounded* inputs,
    so the bound is loose (bf16 input rounding included)."""
    from gpu_utils import HAS_GPU
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, "-c", "\n".join(python_blocks())], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    m = re.search(r"GPU bf16 h \(2, 4, 1000, 128\): max error (\S+) of max\|h\|; dq \(2, 4, 1000, 64\) bfloat16",
                  r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) <= 5e-2
