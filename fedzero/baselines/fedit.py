"""FedIT (Zhang et al., 2024): FedAvg of the LoRA factors A and B, among clients of one backbone."""

from __future__ import annotations

from . import factors
from .base import LoRAStrategy


class FedIT(LoRAStrategy):
    """A' = Σ w_k A_k, B' = Σ w_k B_k for every client. Needs one backbone, one rank and one scaling."""

    name = "fedit"

    def check(self, ranks, scalings):
        if len(set(ranks)) > 1 or len(set(scalings)) > 1:
            raise ValueError(f"fedit averages LoRA factors of one shape and scale, got ranks {list(ranks)} and "
                             f"scalings {scalings}; use hetlora, flora or flexlora for heterogeneous ranks")

    def combine(self, As, Bs, w, ranks, scalings):
        A, B = factors.fedavg_lora(As, Bs, w)
        return [(A, B)] * len(As), {}
