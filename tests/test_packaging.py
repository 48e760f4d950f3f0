"""The wheel ships what a normal (non-editable) install needs: every CUDA source next to the
Python package, every Python module, and kernels that load from there; the required
dependencies are the ones the package imports.

The wheel is built from a copy of the source tree with the running interpreter's setuptools
(`pip wheel --no-deps --no-build-isolation`: offline, a few seconds; the `test` extra brings a
setuptools new enough for pyproject.toml), so this runs whatever way tfla_cupy itself is
installed — also from a virtual environment inside the checkout, as the README's commands make."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tfla_cupy import _loader

REPO = Path(__file__).resolve().parent.parent
#: What a build needs from the checkout (pyproject.toml names the packages and their data).
BUILD_INPUTS = ("pyproject.toml", "README.md", "tfla_cupy", "cuda_src")


def test_sources_are_found_and_complete():
    names = {p.name for p in _loader.source_files()}
    assert {"tfla.cu", "params.cuh", "mma.cuh", "fwd_states.cuh", "fwd_outputs.cuh", "bwd_dstates.cuh",
            "bwd_chunks.cuh", "bwd_gates.cuh", "chunk_gates.cuh", "step.cuh"} <= names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the checkout (the checkout itself gets no build/ or egg-info)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(root / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"building the wheel failed (is the test extra installed?):\n{r.stdout}\n{r.stderr}"
    wheels = list((root / "dist").glob("tfla_cupy-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_ships_every_cuda_source_and_python_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [p.name for p in (REPO / "cuda_src").iterdir() if p.suffix in (".cu", ".cuh")]
    assert "tfla.cu" in sources
    missing = [f"tfla_cupy/cuda_src/{n}" for n in sources if f"tfla_cupy/cuda_src/{n}" not in names]
    modules = [p.relative_to(REPO).as_posix() for p in (REPO / "tfla_cupy").rglob("*.py")
               if "__pycache__" not in p.parts]
    missing += [m for m in modules if m not in names]
    assert not missing, f"missing from the wheel: {missing}"
    assert "tfla_cupy/py.typed" in names


def test_an_installed_wheel_loads_its_own_sources(wheel, tmp_path):
    """Installed into a folder of its own (a pure-Python wheel installs by unpacking), first on
    PYTHONPATH and imported from outside the checkout, the loader finds cuda_src inside the
    package and expands every header."""
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = ("import tfla_cupy, pathlib; from tfla_cupy import _loader; "
            "print(pathlib.Path(tfla_cupy.__file__).resolve().parent); print(_loader.source_dir()); "
            "src = _loader.source(); print(sum(f'// ---- {p.name} ----' in src for p in _loader.source_files() "
            "if p.suffix == '.cuh'), sum(p.suffix == '.cuh' for p in _loader.source_files()))")
    env = dict(os.environ, PYTHONPATH=str(target))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    package, source_dir, counts = r.stdout.splitlines()
    assert Path(package) == target.resolve() / "tfla_cupy"
    assert Path(source_dir) == Path(package) / "cuda_src"
    inlined, headers = map(int, counts.split())
    assert headers > 10 and inlined == headers


def _dependency_names():
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)\]", text, flags=re.M | re.S).group(1)
    return [re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in re.findall(r'"([^"]+)"', block)]


def test_every_required_dependency_is_imported_by_the_package():
    """A required dependency that nothing imports is weight for every install."""
    assert _dependency_names()
    text = "\n".join(p.read_text() for p in (REPO / "tfla_cupy").rglob("*.py"))
    unused = [d for d in _dependency_names()
              if not re.search(rf"^\s*(import|from) {d.replace('-', '_')}\b", text, flags=re.M)]
    assert not unused, f"required but never imported by tfla_cupy: {unused}"
