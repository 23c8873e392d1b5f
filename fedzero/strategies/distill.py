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
    them, for a client that sent no predictions this round (it joined late, or had none yet)."""
    from fedzero.store.store import ALL_CLIENTS

    if not predictions:
        return {}
    teachers = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in leave_one_out_teachers(predictions, weights).items()}
    total = sum(weights.get(c, 0) for c in predictions)
    if total > 0:
        mean = sum(weights.get(c, 0) * np.asarray(p, dtype=np.float64) for c, p in predictions.items()) / total
        teachers[ALL_CLIENTS] = torch.as_tensor(mean, dtype=torch.float32)
    return teachers


def publish_teachers(store, rnd: int, num_samples: dict[str, int]) -> list[str]:
    """The aggregator's step (simulator and MPI aggregator alike): the anchor predictions sent with
    round rnd's aggregated updates ({client: num_samples}) become round rnd+1's teachers, written
    before that round's global, whose publication marks the round ready. Returns the clients whose
    predictions were used (none: no teachers file, no distillation next round)."""
    predictions = {c: p.numpy() for c in num_samples if (p := store.read_anchor_predictions(rnd, c)) is not None}
    if predictions:
        store.write_teachers(rnd + 1, round_teachers(predictions, num_samples))
    return sorted(predictions)


def kl_to_teacher(student_logp: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || student); student_logp = log-probabilities [B, C]."""
    teacher = teacher.to(student_logp)      # its dtype and device
    entropy_part = torch.where(teacher > 0, teacher * teacher.clamp_min(1e-30).log(), torch.zeros_like(teacher))
    return (entropy_part - teacher * student_logp).sum(dim=-1).mean()
