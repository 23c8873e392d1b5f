"""HetLoRA (Cho et al., 2024): zero-padded averaging of heterogeneous ranks, truncated back.

The plain form of the method: no sparsity-weighted aggregation and no rank self-pruning.
"""

from __future__ import annotations

from . import factors
from .base import LoRAStrategy


class HetLoRA(LoRAStrategy):
    name = "hetlora"

    def combine(self, As, Bs, w, ranks, scalings):
        return factors.hetlora(As, Bs, w, ranks, scalings), {}
