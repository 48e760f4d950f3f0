"""The launch configuration: smem formulas agree with C++, the heuristic's choices are valid,
and bad overrides are refused with a clear message."""

import dataclasses

import pytest

from tfla_cupy import _loader, config
from tfla_cupy._gpu import family
from tfla_cupy.config import ChunkTile, KernelConfig, StateTile


_ALL_L = (16, 32, 64, 128, 256, 512, 1024)


def test_geometry_of_every_instantiation_matches_the_cuda_side():
    """Shared-memory bytes and threads of every tile the heuristic can launch (every compute
    policy, every chunk size, every kernel role), the fixed thread counts and the stage-0
    shared memory: each Python value is a static_assert against its C++ definition (whose carve
    is itself asserted equal to its size, in ChunkSmem and StateStream)."""
    asserts = [f"static_assert({name} == {n}, \"{name}\");"
               for name, n in {**config.THREADS, **config.FUSED_FWD, **config.BWD_SM90, **config.BWD_DSTATES_SM90,
                                  **config.BWD_WALK_SM90, **config.FUSED_WS}.items()]
    asserts += [f"static_assert(tfla::chunk_gates_smem_bytes({L}) == {config.chunk_gates_smem_bytes(L)}, \"cg\");"
                for L in _ALL_L]
    asserts += [f"static_assert(tfla::BwdSm90Smem::bytes({DX}) == {config.bwd_sm90_smem_bytes(DX)}, \"bwd sm90\");"
                for DX in (64, 128, 192, 256, 512, 1024)]
    from tfla_cupy.distributed import EMPTY_M
    asserts.append(f"static_assert(tfla::kEmptyM == {EMPTY_M!r}f, \"empty-state stabiliser\");")
    seen = set()
    for mma, e in config.ELEMENT_BYTES.items():
        for L in _ALL_L:
            cfg = config.pick_config(mma, 128, 256, L)
            for tile in (cfg.states, cfg.fwd_h, cfg.bwd_dq, cfg.bwd_dk, cfg.bwd_dv):
                if (tile, e, L) in seen:
                    continue
                seen.add((tile, e, L))
                asserts.append(f"static_assert({tile.cpp()}::smem_bytes({e}, {L}) == {tile.smem_bytes(e, L)}, \"smem\");")
                asserts.append(f"static_assert({tile.cpp()}::kThreads == {tile.threads}, \"threads\");")
    _loader.compile_for_arch([], "sm_80", extra_source="\n" + "\n".join(asserts) + "\n", verbose_ptxas=False)


def test_smem_formulas_match_the_cuda_side():
    asserts = []
    for mma, e in config.ELEMENT_BYTES.items():
        for L in (16, 32, 64, 128, 512, 1024):
            cfg = config.pick_config(mma, 128, 256, L)
            for tile in (cfg.states, cfg.fwd_h):
                asserts.append(f"static_assert({tile.cpp()}::smem_bytes({e}, {L}) == {tile.smem_bytes(e, L)}, \"smem\");")
    _loader.compile_for_arch([], "sm_80", extra_source="\n" + "\n".join(asserts) + "\n", verbose_ptxas=False)


@pytest.mark.parametrize("mma", sorted(config.ELEMENT_BYTES))
@pytest.mark.parametrize("L", [16, 32, 64, 128, 256, 512, 1024])
def test_heuristic_configs_fit_an_h100(mma, L):
    cfg = config.pick_config(mma, 512, 1024, L)
    cfg.check(config.ELEMENT_BYTES[mma], L)
    assert cfg.fwd_h.bm <= L and cfg.fwd_h.bl <= L


def test_default_chunk_size():
    assert [config.default_chunk_size(S) for S in (1, 16, 17, 100, 128, 129, 10**6)] == [16, 16, 32, 128, 128, 128, 128]


def test_invalid_override_is_refused():
    bad = KernelConfig(states=StateTile(), fwd_h=ChunkTile(bl=40), bwd_dq=ChunkTile(), bwd_dk=ChunkTile(),
                       bwd_dv=ChunkTile())
    with pytest.raises(ValueError, match="config: invalid ChunkTile"):
        bad.check(2, 128)
    huge = KernelConfig(states=StateTile(), fwd_h=ChunkTile(bx=512, bn=512), bwd_dq=ChunkTile(),
                        bwd_dk=ChunkTile(), bwd_dv=ChunkTile())
    with pytest.raises(ValueError, match="config.fwd_h: .* needs .* bytes of shared memory"):
        huge.check(4, 1024)


