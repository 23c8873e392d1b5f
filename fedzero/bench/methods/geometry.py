"""The geometry of client updates: pairwise cosines (first round: every client starts from the same
state, so it is the clean alignment signal, docs/method.md), LoRA weight-update cosines across ranks,
and CMGA's effect on an aggregate against FedAvg's of the same updates."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from fedzero.adapters.dema import shared_block
from fedzero.strategies import ClientUpdate, FedAvg


def flat(state: dict[str, torch.Tensor], keys: list[str] | None = None) -> torch.Tensor:
    keys = list(state) if keys is None else keys
    return torch.cat([state[k].detach().reshape(-1).to(torch.float64) for k in keys])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = float(a.norm()), float(b.norm())
    return None if na == 0 or nb == 0 else float(a @ b) / (na * nb)


def pairwise_cosines(updates: dict[str, dict[str, torch.Tensor]], *, common: bool = False) -> list[dict]:
    """Cosine between every two clients' updates. common=False: only pairs with the same keys and
    shapes (LoRA: same backbone and rank); True: over the keys both hold with equal shapes (DeMA:
    the experts and gates always, shape-matched projectors only between clients of one width)."""
    pairs = []
    for (a, ua), (b, ub) in itertools.combinations(updates.items(), 2):
        if common:
            keys = [k for k in ua if k in ub and ua[k].shape == ub[k].shape]
        elif list(ua) == list(ub) and all(ua[k].shape == ub[k].shape for k in ua):
            keys = list(ua)
        else:
            keys = []
        c = cosine(flat(ua, keys), flat(ub, keys)) if keys else None
        if c is not None:
            pairs.append({"a": a, "b": b, "cos": c})
    return pairs


def first_round_cosine(updates: dict[str, dict[str, torch.Tensor]], block_of=None) -> dict:
    """Mean pairwise cosine; with `block_of` (DeMA), over common keys and also per block."""
    pairs = pairwise_cosines(updates, common=block_of is not None)
    out = {"mean": float(np.mean([p["cos"] for p in pairs])) if pairs else None, "pairs": pairs}
    if block_of is not None and updates:
        per_block = {}
        blocks = list(dict.fromkeys(block_of(k) for u in updates.values() for k in u))
        for block in blocks:
            sub = {cid: {k: v for k, v in u.items() if block_of(k) == block} for cid, u in updates.items()}
            cs = [p["cos"] for p in pairwise_cosines({c: u for c, u in sub.items() if u}, common=True)]
            per_block[block] = float(np.mean(cs)) if cs else None
        out["per_block"] = per_block
    return out


def lora_dw_factors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                    scaling: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per LoRA module, the change of its weight update as a low-rank product U V:
    s (B1 A1 - B0 A0) = [s B1, -s B0] [A1; A0], U [out, 2r], V [2r, in] (never formed out x in)."""
    from fedzero.baselines import lora_modules

    b, a = lora_modules(before), lora_modules(after)
    return {m: (torch.cat([scaling * a[m][1], -scaling * b[m][1]], dim=1).double(),
                torch.cat([a[m][0], b[m][0]], dim=0).double()) for m in a}


