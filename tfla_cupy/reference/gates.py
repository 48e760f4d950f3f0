"""Gate transforms shared by every float64 reference (docs/math.md §1.2, §4.1, §7).

``gate="exp"`` (mLSTMexp): log input gate ι = ĩ, log forget gate λ = logσ(f̃), max-stabilized.
``gate="sig"`` (mLSTMsig): ι = logσ(ĩ), λ = logσ(f̃); all log gates are <= 0, so no stabilizer
(m ≡ 0, M ≡ 0) and no row-max floor.
"""

from __future__ import annotations

import numpy as np

GATES = ("exp", "sig")

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


def logsigmoid(x):
    """log σ(x) = −softplus(−x), computed stably in float64."""
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    """σ(x) through tanh, stable for large |x|."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def log_gates(i, f, gate):
    """Return (log_i, log_f) = (ι, λ) for the gate variant, floored as the kernels do."""
    log_f = _floor_keep_nan(logsigmoid(f), LOG_FORGET_FLOOR)
    log_i = i if gate == "exp" else logsigmoid(i)
    return _floor_keep_nan(log_i, LOG_INPUT_FLOOR), log_f


def d_log_gates(i, f, gate):
    """(dι/dĩ, dλ/df̃) of :func:`log_gates`: zero where a floor is active."""
    log_f = logsigmoid(f)
    d_f = np.where(log_f < LOG_FORGET_FLOOR, 0.0, sigmoid(-f))
    log_i = i if gate == "exp" else logsigmoid(i)
    d_i = np.ones_like(log_i) if gate == "exp" else sigmoid(-i)
    return np.where(log_i < LOG_INPUT_FLOOR, 0.0, d_i), d_f


def is_stabilized(gate):
    """The exp variant carries the max-stabilizer m; the sig variant does not."""
    return gate == "exp"


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
