"""The chunkwise form and its manual backward, split into the stages the CUDA kernels have.

docs/math.md §4 (forward), §6 (backward), §7 (mLSTMsig). Float64 throughout; every array is
batched over leading axes (B, NH). Shapes: q, k (..., S, DK); v, h, dh (..., S, DV);
i, f, N, M (..., S); boundary states C (..., NC+1, DK, DV), n (..., NC+1, DK), m (..., NC+1).

Any S >= 1 and any chunk size L >= 1: chunk c covers steps [cL, min((c+1)L, S)), so the last
chunk may be ragged and the last boundary state is the true state after step S.

Stages (kernel of the same role in parentheses):
  fwd_states   boundary states C, n, m                       (forward state pass)
  fwd_outputs  h and the per-step normalizer N, stabilizer M   (forward output pass)
  bwd_dstates  boundary-state gradients dC                     (backward reverse state pass)
  bwd_dq, bwd_dk, bwd_dv                                       (backward chunk passes)
  bwd_gates    di, df from q·dq and k·dk                       (gate-gradient pass)
  gate_grad_parts, bwd_gates_direct  the same di, df from chunk-local pair sums (§12.1)
  bwd_walk, bwd_gates_walk            dq, dk, dv, dC0 and those sums in one reverse walk over the
                                      chunks, value columns in parts      (fused Hopper backward)

The backward is the custom one of §6: N, M and every m are constants. It equals the exact
derivative of the forward with those held fixed, which the ``*_frozen`` arguments of the
forward stages provide for finite-difference checks. There is no dn or dm recursion: n only
feeds N and m only the stabilizers, so the gradients of n0 and m0 are zero by construction.
"""

from __future__ import annotations

import numpy as np

from .gates import ROW_MAX_FLOOR, chunk_gate_vectors, d_log_gates, is_stabilized, log_gates


def chunk_slices(S, L):
    """The slices [cL, min((c+1)L, S)) of the NC = ceil(S / L) chunks."""
    return [slice(s0, min(s0 + L, S)) for s0 in range(0, S, L)]


def _intra_log_gates(b, log_i):
    """D̃[τ, σ] = b_τ − b_σ + ι_σ for σ <= τ, −inf above the diagonal (§4.1)."""
    Lc = b.shape[-1]
    D = b[..., :, None] - b[..., None, :] + log_i[..., None, :]
    return np.where(np.tril(np.ones((Lc, Lc), dtype=bool)), D, -np.inf)


# ------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------


def fwd_states(k, v, log_i, log_f, C0, n0, m0, *, L, stabilized, m_frozen=None):
    """Boundary states entering each chunk, plus the last state (§4.2, §7).

    Returns (C, n, m) with NC + 1 slots: slot c is the state entering chunk c, slot NC the
    state after step S. ``m_frozen`` (..., NC+1) replaces the computed stabilizers.
    """
    S = k.shape[-2]
    C, n = C0, n0
    m = m0 if stabilized else np.zeros_like(m0)  # the sig variant has no stabilizer: m0 is ignored
    Cs, ns, ms = [C], [n], [m]
    for c, sl in enumerate(chunk_slices(S, L)):
        _, g, a = chunk_gate_vectors(log_i[..., sl], log_f[..., sl])
        if m_frozen is not None:
            m_next = m_frozen[..., c + 1]
        elif stabilized:
            m_next = np.maximum(g + m, a.max(-1))
        else:
            m_next = np.zeros_like(g)
        gamma = np.exp(g + m - m_next)
        a_bar = np.exp(a - m_next[..., None])
        # C ← γ C + (K ⊙ ā)ᵀ V ;  n ← γ n + Σ_τ ā_τ k_τ
        C = gamma[..., None, None] * C + np.einsum("...t,...tk,...tv->...kv", a_bar, k[..., sl, :], v[..., sl, :])
        n = gamma[..., None] * n + np.einsum("...t,...tk->...k", a_bar, k[..., sl, :])
        m = m_next
        Cs.append(C), ns.append(n), ms.append(m)
    return np.stack(Cs, -3), np.stack(ns, -2), np.stack(ms, -1)


