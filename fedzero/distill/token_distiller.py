"""A client's side of token-level output distillation (`distill.level: token`): its sparse next-token
distributions on the anchors, and the term KL(teacher || model) it adds to its loss
(the math: fedzero.distill.tokens).

Which positions are scored, per anchor record (fedzero.distill.settings.DistillSettings.token_records):

* ``{"text": t}`` (the language-modelling case, template '{text}'): every position of
  ``[bos] + t + [eos]`` that predicts a token, i.e. exactly the positions the LM training loss reads
  (fedzero.data.build_examples), the text cut on the right to max_length;
* ``{"prompt": p, "completion": c}``: the positions that predict the completion's tokens and eos (the
  prompt cut from the left, as build_examples does);
* ``{"prompt": p}`` (an anchor text framed by a task template): the prompt's last position, where the
  completion would begin: the full-vocabulary version of the label-level prediction.

The positions are fixed by the tokenizer, the anchors and max_length; their sha256 (``anchors_digest``)
travels with the predictions, so the aggregator leaves out a client that scored other positions.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from fedzero.data import build_examples, collate
from fedzero.data.tokenize import IGNORE_INDEX, bos_head
from fedzero.distill.distiller import AnchorDistiller
from fedzero.distill.tokens import PAD_ID, check_sparse, sparse_kl, tokenizer_fingerprint, top_k_encode


def position_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[P_batch, V] logits at the scored positions (batch["labels"] != -100 *at* the position, not
    shifted), row by row, positions in order. Only those positions go through the LM head."""
    scored = batch["labels"] != IGNORE_INDEX
    keep = scored.any(dim=0).nonzero().flatten()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return logits[scored[:, keep]]


