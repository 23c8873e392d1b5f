"""Local: no federation. Every client keeps its own LoRA; nothing is sent."""

from __future__ import annotations

from torch import Tensor

from .base import LoRAAggregate, LoRAStrategy, lora_modules


class Local(LoRAStrategy):
    """The lower bar every federated method must clear. Any backbones, any ranks."""

    name = "local"

    def combine(self, As, Bs, w, ranks, scalings):   # identity; aggregate skips the shared-backbone checks
        return list(zip(As, Bs)), {}

    def aggregate(self, client_states: list[dict[str, Tensor]], weights, ranks, round, *,
                  fingerprints, scalings=None) -> LoRAAggregate:
        for state in client_states:
            lora_modules(state)          # same input contract as the federated methods
        states = [{k: v.clone() for k, v in s.items()} for s in client_states]
        K = len(states)
        return LoRAAggregate(states, metrics={"method": self.name, "upload_params": [0] * K,
                                              "download_params": [0] * K})
