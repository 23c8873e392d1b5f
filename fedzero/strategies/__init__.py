"""Aggregation strategies: one class per file, the Gram-to-coefficients math in `coefficients.py`,
the server step in `server.py`, blocks in `blocks.py`; built by name via `make_strategy`."""

from __future__ import annotations

from fedzero.registry import Registry

from .base import BlockCoefficients, ClientUpdate, Strategy
from .cmga import CMGA
from .fedavg import FedAvg
from .local import Local
from .server import ServerOptimizer

STRATEGIES: Registry = Registry("strategy", {"fedavg": FedAvg, "cmga": CMGA, "local": Local})


def make_strategy(name: str, **options) -> Strategy:
    """Build a strategy by registry name, e.g. make_strategy("cmga", harmonize_norms=True, seed=1)."""
    return STRATEGIES.build(name, **options)


__all__ = ["BlockCoefficients", "CMGA", "ClientUpdate", "FedAvg", "STRATEGIES", "ServerOptimizer", "Strategy", "make_strategy"]
