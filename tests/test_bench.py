"""bench/: the three benchmarks and their shared helper, as far as a machine without a GPU can
check them. Flags: bad values are argparse errors everywhere; without a GPU bench.py runs the
NumPy demo (honouring --variants, --modes, --chunk, --out and --tag, saying where it writes) and
rejects every flag that needs a GPU. The floor model matches the numbers docs/performance.md §3
quotes. gpu_check.sh parses, rejects bad usage and, without a GPU, says so and logs under $OUT.
The GPU is hidden by patching cupy.cuda.is_available (or CUDA_VISIBLE_DEVICES="" in
subprocesses), so these tests also run on GPU machines."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tfla_cupy
from tfla_cupy.config import pick_config

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def _load(name):
    """bench/<name>.py as a module; the scripts import their sibling _common as a script's own
    folder allows, so bench/ is on sys.path while they load."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    saved = list(sys.path)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


bench = _load("bench")
bench_decode = _load("bench_decode")
bench_distributed = _load("bench_distributed")
_common = sys.modules["_common"]


def _env_without_gpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture
def no_gpu(monkeypatch):
    try:
        import cupy
    except ImportError:
        return
    monkeypatch.setattr(cupy.cuda, "is_available", lambda: False)


def _error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# bench.py flags
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, match", [
    pytest.param(["--variants", "exp,foo"], "argument --variants: expected", id="variants"),
    pytest.param(["--variants", ""], "argument --variants: expected", id="variants-empty"),
    pytest.param(["--modes", "bwd"], "argument --modes: expected", id="modes"),
    pytest.param(["--chunk", "100"], "argument --chunk: expected powers of two", id="chunk-not-pow2"),
    pytest.param(["--chunk", "2048"], "argument --chunk: expected powers of two", id="chunk-too-large"),
    pytest.param(["--peers", "fla,nope"], "argument --peers: expected", id="peers"),
    pytest.param(["--S", "0"], "argument --S: expected", id="S-zero"),
    pytest.param(["--sweep", "--S", "1024"], "argument --sweep: not allowed with --S", id="sweep-and-S"),
    pytest.param(["--shape", "third"], "argument --shape: invalid choice", id="shape"),
    pytest.param(["--family", "sm70"], "argument --family: invalid choice", id="family"),
    pytest.param(["--segments", "-1"], "argument --segments: expected an integer in [0, ", id="segments-negative"),
    pytest.param(["--segments", "100000"], "argument --segments: expected an integer in [0, ", id="segments-large"),
    pytest.param(["--profile-once", "--sweep"], "argument --profile-once: not allowed with", id="profile-sweep"),
    pytest.param(["--fwd-ws", "yes"], "argument --fwd-ws: invalid choice", id="fwd-ws"),
    pytest.param(["--fwd-ws", "both", "--varlen"], "argument --fwd-ws: 'both' is not allowed", id="fwd-ws-varlen"),
])
def test_bad_flags_are_argparse_errors(capsys, no_gpu, argv, match):
    assert match in _error(capsys, argv)


@pytest.mark.parametrize("argv", [["--sweep"], ["--S", "1024"], ["--shape", "second"], ["--peers", "fla"],
                                  ["--shape", "main"], ["--varlen"], ["--family", "sm80"], ["--segments", "2"],
                                  ["--profile-once"], ["--probe-cluster"], ["--fwd-ws", "both"]],
                         ids=lambda a: "-".join(x.strip("-") for x in a))
def test_without_gpu_gpu_only_flags_are_rejected(capsys, no_gpu, argv):
    err = _error(capsys, argv)
    assert f"{argv[0]}: needs a CUDA GPU" in err


