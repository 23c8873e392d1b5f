"""Round 0: a client's part of the first global, the union of the clients' parts, and publishing it
(for a client tried alone, `fedzero prepare`, and the simulator alike)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from fedzero.adapters.dema import DeMAConfig, inject_dema
from fedzero.client.client_config import ClientRunConfig
from fedzero.client.distributed import launcher_rank
from fedzero.store import FederationStore

SharedPart = tuple[dict[str, torch.Tensor], dict[str, str]]     # (shared tensors, tensor name -> block)


def initial_shared_part(cfg: ClientRunConfig) -> SharedPart:
    """This client's part of round 0's global and the aggregation blocks its shared container
    declares: its seeded initial shared DeMA state, exactly what inject_dema builds (it depends on
    the DeMA config, the seed and, for shape-matched projectors, the backbone's width and depth,
    never on its weights: the backbone is built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg.client.backbone.hf_config())
    # Anchor projectors are private and computed from the weights; the shared part does not depend on them.
    handle = inject_dema(model, cfg.dema.learned_stand_in())
    return handle.shared_state_dict(), handle.shared_blocks()


def initial_shared_state(cfg: ClientRunConfig) -> dict[str, torch.Tensor]:
    """This client's part of round 0's global (initial_shared_part without the blocks)."""
    return initial_shared_part(cfg)[0]


def union_of_parts(parts: Iterable[tuple[dict[str, torch.Tensor], dict[str, str] | None]]) -> SharedPart:
    """Round 0's global: the union of the clients' parts (with shape-matched sharing each width
    contributes its own projector bank). Where clients overlap they must agree, on the values and
    on the blocks: that is what the shared seed and config guarantee. A part given without its
    blocks (None) adds none."""
    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, str] = {}
    for part_state, part_blocks in parts:
        for key, value in part_state.items():
            if key in state and not torch.equal(state[key], value):
                raise ValueError(f"clients disagree on the initial value of shared tensor {key!r}")
            state.setdefault(key, value)
            if part_blocks is None:
                continue
            if key in blocks and blocks[key] != part_blocks[key]:
                raise ValueError(f"clients put shared tensor {key!r} in different blocks: "
                                 f"{blocks[key]!r} and {part_blocks[key]!r}")
            blocks.setdefault(key, part_blocks[key])
    return state, blocks


def round0_meta(seed: int, dema: DeMAConfig, blocks: dict[str, str], **extra) -> dict:
    """The round-0 global's manifest meta: the seed and DeMA config it was built from, and its
    aggregation blocks, as the aggregator writes them into every later global."""
    return {"seed": seed, "dema": dema.to_dict(), **extra, "blocks": blocks}


def init_store(cfg: ClientRunConfig, root: str | Path) -> None:
    """Create the store and publish round 0's global if absent (process of global rank 0 only;
    called before torch.distributed starts, so the rank comes from the launcher's environment)."""
    if launcher_rank() != 0:
        return
    store = FederationStore(root)
    if not store.has_global(0):
        state, blocks = initial_shared_part(cfg)
        store.publish_global(0, state, meta=round0_meta(cfg.seed, cfg.dema, blocks,
                                                        published_by=f"client {cfg.client.id}"))
