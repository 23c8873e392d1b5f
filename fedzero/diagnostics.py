"""Per-round diagnostics of a DeMA federation.

- cosines between clients' updates per block: the first round's (all clients start from the same
  state) is the clean signal of whether the shared space means the same thing on every client;
- update norms per block and client;
- gate entropy per slot (nats; log M = uniform mixture, 0 = one expert).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from fedzero.adapters.dema.layer import SlotMixture


def _block_vectors(updates, block_of: Callable[[str], str]) -> dict[str, dict[str, torch.Tensor]]:
    """{block: {client_id: flattened float64 delta}}, only for clients that hold the block."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for u in updates:
        parts: dict[str, list[torch.Tensor]] = {}
        for key in sorted(u.delta):
            parts.setdefault(block_of(key), []).append(u.delta[key].detach().reshape(-1).to(torch.float64))
        for block, chunks in parts.items():
            out.setdefault(block, {})[u.client_id] = torch.cat(chunks)
    return out


def update_diagnostics(updates, block_of: Callable[[str], str]) -> dict:
    """{block: {"cosines": {"a|b": cos}, "mean_cosine": float | None, "norms": {client: norm}}}.

    A pair where either update is zero has no cosine (it is left out, not counted as 0)."""
    result = {}
    for block, vectors in _block_vectors(updates, block_of).items():
        norms = {cid: float(v.norm()) for cid, v in vectors.items()}
        cosines = {}
        for a, b in itertools.combinations(sorted(vectors), 2):
            if norms[a] > 0 and norms[b] > 0:
                cosines[f"{a}|{b}"] = float(vectors[a] @ vectors[b] / (norms[a] * norms[b]))
        mean = sum(cosines.values()) / len(cosines) if cosines else None
        result[block] = {"cosines": cosines, "mean_cosine": mean, "norms": norms}
    return result


@torch.no_grad()
def gate_entropy(handle, batch: dict) -> dict[str, float]:
    """Mean entropy of each slot's gate over the real (unpadded) tokens of `batch`: {"slot{s}": nats}.
    Slots that no layer of this client uses are left out."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    for s, mixture in enumerate(handle.shared.slots):
        def hook(module: SlotMixture, args, output, s=s):
            captured.setdefault(s, []).append(module.gate_probs(args[0]).float())
        handles.append(mixture.register_forward_hook(hook))
    try:
        handle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    mask = batch["attention_mask"].bool()
    result = {}
    for s, probs in sorted(captured.items()):
        entropies = [(-(p * p.clamp_min(1e-12).log()).sum(-1))[mask] for p in probs]   # per call: [tokens]
        result[f"slot{s}"] = float(torch.cat(entropies).mean())
    return result