def test_without_gpu_the_demo_honours_variants_modes_chunk_out_tag(capsys, no_gpu, tmp_path):
    assert bench.main(["--variants", "sig", "--modes", "fw,bw", "--chunk", "32", "64", "--out", str(tmp_path),
                       "--tag", "t", "--no-peers", "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU found" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("reference")]
    assert [ln.split(":")[0] for ln in lines] == ["reference fw sig L=32", "reference bw sig L=32",
                                                  "reference fw sig L=64", "reference bw sig L=64"]
    with open(tmp_path / "t.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["impl"], r["variant"], r["mode"], r["L"]) for r in rows] == [
        ("numpy-reference", "sig", "fw", "32"), ("numpy-reference", "sig", "bw", "32"),
        ("numpy-reference", "sig", "fw", "64"), ("numpy-reference", "sig", "bw", "64")]
    assert json.loads((tmp_path / "t.json").read_text(), parse_constant=float)["card"] == "CPU (no CUDA GPU)"
    assert f"# wrote {tmp_path / 't.csv'} and t.json" in out


def test_without_gpu_empty_peer_list_is_accepted(capsys, no_gpu, tmp_path):
    assert bench.main(["--peers", "", "--variants", "exp", "--modes", "fwbw", "--chunk", "64",
                       "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reference fw+bw exp L=64" in out
    assert (tmp_path / "cpu-demo.csv").is_file()
    assert f"# wrote {tmp_path / 'cpu-demo.csv'}" in out


def test_results_go_to_bench_results_by_default():
    _, args = bench.parse_args([])
    assert Path(args.out) == BENCH / "results"
    assert args.modes == ["fw", "fwbw"] and args.variants == ["exp", "sig"] and args.wanted == set(bench.PEERS)


def test_benchmark_run_as_the_readme_does_says_what_it_ran_and_where_it_wrote(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "bench.py"), "--out", str(tmp_path)], capture_output=True,
                       text=True, env=_env_without_gpu(), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU found: running the float64 NumPy reference" in r.stdout
    assert "reference fw+bw exp" in r.stdout and "reference fw sig" in r.stdout
    assert f"# wrote {tmp_path / 'cpu-demo.csv'} and cpu-demo.json" in r.stdout
    assert (tmp_path / "cpu-demo.json").is_file()


# ------------------------------------------------------------------------------------------
# bench.py's models and kernel options
# ------------------------------------------------------------------------------------------


def test_floor_model_gives_the_numbers_docs_quote(monkeypatch):
    """docs/performance.md §3 at the main shape (B 8, S 8192, NH 16, DK 128, DV 256, L 128):
    forward ≈ 1.62 GB → ≈ 0.54 ms at 3.0 TB/s and ≈ 0.2–0.25 TFLOP; fwbw ≈ 0.8 TFLOP; the
    backward alone is the difference of the two FLOP counts."""
    monkeypatch.setattr(bench, "COPY_BW", 3.0e12)
    shape = (8, 16, 8192, 128, 256)
    assert bench.floor_bytes("fw", *shape) == pytest.approx(1.62e9, rel=0.01)
    assert bench.floor_ms("fw", *shape, 128) == pytest.approx(0.54, rel=0.01)
    assert 0.2e12 <= bench.flops("fw", *shape, 128) <= 0.25e12
    assert bench.flops("fwbw", *shape, 128) == pytest.approx(0.8e12, rel=0.1)
    assert bench.flops("bw", *shape, 128) == bench.flops("fwbw", *shape, 128) - bench.flops("fw", *shape, 128)
    assert bench.floor_bytes("fw", *shape) < bench.floor_bytes("bw", *shape) < bench.floor_bytes("fwbw", *shape)


def test_kernel_config_goes_through_the_public_kernel_config():
    assert bench.kernel_config(None, None, 128, 256, 128) is None
    cfg = bench.kernel_config("sm80", 3, 128, 256, 128)
    assert isinstance(cfg, tfla_cupy.KernelConfig)
    assert (cfg.family, cfg.segments) == ("sm80", 3)
    plain = pick_config("MmaBF16", 128, 256, 128)
    assert cfg.fwd_h == plain.fwd_h and cfg.states == plain.states
    assert bench.kernel_config(None, 2, 128, 256, 128).family == "auto"
    cfg.check(2, 128)


# ------------------------------------------------------------------------------------------
# bench_decode.py, bench_distributed.py, _common.py
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [bench_decode, bench_distributed], ids=["decode", "distributed"])
def test_other_benchmarks_without_gpu_say_so_and_exit_zero(capsys, no_gpu, tmp_path, script):
    assert script.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA GPU found" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_decode_bad_batch_is_an_argparse_error(capsys, no_gpu):
    with pytest.raises(SystemExit) as e:
        bench_decode.main(["--B", "0"])
    assert e.value.code == 2 and "argument --B: expected batch sizes >= 1" in capsys.readouterr().err


def test_decode_floor_counts_the_state_bytes():
    """docs/performance.md §2a: at B 256 the state is ≈ 1.07 GB, read and written once per step."""
    assert 2 * bench_decode.state_bytes(256) == pytest.approx(2.15e9, rel=0.01)


def test_markdown_table_and_result_files(capsys, tmp_path):
    assert _common.markdown_table(("a", "b"), [(1, "x"), (2.5, "")]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 |  |"
    rows = [dict(B=1, ms=0.5), dict(B=8, ms=0.75, note="n")]
    csv_path, json_path = _common.write_results(rows, tmp_path / "sub", "r", "card X", copy_rate=1.0)
    with open(csv_path) as fh:
        assert list(csv.DictReader(fh)) == [dict(B="1", ms="0.5", note=""), dict(B="8", ms="0.75", note="n")]
    doc = json.loads(json_path.read_text())
    assert (doc["card"], doc["copy_rate"], doc["rows"]) == ("card X", 1.0, rows)
    assert f"# wrote {csv_path} and r.json" in capsys.readouterr().out


def test_gpu_probe_is_none_without_gpu(no_gpu):
    assert _common.gpu() is None


def test_bench_folder_holds_the_benchmarks_only():
    """Three benchmarks, their helper and the GPU check script: no one-off experiments, no logs."""
    try:
        out = subprocess.run(["git", "ls-files", "bench"], cwd=REPO, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    tracked = set(out.stdout.split())
    assert tracked <= {"bench/bench.py", "bench/bench_decode.py", "bench/bench_distributed.py", "bench/_common.py",
                       "bench/gpu_check.sh"}, sorted(tracked)
    for path in tracked:
        text = (REPO / path).read_text()
        assert "sys.path.insert" not in text and "monkeypatch" not in text, path


# ------------------------------------------------------------------------------------------
# gpu_check.sh
# ------------------------------------------------------------------------------------------


def test_gpu_check_script_parses():
    r = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_gpu_check_rejects_bad_usage(tmp_path):
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "everything"], capture_output=True, text=True,
                       env=dict(_env_without_gpu(), OUT=str(tmp_path)), timeout=60)
    assert r.returncode == 2 and "usage: bash bench/gpu_check.sh" in r.stderr


def test_gpu_check_without_gpu_says_so_and_logs_under_out(tmp_path):
    env = dict(_env_without_gpu(), OUT=str(tmp_path / "logs"), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "no CUDA GPU found" in r.stdout and f"# logs in {tmp_path / 'logs'}" in r.stdout
    assert "no CUDA GPU found" in (tmp_path / "logs" / "card.txt").read_text()
