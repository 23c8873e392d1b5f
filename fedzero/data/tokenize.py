"""Tokenizers, training examples and batching.

* :class:`ByteTokenizer` -- a dependency-free byte-level tokenizer for the tiny inline
  backbones used by the tests and the CPU demo (ids 0..255 are UTF-8 bytes, 256 = bos,
  257 = eos, 258 = pad).
* :func:`load_tokenizer` -- ``"byte"`` or a local Hugging Face tokenizer directory.
* :func:`build_examples` -- records -> ``{"input_ids", "labels"}`` tensors, with the loss masked
  on prompt tokens and the prompt (never the completion) truncated from the left.
* :func:`collate` / :func:`batches` -- right padding and an infinite, seeded batch stream.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "build_examples",
    "collate",
    "batches",
]

IGNORE_INDEX = -100


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 = bytes, 256 = bos, 257 = eos, 258 = pad."""

    name = "byte"
    vocab_size = 259
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` to byte ids (no special tokens added)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decode ids back to text; special tokens are dropped, invalid UTF-8 is replaced."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """Thin adapter giving a Hugging Face tokenizer the same small interface as ByteTokenizer.

    ``encode`` never adds special tokens (build_examples adds bos/eos itself).  The wrapped
    tokenizer is available as ``.hf``.
    """

    def __init__(self, hf_tokenizer: Any, name: str = "hf"):
        self.hf = hf_tokenizer
        self.name = name
        if hf_tokenizer.pad_token_id is None:
            if hf_tokenizer.eos_token is None:
                raise ValueError(f"tokenizer {name!r} has neither a pad nor an eos token")
            hf_tokenizer.pad_token = hf_tokenizer.eos_token
        if hf_tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r} has no eos token")

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.hf.pad_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode(ids, skip_special_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | None, model_dir: str | os.PathLike | None = None):
    """Return a tokenizer with ``.encode(text) -> ids`` (no special tokens), ``eos_token_id``,
    ``pad_token_id`` (and ``bos_token_id``, possibly ``None``, ``decode``, ``vocab_size``).

    * ``spec == "byte"`` (any case) -> :class:`ByteTokenizer`.
    * otherwise ``transformers.AutoTokenizer`` from a local directory: ``spec`` itself if it
      is an existing directory, else ``model_dir`` (so ``None``, ``"auto"``, ``"hf"`` or a
      hub-style model name all mean "the tokenizer saved with the model").

    Hugging Face tokenizers are loaded with ``local_files_only=True`` (never downloads); if the
    tokenizer has no pad token it is set to the eos token.
    """
    if spec is not None and str(spec).lower() == "byte":
        return ByteTokenizer()
    if spec and os.path.isdir(str(spec)):
        source = str(spec)
    elif model_dir is not None:
        source = str(model_dir)
    else:
        raise ValueError(
            f"load_tokenizer: tokenizer spec {spec!r} is not a local directory and no model_dir "
            "was given (use 'byte' for the byte tokenizer)"
        )
    if not os.path.isdir(source):
        raise FileNotFoundError(
            f"load_tokenizer: {source!r} is not a local directory (tokenizers are loaded "
            "from local files only; download the model first)"
        )
    from transformers import AutoTokenizer  # imported lazily: slow, and unused for "byte"

    hf = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    return HFTokenizer(hf, name=str(source))


def _as_long(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def bos_head(tokenizer) -> list[int]:
    """What every sequence starts with: [bos], or nothing for a tokenizer without one."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []


def completion_ids(tokenizer, completion: str) -> list[int]:
    """A completion's tokens as trained and scored: its ids, then eos."""
    return list(tokenizer.encode(completion)) + [tokenizer.eos_token_id]


def build_examples(records, tokenizer, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Tokenize records into ``{"input_ids": LongTensor[T], "labels": LongTensor[T]}``.

    Layout: ``[bos] + tokens + [eos]`` (bos only if ``tokenizer.bos_token_id`` is not None).

    * text records: ``labels == input_ids`` (loss on every token); if too long the *text* is
      cut on the right (bos and eos are kept).
    * prompt/completion records: ``labels`` is ``-100`` on bos and the prompt tokens and equals
      the ids on the completion tokens and eos.  If too long, prompt tokens are dropped from
      the LEFT, so the completion (the label) is never cut.  A completion that does not fit
      on its own raises ``ValueError``.

    Labels are aligned with ``input_ids`` (the model shifts them, Hugging Face convention).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    eos = tokenizer.eos_token_id
    head = bos_head(tokenizer)
    examples = []
    for idx, rec in enumerate(records):
        if "prompt" in rec or "completion" in rec:
            p_ids = list(tokenizer.encode(rec["prompt"]))
            c_ids = completion_ids(tokenizer, rec["completion"])
            budget = max_length - len(head) - len(c_ids)
            if budget < 0:
                raise ValueError(
                    f"record {idx}: completion is {len(c_ids)} tokens (with eos) and does not fit "
                    f"max_length={max_length}; raise max_length"
                )
            if len(p_ids) > budget:
                p_ids = p_ids[len(p_ids) - budget:] if budget > 0 else []
            ids = head + p_ids + c_ids
            labels = [IGNORE_INDEX] * (len(head) + len(p_ids)) + c_ids
        elif "text" in rec:
            t_ids = list(tokenizer.encode(rec["text"]))
            budget = max_length - len(head) - 1
            if budget < 0:
                raise ValueError(f"max_length={max_length} leaves no room for bos/eos")
            ids = head + t_ids[:budget] + [eos]
            labels = list(ids)
        else:
            raise ValueError(f'record {idx}: needs "text" or "prompt"/"completion"')
        examples.append({"input_ids": _as_long(ids), "labels": _as_long(labels)})
    return examples


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one.

    Returns ``input_ids`` (padded with ``pad_id``), ``labels`` (``-100`` at padding) and
    ``attention_mask`` (1 on real tokens, 0 on padding), all ``LongTensor[B, T]``.
    """
    if len(examples) == 0:
        raise ValueError("collate: empty list of examples")
    T = max(int(ex["input_ids"].shape[0]) for ex in examples)
    B = len(examples)
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = int(ex["input_ids"].shape[0])
        input_ids[i, :n] = ex["input_ids"]
        labels[i, :n] = ex["labels"]
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def batches(
    examples,
    batch_size: int,
    *,
    seed: int,
    epoch_shuffle: bool = True,
    pad_id: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Infinite iterator of collated batches, deterministic for a given ``seed``.

    Examples are streamed epoch after epoch and cut into batches of exactly ``batch_size``
    (a batch may straddle two epochs, so every batch is full).  With ``epoch_shuffle=True``
    each epoch uses a fresh permutation drawn from ``numpy.random.default_rng(seed)``;
    with ``False`` the examples are used in their given order.  ``pad_id`` only fills padded
    positions, which are masked (attention_mask 0, labels -100).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(examples)
    if n == 0:
        raise ValueError("batches: no examples")
    rng = np.random.default_rng(seed)

    def index_stream():
        while True:
            order = rng.permutation(n) if epoch_shuffle else np.arange(n)
            yield from order.tolist()

    stream = index_stream()
    while True:
        idx = [next(stream) for _ in range(batch_size)]
        yield collate([examples[i] for i in idx], pad_id)