def fwd_outputs(q, k, v, log_i, log_f, C, n, m, *, L, scale, eps, stabilized, normalize,
                floor=ROW_MAX_FLOOR, M_frozen=None, N_frozen=None):
    """h, N, M from the boundary states (§4.3, §7).

    ``floor=None`` drops the −10 row-max floor (pure step semantics). For the sig variant
    M ≡ 0 and there is no floor. With ``normalize=False`` (sig only) h is the numerator and
    N is returned as ones (unused by the backward).
    """
    S = q.shape[-2]
    h = np.empty(q.shape[:-1] + (v.shape[-1],))
    N = np.empty(q.shape[:-1])
    M = np.empty(q.shape[:-1])
    for c, sl in enumerate(chunk_slices(S, L)):
        b, _, _ = chunk_gate_vectors(log_i[..., sl], log_f[..., sl])
        D = _intra_log_gates(b, log_i[..., sl])
        m_c = m[..., c, None]
        if M_frozen is not None:
            Mc = M_frozen[..., sl]
        elif stabilized:
            mu = D.max(-1)
            if floor is not None:
                mu = np.maximum(mu, floor)
            Mc = np.maximum(b + m_c, mu)
        else:
            Mc = np.zeros_like(b)
        beta_bar = np.exp(b + m_c - Mc)                            # inter weight
        P = np.exp(D - Mc[..., None])                              # stabilized gate matrix
        qs = scale * q[..., sl, :]
        A = np.einsum("...tk,...sk->...ts", qs, k[..., sl, :])     # s·q_τᵀk_σ
        W = P * A
        num = beta_bar[..., None] * np.einsum("...tk,...kv->...tv", qs, C[..., c, :, :]) + W @ v[..., sl, :]
        if normalize:
            den = beta_bar * np.einsum("...tk,...k->...t", qs, n[..., c, :]) + W.sum(-1)
            Nc = np.maximum(np.abs(den), np.exp(-Mc)) if N_frozen is None else N_frozen[..., sl]
            h[..., sl, :] = num / (Nc + eps)[..., None]
        else:
            Nc = np.ones_like(b)
            h[..., sl, :] = num
        N[..., sl], M[..., sl] = Nc, Mc
    return h, N, M


def fwd(q, k, v, i, f, C0, n0, m0, *, gate, normalize, L, eps, scale, floor=ROW_MAX_FLOOR):
    """Both forward stages. Returns h, N, M and the boundary states (C, n, m)."""
    log_i, log_f = log_gates(i, f, gate)
    stabilized = is_stabilized(gate)
    C, n, m = fwd_states(k, v, log_i, log_f, C0, n0, m0, L=L, stabilized=stabilized)
    h, N, M = fwd_outputs(q, k, v, log_i, log_f, C, n, m, L=L, scale=scale, eps=eps,
                          stabilized=stabilized, normalize=normalize, floor=floor)
    return h, N, M, (C, n, m)


# ------------------------------------------------------------------------------------------
# Backward (§6): N, M, m are constants
# ------------------------------------------------------------------------------------------


def scaled_dh(dh, N, *, eps, normalize):
    """Ĝ = dh / (N + ε) (§6.1); dh itself without the normalizer."""
    return dh / (N + eps)[..., None] if normalize else dh


def bwd_dstates(q, log_i, log_f, m, N, M, dh, dC_last, *, L, scale, eps, normalize):
    """Boundary-state gradients dC^(c) = ∂ℓ/∂C^(c) for c = 0..NC (§6.2).

    Slot NC is dC_last (zeros if None); slot 0 is the gradient of the initial C.
    """
    S = q.shape[-2]
    G = scaled_dh(dh, N, eps=eps, normalize=normalize)
    slices = chunk_slices(S, L)
    dC = np.zeros(q.shape[:-2] + (q.shape[-1], dh.shape[-1])) if dC_last is None else dC_last
    dCs = [dC]
    for c in reversed(range(len(slices))):
        sl = slices[c]
        b, g, _ = chunk_gate_vectors(log_i[..., sl], log_f[..., sl])
        gamma = np.exp(g + m[..., c] - m[..., c + 1])
        beta_bar = np.exp(b + m[..., c, None] - M[..., sl])
        # dC^(c) = γ dC^(c+1) + Σ_τ (s β̄_τ q_τ) Ĝ_τᵀ
        dC = gamma[..., None, None] * dC + np.einsum("...t,...tk,...tv->...kv", scale * beta_bar, q[..., sl, :], G[..., sl, :])
        dCs.append(dC)
    return np.stack(dCs[::-1], -3)


