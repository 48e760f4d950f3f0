"""tfla::Params (cuda_src/params.cuh) and its NumPy twin (tfla_cupy/_params.py) agree: same
field names in the same order, same C layout offsets, same size (checked by NVRTC too), and a
Strides field for every sequence tensor."""

import re

import numpy as np

from tfla_cupy import _loader
from tfla_cupy._params import PARAMS_DTYPE, SEQUENCE_TENSORS, STRIDES_DTYPE, make_params

_C_TYPES = {"const void*": ("ptr", 8, 8), "void*": ("ptr", 8, 8), "const float*": ("ptr", 8, 8),
            "float*": ("ptr", 8, 8), "int*": ("ptr", 8, 8), "int": ("int", 4, 4), "float": ("float", 4, 4),
            "i64": ("i64", 8, 8), "Strides": ("strides", 24, 8)}
_LINE = re.compile(r"(const void\*|void\*|const float\*|float\*|int\*|int|float|i64|Strides)\s+(\w+);")


def _parse_struct(name):
    text = (_loader.source_dir() / "params.cuh").read_text()
    body = re.search(r"struct " + name + r" \{(.*?)\n\};", text, re.S).group(1)
    fields = []
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        m = _LINE.fullmatch(line)
        assert m, f"unparsed {name} line: {line!r}"
        fields.append((m.group(2), _C_TYPES[m.group(1)]))
    return fields


def _check_layout(fields, dtype):
    assert [n for n, _ in fields] == list(dtype.names)
    offset = 0
    for name, (kind, size, align) in fields:
        offset = -(-offset // align) * align  # natural alignment
        dt, got = dtype.fields[name]
        assert got == offset, f"{name}: numpy offset {got}, C offset {offset}"
        if kind == "strides":
            assert dt == STRIDES_DTYPE, name
        else:
            assert dt.itemsize == size and dt.kind == {"ptr": "u", "int": "i", "float": "f", "i64": "i"}[kind], name
        offset += size
    assert dtype.itemsize == -(-offset // 8) * 8


def test_fields_and_offsets_match_the_header():
    _check_layout(_parse_struct("Strides"), STRIDES_DTYPE)
    _check_layout(_parse_struct("Params"), PARAMS_DTYPE)


def test_every_sequence_tensor_has_strides():
    assert set(SEQUENCE_TENSORS) == {"q", "k", "v", "i", "f", "h", "dh", "dq", "dk", "dv", "di", "df", "N", "M"}
    for name in SEQUENCE_TENSORS:
        assert name in PARAMS_DTYPE.names and PARAMS_DTYPE.fields[f"st_{name}"][0] == STRIDES_DTYPE


def test_nvrtc_agrees_on_the_size():
    check = (f"\nstatic_assert(sizeof(tfla::Params) == {PARAMS_DTYPE.itemsize}, \"Params size mismatch\");\n"
             f"static_assert(sizeof(tfla::Strides) == {STRIDES_DTYPE.itemsize}, \"Strides size mismatch\");\n")
    _loader.compile_for_arch([], "sm_80", extra_source=check, verbose_ptxas=False)


def test_make_params_fills_scalars_strides_and_rejects_unknown_fields():
    p = make_params(S=7, scale=0.5, st_q=(1, 2, 3))
    assert p["S"][0] == 7 and p["scale"][0] == np.float32(0.5) and p["q"][0] == 0
    assert tuple(int(x) for x in p["st_q"][0]) == (1, 2, 3) and tuple(p["st_k"][0]) == (0, 0, 0)
    try:
        make_params(nope=1)
    except KeyError as e:
        assert "nope" in str(e)
    else:
        raise AssertionError("unknown field accepted")
