"""Gate transforms shared by every float64 reference (docs/math.md §1.2, §4.1, §7).

``gate="exp"`` (mLSTMexp): log input gate ι = ĩ, log forget gate λ = logσ(f̃), max-stabilized.
``gate="sig"`` (mLSTMsig): ι = logσ(ĩ), λ = logσ(f̃); all log gates are <= 0, so no stabilizer
(m ≡ 0, M ≡ 0) and no row-max floor.

logσ and σ are SciPy's ``log_expit`` and ``expit``: accurate in float64 over the whole line
(logσ(x) ≈ x for x → −∞ without overflow, σ(±∞) = 1 / 0 exactly, NaN kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
from scipy.special import expit, log_expit

#: Floor of the intra-chunk row maximum of the exp variant (upstream ``MINIMUM_MAX_VAL``).
ROW_MAX_FLOOR = -10.0

#: Floors of the log gates (docs/math.md §1.2; the kernels use the same values). e^{−10⁴} is
#: exactly zero in every floating format, so flooring λ changes no output and makes f̃ = −∞ a
#: defined reset; flooring ι makes ĩ = −∞ a token that writes nothing. NaN stays NaN. The
#: derivative of a log gate is zero where its floor is active.
LOG_FORGET_FLOOR = -1e4
LOG_INPUT_FLOOR = -1e30


def _floor_keep_nan(x, lo):
    return np.where(x < lo, lo, x)


@dataclass(frozen=True)
class GateSpec:
    """One gate variant, the single definition every layer reads: validation (names, which
    normalize values exist), the references (the log input gate and its derivative; the forget
    gate is logσ for all) and the launch code (the C++ policy per normalize value)."""

    name: str
    stabilized: bool                          # carries the max-stabilizer m, M and the row-max floor
    cpp_policy: Mapping[bool, str]            # normalize -> C++ gate policy (tfla::Gate*)
    log_input: Callable[[np.ndarray], np.ndarray]    # ĩ -> ι (before the floor)
    d_log_input: Callable[[np.ndarray], np.ndarray]  # ĩ -> dι/dĩ (before the floor)

    @property
    def normalize_values(self):
        return tuple(self.cpp_policy)


GATE_SPECS = {
    "exp": GateSpec("exp", True, {True: "tfla::GateExp"}, lambda i: i, np.ones_like),
    "sig": GateSpec("sig", False, {True: "tfla::GateSig<true>", False: "tfla::GateSig<false>"}, log_expit,
                    lambda i: expit(-i)),
}
GATES = tuple(GATE_SPECS)


def log_gates(i, f, gate):
    """Return (log_i, log_f) = (ι, λ) for the gate variant, floored as the kernels do."""
    log_f = _floor_keep_nan(log_expit(f), LOG_FORGET_FLOOR)
    log_i = GATE_SPECS[gate].log_input(i)
    return _floor_keep_nan(log_i, LOG_INPUT_FLOOR), log_f


def d_log_gates(i, f, gate):
    """(dι/dĩ, dλ/df̃) of :func:`log_gates`: zero where a floor is active."""
    spec = GATE_SPECS[gate]
    log_f = log_expit(f)
    d_f = np.where(log_f < LOG_FORGET_FLOOR, 0.0, expit(-f))
    log_i = spec.log_input(i)
    return np.where(log_i < LOG_INPUT_FLOOR, 0.0, spec.d_log_input(i)), d_f


def is_stabilized(gate):
    """The exp variant carries the max-stabilizer m; the sig variant does not."""
    return GATE_SPECS[gate].stabilized


def chunk_gate_vectors(log_i, log_f):
    """Per-chunk log gate vectors of §4.1 over the last axis (the chunk's τ axis).

    Returns ``b`` (inclusive cumulative sum of λ), ``g`` (total log decay, one per chunk)
    and ``a`` (log weight of token τ in the outgoing state: the sum of the *following* λ's
    plus ι_τ, computed by a reverse cumulative sum, never as g − b).
    """
    b = np.cumsum(log_f, axis=-1)
    g = b[..., -1]
    suffix = np.flip(np.cumsum(np.flip(log_f, -1), -1), -1)  # Σ_{u>=τ} λ_u
    suffix_after = np.concatenate([suffix[..., 1:], np.zeros_like(suffix[..., :1])], -1)
    a = suffix_after + log_i
    return b, g, a
