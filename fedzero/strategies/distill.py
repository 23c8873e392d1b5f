"""Knowledge transfer through outputs on the public anchor set (method.md's fallback across widths).

Averaging weights in the shared r-space only carries knowledge if z means the same on every client.
Outputs always do: every client scores the same public anchor prompts over the same label words, so
their predictions are comparable whatever the backbone, its width or its vocabulary. Each round

    client k -> P_k [N, C]   its adapted model's label distribution on the N anchor prompts
    server   -> T_k = sum_{j != k} w_j P_j / sum_{j != k} w_j     (w_j: client j's sample count)
    client k    trains on  task loss + lambda * KL(T_k || P_k(student))  over a few anchors per step

A client never distils from itself, and no private data or weights leave it (N x C floats travel:
64 anchors x 3 labels = 768 B per client-round). It composes with any weight strategy (local,
fedavg, cmga): the client side is fedzero.client.distill.AnchorDistiller.
"""

from __future__ import annotations

import numpy as np
import torch


def leave_one_out_teachers(predictions: dict[str, np.ndarray], weights: dict[str, float]) -> dict[str, np.ndarray]:
    """{client: [N, C] probabilities} -> {client: weighted mean of the *other* clients' predictions}.
    A client with no other client (or only zero-weight ones) gets no teacher."""
    ids = list(predictions)
    shapes = {np.asarray(predictions[c]).shape for c in ids}
    if len(shapes) > 1:
        raise ValueError(f"anchor predictions of different shapes {sorted(shapes)}: clients scored different anchors")
    if any(weights.get(c, 0) < 0 for c in ids):
        raise ValueError("distillation weights must be >= 0")
    teachers = {}
    for k in ids:
        others = [c for c in ids if c != k and weights.get(c, 0) > 0]
        total = sum(weights[c] for c in others)
        if total > 0:
            teachers[k] = sum(weights[c] * np.asarray(predictions[c], dtype=np.float64) for c in others) / total
    return teachers


def round_teachers(predictions: dict[str, np.ndarray], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """What the aggregator publishes for the next round (fedzero.store's teachers file): every
    predicting client's leave-one-out teacher, and under ALL_CLIENTS the weighted mean of all of
    them, for a client that sent no predictions this round (it joined late). ALL_CLIENTS only
    when two or more clients carry weight: else it would be one client's own predictions, and a
    predicting client without a teacher of its own would fall back to it."""
    from fedzero.store.store import ALL_CLIENTS

    teachers = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in leave_one_out_teachers(predictions, weights).items()}
    weighted = [c for c in predictions if weights.get(c, 0) > 0]
    if len(weighted) >= 2:
        total = sum(weights[c] for c in weighted)
        mean = sum(weights[c] * np.asarray(predictions[c], dtype=np.float64) for c in weighted) / total
        teachers[ALL_CLIENTS] = torch.as_tensor(mean, dtype=torch.float32)
    return teachers


def check_predictions(probs: torch.Tensor) -> str | None:
    """Why a client's anchor predictions cannot be used (None: they can): rows of finite,
    non-negative probabilities summing to 1. One NaN row would poison every other client's teacher."""
    if probs.dim() != 2 or probs.numel() == 0:
        return f"shape {tuple(probs.shape)} is not [anchors, labels]"
    p = probs.double()
    if not torch.isfinite(p).all() or (p < 0).any():
        return "holds non-finite or negative values"
    if not torch.allclose(p.sum(dim=1), torch.ones(len(p), dtype=p.dtype), atol=1e-3):
        return "rows do not sum to 1"
    return None


def publish_teachers(store, rnd: int, num_samples: dict[str, int]) -> dict:
    """The aggregator's step (simulator and MPI aggregator alike): the anchor predictions sent with
    round rnd's aggregated updates ({client: num_samples}) become round rnd+1's teachers, written
    before that round's global, whose publication marks the round ready. A client whose predictions
    cannot be read, are malformed, or are shaped unlike the majority's (other anchors or labels) is
    left out, not fatal. Returns {"used": [clients], "dropped": {client: reason}} for the result."""
    from fedzero.store import StoreError

    predictions, dropped = {}, {}
    for c in sorted(num_samples):
        try:
            p = store.read_anchor_predictions(rnd, c)
        except StoreError as err:
            dropped[c] = f"unreadable: {err}"
            continue
        if p is None:
            continue
        reason = check_predictions(p)
        if reason:
            dropped[c] = reason
        else:
            predictions[c] = p.numpy()
    shapes = [p.shape for p in predictions.values()]
    if shapes:
        common = max(set(shapes), key=lambda s: (shapes.count(s), s))
        for c in [c for c, p in predictions.items() if p.shape != common]:
            dropped[c] = f"shape {predictions.pop(c).shape}, the others' is {common} (other anchors or labels)"
    teachers = round_teachers(predictions, num_samples) if predictions else {}
    if teachers:
        store.write_teachers(rnd + 1, teachers)
    else:
        store.clear_teachers(rnd + 1)
    return {"used": sorted(predictions), "dropped": dropped}


def kl_to_teacher(student_logp: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || student); student_logp = log-probabilities [B, C]."""
    teacher = teacher.to(student_logp)      # its dtype and device
    entropy_part = torch.where(teacher > 0, teacher * teacher.clamp_min(1e-30).log(), torch.zeros_like(teacher))
    return (entropy_part - teacher * student_logp).sum(dim=-1).mean()
