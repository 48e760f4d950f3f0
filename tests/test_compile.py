"""Every CUDA kernel instantiation compiles through NVRTC for sm_80, sm_90 and sm_90a without a
GPU, and ptxas reports no register spills (tfla_cupy.config.all_instantiations is the list the
launch heuristic can ask for)."""

import re

import pytest

from tfla_cupy import _loader, config

ARCHS = ("sm_80", "sm_90", "sm_90a")
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _spills(log):
    """{mangled kernel name: spill bytes} from a ptxas -v log."""
    out, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            continue
        m = _SPILL.search(line)
        if m and current is not None:
            out[current] = int(m.group(1)) + int(m.group(2))
            current = None
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mma", sorted(config.all_instantiations()))
def test_every_instantiation_compiles_without_spills(mma, arch):
    names = config.all_instantiations()[mma]
    log, lowered = _loader.compile_for_arch(names, arch)
    assert set(lowered) == set(names)
    spills = _spills(log)
    assert len(spills) == len(names), f"ptxas reported {len(spills)} entry functions for {len(names)} names"
    spilling = {k: v for k, v in spills.items() if v}
    assert not spilling, f"register spills on {arch}: {spilling}"


def test_source_inlines_every_header():
    src = _loader.source()
    for path in _loader.source_files():
        if path.suffix == ".cuh":
            assert f"// ---- {path.name} ----" in src, f"{path.name} is not part of the translation unit"
    assert "#include \"" not in src


def test_compile_error_carries_the_log():
    with pytest.raises(_loader.CompileError, match="error"):
        _loader.compile_for_arch(["tfla::no_such_kernel<int>"], "sm_80", verbose_ptxas=False)
