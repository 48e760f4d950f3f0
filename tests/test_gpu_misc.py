"""GPU plumbing: struct passing, sm_90a, DLPack producers, CUDA-graph capture, error paths,
and compute-sanitizer runs on small ragged cases."""

import textwrap

import numpy as np
import pytest

import tfla_cupy
from tfla_cupy import _loader
from tfla_cupy._params import PARAMS_DTYPE, make_params
from gpu_utils import FWD_TOL, cp, eager_then_graph, gpu, make_inputs, reference, rel_err, run_sanitized, to_gpu

pytestmark = gpu

_LAYOUT_SRC = r"""
#define OFF(f) (unsigned long long)((const char*)&((const tfla::Params*)0)->f - (const char*)0)
extern "C" __global__ void params_layout(unsigned long long* out, const tfla::Params p) {
  out[0] = sizeof(tfla::Params);
  %s
  out[100] = (unsigned long long)p.S;
  out[101] = (unsigned long long)(p.scale * 1000.f);
}
"""


def test_params_layout_on_the_device_and_by_value_passing():
    names = PARAMS_DTYPE.names
    body = "\n  ".join(f"out[{j + 1}] = OFF({n});" for j, n in enumerate(names))
    src = _loader.source() + _LAYOUT_SRC % body
    fn = cp.RawModule(code=src, options=_loader.OPTIONS).get_function("params_layout")
    out = cp.zeros(128, dtype=cp.uint64)
    fn((1,), (1,), (out, make_params(S=12345, scale=0.25)))
    got = cp.asnumpy(out)
    assert got[0] == PARAMS_DTYPE.itemsize
    assert [int(x) for x in got[1:len(names) + 1]] == [PARAMS_DTYPE.fields[n][1] for n in names]
    assert got[100] == 12345 and got[101] == 250


def test_sm90a_build_runs_on_hopper():
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("sm_90a is only used on compute capability 9.0")
    src = 'extern "C" __global__ void k(int* o) { asm volatile("setmaxnreg.inc.sync.aligned.u32 232;"); o[0] = 42; }'
    fn = cp.RawModule(code=src, options=("-std=c++17", "-arch=sm_90a")).get_function("k")
    o = cp.zeros(1, dtype=cp.int32)
    fn((1,), (128,), (o,))
    assert int(o[0]) == 42


def test_torch_tensors_via_dlpack_zero_copy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    host, ref = make_inputs(rng, 1, 2, 130, 64, 64, np.float32)
    t = {n: torch.from_dlpack(cp.asarray(x)) for n, x in host.items()}
    h = tfla_cupy.mlstm(t["q"], t["k"], t["v"], t["i"], t["f"], chunk_size=64)
    assert isinstance(h, cp.ndarray)
    assert rel_err(h, reference(ref, gate="exp", normalize=True, L=64)["h"]) <= FWD_TOL["f32"]
    assert torch.from_dlpack(h).shape == (1, 2, 130, 64)


def test_forward_and_backward_capture_in_a_cuda_graph():
    rng = np.random.default_rng(2)
    host, _ = make_inputs(rng, 1, 2, 256, 64, 64, np.float32)
    x = to_gpu(host)
    dh = cp.ones((1, 2, 256, 64), np.float32)

    def step():
        h, _, ctx = tfla_cupy.mlstm_fwd(*(x[n] for n in "qkvif"), chunk_size=64)
        return h, tfla_cupy.mlstm_bwd(ctx, dh)
    (h_eager, g_eager), (h_graph, g_graph) = eager_then_graph(step)
    assert bool(cp.all(h_graph == h_eager)) and bool(cp.all(g_graph.df == g_eager.df))


