"""The installed distribution ships every CUDA source next to the Python package, so kernels load
from a normal (non-editable) install; the no-GPU NumPy demo of the benchmark runs."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import tfla_cupy
from tfla_cupy import _loader

REPO = Path(__file__).resolve().parent.parent


def test_sources_are_found_and_complete():
    names = {p.name for p in _loader.source_files()}
    assert {"tfla.cu", "params.cuh", "mma.cuh", "fwd_states.cuh", "fwd_outputs.cuh", "bwd_dstates.cuh",
            "bwd_chunks.cuh", "bwd_gates.cuh", "chunk_gates.cuh", "step.cuh"} <= names


def test_installed_wheel_ships_cuda_sources():
    installed = Path(tfla_cupy.__file__).resolve().parent
    if REPO in installed.parents:
        pytest.skip("tfla_cupy is imported from the source tree, not from an installed distribution")
    # The distribution installed at `installed`: a source tree on sys.path (its egg-info from the
    # build) may also answer to the name, and its file list is relative to the tree, not the wheel.
    dists = [d for d in importlib.metadata.distributions(name="tfla-cupy")
             if Path(d.locate_file("tfla_cupy/__init__.py")).resolve().parent == installed]
    assert dists, f"no installed distribution of tfla-cupy provides {installed}"
    files = {str(f) for f in dists[0].files or []}
    for src in (REPO / "cuda_src").iterdir():
        if src.suffix in (".cu", ".cuh"):
            assert f"tfla_cupy/cuda_src/{src.name}" in files, f"{src.name} missing from the wheel"
    assert _loader.source_dir() == installed / "cuda_src"


def test_benchmark_without_gpu_runs_the_reference_and_says_so(tmp_path):
    try:
        import cupy
        if cupy.cuda.is_available():
            pytest.skip("a GPU is present: the benchmark would run the CUDA kernels")
    except ImportError:
        pass
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU found: running the float64 NumPy reference" in r.stdout
    assert "reference fw+bw" in r.stdout
