"""Local training of one client's DeMA adapters on its frozen backbone (single process).

The DeepSpeed client (launch/client.py) runs the same round logic under ZeRO; this is the
reference path the simulator uses and the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedzero.adapters.dema import DeMAModel
from fedzero.client.steps import train_round_steps
from fedzero.data import batches, collate
from fedzero.evaluate import labelled_logits
from fedzero.fields import from_known_fields


@dataclass
class TrainSettings:
    local_steps: int = 10
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_length: int = 128
    grad_clip: float = 1.0
    schedule: str = "cosine"      # over the whole federation: rounds * local_steps optimizer steps
    warmup_steps: int = 0
    eval_batch_size: int = 32
    max_eval_examples: int | None = None

    def __post_init__(self):
        for name in ("local_steps", "batch_size", "max_length", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"train.schedule must be 'constant' or 'cosine', got {self.schedule!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainSettings":
        return from_known_fields(cls, data, "train setting")


def token_loss_sums(model, batch) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled tokens, and their count."""
    logits, targets = labelled_logits(model, batch)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


class LocalClient:
    def __init__(self, client_id: str, handle: DeMAModel, fingerprint: str, train_examples, eval_examples,
                 settings: TrainSettings, *, pad_id: int, seed: int, total_rounds: int,
                 tokenizer=None, eval_records: list[dict] | None = None, distiller=None):
        if not train_examples:
            raise ValueError(f"client {client_id!r} has no training examples")
        self.client_id = client_id
        self.handle = handle
        self.tokenizer = tokenizer            # for label scoring of eval_records (prompt -> label tasks)
        self.eval_records = eval_records or []
        self.distiller = distiller            # fedzero.distill.distiller.AnchorDistiller: output distillation
        self.fingerprint = fingerprint
        self.eval_examples = eval_examples[: settings.max_eval_examples] if settings.max_eval_examples else eval_examples
        self.num_samples = len(train_examples)
        self.settings = settings
        self.pad_id = pad_id
        self.total_steps = total_rounds * settings.local_steps
        self.step = 0
        self._batches = batches(train_examples, settings.batch_size, seed=seed, pad_id=pad_id)

    def resume_at(self, step: int) -> None:
        """Continue as if the federation's first `step` optimizer steps had run here: the seeded batch
        stream and the learning-rate schedule move on to where an uninterrupted run would be (a resumed
        `fedzero simulate`; the adapter's state is loaded separately)."""
        if step < self.step:
            raise ValueError(f"client {self.client_id!r} is at step {self.step}; it cannot go back to {step}")
        for _ in range(step - self.step):
            next(self._batches)
        self.step = step

    def _optimizer(self) -> torch.optim.Optimizer:
        # A fresh optimizer every round: the shared parameters jump at aggregation, so Adam moments
        # from the last round describe a point that no longer exists (policy: reset).
        return torch.optim.AdamW(self.handle.param_groups(self.settings.lr), lr=self.settings.lr,
                                 weight_decay=self.settings.weight_decay)

    def train_round(self, global_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """Load the global shared state, train local_steps, return (delta of shared tensors, metrics)."""
        self.handle.load_shared_state_dict(global_state)
        losses = train_round_steps(self.handle.model, self._optimizer(), self.handle.trainable_parameters(),
                                   self._batches.__next__, self.settings, first_step=self.step,
                                   total_steps=self.total_steps, penalty=self.handle.regularization,
                                   distill=self.distiller.loss if self.distiller is not None else None)
        self.step += len(losses)
        trained = self.handle.shared_state_dict()
        delta = {k: trained[k].float() - global_state[k].float() for k in trained}   # own keys only
        return delta, {"train_loss": sum(losses) / len(losses)}

    def evaluate(self) -> float:
        """Mean token loss on the client's held-out examples (labelled tokens only)."""
        model = self.handle.model
        model.eval()
        return mean_token_loss(model, self.eval_examples, batch_size=self.settings.eval_batch_size,
                               pad_id=self.pad_id)


@torch.no_grad()
def mean_token_loss(model, examples, *, batch_size: int, pad_id: int, device=None) -> float:
    """Mean next-token loss over the labelled tokens of `examples` (0.0 for none), in batches of
    `batch_size`, moved to `device` if given. A client's held-out loss: its eval metric, and the
    quality it sends with its anchor predictions (LocalClient and the DeepSpeed client alike)."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        s, n = token_loss_sums(model, batch)
        total += float(s)
        count += n
    return total / max(count, 1)
