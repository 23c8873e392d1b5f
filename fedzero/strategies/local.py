"""Strategy "local": nothing is aggregated. Each client keeps training its own adapter (its shared
part included); the global state stays round 0's. A control inside the product: run a config once
with its strategy and once with `--strategy local`, then `fedzero compare` says whether federating
helped each client.

Only the in-process federation runs it (`fedzero simulate`, which keeps each client's own shared
part beside its private one and publishes the unchanged global with meta strategy "local"): the
DeepSpeed clients start every round from the store's global, so the MPI aggregator refuses it.
"""

from __future__ import annotations

import numpy as np

from .base import BlockCoefficients, Strategy


class Local(Strategy):
    """No aggregation. `aggregate` returns the global unchanged."""

    name = "local"
    aggregates = False          # fedzero.simulate: each client starts a round from its own shared state

    def aggregate(self, global_state, updates, *, round: int, block_of):
        return dict(global_state), {"blocks": {}, "clients": [u.client_id for u in updates], "aggregated": False}

    def coefficients(self, gram: np.ndarray, weights: np.ndarray, groups: list[str], *,
                     block: str, round: int) -> tuple[np.ndarray, dict]:
        raise ValueError(_REFUSAL)

    def block_coefficients(self, *args, **kwargs) -> BlockCoefficients:
        raise ValueError(_REFUSAL)


_REFUSAL = ("strategy 'local' aggregates nothing and runs only in `fedzero simulate`: a DeepSpeed client starts every "
            "round from the store's global, so it cannot keep its own adapter between rounds")