def test_every_heuristic_choice_is_in_the_compiled_list():
    names = {n for group in config.all_instantiations().values() for n in group}
    for mma in config.ELEMENT_BYTES:
        for gate in config.GATE_POLICY.values():
            for L in (16, 32, 64, 128, 1024):
                cfg = config.pick_config(mma, 64, 64, L)
                for kind in ("fwd_h", "bwd_dq", "bwd_dk", "bwd_dv"):
                    assert config.chunk_kernel(f"{kind}_kernel", mma, gate, getattr(cfg, kind)) in names
                assert set(config.state_kernels(mma, gate, cfg.states).values()) <= names


def test_one_gate_specification_drives_validation_references_and_launches():
    import numpy as np

    import tfla_cupy
    from tfla_cupy import _validate
    from tfla_cupy.reference import gates

    assert _validate.GATES == tuple(gates.GATE_SPECS) == gates.GATES
    assert set(config.GATE_POLICY) == {(g, n) for g, s in gates.GATE_SPECS.items() for n in s.normalize_values}
    x = np.linspace(-5, 5, 11)
    for name, spec in gates.GATE_SPECS.items():
        assert gates.is_stabilized(name) == spec.stabilized
        log_i, _ = gates.log_gates(x, x, name)
        assert np.allclose(log_i, spec.log_input(x))
        for normalize in (True, False):
            args = [np.zeros((1, 1, 4, 8))] * 3 + [np.zeros((1, 1, 4))] * 2
            if normalize in spec.normalize_values:
                tfla_cupy.mlstm(*args, gate=name, normalize=normalize)
            else:
                with pytest.raises(ValueError, match=rf"^normalize: normalize={normalize} is only defined for"):
                    tfla_cupy.mlstm(*args, gate=name, normalize=normalize)


def test_family_is_checked():
    cfg = dataclasses.replace(config.pick_config("MmaBF16", 128, 256, 128), family="sm100")
    with pytest.raises(ValueError, match=r"config.family: expected one of \('auto', 'sm80', 'sm90'\), got 'sm100'"):
        cfg.check(2, 128)


class _Device:
    def __init__(self, cc):
        self.compute_capability = cc


class _Problem:
    def __init__(self, DK=128, DV=256, chunk_size=128, NSEQ=8, NH=16, cu_seqlens=None):
        self.DK, self.DV, self.chunk_size, self.NSEQ, self.NH = DK, DV, chunk_size, NSEQ, NH
        self.varlen = cu_seqlens is not None


@pytest.mark.parametrize("cc,mma,DK,DV,L,want", [
    ("90", "MmaBF16", 128, 256, 128, "sm90"), ("90", "MmaF16", 128, 128, 128, "sm90"),
    ("80", "MmaBF16", 128, 256, 128, "sm80"), ("90", "MmaF32", 128, 256, 128, "sm80"),
    ("90", "MmaBF16", 64, 256, 128, "sm80"), ("90", "MmaBF16", 128, 96, 128, "sm80"),
    ("90", "MmaBF16", 128, 256, 64, "sm80")])
def test_auto_family_covers_or_falls_back(monkeypatch, cc, mma, DK, DV, L, want):
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    cfg = config.pick_config(mma, DK, DV, L)
    assert family.forward(_Problem(DK, DV, L), cfg, mma, _Device(cc), 132) == want


def test_forced_family_and_environment(monkeypatch):
    cfg = config.pick_config("MmaBF16", 128, 256, 128)
    monkeypatch.setenv(config.FAMILY_ENV, "sm80")
    assert family.forward(_Problem(), cfg, "MmaBF16", _Device("90"), 132) == "sm80"
    assert family.forward(_Problem(), dataclasses.replace(cfg, family="sm90"), "MmaBF16", _Device("90"), 132) == "sm90"
    monkeypatch.setenv(config.FAMILY_ENV, "hopper")
    with pytest.raises(ValueError, match=r"TFLA_CUPY_FAMILY: expected one of .*, got 'hopper'"):
        family.forward(_Problem(), cfg, "MmaBF16", _Device("90"), 132)
    monkeypatch.delenv(config.FAMILY_ENV)
    forced = dataclasses.replace(cfg, family="sm90")
    with pytest.raises(ValueError, match=r"config.family: 'sm90' needs compute capability 9.0, this device has 8.0"):
        family.forward(_Problem(), forced, "MmaBF16", _Device("80"), 132)
    with pytest.raises(ValueError, match=r"config.family: 'sm90' does not cover this call: it is built for chunk_size"):
        family.forward(_Problem(chunk_size=64), forced, "MmaBF16", _Device("90"), 132)


