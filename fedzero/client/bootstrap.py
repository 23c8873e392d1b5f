"""Round 0: a client's part of the first global, and publishing it for a client tried alone."""

from __future__ import annotations

from pathlib import Path

import torch

from fedzero.adapters.dema import inject_dema
from fedzero.client.client_config import ClientRunConfig
from fedzero.client.distributed import launcher_rank
from fedzero.store import FederationStore


def initial_shared_state(cfg: ClientRunConfig) -> dict[str, torch.Tensor]:
    """This client's part of round 0's global: its seeded initial shared DeMA state, exactly what
    inject_dema builds (it depends on the DeMA config, the seed and, for shape-matched projectors,
    the backbone's width and depth, never on its weights: the backbone is built on the meta device).
    A federation's round-0 global is the union of its clients' parts (fedzero.simulate)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg.client.backbone.hf_config())
    # Anchor projectors are private and computed from the weights; the shared part does not depend on them.
    return inject_dema(model, cfg.dema.learned_stand_in()).shared_state_dict()


def init_store(cfg: ClientRunConfig, root: str | Path) -> None:
    """Create the store and publish round 0's global if absent (process of global rank 0 only;
    called before torch.distributed starts, so the rank comes from the launcher's environment)."""
    if launcher_rank() != 0:
        return
    store = FederationStore(root)
    if not store.has_global(0):
        store.publish_global(0, initial_shared_state(cfg), meta={"seed": cfg.seed, "dema": cfg.dema.to_dict(),
                                                                      "published_by": f"client {cfg.client.id}"})