def dw_cosines(changes: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> list[dict]:
    """Cosine of the weight-update changes <dW_a, dW_b>_F over all modules, for clients with the same
    modules and weight shapes, whatever their LoRA ranks: <U_a V_a, U_b V_b> = Σ (U_aᵀ U_b) ⊙ (V_a V_bᵀ)."""
    def inner(x, y):
        return sum(float(((x[m][0].T @ y[m][0]) * (x[m][1] @ y[m][1].T)).sum()) for m in x)

    pairs = []
    for (a, ca), (b, cb) in itertools.combinations(changes.items(), 2):
        if list(ca) != list(cb) or any((ca[m][0].shape[0], ca[m][1].shape[1]) != (cb[m][0].shape[0], cb[m][1].shape[1])
                                       for m in ca):
            continue
        na, nb = inner(ca, ca), inner(cb, cb)
        if na > 0 and nb > 0:
            pairs.append({"a": a, "b": b, "cos": inner(ca, cb) / (na * nb) ** 0.5})
    return pairs


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# -- CMGA's effect on the aggregate ------------------------------------------------------------------

class _FedAvgWithGram(FedAvg):
    """FedAvg that also returns each block's Gram in its stats: CMGA's and FedAvg's aggregates are both
    Σ_k β_k Δ_k over the same updates, so their difference is measured from β and the Gram alone."""

    def coefficients(self, gram, weights, groups, *, block, round):
        beta, stats = super().coefficients(gram, weights, groups, block=block, round=round)
        return beta, {**stats, "gram": gram}


def block_effect(gram: np.ndarray, beta: np.ndarray, beta_fedavg: np.ndarray) -> tuple[bool, float | None]:
    """(changed, relative difference) of one block's aggregate Σ_k β_k Δ_k against FedAvg's Σ_k β^f_k Δ_k.

    changed: β differs from FedAvg's at all. CMGA's β is FedAvg's bit for bit when it neither projects
    nor harmonises (math.cmga_coefficients; tests/test_strategies.py), so this is exact, not a threshold.
    relative difference ‖Σ(β − β^f)Δ‖ / ‖Σ β^f Δ‖ from the Gram (squared norms dᵀGd); 0 when unchanged,
    None when FedAvg's aggregate is zero but CMGA's is not (no scale to compare against).
    """
    beta, beta_fedavg = np.asarray(beta, dtype=np.float64), np.asarray(beta_fedavg, dtype=np.float64)
    if np.array_equal(beta, beta_fedavg):
        return False, 0.0
    d = beta - beta_fedavg
    diff, ref = float(max(d @ gram @ d, 0.0)) ** 0.5, float(max(beta_fedavg @ gram @ beta_fedavg, 0.0)) ** 0.5
    if ref == 0:
        return True, 0.0 if diff == 0 else None
    return True, diff / ref


def _sig(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")      # run files stay compact


def cmga_effect(rnd: int, global_state: dict[str, torch.Tensor], updates: list[ClientUpdate], blocks: dict,
                block_of=shared_block) -> dict:
    """One round's record of what CMGA did: `blocks` is CMGA's aggregate(...)["blocks"] for `updates`
    in round `rnd` (0-based, as aggregate takes it; recorded 1-based, as the run's other per-round
    lists); FedAvg aggregates the same updates with the same weights (one more Gram per block).

    Returns {"round", "changed_blocks", "total_blocks" (the blocks aggregated, i.e. not skipped),
    "rel_diff_mean", "rel_diff_max" (over those blocks, unchanged ones counting 0; None if none is
    defined), "conflicts", "pairs" (CMGA's own stats summed over blocks: group pairs whose means have a
    negative inner product before alignment, and all group pairs), "cos_before_mean" (mean over blocks
    of CMGA's mean pairwise cosine of group means; None with one group), "rel_diff" {block: value}}."""
    _, reference = _FedAvgWithGram().aggregate(global_state, updates, round=rnd, block_of=block_of)
    per_block = {}
    for block, ref in reference["blocks"].items():
        # depth-aware projector banks are averaged by their overlaps under any strategy: no Gram, no effect
        if not ref.get("skipped") and "gram" in ref:
            per_block[block] = block_effect(ref["gram"], blocks[block]["beta"], ref["beta"])
    rel = [r for _, r in per_block.values() if r is not None]
    stats = [blocks[b] for b in per_block]
    cos = [s["mean_cos_before"] for s in stats if s.get("mean_cos_before") is not None]
    return {"round": rnd + 1, "changed_blocks": sum(changed for changed, _ in per_block.values()),
            "total_blocks": len(per_block), "rel_diff_mean": _sig(float(np.mean(rel))) if rel else None,
            "rel_diff_max": _sig(max(rel)) if rel else None,
            "conflicts": sum(int(s.get("n_conflicts", 0)) for s in stats),
            "pairs": sum(int(s.get("n_pairs", 0)) for s in stats),
            "cos_before_mean": _sig(float(np.mean(cos))) if cos else None,
            "rel_diff": {b: _sig(r) for b, (_, r) in per_block.items()}}

