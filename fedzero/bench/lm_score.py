"""Held-out NLL of the LM task's records (lm_data), the bench's one NLL scorer: `score_records`
returns, per record, the summed NLL (nats), the number of scored tokens and the UTF-8 bytes they
cover (`heldout_nll_per_token`: their sums). NLL per token is comparable between models with the
same tokenizer only; NLL per byte is comparable across vocabularies (see docs/lm_task.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


# -- held-out NLL ------------------------------------------------------------------------------------

class HeldoutNLL(NamedTuple):
    nll: float          # summed next-token NLL, nats
    tokens: int         # scored tokens (every text token after the first input position, and eos)
    bytes: int          # UTF-8 bytes of the text those tokens cover

    @property
    def per_token(self) -> float:
        """Nats per token: comparable only between models that share a tokenizer."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def per_byte(self) -> float:
        """Nats per UTF-8 byte: comparable across tokenizers (bits per byte = this / ln 2)."""
        return self.nll / self.bytes if self.bytes else math.nan


class RecordNLL(NamedTuple):
    """Per-record held-out NLL, arrays in the order of the records scored."""

    nll: np.ndarray          # [N] float64: each record's summed next-token NLL, nats
    tokens: np.ndarray       # [N] int64: its scored tokens
    bytes: np.ndarray        # [N] int64: the UTF-8 bytes of text those tokens cover

    def total(self, n: int | None = None) -> HeldoutNLL:
        """The sums over all records (or the first n)."""
        return HeldoutNLL(float(self.nll[:n].sum()), int(self.tokens[:n].sum()), int(self.bytes[:n].sum()))


def heldout_nll_per_token(model, tokenizer, records: list[dict], max_length: int, batch_size: int = 16
                          ) -> HeldoutNLL:
    """Summed token NLL of `records` ({"text"} records) under `model`, forward only, no grad: the sums
    of `score_records` (see there). nll / tokens is the NLL per token (same-tokenizer comparisons
    only), nll / bytes the NLL per UTF-8 byte of text, comparable across vocabularies."""
    return score_records(model, tokenizer, records, max_length, batch_size).total()


HEAD_CHUNK = 512    # positions per LM-head matmul: [512, 49152] float32 logits are 100 MB


def score_records(model, tokenizer, records: list[dict], max_length: int, batch_size: int = 16) -> RecordNLL:
    """Every record's summed next-token NLL, scored tokens and covered bytes, forward only, no grad, in
    eval mode (the model's mode is restored). The bench's one NLL scorer: the LM task's final, per-round
    and zero-shot scores all come from here.

    Tokenised exactly as training does (fedzero.data.build_examples: [bos] + text + eos, loss on every
    token). The eos prediction counts in tokens and NLL (the end of a document is part of what every
    model predicts). Without a bos token the first text token is input only, so its bytes are not
    counted. A record that does not fit max_length is refused rather than silently cut (cutting would
    make the byte count wrong): lower the split's max_chars or raise max_length.

    Speed (the LM task's dominant cost; the LM head over a 49k vocabulary is half of a 10-layer
    SmolLM2's forward and most of a small model's): records are batched in order of length, so
    batches carry little padding; the model runs its decoder but not its head (an empty
    `logits_to_keep`), and the head is applied to the real (non-padding) positions alone, in
    chunks of HEAD_CHUNK, from the final norm's output. That equals the model's logits where
    logits = output_embeddings(final norm output); where it does not (e.g. logit soft-capping),
    the first batch, scored from the model's full logits, shows it, and full logits are used throughout.
    """
    import torch

    from fedzero.data import build_examples, collate

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_bytes = _record_bytes(tokenizer, records, max_length)
    examples = build_examples(records, tokenizer, max_length)
    order = sorted(range(len(examples)), key=lambda i: int(examples[i]["input_ids"].shape[0]))
    nll = np.zeros(len(records))
    tokens = np.zeros(len(records), dtype=np.int64)
    was_training = model.training
    model.eval()
    capture = _FinalHidden(model)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = collate([examples[i] for i in rows], tokenizer.pad_token_id)
                per_token, row = _token_nll(model, batch, capture)
                nll[rows] = np.bincount(row, weights=per_token, minlength=len(rows))
                tokens[rows] = np.bincount(row, minlength=len(rows))
    finally:
        capture.remove()
        model.train(was_training)
    return RecordNLL(nll, tokens, n_bytes)


def _record_bytes(tokenizer, records: list[dict], max_length: int) -> np.ndarray:
    """UTF-8 bytes each record's scored tokens cover; refuses records that build_examples would cut."""
    from fedzero.data.tokenize import bos_head

    head = bos_head(tokenizer)
    room = max_length - 1 - len(head)           # what build_examples keeps besides [bos] and eos
    out = np.zeros(len(records), dtype=np.int64)
    for i, record in enumerate(records):
        if not record.get("text"):
            raise ValueError(f"record {i} ({record.get('uid', '?')}): needs a non-empty \"text\"")
        ids = tokenizer.encode(record["text"])
        if len(ids) > room:
            raise ValueError(f"record {i} ({record.get('uid', '?')}) is {len(ids)} tokens; max_length={max_length} "
                             f"holds {room} besides bos/eos: lower lm_data.max_chars or raise max_length")
        out[i] = len(record["text"].encode("utf-8"))
        if not head and ids:
            out[i] -= len(tokenizer.decode([ids[0]]).encode("utf-8"))
    return out


class _FinalHidden:
    """Keeps the final norm's last output while registered: the final hidden state, with whatever
    adapters add there (DeMA's side stream adds its output at the final norm, by a hook registered
    earlier, so it runs first). `exact` (does output_embeddings(value) reproduce the model's logits?)
    is settled on the first batch; False at once for a model whose layout is not found or whose config
    caps its logits."""

    def __init__(self, model):
        from fedzero.backbones import decoder_layout

        self.value = None
        self.exact = None
        self.head = model.get_output_embeddings()
        self.handle = None
        config = getattr(model, "config", None)
        if config is not None and getattr(config.get_text_config(), "final_logit_softcapping", None):
            self.exact = False      # Gemma 2: tanh-capped logits; the check could miss it where logits are small
            return
        try:
            norm = decoder_layout(model).final_norm
        except ValueError:
            self.exact = False
            return
        self.handle = norm.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.value = output

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def _token_nll(model, batch, capture: _FinalHidden):
    """(NLL [n] float64, batch row [n]) of every labelled token of a collated batch."""
    import torch
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    labelled = targets != -100
    rows = labelled.nonzero()[:, 0].numpy()
    t = targets[labelled]
    if capture.exact is not True:       # the first batch (checks the shortcut) or a model it does not fit
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][labelled]
        if capture.exact is None:
            mine = capture.head(capture.value[:, :-1][labelled]).float()
            capture.exact = bool(torch.allclose(mine, logits.float(), rtol=1e-4, atol=1e-4))
        return F.cross_entropy(logits.float(), t, reduction="none").double().numpy(), rows
    # An empty logits_to_keep: the model's forward runs its decoder and no head (logits_to_keep=1 was
    # no cheaper: HF's [B, 1, H] head ran as a slow batched matmul)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
          logits_to_keep=torch.zeros(0, dtype=torch.long))
    h = capture.value[:, :-1][labelled]             # real positions only: no padding reaches the head
    parts = [F.cross_entropy(capture.head(h[i:i + HEAD_CHUNK]).float(), t[i:i + HEAD_CHUNK], reduction="none")
             for i in range(0, len(t), HEAD_CHUNK)]
    return torch.cat(parts).double().numpy(), rows
