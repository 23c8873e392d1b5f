"""CMGA: cross-model gradient alignment (our design after the HeteroTune abstract; docs/method.md)."""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import coefficients
from .base import ClientUpdate, Strategy


class CMGA(Strategy):
    """Group means per backbone, optional norm harmonisation, PCGrad-style projection of conflicts.

    groups="fingerprint": clients on the same backbone form one group; "client": every client is its
    own group. The visit order is seeded per (seed, round, block), so every process and rerun agrees.
    """

    name = "cmga"

    def __init__(self, *, harmonize_norms: bool = False, c_max: float = 2.0, groups: str = "fingerprint",
                 server_lr: float = 1.0, server_momentum: float = 0.0, seed: int = 0):
        super().__init__(server_lr=server_lr, server_momentum=server_momentum, seed=seed)
        if groups not in ("fingerprint", "client"):
            raise ValueError(f"CMGA groups must be 'fingerprint' or 'client', got {groups!r}")
        if not isinstance(harmonize_norms, bool):        # bool("no") is True: a string is refused, not read
            raise ValueError(f"CMGA harmonize_norms must be true or false, got {harmonize_norms!r}")
        if isinstance(c_max, bool) or not isinstance(c_max, numbers.Real) or not math.isfinite(c_max) or c_max < 1:
            raise ValueError(f"CMGA c_max must be >= 1 and finite, got {c_max!r}")
        self.harmonize_norms, self.c_max, self.groups = harmonize_norms, float(c_max), groups

    def group_labels(self, updates: list[ClientUpdate]) -> list[str]:
        if self.groups == "client":
            return [u.client_id for u in updates]
        return super().group_labels(updates)

    def coefficients(self, gram: np.ndarray, weights: np.ndarray, groups: list[str], *,
                     block: str, round: int) -> tuple[np.ndarray, dict]:
        if self.groups == "client" and len(set(groups)) < len(groups):
            # A caller passed fingerprints; make the labels unique so each client stands alone.
            groups = [f"{k}:{g}" for k, g in enumerate(groups)]
        return coefficients.cmga_coefficients(gram, weights, groups,
                                              seed=coefficients.block_seed(self.seed, round, block),
                                              harmonize_norms=self.harmonize_norms, c_max=self.c_max)