def _chunk_backward_tiles(q, k, v, log_i, log_f, m, N, M, dh, c, sl, *, scale, eps, normalize):
    """Per-chunk quantities shared by bwd_dq / bwd_dk / bwd_dv (§6.3)."""
    b, _, a = chunk_gate_vectors(log_i[..., sl], log_f[..., sl])
    P = np.exp(_intra_log_gates(b, log_i[..., sl]) - M[..., sl, None])
    G = scaled_dh(dh[..., sl, :], N[..., sl], eps=eps, normalize=normalize)
    dP = np.einsum("...tv,...sv->...ts", G, v[..., sl, :])          # dP̄ = Ĝ Vᵀ
    beta_bar = np.exp(b + m[..., c, None] - M[..., sl])
    a_bar = np.exp(a - m[..., c + 1, None])
    return P, G, dP, beta_bar, a_bar


def bwd_dq(q, k, v, log_i, log_f, C, m, N, M, dh, *, L, scale, eps, normalize):
    """dq_τ = Σ_{σ<=τ} dS_τσ k_σ + s β̄_τ C^(c) Ĝ_τ, dS = s·P ⊙ dP̄ (§6.3)."""
    dq = np.empty(q.shape)
    for c, sl in enumerate(chunk_slices(q.shape[-2], L)):
        P, G, dP, beta_bar, _ = _chunk_backward_tiles(q, k, v, log_i, log_f, m, N, M, dh, c, sl,
                                                      scale=scale, eps=eps, normalize=normalize)
        dS = scale * P * dP
        dq[..., sl, :] = dS @ k[..., sl, :] + (scale * beta_bar)[..., None] * np.einsum("...tv,...kv->...tk", G, C[..., c, :, :])
    return dq


def bwd_dk(q, k, v, log_i, log_f, m, dC, N, M, dh, *, L, scale, eps, normalize):
    """dk_σ = Σ_{τ>=σ} dS_τσ q_τ + ā_σ dC^(c+1) v_σ (§6.3)."""
    dk = np.empty(k.shape)
    for c, sl in enumerate(chunk_slices(k.shape[-2], L)):
        P, G, dP, _, a_bar = _chunk_backward_tiles(q, k, v, log_i, log_f, m, N, M, dh, c, sl,
                                                   scale=scale, eps=eps, normalize=normalize)
        dS = scale * P * dP
        dk[..., sl, :] = np.swapaxes(dS, -1, -2) @ q[..., sl, :] + a_bar[..., None] * np.einsum("...kv,...sv->...sk", dC[..., c + 1, :, :], v[..., sl, :])
    return dk


def bwd_dv(q, k, v, log_i, log_f, m, dC, N, M, dh, *, L, scale, eps, normalize):
    """dv_σ = Σ_{τ>=σ} P_τσ A_τσ Ĝ_τ + ā_σ dC^(c+1)ᵀ k_σ (§6.3)."""
    dv = np.empty(v.shape)
    for c, sl in enumerate(chunk_slices(v.shape[-2], L)):
        P, G, _, _, a_bar = _chunk_backward_tiles(q, k, v, log_i, log_f, m, N, M, dh, c, sl,
                                                  scale=scale, eps=eps, normalize=normalize)
        A = scale * np.einsum("...tk,...sk->...ts", q[..., sl, :], k[..., sl, :])
        dv[..., sl, :] = np.swapaxes(P * A, -1, -2) @ G + a_bar[..., None] * np.einsum("...kv,...sk->...sv", dC[..., c + 1, :, :], k[..., sl, :])
    return dv


