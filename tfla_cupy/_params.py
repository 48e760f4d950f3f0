"""NumPy twin of ``tfla::Params`` (cuda_src/params.cuh), the by-value kernel argument.

The field order and types here must match the C++ struct; tests/test_params_layout.py parses
the header and checks names, order, offsets and size (plus an NVRTC static_assert on sizeof).
"""

from __future__ import annotations

import struct

import numpy as np

_PTR, _INT, _FLOAT = np.uint64, np.int32, np.float32
#: tfla::Strides: element strides (batch, head, token) of one sequence tensor
STRIDES_DTYPE = np.dtype([("b", np.int64), ("h", np.int64), ("t", np.int64)], align=True)
#: The sequence tensors, each with a Strides field ``st_<name>``.
SEQUENCE_TENSORS = ("q", "k", "v", "i", "f", "h", "dh", "dq", "dk", "dv", "di", "df", "N", "M")

FIELDS = (
    ("q", _PTR), ("k", _PTR), ("v", _PTR), ("i", _PTR), ("f", _PTR),
    ("C0", _PTR), ("n0", _PTR), ("m0", _PTR),
    ("h", _PTR), ("N", _PTR), ("M", _PTR),
    ("C_last", _PTR), ("n_last", _PTR), ("m_last", _PTR),
    ("C_states", _PTR), ("n_states", _PTR), ("m_states", _PTR),
    ("gate_a", _PTR), ("gate_b", _PTR), ("gate_g", _PTR), ("gate_amax", _PTR), ("gate_terms", _PTR),
    ("dh", _PTR), ("dC_last", _PTR), ("dC_states", _PTR),
    ("dq", _PTR), ("dk", _PTR), ("dv", _PTR), ("di", _PTR), ("df", _PTR), ("dC0", _PTR),
    ("q_terms", _PTR), ("k_terms", _PTR), ("state_terms", _PTR),
    ("cu_seqlens", _PTR), ("seq_table", _PTR), ("seg_C", _PTR), ("seg_n", _PTR), ("seg_m", _PTR),
    *((f"st_{n}", STRIDES_DTYPE) for n in SEQUENCE_TENSORS),
    ("BH", _INT), ("S", _INT), ("DK", _INT), ("DV", _INT), ("L", _INT), ("NC", _INT),
    ("NH", _INT), ("NSEQ", _INT), ("NM", _INT),
    ("q_parts", _INT), ("k_parts", _INT), ("seg_chunks", _INT), ("nseg", _INT),
    ("scale", _FLOAT), ("eps", _FLOAT), ("state_parts", _INT),
)

PARAMS_DTYPE = np.dtype([(n, t) for n, t in FIELDS], align=True)
_POINTERS = {n for n, t in FIELDS if t is _PTR}


def _packers(dtype):
    """{field: (byte offset, struct format)} of a Params-like record dtype."""
    out = {}
    for name in dtype.names:
        sub, off = dtype.fields[name][:2]
        fmt = "<qqq" if sub == STRIDES_DTYPE else {np.dtype(_PTR): "<Q", np.dtype(_INT): "<i",
                                                  np.dtype(_FLOAT): "<f"}[sub]
        out[name] = (off, struct.Struct(fmt))
    return out


_PACKERS = _packers(PARAMS_DTYPE)


def make_params(**values):
    """A one-element structured array (passed by value to the kernels). Arrays become their
    device pointers, None becomes a null pointer, strides are (batch, head, token) triples in
    elements, omitted fields are zero. (Packed with struct: it runs on every launch.)"""
    unknown = set(values) - _PACKERS.keys()
    if unknown:
        raise KeyError(f"unknown Params fields: {sorted(unknown)}")
    buf = bytearray(PARAMS_DTYPE.itemsize)
    for name, value in values.items():
        off, packer = _PACKERS[name]
        if name in _POINTERS:
            packer.pack_into(buf, off, 0 if value is None else value.data.ptr)
        elif packer.format == "<qqq":
            packer.pack_into(buf, off, *value)
        else:
            packer.pack_into(buf, off, value)
    return np.frombuffer(buf, dtype=PARAMS_DTYPE)


#: The pointer fields, which come first in the record (offsets 0, 8, ...): a call that repeats a
#: signature packs them into a copy of a record made once with everything else (bind).
POINTER_FIELDS = tuple(n for n, t in FIELDS if t is _PTR)
assert all(PARAMS_DTYPE.fields[n][1] == 8 * j for j, n in enumerate(POINTER_FIELDS))
_POINTER_PACK = struct.Struct(f"<{len(POINTER_FIELDS)}Q")


def _address(x):
    return 0 if x is None else x if isinstance(x, int) else x.data.ptr


def bind(base, pointers, strides=None, scalars=None):
    """A new record from ``base`` (the bytes of a record made once with the fields every call
    shares): every pointer field set from ``pointers`` (name -> array, device address or None;
    fields not named become null), then the (batch, head, token) ``strides`` ({"st_<name>": ...})
    and ``scalars`` given. (The launch-time form of make_params: one struct call for the pointers.)"""
    buf = bytearray(base)
    _POINTER_PACK.pack_into(buf, 0, *(_address(pointers.get(n)) for n in POINTER_FIELDS))
    for fields in (strides, scalars):
        if fields:
            for name, value in fields.items():
                off, packer = _PACKERS[name]
                if packer.format == "<qqq":
                    packer.pack_into(buf, off, *value)
                else:
                    packer.pack_into(buf, off, value)
    return np.frombuffer(buf, dtype=PARAMS_DTYPE)


#: Twin of ``tfla::StepParams`` (cuda_src/step.cuh), the argument of the step kernels.
STEP_FIELDS = (
    ("q", _PTR), ("k", _PTR), ("v", _PTR), ("i", _PTR), ("f", _PTR),
    ("C0", _PTR), ("n0", _PTR), ("m0", _PTR),
    ("h", _PTR), ("C_last", _PTR), ("n_last", _PTR), ("m_last", _PTR),
    ("state_indices", _PTR),
    ("BH", _INT), ("NH", _INT), ("DK", _INT), ("DV", _INT), ("P", _INT), ("lanes", _INT), ("nm_here", _INT),
    ("scale", _FLOAT), ("eps", _FLOAT),
)

STEP_PARAMS_DTYPE = np.dtype([(n, t) for n, t in STEP_FIELDS], align=True)
#: Index of each pointer field in a uint64 view of a StepParams record (pointers come first).
STEP_POINTER_SLOT = {n: j for j, (n, t) in enumerate(STEP_FIELDS) if t is _PTR}
assert all(STEP_PARAMS_DTYPE.fields[n][1] == 8 * j for n, j in STEP_POINTER_SLOT.items())
