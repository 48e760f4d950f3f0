"""Shared helpers of the CPU test suite: the tolerance table, random inputs, the error measure
and test ids. Every comparison is against a float64 reference on fresh random inputs."""

from __future__ import annotations

import functools
import inspect
import math
import os
import types
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from tfla_cupy.reference.gates import ROW_MAX_FLOOR

# JAX (where installed) must not take 75 % of the GPU at its first use: CuPy's tests share the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# ------------------------------------------------------------------------------------------
# Tolerances: relative errors max|out - ref| / max|ref| (see rel_err) unless noted.
# ------------------------------------------------------------------------------------------

#: Float64 identities between the step, chunkwise and parallel forms (measured ~1e-14).
TOL_EXACT = 1e-10
#: The public NumPy path vs the float64 reference stage it runs (same arithmetic).
TOL_SAME = 1e-12
#: Manual backward vs central finite differences of the frozen forward (measured ~1e-9).
TOL_FD = 1e-6
#: One call vs the same sequence in pieces with the state carried, forward and backward.
TOL_STATE_PASSING = 1e-9
#: Central-difference step and number of sampled entries per gradient.
FD_STEP = 1e-5
FD_SAMPLES = 12
#: A gradient with the §6.5 term dropped must miss the finite differences by more than this
#: (measured 0.8-0.9 relative).
FD_MISMATCH_MIN = 1e-2
#: The library's default ε.
EPS = 1e-6
#: Largest per-element relative change of h caused by the −10 row-max floor: where it is
#: active it only replaces ε·e^{m} by ε·e^{−10} next to a normalizer >= 1 (unstabilized units,
#: docs/math.md §2.2, §4.3), so |h_floor − h_step| <= ε·e^{−10}·|h| ≈ 4.5e-11 (plus rounding).
TOL_FLOOR = EPS * math.exp(ROW_MAX_FLOOR)

#: (gate, normalize) variants of the mLSTM and their id suffixes.
GATE_VARIANTS = [("exp", True), ("sig", True), ("sig", False)]


def gate_id(gate, normalize):
    return gate if normalize else f"{gate}-nonorm"


GATE_PARAMS = [pytest.param(g, n, id=gate_id(g, n)) for g, n in GATE_VARIANTS]


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def rel_err(out, ref):
    """max|out − ref| / max|ref| in float64 (the absolute error when ref is all zeros)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = np.max(np.abs(out - ref))
    scale = np.max(np.abs(ref))
    return err / scale if scale > 0 else err


@dataclass(frozen=True)
class Shape:
    """Problem sizes; ``L`` is the chunk size (None: the API default)."""

    B: int
    NH: int
    S: int
    DK: int
    DV: int
    L: int | None = None

    @property
    def id(self):
        s = f"B{self.B}-NH{self.NH}-S{self.S}-DK{self.DK}-DV{self.DV}"
        return s if self.L is None else f"{s}-L{self.L}"


def random_inputs(rng, shape, *, i_range=None, f_range=None, i_offset=0.0, f_offset=3.0):
    """q, k, v ~ N(0, 1); ĩ ~ i_offset + N(0, 1), f̃ ~ f_offset + N(0, 1) (docs/math.md §12),
    or uniform in i_range / f_range when given. Returns a dict q, k, v, i, f (float64)."""
    B, NH, S = shape.B, shape.NH, shape.S

    def gate(rng_range, offset):
        if rng_range is not None:
            return rng.uniform(*rng_range, size=(B, NH, S))
        return offset + rng.standard_normal((B, NH, S))

    return dict(
        q=rng.standard_normal((B, NH, S, shape.DK)),
        k=rng.standard_normal((B, NH, S, shape.DK)),
        v=rng.standard_normal((B, NH, S, shape.DV)),
        i=gate(i_range, i_offset),
        f=gate(f_range, f_offset),
    )


def random_state(rng, shape, gate):
    """A random initial state (C0, n0, m0); m0 is zeros for gate="sig" (no stabilizer)."""
    B, NH = shape.B, shape.NH
    C0 = rng.standard_normal((B, NH, shape.DK, shape.DV))
    n0 = rng.standard_normal((B, NH, shape.DK))
    m0 = rng.standard_normal((B, NH)) if gate == "exp" else np.zeros((B, NH))
    return C0, n0, m0


def zero_state(shape):
    """The absent initial state: zeros, with m_0 = 0 (docs/math.md §1.1)."""
    B, NH = shape.B, shape.NH
    return np.zeros((B, NH, shape.DK, shape.DV)), np.zeros((B, NH, shape.DK)), np.zeros((B, NH))


def ref_opts(shape, gate, normalize, *, eps=EPS, scale=None):
    """Options of the reference functions; the scale defaults to 1/sqrt(DK) like the API."""
    return dict(gate=gate, normalize=normalize, eps=eps,
                scale=shape.DK ** -0.5 if scale is None else scale)


def state_kwargs(state, names=("C0", "n0", "m0")):
    """A (C, n, m) triple as the keyword arguments of the reference functions."""
    return dict(zip(names, state))


@pytest.fixture
def rng(request):
    """A generator seeded from the test id: fresh inputs per test, reproducible per run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# ------------------------------------------------------------------------------------------
# NVRTC: the tests that compile through CuPy's NVRTC bindings skip where those are missing
# (a CPU-only install, `pip install ".[test]"` without the cuda12 / cuda13 extra).
# ------------------------------------------------------------------------------------------

#: The loader's entry point that compiles through NVRTC without a GPU.
NVRTC_ENTRY = "compile_for_arch"


def _referenced_names(code, module_globals, seen):
    """The names a code object refers to, through its nested code objects (lambdas,
    comprehensions) and the helper functions of the same module it calls (not other tests)."""
    if code in seen:
        return set()
    seen.add(code)
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _referenced_names(const, module_globals, seen)
    for name in list(names):
        obj = module_globals.get(name)
        if (isinstance(obj, types.FunctionType) and obj.__globals__ is module_globals
                and not name.startswith("test")):
            names |= _referenced_names(obj.__code__, module_globals, seen)
    return names


def uses_nvrtc(function) -> bool:
    """Whether a test function (or a helper of its module it calls) refers to NVRTC_ENTRY."""
    function = inspect.unwrap(function)
    code = getattr(function, "__code__", None)
    if code is None:
        return False
    return NVRTC_ENTRY in _referenced_names(code, function.__globals__, set())


@functools.lru_cache(maxsize=None)
def nvrtc_problem():
    """None when CuPy's NVRTC bindings import and load the NVRTC library, else why not."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - no CuPy, no bindings or no library: the same skip
        return f"{type(e).__name__}: {e}"
    return None


def pytest_collection_modifyitems(config, items):
    """Mark the tests that compile through NVRTC (marker ``nvrtc``, or found by uses_nvrtc) and
    skip them, with the reason, where NVRTC is not available."""
    for item in items:
        function = getattr(item, "function", None)
        if item.get_closest_marker("nvrtc") is None and function is not None and uses_nvrtc(function):
            item.add_marker(pytest.mark.nvrtc)
    marked = [item for item in items if item.get_closest_marker("nvrtc") is not None]
    if marked and nvrtc_problem() is not None:
        skip = pytest.mark.skip(reason=f"needs NVRTC through CuPy (install the cuda12 or cuda13 extra): "
                                       f"{nvrtc_problem()}")
        for item in marked:
            item.add_marker(skip)
