"""The sm_90a warpgroup-MMA primitives (cuda_src/wgmma.cuh), through the probe kernels of cuda_src/wgmma_probes.cuh: they compile for every
architecture (an empty trap below sm_90a) and, on a Hopper GPU, compute A·Bᵀ like NumPy for A
from shared memory and A from registers, K-major and MN-major (transposed) 128-byte swizzled tiles."""

import numpy as np
import pytest

from tfla_cupy import _loader
from tfla_cupy._params import make_params

#: (mode, id, NumPy product) of wgmma_probe_kernel<mode> (cuda_src/wgmma.cuh)
MODES = [(0, "smemA", lambda a, b: a @ b.T), (1, "regA", lambda a, b: a @ b.T), (2, "smemA-mnB", lambda a, b: a @ b),
         (3, "regA-mnB", lambda a, b: a @ b), (4, "mnA-mnB", lambda a, b: a.T @ b),
         (5, "mnA-kB", lambda a, b: a.T @ b.T), (6, "n8", lambda a, b: np.pad(a @ b[:8].T, ((0, 0), (0, 56))))]
NAMES = [f"tfla::wgmma_probe_kernel<{m}>" for m, _, _ in MODES]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
def test_probe_compiles(arch):
    log, lowered = _loader.compile_for_arch(NAMES, arch)
    assert set(lowered) == set(NAMES)
    if arch == "sm_90a":
        assert "wgmma" not in log or "error" not in log


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [pytest.param(m, id=i) for m, i, _ in MODES])
def test_probe_matches_numpy(mode):
    cp = pytest.importorskip("cupy")
    if not cp.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("needs compute capability 9.0 (sm_90a)")
    import ml_dtypes

    rng = np.random.default_rng(5 + mode)
    a = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    A, B = cp.asarray(a), cp.asarray(b)
    D = cp.full((64, 64), np.nan, dtype=cp.float32)
    _loader.get_kernel(NAMES[mode])(1, 128, make_params(q=A, k=B, h=D))
    want = MODES[mode][2](a.astype(np.float64), b.astype(np.float64))
    got = cp.asnumpy(D).astype(np.float64)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


TMA_NAME = "tfla::tma_probe_kernel<0>"


def test_tma_probe_compiles():
    for arch in ("sm_80", "sm_90a"):
        _, lowered = _loader.compile_for_arch([TMA_NAME], arch)
        assert set(lowered) == {TMA_NAME}


def _tensor_map_2d(cp, x):
    """A CUtensorMap (128 bytes, in device memory) for a 2-D bf16 CuPy array: 64 × 64 boxes,
    128-byte swizzle, encoded by the driver (cuda-bindings)."""
    import ctypes

    drv = pytest.importorskip("cuda.bindings.driver")
    rows, cols = x.shape
    err, tmap = drv.cuTensorMapEncodeTiled(
        drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, x.data.ptr,
        [drv.cuuint64_t(cols), drv.cuuint64_t(rows)], [drv.cuuint64_t(x.strides[0])],
        [drv.cuuint32_t(64), drv.cuuint32_t(64)], [drv.cuuint32_t(1), drv.cuuint32_t(1)],
        drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
        drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    assert err == drv.CUresult.CUDA_SUCCESS, err
    raw = np.frombuffer(ctypes.string_at(tmap.getPtr(), 128), dtype=np.uint8)
    return cp.asarray(raw)


@pytest.mark.gpu
def test_tma_probe_matches_numpy():
    cp = pytest.importorskip("cupy")
    if not cp.cuda.is_available() or cp.cuda.Device().compute_capability != "90":
        pytest.skip("needs compute capability 9.0 (sm_90a)")
    import ml_dtypes

    rng = np.random.default_rng(9)
    a = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    A, B = cp.asarray(a), cp.asarray(b)
    ta, tb = _tensor_map_2d(cp, A), _tensor_map_2d(cp, B)
    D = cp.full((64, 64), np.nan, dtype=cp.float32)
    _loader.get_kernel(TMA_NAME)(1, 128, make_params(h=D, C0=ta, n0=tb))
    want = a.astype(np.float64) @ b.astype(np.float64).T
    got = cp.asnumpy(D).astype(np.float64)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


CLUSTER_NAMES = [f"tfla::cluster_probe_kernel<{m}>" for m in (0, 1, 2)]


def test_cluster_probe_compiles():
    for arch in ("sm_80", "sm_90", "sm_90a"):
        _, lowered = _loader.compile_for_arch(CLUSTER_NAMES, arch)
        assert set(lowered) == set(CLUSTER_NAMES)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [1, 2], ids=["remote-stores", "bulk-copy"])
def test_cluster_probe_delivers_the_peers_bytes(mode):
    """cluster.cuh's exchanges between the two CTAs of a cluster (st.shared::cluster, and the bulk
    copy completing the peer's mbarrier): after three rounds each CTA holds exactly its peer's last
    round; the output starts poisoned."""
    cp = pytest.importorskip("cupy")
    if not cp.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("needs compute capability 9.0 (sm_90a)")
    ctas, nbytes, rounds = 4, 48 * 1024, 3
    out = cp.full(ctas * nbytes // 4, 0xFFFFFFFF, dtype=cp.uint32)
    cycles = cp.full(ctas, np.nan, dtype=cp.float32)
    _loader.get_kernel(CLUSTER_NAMES[mode])(ctas, 128, make_params(h=out, N=cycles, S=nbytes, NC=rounds), 2 * 64 * 1024)
    got = cp.asnumpy(out).reshape(ctas, -1)
    words = np.arange(nbytes // 4, dtype=np.uint64)
    for b in range(ctas):
        want = ((((b % 2) ^ 1) << 28) + ((rounds - 1) << 16) + words) % 2**32
        assert np.array_equal(got[b], want.astype(np.uint32)), f"CTA {b}"
    assert bool(cp.all(cp.asarray(cycles) > 0))
