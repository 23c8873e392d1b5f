"""Pretraining on the public text: the causal-LM loop that heals a depth variant or pretrains a small
backbone (fedzero.backbones.recipes), and the held-out loss that measures it.

The public text is fedzero/resources/public_text/sotu-1981-2021.jsonl (41 State of the Union addresses,
public domain; that folder's README.md). The last HELDOUT_DOCS addresses are held out for the loss
measurements; the rest is trained on.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
PUBLIC_TEXT = RESOURCES / "public_text" / "sotu-1981-2021.jsonl"
HELDOUT_DOCS = 3                      # the last documents of the public text: loss measurements only


# -- public text -------------------------------------------------------------------------------------

def public_documents(path: Path = PUBLIC_TEXT) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def text_blocks(tokenizer, seq_len: int, *, heldout: bool) -> torch.Tensor:
    """The public text as [N, seq_len] token blocks: documents joined with eos, cut into blocks.
    heldout=False: all but the last HELDOUT_DOCS documents; True: only those."""
    docs = public_documents()
    docs = docs[-HELDOUT_DOCS:] if heldout else docs[:-HELDOUT_DOCS]
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def lm_loss(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL over `blocks` [N, T]."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size]
        out = model(input_ids=x, labels=x)
        n = x.numel() - x.shape[0]
        total += float(out.loss) * n
        count += n
    return total / max(count, 1)


def lm_train(model, params: list[torch.nn.Parameter], blocks: torch.Tensor, train: dict, *, seed: int = 0,
             log=print, label: str = "") -> dict:
    """Causal-LM training of `params` on shuffled `blocks`: AdamW, linear warm-up, cosine to 10%."""
    steps, bs = int(train["steps"]), int(train["batch_size"])
    optimizer = torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"])
    rng = np.random.default_rng(seed)
    order: list[int] = []
    model.train()
    started, losses = time.time(), []
    for step in range(steps):
        warm = int(train["warmup_steps"])
        if warm and step < warm:
            factor = (step + 1) / warm
        else:
            progress = (step - warm) / max(1, steps - warm)
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group in optimizer.param_groups:
            group["lr"] = train["lr"] * factor
        while len(order) < bs:
            order.extend(rng.permutation(len(blocks)).tolist())
        idx, order = order[:bs], order[bs:]
        x = blocks[idx]
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"[bench]   {label} step {step + 1}/{steps} loss {np.mean(losses[-10:]):.3f} "
                f"({(time.time() - started) / (step + 1):.2f} s/step)")
    model.eval()
    seconds = time.time() - started
    return {"train_steps": steps, "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / max(steps, 1), 3),
            "train_tokens": steps * bs * int(blocks.shape[1]),
            "train_loss_first10": float(np.mean(losses[:10])) if losses else None,
            "train_loss_last10": float(np.mean(losses[-10:])) if losses else None}
