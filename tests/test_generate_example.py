"""The generation example runs on the NumPy path (tiny model, no CUDA graph): its decode loop
(prefill state -> StepPlan, state in place) agrees with one sequence call on the same tokens."""

import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("generate", Path(__file__).parent.parent / "examples" / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def test_generate_numpy_agrees_with_the_sequence_model(capsys):
    res = generate.generate(np, batch=2, prompt=7, new_tokens=5, vocab=24, E=16, NH=2, DK=8, DV=16, layers=2,
                            verbose=True)
    out = capsys.readouterr().out
    assert "NumPy (no GPU: float64 reference path, tiny model, no CUDA graph)" in out and "tokens/s" in out
    assert res["max_rel_diff"] <= 1e-10 and not res["graph"]
    assert res["tokens"].shape == (2, 5) and res["tokens"].min() >= 0 and res["tokens"].max() < 24


def test_generate_main_checks_agreement():
    generate.main(["--cpu"])  # raises SystemExit when the decode loop and the sequence model disagree
