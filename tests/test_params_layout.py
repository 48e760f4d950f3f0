"""The by-value kernel arguments and their NumPy twins agree: tfla::Params and tfla::Strides
(cuda_src/params.cuh, tfla_cupy/_params.py PARAMS_DTYPE / STRIDES_DTYPE) and tfla::StepParams
(cuda_src/step.cuh, STEP_PARAMS_DTYPE): same field names in the same order, same C layout
offsets, same size (checked by NVRTC too), and a Strides field for every sequence tensor."""

import re

import numpy as np
import pytest

from tfla_cupy import _loader
from tfla_cupy._params import PARAMS_DTYPE, SEQUENCE_TENSORS, STEP_PARAMS_DTYPE, STRIDES_DTYPE, make_params

_C_TYPES = {"const void*": ("ptr", 8, 8), "void*": ("ptr", 8, 8), "const float*": ("ptr", 8, 8),
            "float*": ("ptr", 8, 8), "int*": ("ptr", 8, 8), "const int*": ("ptr", 8, 8), "int": ("int", 4, 4),
            "float": ("float", 4, 4), "i64": ("i64", 8, 8), "Strides": ("strides", 24, 8)}
_LINE = re.compile(r"(const void\*|void\*|const float\*|float\*|const int\*|int\*|int|float|i64|Strides)\s+(\w+);")

#: (C++ struct, header, NumPy twin)
STRUCTS = [pytest.param("Strides", "params.cuh", STRIDES_DTYPE, id="Strides"),
           pytest.param("Params", "params.cuh", PARAMS_DTYPE, id="Params"),
           pytest.param("StepParams", "step.cuh", STEP_PARAMS_DTYPE, id="StepParams")]


def _parse_struct(name, header):
    text = (_loader.source_dir() / header).read_text()
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


@pytest.mark.parametrize("struct, header, dtype", STRUCTS)
def test_fields_and_offsets_match_the_header(struct, header, dtype):
    fields = _parse_struct(struct, header)
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


def test_every_sequence_tensor_has_strides():
    assert set(SEQUENCE_TENSORS) == {"q", "k", "v", "i", "f", "h", "dh", "dq", "dk", "dv", "di", "df", "N", "M"}
    for name in SEQUENCE_TENSORS:
        assert name in PARAMS_DTYPE.names and PARAMS_DTYPE.fields[f"st_{name}"][0] == STRIDES_DTYPE


@pytest.mark.parametrize("struct, header, dtype", STRUCTS)
def test_nvrtc_agrees_on_the_size(struct, header, dtype):
    check = f"\nstatic_assert(sizeof(tfla::{struct}) == {dtype.itemsize}, \"{struct} size mismatch\");\n"
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


def test_step_pointer_slots_address_the_pointer_fields():
    """StepPlan writes pointers through a uint64 view of the StepParams record."""
    from tfla_cupy._params import STEP_POINTER_SLOT
    record = np.zeros(1, STEP_PARAMS_DTYPE)
    record["DK"], record["eps"] = 256, 1e-6
    view = record.view(np.uint64)
    for j, name in enumerate(STEP_POINTER_SLOT):
        view[STEP_POINTER_SLOT[name]] = 1000 + j
    for j, name in enumerate(STEP_POINTER_SLOT):
        assert record[name][0] == 1000 + j
    assert record["DK"][0] == 256 and record["eps"][0] == np.float32(1e-6)


def test_bind_equals_make_params_with_the_same_fields():
    """The launch-time path (a base record, then pointers, strides and scalars) builds the very
    record that make_params builds from everything at once; pointers may be device addresses."""
    import types
    from tfla_cupy._params import POINTER_FIELDS, bind
    arrays = {n: types.SimpleNamespace(data=types.SimpleNamespace(ptr=4096 * (j + 1)))
              for j, n in enumerate(POINTER_FIELDS) if j % 3}
    shared = dict(S=7, NC=3, scale=0.25, eps=1e-6)
    per_call = dict(st_q=(5, 6, 7), st_h=(8, 9, 10))
    want = make_params(**shared, **per_call, **arrays, q_parts=2)
    base = make_params(**shared, q=arrays.get("k"), st_q=(1, 1, 1)).tobytes()  # its pointers and strides are replaced
    got = bind(base, arrays, per_call, dict(q_parts=2))
    assert got.tobytes() == want.tobytes()
    addresses = {n: x.data.ptr for n, x in arrays.items()}
    assert bind(base, addresses, per_call, dict(q_parts=2)).tobytes() == want.tobytes()
    try:
        bind(base, {}, None, dict(no_such_field=1))
    except KeyError as e:
        assert "no_such_field" in str(e)
    else:
        raise AssertionError("an unknown field accepted")


def test_launch_bytes_are_the_record_bytes():
    """A record reaches CuPy as a plain void array of the very same bytes (read through the
    buffer protocol, not a field-checked view), also from a read-only record."""
    from tfla_cupy import _loader
    rec = make_params(S=7, NC=3, scale=0.5, eps=1e-6, st_q=(1, 2, 3))
    raw = _loader._raw(rec)
    assert raw.dtype.names is None and raw.dtype.itemsize == rec.dtype.itemsize and raw.shape == (1,)
    assert raw.tobytes() == rec.tobytes()
    rec.flags.writeable = False
    assert _loader._raw(rec).tobytes() == rec.tobytes()
    assert _loader._raw(5) == 5
