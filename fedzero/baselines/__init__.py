"""Baselines for comparison with DeMA (docs/method.md, "Baselines"): PEFT LoRA federated five ways.

Strategies (one file each, the factor math in `factors.py`) act on PEFT LoRA state dicts; `LoRAClient` trains
one client's LoRA on its frozen backbone. Built by name via `make_lora_strategy`.
"""

from __future__ import annotations

from fedzero.registry import Registry

from .base import LoRAAggregate, LoRAStrategy, lora_modules, lora_state, same_backbone_groups
from .fedit import FedIT
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA
from .local import Local

LORA_STRATEGIES: Registry = Registry("LoRA baseline", {
    "local": Local, "fedit": FedIT, "hetlora": HetLoRA, "flora": FLoRA, "flexlora": FlexLoRA,
})


def make_lora_strategy(name: str, **options) -> LoRAStrategy:
    """Build a LoRA baseline by registry name, e.g. make_lora_strategy("flexlora")."""
    return LORA_STRATEGIES.build(name, **options)


__all__ = ["FLoRA", "FedIT", "FlexLoRA", "HetLoRA", "LORA_STRATEGIES", "LoRAAggregate", "LoRAClient",
           "LoRASettings", "LoRAStrategy", "Local", "lora_modules", "lora_state", "make_lora_strategy",
           "same_backbone_groups"]


def __getattr__(name):
    # The client pulls in peft and transformers; the aggregation side (a server) needs neither.
    if name in ("LoRAClient", "LoRASettings"):
        from . import client
        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

