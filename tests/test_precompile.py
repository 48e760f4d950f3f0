"""`python -m tfla_cupy.precompile`: without a usable GPU one line and exit status 1, never a
traceback; bad options are argparse errors (status 2). CUDA_VISIBLE_DEVICES="" hides any GPU, so
the no-GPU case is exercised on GPU machines too."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tfla_cupy import precompile

REPO = Path(__file__).resolve().parent.parent


def _run(*args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "tfla_cupy.precompile", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=REPO)


def test_without_a_gpu_one_line_and_nonzero_exit():
    r = _run()
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    assert lines[0].startswith("tfla_cupy.precompile: ") and "nothing was compiled" in lines[0]


def test_bad_dtype_is_an_argparse_error_in_a_subprocess():
    r = _run("--dtype", "bf17")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "argument --dtype: expected a comma-separated subset" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, match", [
    pytest.param(["--dtype", "bf17"], "argument --dtype: expected a comma-separated subset", id="dtype-unknown"),
    pytest.param(["--dtype", "bf16,"], "argument --dtype", id="dtype-trailing-comma"),
    pytest.param(["--jobs", "0"], "argument --jobs: expected an integer >= 1", id="jobs-zero"),
    pytest.param(["--jobs", "x"], "argument --jobs", id="jobs-text"),
    pytest.param(["--no-such-flag"], "unrecognized arguments", id="unknown-flag"),
    pytest.param(["--family", "sm70"], "argument --family: invalid choice", id="family"),
])
def test_bad_options_are_argparse_errors(capsys, monkeypatch, args, match):
    monkeypatch.setattr(precompile, "precompile", lambda *a, **k: pytest.fail("must not compile"))
    with pytest.raises(SystemExit) as e:
        precompile.main(args)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_dtype_option_parses_subsets():
    assert precompile._dtypes("bf16, f32") == ["bf16", "f32"]
    with pytest.raises(Exception, match="subset"):
        precompile._dtypes("fp8")


def test_main_returns_one_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(precompile, "gpu_problem", lambda: "no CUDA GPU found")
    monkeypatch.setattr(precompile, "precompile", lambda *a, **k: pytest.fail("must not compile"))
    assert precompile.main(["--dtype", "bf16"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU found" in err


def test_family_selects_one_family_with_the_shared_stages():
    """--family sm90: the Hopper kernels of the chosen dtypes and the shared stages (fp32 gate
    kernels, the sequence table), nothing of sm80; --family sm80 the rest; together, everything."""
    from tfla_cupy import config
    every = set(precompile.selected(["bf16", "f16", "f32", "tf32"]))
    hopper = set(precompile.selected(["bf16", "f16"], "sm90"))
    others = set(precompile.selected(["bf16", "f16", "f32", "tf32"], "sm80"))
    stages = set(config.stage_kernels())
    assert stages <= hopper and stages <= others and stages <= every
    assert all("sm90" in n for n in hopper - stages) and not any("sm90" in n for n in others - stages)
    assert config.fused_ws_kernel("MmaBF16", "tfla::GateExp") in hopper
    assert config.fused_ws_kernel("MmaF16", "tfla::GateExp", "states") in hopper
    assert precompile.selected(["bf16", "f16", "f32", "tf32"], "sm90") and (
        set(precompile.selected(["bf16", "f16", "f32", "tf32"], "sm90")) | others == every)
