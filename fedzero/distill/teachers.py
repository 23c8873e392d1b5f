"""The server side of output distillation: how the clients' anchor predictions are mixed into each
client's teacher (the rule, the quality weights, the leave-one-out mixtures published per round).
The formulas: fedzero.distill's package doc."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TEACHERS = ("mean", "quality")
LEVELS = ("label", "token")     # distill.level: what the clients exchange (fedzero.distill.tokens for "token")


@dataclass(frozen=True)
class TeacherRule:
    """How the other clients' predictions are mixed into a client's teacher: the run config's
    `distill.teacher`, `distill.only_stronger` and `distill.level` (fedzero.distill.settings.DistillSettings
    holds them for the clients; the MPI aggregator reads just these keys of the same section)."""

    teacher: str = "mean"          # "mean": sample-weighted; "quality": also by held-out loss and confidence
    only_stronger: bool = False    # distil only from clients whose held-out loss is lower than one's own
    level: str = "label"           # "label": [N, C] label distributions; "token": sparse next-token ones

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"distill.level must be one of {list(LEVELS)}, got {self.level!r}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"distill.teacher must be one of {list(TEACHERS)}, got {self.teacher!r}")
        if not isinstance(self.only_stronger, bool):
            raise ValueError(f"distill.only_stronger must be true or false, got {self.only_stronger!r}")

    @property
    def needs_quality(self) -> bool:
        """Whether clients must send their held-out loss with their predictions."""
        return self.teacher == "quality" or self.only_stronger

    def __str__(self) -> str:
        """The config keys that set the rule, for messages: "distill.teacher 'quality'", ..."""
        parts = ([f"distill.teacher {self.teacher!r}"] if self.teacher != "mean" or not self.only_stronger else []) \
            + (["distill.only_stronger"] if self.only_stronger else [])
        return " with ".join(parts)

    @classmethod
    def from_config(cls, distill) -> "TeacherRule":
        """From a run config's `distill:` mapping (None: no distillation, the default rule); the
        section's other keys belong to the clients (DistillSettings checks them)."""
        if distill is None:
            return cls()
        if not isinstance(distill, dict):
            raise ValueError(f"config: 'distill' must be a mapping, got {type(distill).__name__}")
        return cls(distill.get("teacher", "mean"), distill.get("only_stronger", False), distill.get("level", "label"))


def check_val_losses(val_losses: dict[str, float] | None, clients) -> dict[str, float]:
    """{client: held-out loss} for these clients, each a finite number >= 0, or a ValueError naming
    the clients without one."""
    from fedzero.store.store import is_valid_quality

    val_losses = val_losses or {}
    bad = sorted(c for c in clients if not is_valid_quality(val_losses.get(c)))
    if bad:
        raise ValueError(f"teacher rule needs every client's held-out loss (finite, >= 0); missing or invalid "
                         f"for {bad}: {[val_losses.get(c) for c in bad]}")
    return {c: float(val_losses[c]) for c in clients}


def quality_weights(predictions: dict[str, np.ndarray], weights: dict[str, float],
                    val_losses: dict[str, float]) -> np.ndarray:
    """[J, N] mixing weights of the quality teacher over the J clients given (in their order), each
    column summing to 1: w_jn = s_j * q_j * c_jn normalised over j, with

        s_j = weights[j]                  the sample weight, as for the mean teacher (> 0)
        q_j = exp(-val_losses[j])         the geometric-mean probability client j's model gives the
                                          held-out truth (val loss in nats): one nat lower loss weighs e
                                          times more; no scale to tune, and it is never 0
        c_jn = max_c P_j[n, c]            client j's confidence on anchor n, in [1/C, 1]: a confident
                                          client counts up to C times an undecided one, never less than
                                          1/C of it, so confidence scales quality and cannot veto it
                                          (1 - normalised entropy would be 0 for a uniform row, and a
                                          teacher of undecided clients would be 0/0)

    Computed in log space (a softmax over j): exp(-L) of a large loss would underflow to 0 for every
    client alike, though only the differences between losses matter."""
    ids = list(predictions)
    if any(not weights.get(c, 0) > 0 for c in ids):
        raise ValueError("quality weights need a sample weight > 0 for every client given")
    losses = check_val_losses(val_losses, ids)
    probs = np.stack([np.asarray(predictions[c], dtype=np.float64) for c in ids])          # [J, N, C]
    confidence = probs.max(axis=2)                                                          # [J, N]
    log_w = (np.log([float(weights[c]) for c in ids]) - np.array([losses[c] for c in ids]))[:, None] \
        + np.log(np.maximum(confidence, np.finfo(np.float64).tiny))
    log_w -= log_w.max(axis=0, keepdims=True)
    w = np.exp(log_w)
    return w / w.sum(axis=0, keepdims=True)