def scored_example(record: dict, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """{"input_ids", "labels"} with labels != -100 exactly at the scored positions (the module doc)."""
    if "completion" in record or "text" in record:
        ex = build_examples([record], tokenizer, max_length)[0]
        ids, shifted = ex["input_ids"], ex["labels"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:-1] = torch.where(shifted[1:] != IGNORE_INDEX, ids[1:], IGNORE_INDEX)   # position i predicts i+1
    else:
        head = bos_head(tokenizer)
        if max_length <= len(head):
            raise ValueError(f"max_length={max_length} leaves no room for an anchor prompt")
        ids = torch.tensor(head + list(tokenizer.encode(record["prompt"]))[-(max_length - len(head)):], dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-1] = 0                                                                   # scored, target unknown
    if not (labels != IGNORE_INDEX).any():
        raise ValueError(f"anchor record {record!r:.80} leaves no position to score (empty text?)")
    return {"input_ids": ids, "labels": labels}


class TokenDistiller:
    """Scores the anchors' next-token distributions (top_k, renormalised) and adds
    weight * KL(teacher || model), averaged over the positions of `batch_size` anchors per step.
    The interface of AnchorDistiller: predict, set_teacher, loss, anchors_at, and the store's side
    (write_predictions, read_teacher), so every client path drives either the same way."""

    level = "token"

    def __init__(self, tokenizer, records: list[dict], *, weight: float, batch_size: int, max_length: int,
                 seed: int, top_k: int):
        if not records:
            raise ValueError("output distillation needs at least one anchor")
        if not weight > 0 or batch_size < 1 or top_k < 1:
            raise ValueError(f"distillation weight must be > 0, batch_size and top_k >= 1, got {weight}, "
                             f"{batch_size}, {top_k}")
        self.examples = [scored_example(r, tokenizer, max_length) for r in records]
        counts = [int((ex["labels"] != IGNORE_INDEX).sum()) for ex in self.examples]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)   # anchor a: rows offsets[a]:offsets[a+1]
        self.num_positions = int(self.offsets[-1])
        self.vocab_size = int(len(tokenizer))
        self.top_k = int(top_k)
        if self.top_k > self.vocab_size:
            raise ValueError(f"distill.top_k {self.top_k} exceeds the tokenizer's {self.vocab_size} tokens")
        self.tokenizer = tokenizer_fingerprint(tokenizer)
        digest = hashlib.sha256()
        for ex in self.examples:
            digest.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
            digest.update(np.asarray((ex["labels"] != IGNORE_INDEX).nonzero().flatten(), dtype=np.int64).tobytes())
            digest.update(b"|")
        self.anchors_digest = digest.hexdigest()
        self.pad_id = tokenizer.pad_token_id
        self.weight, self.batch_size = float(weight), int(batch_size)
        self.teacher: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reports_quality = False
        self.device: torch.device | None = None
        self._rng = np.random.default_rng(seed)
        self._epochs: list[np.ndarray] = []

    # the same seeded, reshuffled epochs of anchors as the label level (a function of the step alone)
    anchors_at = AnchorDistiller.anchors_at

    def _rows(self, idx: list[int]) -> np.ndarray:
        return np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])

    def logits(self, model, idx: list[int]) -> torch.Tensor:
        """[positions of these anchors, V] logits of the model (differentiable), anchors in idx order."""
        batch = collate([self.examples[i] for i in idx], self.pad_id)
        if self.device is not None:
            batch = {k: v.to(self.device) for k, v in batch.items()}
        return position_logits(model, batch)

    @torch.no_grad()
    def predict(self, model, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(ids [P, top_k] int32, probs [P, top_k] float32): what is sent (fedzero.distill.tokens)."""
        was_training = model.training
        model.eval()
        ids, probs = [], []
        n = len(self.examples)
        for i in range(0, n, batch_size):
            top_ids, top_p = top_k_encode(self.logits(model, list(range(i, min(i + batch_size, n)))), self.top_k,
                                          self.vocab_size)
            ids.append(top_ids.cpu())
            probs.append(top_p.cpu())
        model.train(was_training)
        return torch.cat(ids).numpy(), torch.cat(probs).numpy()

    def set_teacher(self, teacher: tuple[np.ndarray, np.ndarray] | None) -> None:
        if teacher is None:
            self.teacher = None
            return
        ids, probs = teacher
        if np.shape(ids)[0] != self.num_positions:
            raise ValueError(f"token teacher over {np.shape(ids)[0]} positions, expected {self.num_positions} "
                             "(other anchors, tokenizer or max_length than this client's)")
        why = check_sparse(np.asarray(ids), np.asarray(probs), allow_pad=True)
        if why:
            raise ValueError(f"token teacher {why}")
        self.teacher = (torch.as_tensor(np.asarray(ids), dtype=torch.long),
                        torch.as_tensor(np.asarray(probs), dtype=torch.float32))

    def loss(self, model, step: int) -> torch.Tensor | None:
        """The distillation term of optimizer step `step` (None while there is no teacher)."""
        if self.teacher is None:
            return None
        idx = self.anchors_at(step)
        rows = torch.as_tensor(self._rows(idx))
        logp = torch.log_softmax(self.logits(model, idx).float(), dim=-1)
        return self.weight * sparse_kl(logp, self.teacher[0][rows], self.teacher[1][rows])

    # -- the store's side ---------------------------------------------------------------------
    def write_predictions(self, store, rnd: int, client_id: str, predictions, *, quality: float | None = None):
        ids, probs = predictions
        return store.write_token_predictions(rnd, client_id, torch.as_tensor(ids), torch.as_tensor(probs),
                                             tokenizer=self.tokenizer, anchors=self.anchors_digest, quality=quality)

    def read_teacher(self, store, rnd: int, client_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        found = store.read_token_teacher(rnd, client_id)
        return None if found is None else (found[0].numpy(), found[1].numpy())

    @staticmethod
    def payload_bytes(predictions) -> int:
        """Bytes of what is sent: ids (4 B) and probabilities (4 B) of every kept token."""
        ids, probs = predictions
        return int(np.asarray(ids).size * 4 + np.asarray(probs).size * 4)


__all__ = ["TokenDistiller", "position_logits", "scored_example", "PAD_ID"]
