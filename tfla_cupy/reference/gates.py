"""Gate transforms shared by every float64 reference (MLSTM_SPEC.md §1.2, §4.1, §7).

``gate="exp"`` (mLSTMexp): log input gate ι = ĩ, log forget gate λ = logσ(f̃), max-stabilized.
``gate="sig"`` (mLSTMsig): ι = logσ(ĩ), λ = logσ(f̃); all log gates are <= 0, so no stabilizer
(m ≡ 0, M ≡ 0) and no row-max floor.
"""

from __future__ import annotations

import numpy as np

GATES = ("exp", "sig")

#: Floor of the intra-chunk row maximum of the exp variant (upstream ``MINIMUM_MAX_VAL``).
ROW_MAX_FLOOR = -10.0


def logsigmoid(x):
    """log σ(x) = −softplus(−x), computed stably in float64."""
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    """σ(x) through tanh, stable for large |x|."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def log_gates(i, f, gate):
    """Return (log_i, log_f) = (ι, λ) for the gate variant."""
    log_f = logsigmoid(f)
    log_i = i if gate == "exp" else logsigmoid(i)
    return log_i, log_f


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
