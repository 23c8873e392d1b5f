"""A client's side of output distillation: its label distribution on the anchor prompts, and the
distillation term KL(teacher || model) it adds to its loss.

The anchors are public texts framed as the task's prompts (e.g. "Tweet: <anchor>\\nSentiment:"); a
model's prediction on one is its distribution over the label words: read from the logits of the one
token that tells the labels apart (one forward per anchor) when the tokenizer has one, else from
the summed log-likelihoods of the whole completions (C forwards per anchor). Differentiable.
"""

from __future__ import annotations

import numpy as np
import torch

from fedzero.data import build_examples, collate
from fedzero.data.tokenize import bos_head
from fedzero.evaluate import completion_logprob_sums


def label_branch(tokenizer, labels: list[str]) -> tuple[list[int], list[int]] | None:
    """(prefix, next ids): the token prefix every " label" starts with, and the one token after it
    that tells the labels apart (SmolLM2: prefix [], " negative"/" neutral"/" positive" are single
    tokens). None when the labels are not told apart by one token after a common prefix (a byte
    tokenizer on negative/neutral): then whole completions are scored."""
    seqs = [list(tokenizer.encode(f" {label}")) for label in labels]
    n = 0
    while all(len(q) > n for q in seqs) and len({q[n] for q in seqs}) == 1:
        n += 1
    if any(len(q) <= n for q in seqs) or len({q[n] for q in seqs}) != len(labels):
        return None
    return seqs[0][:n], [q[n] for q in seqs]


def label_logprobs(model, batch: dict[str, torch.Tensor], label_ids: list[int]) -> torch.Tensor:
    """[B, C] log-softmax over the label tokens at each (right-padded) sequence's last position."""
    last = batch["attention_mask"].sum(dim=1) - 1
    keep, row_pos = torch.unique(last, return_inverse=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    picked = logits[torch.arange(len(last)), row_pos][:, label_ids].float()
    return torch.log_softmax(picked, dim=-1)


def completion_logprobs(model, batch: dict[str, torch.Tensor], num_labels: int) -> torch.Tensor:
    """[B/C, C] log-softmax over the summed log-likelihoods of C consecutive candidate rows
    (prompt + " label" + eos, as fedzero.evaluate.label_scores scores them)."""
    return torch.log_softmax(completion_logprob_sums(model, batch).float().view(-1, num_labels), dim=-1)


class AnchorDistiller:
    """Scores the anchor prompts and adds weight * KL(teacher || model) on `batch_size` of them per step."""

    level = "label"

    def __init__(self, tokenizer, prompts: list[str], labels: list[str], *, weight: float, batch_size: int,
                 max_length: int, seed: int):
        if not prompts:
            raise ValueError("output distillation needs at least one anchor prompt")
        if not weight > 0 or batch_size < 1:
            raise ValueError(f"distillation weight must be > 0 and batch_size >= 1, got {weight}, {batch_size}")
        self.num_labels = len(labels)
        branch = label_branch(tokenizer, labels)
        self.label_ids = branch[1] if branch else None
        if branch:      # one sequence per anchor: prompt + the labels' common prefix, scored at its end
            head = bos_head(tokenizer)
            self.examples = []
            for p in prompts:
                ids = head + (list(tokenizer.encode(p)) + branch[0])[-(max_length - len(head)):]
                t = torch.tensor(ids, dtype=torch.long)
                self.examples.append([{"input_ids": t, "labels": torch.full_like(t, -100)}])
        else:           # C candidate sequences per anchor
            cands = build_examples([{"prompt": p, "completion": f" {label}"} for p in prompts for label in labels],
                                   tokenizer, max_length)
            self.examples = [cands[i:i + len(labels)] for i in range(0, len(cands), len(labels))]
        self.pad_id = tokenizer.pad_token_id
        self.weight, self.batch_size = float(weight), int(batch_size)
        self.teacher: torch.Tensor | None = None
        # The client sends its held-out loss with its predictions (the teacher rule weighs clients by it).
        self.reports_quality = False
        self.device: torch.device | None = None   # where the model's inputs go (the DeepSpeed client sets it)
        self._rng = np.random.default_rng(seed)
        self._epochs: list[np.ndarray] = []       # the anchor order: one seeded permutation per epoch

    def logprobs(self, model, idx: list[int]) -> torch.Tensor:
        """[len(idx), C] label log-probabilities of the model on these anchors (differentiable)."""
        batch = collate([ex for i in idx for ex in self.examples[i]], self.pad_id)
        if self.device is not None:
            batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.label_ids is not None:
            return label_logprobs(model, batch, self.label_ids)
        return completion_logprobs(model, batch, self.num_labels)

    @torch.no_grad()
    def predict(self, model, batch_size: int = 32) -> np.ndarray:
        """[N, C] label probabilities of the current model on every anchor prompt (what is sent)."""
        was_training = model.training
        model.eval()
        n = len(self.examples)
        out = [self.logprobs(model, list(range(i, min(i + batch_size, n)))).exp() for i in range(0, n, batch_size)]
        model.train(was_training)
        return torch.cat(out).double().cpu().numpy()

    def set_teacher(self, teacher: np.ndarray | None) -> None:
        if teacher is not None and tuple(np.shape(teacher)) != (len(self.examples), self.num_labels):
            raise ValueError(f"teacher of shape {np.shape(teacher)}, expected {(len(self.examples), self.num_labels)}")
        self.teacher = None if teacher is None else torch.as_tensor(np.asarray(teacher), dtype=torch.float32)

    def anchors_at(self, step: int) -> list[int]:
        """The anchors of optimizer step `step`: positions [step*b, (step+1)*b) of a seeded sequence of
        reshuffled epochs. A function of the step alone, so a client resumed mid-round, or one of
        several data-parallel ranks, picks the same anchors as an uninterrupted single process."""
        n, start = len(self.examples), step * self.batch_size
        while len(self._epochs) * n < start + self.batch_size:
            self._epochs.append(self._rng.permutation(n))
        return [int(self._epochs[p // n][p % n]) for p in range(start, start + self.batch_size)]

    def loss(self, model, step: int) -> torch.Tensor | None:
        """The distillation term of optimizer step `step` (None while there is no teacher)."""
        if self.teacher is None:
            return None
        idx = self.anchors_at(step)
        return self.weight * kl_to_teacher(self.logprobs(model, idx), self.teacher[idx])

    # -- the store's side (the same calls as fedzero.distill.token_distiller.TokenDistiller's) ---------
    def write_predictions(self, store, rnd: int, client_id: str, predictions: np.ndarray, *,
                          quality: float | None = None):
        return store.write_anchor_predictions(rnd, client_id, torch.as_tensor(predictions, dtype=torch.float32),
                                              quality=quality)

    def read_teacher(self, store, rnd: int, client_id: str) -> np.ndarray | None:
        teacher = store.read_teacher(rnd, client_id)
        return None if teacher is None else teacher.numpy()

    @staticmethod
    def payload_bytes(predictions: np.ndarray) -> int:
        """Bytes of what is sent: N x C float32."""
        return int(np.asarray(predictions).size * 4)


def kl_to_teacher(student_logp: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || student); student_logp = log-probabilities [B, C]."""
    teacher = teacher.to(student_logp)      # its dtype and device
    entropy_part = torch.where(teacher > 0, teacher * teacher.clamp_min(1e-30).log(), torch.zeros_like(teacher))
    return (entropy_part - teacher * student_logp).sum(dim=-1).mean()