def bwd_gates(q, k, dq, dk, i, f, *, gate, last_state_dot=None):
    """di, df from the token gradients (§6.3, §6.5, §7).

    dι_t = k_t·dk_t; dλ_t = Σ_{u>=t} (q_u·dq_u − k_u·dk_u) over the whole sequence, plus
    ⟨dC_last, C_last⟩ (``last_state_dot``, (...)) when a gradient flows into the last state.
    di = dι·dι/dĩ (1 for exp, σ(−ĩ) for sig); df = dλ·σ(−f̃); both zero where a log-gate
    floor is active (gates.d_log_gates).
    """
    kdk = np.einsum("...tk,...tk->...t", k, dk)
    qdq = np.einsum("...tk,...tk->...t", q, dq)
    d_log_f = np.flip(np.cumsum(np.flip(qdq - kdk, -1), -1), -1)
    if last_state_dot is not None:
        d_log_f = d_log_f + last_state_dot[..., None]
    d_i, d_f = d_log_gates(i, f, gate)
    return kdk * d_i, d_log_f * d_f


def gate_grad_parts(q, k, v, log_i, log_f, C, m, dC, N, M, dh, *, L, scale, eps, normalize):
    """The pieces of the direct form of the gate gradients (docs/math.md §12.1), per chunk c with
    Z_τσ = P_τσ (Ĝ_τ·v_σ) A_τσ (σ <= τ), the derivative of the loss with respect to D̃_τσ:

    R (..., S)   R_t = Σ_{τ >= t} Σ_{σ < t} Z_τσ         intra-chunk pairs crossing t
    Zc (..., S)  Zc_σ = Σ_{τ >= σ} Z_τσ                  column sums (all pairs with key σ)
    W (..., S)   W_τ = s β̄_τ q_τᵀ C^(c) Ĝ_τ  = q_τ·dq_τ^inter   (query τ, keys before the chunk)
    E (..., S)   E_σ = ā_σ k_σᵀ dC^(c+1) v_σ = k_σ·dk_σ^inter   (key σ, queries after the chunk)
    B (..., NC)  B_c = γ_c ⟨dC^(c+1), C^(c)⟩              (queries after the chunk, keys before it)

    C, m, dC are the boundary states, stabilizers and state gradients (NC + 1 slots; dC's slot NC
    is dC_last). Every piece is a sum over pairs of one sign structure: nothing cancels between
    large sums."""
    S = q.shape[-2]
    R, Zc, W, E = (np.empty(q.shape[:-1]) for _ in range(4))
    B = []
    for c, sl in enumerate(chunk_slices(S, L)):
        P, G, dP, beta_bar, a_bar = _chunk_backward_tiles(q, k, v, log_i, log_f, m, N, M, dh, c, sl,
                                                          scale=scale, eps=eps, normalize=normalize)
        A = scale * np.einsum("...tk,...sk->...ts", q[..., sl, :], k[..., sl, :])
        Z = P * dP * A
        X = np.cumsum(Z, -1) - Z                                   # X[τ, t] = Σ_{σ < t} Z[τ, σ]
        R[..., sl] = np.diagonal(np.flip(np.cumsum(np.flip(X, -2), -2), -2), axis1=-2, axis2=-1)
        Zc[..., sl] = Z.sum(-2)
        W[..., sl] = scale * beta_bar * np.einsum("...tk,...kv,...tv->...t", q[..., sl, :], C[..., c, :, :], G)
        E[..., sl] = a_bar * np.einsum("...sk,...kv,...sv->...s", k[..., sl, :], dC[..., c + 1, :, :], v[..., sl, :])
        _, g, _ = chunk_gate_vectors(log_i[..., sl], log_f[..., sl])
        gamma = np.exp(g + m[..., c] - m[..., c + 1])
        B.append(gamma * np.einsum("...kv,...kv->...", dC[..., c + 1, :, :], C[..., c, :, :]))
    return dict(R=R, Zc=Zc, W=W, E=E, B=np.stack(B, -1))


