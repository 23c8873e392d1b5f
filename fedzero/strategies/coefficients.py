"""The aggregation math as pure numpy (float64) functions, no torch.

Notation (docs/method.md, "CMGA"): K clients with updates Δ_k (flattened, length D) and weights w_k;
G groups; the client Gram K_ij = <Δ_i, Δ_j> is [K, K]. Every step is linear in the Δ_k, so a
strategy only ever needs the Gram and returns coefficients β [K]; the caller forms Σ_k β_k Δ_k.
`cmga_explicit` runs the same algorithm on explicit vectors and exists to test the Gram path.
"""

from __future__ import annotations

import zlib

import numpy as np


def block_seed(seed: int, round: int, block: str) -> np.random.Generator:
    """Generator for one (round, block); identical in every process and run (crc32, not hash())."""
    return np.random.default_rng([seed, round, zlib.crc32(block.encode())])


def _check(gram: np.ndarray | None, weights: np.ndarray, groups: list[str]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"weights must have shape [K], got {w.shape}")
    if len(groups) != len(w):
        raise ValueError(f"got {len(groups)} group labels for {len(w)} weights")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    if gram is not None:
        if gram.shape != (len(w), len(w)):
            raise ValueError(f"gram must have shape [{len(w)}, {len(w)}], got {gram.shape}")
        if not np.all(np.isfinite(gram)):
            raise ValueError("gram has non-finite entries (NaN/inf in a client update?)")
    return w


