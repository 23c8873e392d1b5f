"""FlexLoRA (Bai et al., 2024): average the full ΔW, give each client its best rank-r_k part.

The SVD runs on an R × R core from QR of the stacked factors (R = Σ r_k), never on out × in.
"""

from __future__ import annotations

from . import factors
from .base import LoRAStrategy


class FlexLoRA(LoRAStrategy):
    """metrics["energy_kept"][k]: share of ||ΔW||_F² client k's rank keeps, mean over modules."""

    name = "flexlora"

    def combine(self, As, Bs, w, ranks, scalings):
        pairs, S = factors.flexlora(As, Bs, w, ranks, scalings)
        return pairs, {"energy_kept": [factors.energy_kept(S, r) for r in ranks]}
