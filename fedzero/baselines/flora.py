"""FLoRA (Wang et al., 2024): stack the clients' factors, merge the exact weighted sum into the base.

Every client adds B_stack @ A_stack = Σ_k w_k s_k B_k A_k to its frozen weights and restarts with
fresh LoRA (as its authors do), so the next round starts from the aggregate with no factor noise.
"""

from __future__ import annotations

from . import factors
from .base import LoRAStrategy


class FLoRA(LoRAStrategy):
    name = "flora"
    merges = True

    def combine(self, As, Bs, w, ranks, scalings):
        return factors.flora_stack(As, Bs, w, scalings), {}