def bwd_gates_direct(parts, i, f, *, gate, L):
    """di, df from gate_grad_parts (docs/math.md §12.1): for t in chunk c

        dι_t = Zc_t + E_t,      dλ_t = R_t + Σ_{τ >= t} W_τ + B_c + Σ_{σ < t} E_σ    (sums inside the chunk)

    equal to bwd_gates (with the §6.5 term) in exact arithmetic; no sum runs over more than a chunk."""
    R, W, E = parts["R"], parts["W"], parts["E"]
    d_log_f = np.empty(R.shape)
    for c, sl in enumerate(chunk_slices(R.shape[-1], L)):
        w_suffix = np.flip(np.cumsum(np.flip(W[..., sl], -1), -1), -1)
        e_prefix = np.cumsum(E[..., sl], -1) - E[..., sl]
        d_log_f[..., sl] = R[..., sl] + w_suffix + parts["B"][..., c, None] + e_prefix
    d_i, d_f = d_log_gates(i, f, gate)
    return (parts["Zc"] + E) * d_i, d_log_f * d_f


def bwd_walk(q, k, v, log_i, log_f, C, m, N, M, dh, dC_last, *, L, scale, eps, normalize, parts=1):
    """The fused backward's reverse walk (the Hopper kernel bwd_walk_sm90, docs/architecture.md):
    one pass over the chunks of a sequence from the last, dC^(c+1) carried from chunk to chunk,
    every token gradient of chunk c formed beside it. The value columns are cut into ``parts``
    equal blocks (one CTA each on the GPU): a part owns its columns of dC, dv and Ĝ, v, and adds
    its share of everything that sums over the value columns (dq, dk, the pair terms Z, the dots
    W and E); dq and dk are those shares summed in part order. In chunk c and part j, with the
    weights P = exp(D̃ − M) (zero above the diagonal) and A = s·q·kᵀ:

        dP_j = Ĝ_j v_jᵀ,  Z_j = P ⊙ dP_j ⊙ A
        dq += s (P ⊙ dP_j) k + s β̄ Ĝ_j C_jᵀ           dk += s (P ⊙ dP_j)ᵀ q + ā v_j dC_jᵀ
        dv_j = (P ⊙ A)ᵀ Ĝ_j + ā k dC_j
        q_terms[j] = W_j + Σ_σ Z_j[τ, σ],  k_terms[0][j] = Σ_τ Z_j[τ, σ],  k_terms[1][j] = E_j
    then B_c = γ_c ⟨dC^(c+1), C^(c)⟩ and dC^(c) = γ_c dC^(c+1) + Σ_τ s β̄_τ q_τ Ĝ_τᵀ.

    C, m: boundary states and stabilizers (NC + 1 slots, as fwd returns them). Returns dq, dk,
    dv, dC0 and the gate terms (q_terms (parts, ..., S), k_terms (2, parts, ..., S), B (..., NC)),
    which bwd_gates_walk turns into di, df."""
    S, DV = dh.shape[-2], dh.shape[-1]
    if DV % parts:
        raise ValueError(f"parts: expected a divisor of DV = {DV}, got {parts}")
    cols = [slice(j * DV // parts, (j + 1) * DV // parts) for j in range(parts)]
    G = scaled_dh(dh, N, eps=eps, normalize=normalize)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.empty(v.shape)
    q_terms, k_terms = np.empty((parts,) + q.shape[:-1]), np.empty((2, parts) + q.shape[:-1])
    slices = chunk_slices(S, L)
    B = np.empty(q.shape[:-2] + (len(slices),))
    dC = np.zeros(q.shape[:-2] + (q.shape[-1], DV)) if dC_last is None else np.asarray(dC_last, dtype=np.float64)
    for c in reversed(range(len(slices))):
        sl = slices[c]
        P, Gc, _, beta_bar, a_bar = _chunk_backward_tiles(q, k, v, log_i, log_f, m, N, M, dh, c, sl,
                                                          scale=scale, eps=eps, normalize=normalize)
        qc, kc = q[..., sl, :], k[..., sl, :]
        A = scale * np.einsum("...tk,...sk->...ts", qc, kc)
        _, g, _ = chunk_gate_vectors(log_i[..., sl], log_f[..., sl])
        gamma = np.exp(g + m[..., c] - m[..., c + 1])
        B[..., c] = gamma * np.einsum("...kv,...kv->...", dC, C[..., c, :, :])
        for j, cj in enumerate(cols):
            Gj, vj, dCj, Cj = Gc[..., cj], v[..., sl, cj], dC[..., :, cj], C[..., c, :, cj]
            dS = scale * P * np.einsum("...tv,...sv->...ts", Gj, vj)
            Z = dS * A / scale
            dq_inter = (scale * beta_bar)[..., None] * np.einsum("...tv,...kv->...tk", Gj, Cj)
            dk_inter = a_bar[..., None] * np.einsum("...kv,...sv->...sk", dCj, vj)
            dq[..., sl, :] += dS @ kc + dq_inter
            dk[..., sl, :] += np.swapaxes(dS, -1, -2) @ qc + dk_inter
            dv[..., sl, cj] = np.swapaxes(P * A, -1, -2) @ Gj + a_bar[..., None] * np.einsum("...kv,...sk->...sv", dCj, kc)
            q_terms[j][..., sl] = np.einsum("...tk,...tk->...t", qc, dq_inter) + Z.sum(-1)
            k_terms[0, j][..., sl] = Z.sum(-2)
            k_terms[1, j][..., sl] = np.einsum("...sk,...sk->...s", kc, dk_inter)
        dC = gamma[..., None, None] * dC + np.einsum("...t,...tk,...tv->...kv", scale * beta_bar, qc, Gc)
    return dq, dk, dv, dC, dict(q_terms=q_terms, k_terms=k_terms, B=B)


def bwd_gates_walk(terms, i, f, *, gate, L):
    """di, df from bwd_walk's terms, as the gate kernel forms them (docs/math.md §12.1): with the
    parts summed, Q_τ = W_τ + Σ_{σ<=τ} Z_τσ, Zc_σ = Σ_{τ>=σ} Z_τσ, for t in chunk c

        dι_t = Zc_t + E_t,      dλ_t = Σ_{τ >= t} (Q_τ − Zc_τ) + B_c + Σ_{σ < t} E_σ   (sums inside the chunk)"""
    Q = terms["q_terms"].sum(0)
    Zc, E = terms["k_terms"].sum(1)
    d_log_f = np.empty(Q.shape)
    for c, sl in enumerate(chunk_slices(Q.shape[-1], L)):
        suffix = np.flip(np.cumsum(np.flip(Q[..., sl] - Zc[..., sl], -1), -1), -1)
        d_log_f[..., sl] = suffix + terms["B"][..., c, None] + np.cumsum(E[..., sl], -1) - E[..., sl]
    d_i, d_f = d_log_gates(i, f, gate)
    return (Zc + E) * d_i, d_log_f * d_f


def bwd(q, k, v, i, f, C0, n0, m0, dh, dC_last, *, gate, normalize, L, eps, scale, floor=ROW_MAX_FLOOR):
    """The whole manual backward: recompute the forward quantities, then every stage.

    Returns dq, dk, dv, di, df, dC0.
    """
    log_i, log_f = log_gates(i, f, gate)
    h, N, M, (C, n, m) = fwd(q, k, v, i, f, C0, n0, m0, gate=gate, normalize=normalize, L=L,
                             eps=eps, scale=scale, floor=floor)
    opts = dict(L=L, scale=scale, eps=eps, normalize=normalize)
    dC = bwd_dstates(q, log_i, log_f, m, N, M, dh, dC_last, **opts)
    dq = bwd_dq(q, k, v, log_i, log_f, C, m, N, M, dh, **opts)
    dk = bwd_dk(q, k, v, log_i, log_f, m, dC, N, M, dh, **opts)
    dv = bwd_dv(q, k, v, log_i, log_f, m, dC, N, M, dh, **opts)
    last_dot = None if dC_last is None else np.einsum("...kv,...kv->...", dC_last, C[..., -1, :, :])
    di, df = bwd_gates(q, k, dq, dk, i, f, gate=gate, last_state_dot=last_dot)
    return dq, dk, dv, di, df, dC[..., 0, :, :]