def group_matrix(weights: np.ndarray, groups: list[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Group-averaging matrix.

    Returns P [G, K] with P[a, k] = w_k / W_a for k in group a (else 0), the group names (order of
    first appearance) and W [G] = per-group total weight. Groups whose total weight is 0 are dropped:
    they have no mean, and they contribute nothing to any weighted average anyway.
    """
    w = _check(None, weights, groups)
    members = {g: [k for k, h in enumerate(groups) if h == g] for g in dict.fromkeys(groups)}
    names = [g for g, ks in members.items() if w[ks].sum() > 0]
    W = np.array([w[members[g]].sum() for g in names], dtype=np.float64)
    P = np.zeros((len(names), len(w)))
    for a, g in enumerate(names):
        P[a, members[g]] = w[members[g]] / W[a]
    return P, names, W


def _pair_cosines(Q: np.ndarray) -> float | None:
    """Mean cosine over group pairs a < c whose means are both non-zero; None if there is none."""
    norms = np.sqrt(np.clip(np.diag(Q), 0.0, None))
    cos = [Q[a, c] / (norms[a] * norms[c])
           for a in range(len(Q)) for c in range(a + 1, len(Q)) if norms[a] > 0 and norms[c] > 0]
    return float(np.mean(cos)) if cos else None


def conflict_stats(gram: np.ndarray, P: np.ndarray, C: np.ndarray | None = None) -> dict:
    """Report how much the group means disagree, before and after alignment.

    gram [K, K]; P [G, K] the group means as coefficient rows; C [G, K] the aligned means (None: no
    alignment, after == before). Shared by FedAvg and CMGA so their reports are comparable; when the
    updates are nearly orthogonal the cosines show that CMGA had nothing to fix.
    """
    Q = P @ gram @ P.T
    G = len(P)
    conflicts = sum(1 for a in range(G) for c in range(a + 1, G) if Q[a, c] < 0)
    C = P if C is None else C
    return {
        "n_groups": G,
        "n_pairs": G * (G - 1) // 2,
        "n_conflicts": conflicts,
        "mean_cos_before": _pair_cosines(Q) if G >= 2 else None,
        "mean_cos_after": _pair_cosines(C @ gram @ C.T) if G >= 2 else None,
        "group_norms": np.sqrt(np.clip(np.diag(Q), 0.0, None)).tolist(),
    }


def fedavg_coefficients(gram: np.ndarray, weights: np.ndarray, groups: list[str]) -> tuple[np.ndarray, dict]:
    """β = w / Σw ([K]; zeros if Σw = 0), plus the same conflict stats CMGA reports."""
    w = _check(gram, weights, groups)
    P, names, _ = group_matrix(w, groups)
    beta = w / w.sum() if w.sum() > 0 else np.zeros_like(w)
    return beta, {**conflict_stats(gram, P), "groups": names}


def _harmonize_factors(norms: np.ndarray, W: np.ndarray, c_max: float) -> np.ndarray:
    """f_a = clip(n̄ / ||g_a||, 1/c_max, c_max) with n̄ = Σ_a W_a ||g_a|| / ΣW; 1 for zero-norm groups."""
    if c_max < 1:
        raise ValueError(f"c_max must be >= 1, got {c_max}")
    mean_norm = float(W @ norms / W.sum())
    f = np.ones_like(norms)
    nz = norms > 0
    f[nz] = np.clip(mean_norm / norms[nz], 1.0 / c_max, c_max)
    return f


def _visit_orders(rng: np.random.Generator, G: int) -> list[np.ndarray]:
    """One random order of the other groups per group a, drawn in order a = 0..G-1.

    Both the Gram path and the explicit path draw through here, so they visit identically.
    """
    return [rng.permutation([c for c in range(G) if c != a]) for a in range(G)]


def _as_rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def cmga_coefficients(gram: np.ndarray, weights: np.ndarray, groups: list[str], *,
                      seed: int | np.random.Generator, harmonize_norms: bool = False,
                      c_max: float = 2.0) -> tuple[np.ndarray, dict]:
    """CMGA on the Gram matrix alone.

    gram [K, K] client Gram; weights [K]; groups: K labels. seed: an int or a Generator (the strategy
    passes block_seed(seed, round, block)). Returns β [K] with Σ_k β_k Δ_k = Σ_a (W_a/ΣW) g'_a, and
    stats (conflict_stats + "groups", and "harmonize_factors" when harmonising).
    """
    w = _check(gram, weights, groups)
    rng = _as_rng(seed)
    P, names, W = group_matrix(w, groups)
    total = w.sum()                          # == W.sum(); w.sum() is what FedAvg divides by
    if total == 0:
        return np.zeros_like(w), {**conflict_stats(gram, P), "groups": names}
    G = len(names)

    norms = np.sqrt(np.clip(np.diag(P @ gram @ P.T), 0.0, None))
    f = _harmonize_factors(norms, W, c_max) if harmonize_norms else np.ones(G)
    Ph = f[:, None] * P                      # [G, K] harmonised group means g_a
    sq = np.diag(Ph @ gram @ Ph.T)           # ||g_a||^2
    C = Ph.copy()                            # [G, K] aligned means g'_a, built up in place
    for a, order in enumerate(_visit_orders(rng, G)):
        for c in order:
            if sq[c] <= 0:
                continue
            dot = C[a] @ gram @ Ph[c]        # <g'_a, g_c>, against the original (harmonised) g_c
            if dot < 0:
                C[a] -= (dot / sq[c]) * Ph[c]
    # Σ_a (W_a/ΣW) f_a P[a, k] = f_{a(k)} w_k / ΣW exactly, so without projection or harmonisation
    # β is bit-for-bit FedAvg's w / Σw; the projections enter only through C - Ph.
    f_client = np.array([f[names.index(g)] if g in names else 1.0 for g in groups])  # dropped: w_k = 0
    beta = f_client * w / total + (W / total) @ (C - Ph)
    stats = {**conflict_stats(gram, P, C), "groups": names}
    if harmonize_norms:
        stats["harmonize_factors"] = f.tolist()
    return beta, stats


def cmga_explicit(deltas: np.ndarray, weights: np.ndarray, groups: list[str], *,
                  seed: int | np.random.Generator, harmonize_norms: bool = False,
                  c_max: float = 2.0) -> np.ndarray:
    """The same algorithm on explicit vectors: deltas [K, D] -> aggregate Δ [D]. For tests."""
    X = np.asarray(deltas, dtype=np.float64)
    w = _check(None, weights, groups)
    rng = _as_rng(seed)
    _, names, W = group_matrix(w, groups)   # bookkeeping only; the means are formed as vectors
    if not names:
        return np.zeros(X.shape[1])
    g = np.stack([sum(w[k] * X[k] for k, h in enumerate(groups) if h == n) / Wa for n, Wa in zip(names, W)])
    if harmonize_norms:
        g = _harmonize_factors(np.linalg.norm(g, axis=1), W, c_max)[:, None] * g
    aligned = g.copy()
    for a, order in enumerate(_visit_orders(rng, len(names))):
        for c in order:
            sq = g[c] @ g[c]
            if sq > 0 and aligned[a] @ g[c] < 0:
                aligned[a] -= (aligned[a] @ g[c] / sq) * g[c]
    return (W / W.sum()) @ aligned
