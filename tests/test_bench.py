"""bench/bench.py's flags: bad values are argparse errors everywhere; without a GPU the NumPy demo
honours --variants, --modes, --chunk, --out and --tag and rejects the flags that need a GPU
(the GPU is hidden by patching cupy.cuda.is_available, so this also runs on GPU machines)."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parent.parent / "bench" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench", bench)   # dataclasses look their module up there
_saved_path = list(sys.path)
_spec.loader.exec_module(bench)
sys.path[:] = _saved_path             # bench.py puts the source tree first for direct runs; tests use the install


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


@pytest.mark.parametrize("argv, match", [
    pytest.param(["--variants", "exp,foo"], "argument --variants: expected", id="variants"),
    pytest.param(["--variants", ""], "argument --variants: expected", id="variants-empty"),
    pytest.param(["--modes", "bw"], "argument --modes: expected", id="modes"),
    pytest.param(["--chunk", "100"], "argument --chunk: expected powers of two", id="chunk-not-pow2"),
    pytest.param(["--chunk", "2048"], "argument --chunk: expected powers of two", id="chunk-too-large"),
    pytest.param(["--peers", "fla,nope"], "argument --peers: expected", id="peers"),
    pytest.param(["--S", "0"], "argument --S: expected", id="S-zero"),
    pytest.param(["--sweep", "--S", "1024"], "argument --sweep: not allowed with --S", id="sweep-and-S"),
    pytest.param(["--shape", "third"], "argument --shape: invalid choice", id="shape"),
])
def test_bad_flags_are_argparse_errors(capsys, no_gpu, argv, match):
    assert match in _error(capsys, argv)


@pytest.mark.parametrize("argv", [["--sweep"], ["--S", "1024"], ["--shape", "second"], ["--peers", "fla"],
                                  ["--shape", "main"]], ids=lambda a: "-".join(x.strip("-") for x in a))
def test_without_gpu_gpu_only_flags_are_rejected(capsys, no_gpu, argv):
    err = _error(capsys, argv)
    assert f"{argv[0]}: needs a CUDA GPU" in err


def test_without_gpu_the_demo_honours_variants_modes_chunk_out_tag(capsys, no_gpu, tmp_path):
    assert bench.main(["--variants", "sig", "--modes", "fw", "--chunk", "32", "64", "--out", str(tmp_path),
                       "--tag", "t", "--no-peers", "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU found" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("reference")]
    assert [ln.split(":")[0] for ln in lines] == ["reference fw sig L=32", "reference fw sig L=64"]
    with open(tmp_path / "t.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["impl"], r["variant"], r["mode"], r["L"]) for r in rows] == [
        ("numpy-reference", "sig", "fw", "32"), ("numpy-reference", "sig", "fw", "64")]
    assert (tmp_path / "t.json").is_file()


def test_without_gpu_empty_peer_list_is_accepted(capsys, no_gpu, tmp_path):
    assert bench.main(["--peers", "", "--variants", "exp", "--modes", "fwbw", "--chunk", "64",
                       "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reference fw+bw exp L=64" in out
    assert (tmp_path / "cpu-demo.csv").is_file()