def test_gpu_specific_validation_errors():
    z = lambda *s, dt=np.float32: cp.zeros(s, dtype=dt)  # noqa: E731
    with pytest.raises(TypeError, match="q: the GPU path supports float16, bfloat16 and float32, got float64"):
        tfla_cupy.mlstm(z(1, 1, 4, 8, dt=np.float64), z(1, 1, 4, 8, dt=np.float64), z(1, 1, 4, 8, dt=np.float64),
                        z(1, 1, 4), z(1, 1, 4))
    with pytest.raises(ValueError, match="DK to be a multiple of 8 and <= 512, got DK=12"):
        tfla_cupy.mlstm(z(1, 1, 4, 12), z(1, 1, 4, 12), z(1, 1, 4, 8), z(1, 1, 4), z(1, 1, 4))
    with pytest.raises(ValueError, match="DV to be a multiple of 8 and <= 1024, got DV=1032"):
        tfla_cupy.mlstm(z(1, 1, 4, 8), z(1, 1, 4, 8), z(1, 1, 4, 1032), z(1, 1, 4), z(1, 1, 4))
    with pytest.raises(TypeError, match="initial_state.C: the GPU path keeps states in float32, got float16"):
        tfla_cupy.mlstm(z(1, 1, 4, 8), z(1, 1, 4, 8), z(1, 1, 4, 8), z(1, 1, 4), z(1, 1, 4),
                        initial_state=(z(1, 1, 8, 8, dt=np.float16), z(1, 1, 8), z(1, 1)))
    with pytest.raises(TypeError, match="expected all host .NumPy. arrays or all GPU arrays"):
        tfla_cupy.mlstm(z(1, 1, 4, 8), np.zeros((1, 1, 4, 8)), z(1, 1, 4, 8), z(1, 1, 4), z(1, 1, 4))
    h, _, ctx = tfla_cupy.mlstm_fwd(z(1, 1, 4, 8), z(1, 1, 4, 8), z(1, 1, 4, 8), z(1, 1, 4), z(1, 1, 4))
    with pytest.raises(TypeError, match="dh: is a NumPy .host. array but ctx comes from a forward on GPU arrays"):
        tfla_cupy.mlstm_bwd(ctx, np.zeros((1, 1, 4, 8)))


def test_nan_inputs_propagate_per_head():
    rng = np.random.default_rng(4)
    host, _ = make_inputs(rng, 1, 2, 100, 32, 32, np.float32)
    host["q"][0, 1, 50, 3] = np.nan
    h = cp.asnumpy(tfla_cupy.mlstm(*(cp.asarray(host[n]) for n in "qkvif"), chunk_size=64))
    assert np.all(np.isfinite(h[0, 0])) and np.isnan(h[0, 1, 50]).any()


_SANITIZED = textwrap.dedent("""
    import numpy as np, cupy as cp, tfla_cupy
    rng = np.random.default_rng(0)
    for dt, mode in ((np.float32, ("exp", True)), (np.float16, ("sig", False))):
        q, k = (cp.asarray(rng.standard_normal((1, 2, 77, 24)).astype(dt)) for _ in range(2))
        v = cp.asarray(rng.standard_normal((1, 2, 77, 40)).astype(dt))
        i, f = (cp.asarray(rng.standard_normal((1, 2, 77)).astype(np.float32)) for _ in range(2))
        st = tfla_cupy.MLSTMState(cp.zeros((1, 2, 24, 40), np.float32), cp.zeros((1, 2, 24), np.float32),
                                  cp.zeros((1, 2), np.float32))
        h, last, ctx = tfla_cupy.mlstm_fwd(q, k, v, i, f, gate=mode[0], normalize=mode[1], chunk_size=32,
                                           initial_state=st)
        g = tfla_cupy.mlstm_bwd(ctx, cp.ones_like(h), last)
        tfla_cupy.mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], last,
                             gate=mode[0], normalize=mode[1])
        tfla_cupy.mlstm_step(q[:, :, 1], k[:, :, 1], v[:, :, 1], i[:, :, 1], f[:, :, 1], last,
                             gate=mode[0], normalize=mode[1], out_state=last)       # in place
        tfla_cupy.mlstm_step(q[:, :, 2], k[:, :, 2], v[:, :, 2], i[:, :, 2], f[:, :, 2], last,
                             gate=mode[0], normalize=mode[1], state_indices=cp.zeros(1, np.int32))
    cp.cuda.Device().synchronize()
    print("SANITIZED-RUN-OK")
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool, tmp_path):
    run_sanitized(tool, _SANITIZED, tmp_path)  # asserts the clean summary
