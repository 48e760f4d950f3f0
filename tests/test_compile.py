"""CUDA kernels compile through NVRTC without a GPU, ptxas reports no register spills and, for
the Hopper kernels, no serialised wgmma pipeline (ptxas info C7511 / C7515 / C7520).

The default run compiles one instantiation of every kernel family (the template before ``<``)
for sm_80 and sm_90a; the full matrix — every instantiation the launch heuristic can ask for
(tfla_cupy.config.all_instantiations) for sm_80, sm_90 and sm_90a — carries the marker
``nvrtc_matrix``, which the default run deselects and .ci/run runs explicitly
(``pytest -m nvrtc_matrix tests``)."""

import re

import pytest

from tfla_cupy import _loader, config

ARCHS = ("sm_80", "sm_90", "sm_90a")
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
#: ptxas info C7511 / C7515 / C7520: wgmma instructions of a function run one after another (registers
#: touched inside the asynchronous window, or too few registers): correct but several times slower.
_SERIALIZED = re.compile(r"\(C75(?:11|15|20)\)[^\n]*?function '(\w+)'")


def _family(name):
    """The kernel template of an instantiation: ``tfla::fwd_h_kernel<...>`` -> ``tfla::fwd_h_kernel``."""
    return name.split("<", 1)[0]


def one_per_family():
    """One instantiation of every kernel family: the main path first (16-bit policies, the tiles
    the heuristic picks at the default chunk size), any other instantiation for a family the
    main path does not have."""
    groups = config.all_instantiations()
    order = sorted(groups, key=lambda mma: (config.ELEMENT_BYTES[mma], mma))
    out = {}
    for mma in order:
        main = config.pick_config(mma, 128, 256, config.DEFAULT_CHUNK_SIZE).fwd_h.cpp()
        for name in sorted(groups[mma], key=lambda n: main not in n and "ChunkTile" in n):
            out.setdefault(_family(name), name)
    return out


def _check_compiles_without_spills(names, arch):
    log, lowered = _loader.compile_for_arch(names, arch)
    assert set(lowered) == set(names)
    spills = _spills(log)
    assert len(spills) == len(names), f"ptxas reported {len(spills)} entry functions for {len(names)} names"
    spilling = {k: v for k, v in spills.items() if v}
    assert not spilling, f"register spills on {arch}: {spilling}"
    serialized = sorted({m.group(1) for m in _SERIALIZED.finditer(log)})
    assert not serialized, f"ptxas serialised the wgmma pipeline on {arch} (C7511/C7515/C7520) in: {serialized}"


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


@pytest.mark.parametrize("arch", ("sm_80", "sm_90a"))
def test_one_instantiation_of_every_family_compiles_without_spills(arch):
    names = list(one_per_family().values())
    _check_compiles_without_spills(names, arch)


def test_one_per_family_covers_every_family():
    families = {_family(n) for group in config.all_instantiations().values() for n in group}
    assert set(one_per_family()) == families
    assert len(families) >= 9, sorted(families)


@pytest.mark.nvrtc_matrix
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mma", sorted(config.all_instantiations()))
def test_every_instantiation_compiles_without_spills(mma, arch):
    _check_compiles_without_spills(config.all_instantiations()[mma], arch)


def test_source_inlines_every_header():
    src = _loader.source()
    for path in _loader.source_files():
        if path.suffix == ".cuh":
            assert f"// ---- {path.name} ----" in src, f"{path.name} is not part of the translation unit"
    assert "#include \"" not in src


def test_compile_error_carries_the_log():
    with pytest.raises(_loader.CompileError, match="error"):
        _loader.compile_for_arch(["tfla::no_such_kernel<int>"], "sm_80", verbose_ptxas=False)


def test_conftest_finds_the_tests_that_need_nvrtc():
    """tests/conftest.py marks (and, without CuPy's NVRTC, skips) the tests that compile: called
    directly or through a helper of the module, and no other test."""
    from conftest import uses_nvrtc
    assert uses_nvrtc(test_compile_error_carries_the_log)
    assert uses_nvrtc(test_every_instantiation_compiles_without_spills)
    assert uses_nvrtc(test_one_instantiation_of_every_family_compiles_without_spills)
    assert not uses_nvrtc(test_source_inlines_every_header)
    assert not uses_nvrtc(test_one_per_family_covers_every_family)


def test_development_options_reach_every_compilation(monkeypatch):
    """TFLA_CUPY_NVRTC_OPTIONS adds its options to every compilation: with the bounded mbarrier
    wait (-DTFLA_WAIT_LIMIT) and -lineinfo the warp-specialised forward and the fused forward
    still build for sm_90a (a debug build, which may spill); a malformed option, or a limit too
    small to mean anything, is NVRTC's error, with its log."""
    monkeypatch.setenv(_loader.NVRTC_OPTIONS_ENV, "-DTFLA_WAIT_LIMIT=100000000 -lineinfo")
    assert _loader.options()[-2:] == ("-DTFLA_WAIT_LIMIT=100000000", "-lineinfo")
    names = [config.fused_ws_kernel("MmaBF16", gate) for gate in config.GATE_POLICY.values()]
    names.append(config.fused_fwd_kernel("MmaBF16", "tfla::GateExp"))
    log, lowered = _loader.compile_for_arch(names, "sm_90a")
    assert set(lowered) == set(names) and len(_spills(log)) == len(names), log
    monkeypatch.setenv(_loader.NVRTC_OPTIONS_ENV, "--no-such-option")
    with pytest.raises(_loader.CompileError):
        _loader.compile_for_arch(names[:1], "sm_80", verbose_ptxas=False)
    monkeypatch.setenv(_loader.NVRTC_OPTIONS_ENV, "-DTFLA_WAIT_LIMIT=10")  # too few polls to mean anything
    with pytest.raises(_loader.CompileError, match="TFLA_WAIT_LIMIT"):
        _loader.compile_for_arch(names[:1], "sm_90a", verbose_ptxas=False)
