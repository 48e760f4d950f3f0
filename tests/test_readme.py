"""The README is a front page that holds: its Python code runs as printed and does what its
comments say (on the NumPy path it prints what it computed, and the state carried on with the next
tokens reproduces one call over all tokens; the CUDA part is skipped without a GPU,
CUDA_VISIBLE_DEVICES="" hides any GPU); the two set-up commands are the documented ones; every
headline number names its card and date; status cells stay one short line."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def readme():
    return (REPO / "README.md").read_text()


def python_blocks():
    return re.findall(r"```python\n(.*?)```", readme(), flags=re.S)


def table_after(heading):
    """The rows (lists of cells) of the first Markdown table below ``heading``, header excluded."""
    text = readme().split(heading, 1)[1]
    lines = [ln for ln in text.split("\n## ", 1)[0].splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


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


def test_the_two_set_up_commands_are_the_documented_ones():
    text = readme()
    venv = 'python3 -m venv .venv && .venv/bin/pip install ".[cuda12,test]" && '
    assert venv + ".venv/bin/python bench/bench.py" in text
    assert venv + ".venv/bin/pytest -q tests" in text
    assert (REPO / "bench" / "bench.py").is_file()


def test_every_headline_number_names_its_card_and_date():
    rows = table_after("## Results")
    assert len(rows) >= 5
    for row in rows:
        assert re.search(r"\d ms|\d GB", row[1]), row
        assert re.fullmatch(r"H[12]00, 20\d\d-\d\d-\d\d", row[-1]), row


def test_status_cells_are_one_short_line():
    rows = table_after("## Status")
    assert len(rows) >= 8
    long = [cell for row in rows for cell in row if len(cell) > 100]
    assert not long, long