def _mixture(predictions: dict[str, np.ndarray], weights: dict[str, float], clients: list[str], teacher: str,
             val_losses: dict[str, float] | None) -> np.ndarray:
    """The teacher made of `clients` (each with weight > 0) under rule `teacher`: [N, C] float64."""
    if teacher == "mean":      # exactly the expression of the first version: "mean" teachers stay bit for bit
        total = sum(weights[c] for c in clients)
        return sum(weights[c] * np.asarray(predictions[c], dtype=np.float64) for c in clients) / total
    alpha = quality_weights({c: predictions[c] for c in clients}, weights, val_losses)     # [J, N]
    probs = np.stack([np.asarray(predictions[c], dtype=np.float64) for c in clients])      # [J, N, C]
    return np.einsum("jn,jnc->nc", alpha, probs)


def leave_one_out_teachers(predictions: dict[str, np.ndarray], weights: dict[str, float],
                           rule: TeacherRule | None = None,
                           val_losses: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """{client: [N, C] probabilities} -> {client: the mixture of the *other* clients' predictions}
    (the module doc's T_k; rule None: the "mean" teacher). val_losses {client: held-out loss} is
    needed by teacher "quality" and by only_stronger. A client with no other client (or only
    zero-weight ones, or under only_stronger none with a lower loss) gets no teacher."""
    rule = rule or TeacherRule()
    ids = list(predictions)
    shapes = {np.asarray(predictions[c]).shape for c in ids}
    if len(shapes) > 1:
        raise ValueError(f"anchor predictions of different shapes {sorted(shapes)}: clients scored different anchors")
    return leave_one_out(ids, weights, rule, val_losses,
                         lambda others, losses: _mixture(predictions, weights, others, rule.teacher, losses))


def leave_one_out(ids: list[str], weights: dict[str, float], rule: TeacherRule,
                  val_losses: dict[str, float] | None, mix) -> dict:
    """{client: mix(others, losses)} for each of `ids` with at least one eligible other client
    (weight > 0, and under only_stronger a strictly lower held-out loss); losses are the checked
    val_losses (None unless the rule needs qualities). Shared by the label- and token-level teachers."""
    if any(weights.get(c, 0) < 0 for c in ids):
        raise ValueError("distillation weights must be >= 0")
    losses = check_val_losses(val_losses, ids) if rule.needs_quality else None
    teachers = {}
    for k in ids:
        # only_stronger: strictly lower loss, so two equally good clients do not teach each other
        others = [c for c in ids if c != k and weights.get(c, 0) > 0
                  and (not rule.only_stronger or losses[c] < losses[k])]
        if others and sum(weights[c] for c in others) > 0:
            teachers[k] = mix(others, losses)
    return teachers


def round_teachers(predictions: dict[str, np.ndarray], weights: dict[str, float], rule: TeacherRule | None = None,
                   val_losses: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """What the aggregator publishes for the next round (fedzero.store's teachers file): every
    predicting client's leave-one-out teacher, and under ALL_CLIENTS the mixture of all of them
    (same rule), for a client that sent no predictions this round (it joined late). ALL_CLIENTS only
    when two or more clients carry weight: else it would be one client's own predictions, and a
    predicting client without a teacher of its own would fall back to it. Never under only_stronger:
    there a predicting client may be left without a teacher on purpose (no client is stronger), and
    the mixture of all would hand it its own predictions; a late client's loss is unknown anyway."""
    from fedzero.store.store import ALL_CLIENTS

    rule = rule or TeacherRule()
    teachers = {k: torch.as_tensor(v, dtype=torch.float32)
                for k, v in leave_one_out_teachers(predictions, weights, rule, val_losses).items()}
    weighted = [c for c in predictions if weights.get(c, 0) > 0]
    if len(weighted) >= 2 and not rule.only_stronger:
        mixture = _mixture(predictions, weights, weighted, rule.teacher,
                           check_val_losses(val_losses, weighted) if rule.needs_quality else None)
        teachers[ALL_CLIENTS] = torch.as_tensor(mixture, dtype=torch.float32)
    return teachers
