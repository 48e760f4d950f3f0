"""tfla::Params (cuda_src/params.cuh) and its NumPy twin (tfla_cupy/_params.py) agree: same
field names in the same order, same C layout offsets, same size (checked by NVRTC too)."""

import re

import numpy as np

from tfla_cupy import _loader
from tfla_cupy._params import PARAMS_DTYPE, make_params

_C_TYPES = {"const void*": ("ptr", 8), "void*": ("ptr", 8), "const float*": ("ptr", 8), "float*": ("ptr", 8),
            "int": ("int", 4), "float": ("float", 4)}


def _parse_struct():
    text = (_loader.source_dir() / "params.cuh").read_text()
    body = re.search(r"struct Params \{(.*?)\n\};", text, re.S).group(1)
    fields = []
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(const void\*|void\*|const float\*|float\*|int|float)\s+(\w+);", line)
        assert m, f"unparsed Params line: {line!r}"
        fields.append((m.group(2), _C_TYPES[m.group(1)]))
    return fields


def test_fields_and_offsets_match_the_header():
    fields = _parse_struct()
    assert [n for n, _ in fields] == list(PARAMS_DTYPE.names)
    offset = 0
    for name, (kind, size) in fields:
        offset = -(-offset // size) * size  # natural alignment
        dt, got = PARAMS_DTYPE.fields[name]
        assert got == offset, f"{name}: numpy offset {got}, C offset {offset}"
        assert dt.itemsize == size and dt.kind == {"ptr": "u", "int": "i", "float": "f"}[kind], name
        offset += size
    assert PARAMS_DTYPE.itemsize == -(-offset // 8) * 8


def test_nvrtc_agrees_on_the_size():
    check = f"\nstatic_assert(sizeof(tfla::Params) == {PARAMS_DTYPE.itemsize}, \"Params size mismatch\");\n"
    _loader.compile_for_arch([], "sm_80", extra_source=check, verbose_ptxas=False)


def test_make_params_fills_scalars_and_rejects_unknown_fields():
    p = make_params(S=7, scale=0.5)
    assert p["S"][0] == 7 and p["scale"][0] == np.float32(0.5) and p["q"][0] == 0
    try:
        make_params(nope=1)
    except KeyError as e:
        assert "nope" in str(e)
    else:
        raise AssertionError("unknown field accepted")
