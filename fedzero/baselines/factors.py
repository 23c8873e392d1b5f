"""The LoRA baselines' aggregation math, per module, as pure torch functions (float64 inside).

Notation (PEFT): client k holds A_k [r_k, in] and B_k [out, r_k] with scaling s_k = alpha_k / r_k,
so its update to the frozen weight W [out, in] is ΔW_k = s_k B_k A_k. Weights w [K] are normalised
(Σ w = 1). Every function takes lists over clients and returns (A, B) pairs; the caller casts back.
The scalings matter as soon as ranks differ under a fixed alpha: s_k then differs per client and
averaging raw factors would mix updates of different magnitudes. With equal s_k every function
reduces to its paper's plain form on the raw factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

Pair = tuple[Tensor, Tensor]   # (A [r, in], B [out, r])


def _f64(xs: list[Tensor]) -> list[Tensor]:
    return [x.detach().to(torch.float64) for x in xs]


def fedavg_lora(As: list[Tensor], Bs: list[Tensor], w: Tensor) -> Pair:
    """FedIT: (Σ w_k A_k, Σ w_k B_k). Needs equal ranks and scalings (the caller checks).

    Note Σ w_k B_k A_k ≠ (Σ w_k B_k)(Σ w_k A_k): FedIT averages the factors, not the updates.
    """
    As, Bs = _f64(As), _f64(Bs)
    return sum(wk * A for wk, A in zip(w, As)), sum(wk * B for wk, B in zip(w, Bs))


def pad_rank(A: Tensor, B: Tensor, r: int) -> Pair:
    """Zero-pad A [r0, in] -> [r, in] (rows) and B [out, r0] -> [out, r] (columns); B A is unchanged."""
    r0 = A.shape[0]
    if r < r0:
        raise ValueError(f"cannot pad rank {r0} down to {r}")
    return torch.nn.functional.pad(A, (0, 0, 0, r - r0)), torch.nn.functional.pad(B, (0, r - r0))


def hetlora(As: list[Tensor], Bs: list[Tensor], w: Tensor, ranks: list[int], scalings: list[float]) -> list[Pair]:
    """HetLoRA: zero-pad every client to r_max, average, truncate back to each r_k.

    Each client's factors are first put in the common scale sqrt(s_k) (so their product is ΔW_k)
    and the truncated result is divided by sqrt(s_k) again. Rows beyond a small client's rank are
    averaged with that client's zeros (the paper's plain zero-padded average, which dilutes them).
    Returns [(A_k' [r_k, in], B_k' [out, r_k])] per client.
    """
    r_max = max(ranks)
    As, Bs = _f64(As), _f64(Bs)
    A_avg = sum(wk * s ** 0.5 * pad_rank(A, B, r_max)[0] for wk, s, A, B in zip(w, scalings, As, Bs))
    B_avg = sum(wk * s ** 0.5 * pad_rank(A, B, r_max)[1] for wk, s, A, B in zip(w, scalings, As, Bs))
    return [(A_avg[:r] / s ** 0.5, B_avg[:, :r] / s ** 0.5) for r, s in zip(ranks, scalings)]


def flora_stack(As: list[Tensor], Bs: list[Tensor], w: Tensor, scalings: list[float]) -> Pair:
    """FLoRA: A_stack = [w_1 s_1 A_1; …; w_K s_K A_K] [Σr, in], B_stack = [B_1 … B_K] [out, Σr].

    B_stack A_stack = Σ_k w_k s_k B_k A_k = Σ_k w_k ΔW_k exactly (block product, no cross terms):
    the noise-free aggregate, to be merged into W with scaling 1.
    """
    As, Bs = _f64(As), _f64(Bs)
    A = torch.cat([wk * s * A for wk, s, A in zip(w, scalings, As)], dim=0)
    return A, torch.cat(Bs, dim=1)


def flexlora(As: list[Tensor], Bs: list[Tensor], w: Tensor, ranks: list[int],
             scalings: list[float]) -> tuple[list[Pair], Tensor]:
    """FlexLoRA: ΔW = Σ_k w_k ΔW_k, then its best rank-r_k approximation per client.

    ΔW = B_stack A_stack (FLoRA's stacking) is never formed: with B_stack = Q_B R_B [out, R],
    A_stackᵀ = Q_A R_A [in, R] (R = Σ r_k), ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ, and the SVD of the small core
    U S Vᵀ = R_B R_Aᵀ [≤R, ≤R] gives ΔW's SVD (Q_B U) S (Q_A V)ᵀ. Client k gets the top r_k triplets,
    split evenly between the factors and divided by its scaling so s_k B_k' A_k' = the rank-r_k
    approximation: B_k' = Q_B U_r sqrt(S_r / s_k), A_k' = sqrt(S_r / s_k) V_rᵀ Q_Aᵀ. A rank beyond
    ΔW's own (R or a dimension) is filled with zeros. Cost O((out + in) R²), never out × in.
    Returns ([(A_k', B_k')] per client, the singular values S [≤R]).
    """
    A_st, B_st = flora_stack(As, Bs, w, scalings)
    Q_B, R_B = torch.linalg.qr(B_st)              # [out, p], [p, R]; p = min(out, R)
    Q_A, R_A = torch.linalg.qr(A_st.T)            # [in, q], [q, R]; q = min(in, R)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)      # [p, m], [m], [m, q]; m = min(p, q)
    left, right = Q_B @ U, Vh @ Q_A.T             # [out, m], [m, in]: ΔW = left diag(S) right
    out = []
    for r, s in zip(ranks, scalings):
        k = min(r, S.numel())
        root = (S[:k] / s).sqrt()
        A_k, B_k = root[:, None] * right[:k], left[:, :k] * root[None, :]
        out.append(pad_rank(A_k, B_k, r))
    return out, S


def energy_kept(S: Tensor, r: int) -> float:
    """Fraction of ||ΔW||_F² kept by a rank-r truncation (1.0 for ΔW = 0)."""
    total = float((S ** 2).sum())
    return 1.0 if total == 0 else float((S[:r] ** 2).sum()) / total
