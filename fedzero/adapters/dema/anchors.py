"""The public anchor set and the pooled hidden states that define anchor projectors.

Every client runs its own frozen backbone on the same public texts; the per-layer mean hidden
states become that layer's anchors (docs/method.md, "anchor"). Nothing computed here leaves the
client.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

DEFAULT_ANCHOR_FILE = Path(__file__).resolve().parents[2] / "resources" / "anchors" / "sotu.jsonl"


def load_anchor_texts(path: str | Path | None, count: int, setting: str = "dema.num_anchors") -> list[str]:
    path = Path(path) if path else DEFAULT_ANCHOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"anchor file {path} not found")
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(texts) < count:
        raise ValueError(f"anchor file {path} has {len(texts)} texts; {count} are needed ({setting})")
    return texts[:count]


@torch.no_grad()
def pooled_hidden_states(model: nn.Module, tokenizer, texts: list[str], modules: list[nn.Module], *,
                         capture: str, max_length: int = 64, batch_size: int = 16,
                         pool: str = "mean") -> list[torch.Tensor]:
    """For each module, the texts' hidden states there, pooled over tokens: a list of [N, d].

    capture='input' reads each module's first input (the adapter's input x), 'output' its output.
    pool='mean' averages the real tokens (the anchors' definition); pool='last' takes the last real
    token, the one that predicts a label (fedzero.adapters.dema.alignment). With 'last' a long text
    loses its beginning, not its end, so the token read is the text's own last token whatever the
    tokenizer.
    """
    if capture not in ("input", "output"):
        raise ValueError(f"capture must be 'input' or 'output', got {capture!r}")
    if pool not in ("mean", "last"):
        raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a bos and a token), got {max_length}")
    store: list[list[torch.Tensor]] = [[] for _ in modules]
    mask_holder: dict[str, torch.Tensor] = {}

    def make_hook(i):
        def pooled(h):
            mask = mask_holder["mask"]
            if pool == "last":      # right padding: the last real token sits at length - 1
                store[i].append(h[torch.arange(h.shape[0]), mask.sum(1) - 1].float())     # [B, d]
                return
            mask = mask.to(h.dtype).unsqueeze(-1)                                    # [B, T, 1]
            store[i].append(((h * mask).sum(1) / mask.sum(1)).float())             # [B, d]

        if capture == "input":
            return lambda mod, args, kwargs: pooled(args[0] if args else kwargs["hidden_states"])
        return lambda mod, args, out: pooled(out if torch.is_tensor(out) else out[0])

    handles = [
        m.register_forward_pre_hook(make_hook(i), with_kwargs=True) if capture == "input"
        else m.register_forward_hook(make_hook(i))
        for i, m in enumerate(modules)
    ]
    bos = getattr(tokenizer, "bos_token_id", None)
    was_training = model.training
    try:
        model.eval()
        for start in range(0, len(texts), batch_size):
            ids = [([bos] if bos is not None else []) + _truncated(tokenizer.encode(t), max_length - 1, pool)
                   for t in texts[start:start + batch_size]]
            empty = [start + row for row, x in enumerate(ids) if not x]
            if empty:
                raise ValueError(f"text {empty[0]} has no tokens and this tokenizer adds no bos: nothing to read")
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, x in enumerate(ids):
                input_ids[row, : len(x)] = torch.tensor(x)
                mask[row, : len(x)] = 1
            mask_holder["mask"] = mask
            model(input_ids=input_ids, attention_mask=mask)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [torch.cat(chunks) for chunks in store]


def _truncated(ids: list[int], budget: int, pool: str) -> list[int]:
    # Mean pooling keeps a text's beginning; last-token pooling its end (the token it reads).
    return ids[len(ids) - budget:] if pool == "last" and len(ids) > budget else ids[:budget]