def test_auto_family_small_grids():
    """Fixed-length calls take the fused forward however few its CTAs (segments fill the GPU);
    packed sequences, which are not segmented, need a quarter CTA per SM (33 of 132); forcing sm90
    still runs it."""
    cfg = config.pick_config("MmaBF16", 128, 256, 128)
    assert config.FUSED_AUTO_MIN_CTAS_PER_SM == 0.25
    for NH in (16, 9, 8, 1):
        assert family.forward(_Problem(NSEQ=1, NH=NH), cfg, "MmaBF16", _Device("90"), 132) == "sm90"
    cu = [0, 5, 9]
    assert family.forward(_Problem(NSEQ=9, NH=1, cu_seqlens=cu), cfg, "MmaBF16", _Device("90"), 132) == "sm90"  # 36
    small = _Problem(NSEQ=8, NH=1, cu_seqlens=cu)                                                                # 32
    assert family.forward(small, cfg, "MmaBF16", _Device("90"), 132) == "sm80"
    assert family.forward(small, dataclasses.replace(cfg, family="sm90"), "MmaBF16", _Device("90"), 132) == "sm90"


def test_operands_the_fused_forward_cannot_take_fall_back_or_are_refused(monkeypatch):
    """A reason from the call's arrays (here: an out buffer for h that is not 16-byte aligned)
    sends "auto" to the sm80 family and is a clear error when sm90 is forced."""
    monkeypatch.delenv(config.FAMILY_ENV, raising=False)
    cfg = config.pick_config("MmaBF16", 128, 256, 128)
    why = "its output h must be 16-byte aligned (the out buffer given is not)"
    assert family.forward(_Problem(), cfg, "MmaBF16", _Device("90"), 132, why) == "sm80"
    with pytest.raises(ValueError, match=r"config.family: 'sm90' does not cover this call: its output h must be "
                                         r"16-byte aligned"):
        family.forward(_Problem(), dataclasses.replace(cfg, family="sm90"), "MmaBF16", _Device("90"), 132, why)


def test_pick_segments():
    """Segments only where the walks cannot fill the GPU: none at the main shape (512 CTAs of 64
    chunks on 132 SMs), some for B = 1, 16 heads, S = 65536 (64 CTAs of 512 chunks); a forced
    count is capped by the chunks and never leaves a segment empty."""
    assert config.pick_segments(512, 64, 132) == (1, 0)
    n, per = config.pick_segments(64, 512, 132)
    assert n >= 2 and per * (n - 1) < 512 <= per * n
    assert config.pick_segments(64, 1, 132) == (1, 0)
    assert config.pick_segments(512, 64, 132, forced=3) == (3, 22)
    assert config.pick_segments(8, 5, 132, forced=64) == (5, 1)
    assert config.pick_segments(8, 7, 132, forced=4) == (4, 2)   # 2 + 2 + 2 + 1
    assert config.pick_segments(8, 5, 132, forced=4) == (3, 2)   # ceil(5 / 4) = 2 per segment: 3 segments
    assert config.pick_segments(8, 100, 132, forced=1) == (1, 0)
    for ctas in (1, 7, 64, 131, 132, 500):
        for chunks in (2, 9, 64, 513):
            n, per = config.pick_segments(ctas, chunks, 132)
            assert 1 <= n <= config.MAX_SEGMENTS and (n == 1 or per * (n - 1) < chunks <= per * n)


@pytest.mark.parametrize("bad", [-1, config.MAX_SEGMENTS + 1, 2.0, True, "2"])
def test_config_segments_is_checked(bad):
    cfg = dataclasses.replace(config.pick_config("MmaBF16", 128, 256, 128), segments=bad)
    with pytest.raises(ValueError, match=r"config.segments: expected an int in \[0, 64\], got"):
        cfg.check(2, 128)
