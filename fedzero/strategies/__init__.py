"""Aggregation strategies: one class per file, the Gram-to-coefficients math in `coefficients.py`,
the server step in `server.py`, blocks in `blocks.py`; built by name via `make_strategy`."""

from __future__ import annotations

import inspect

from .base import BlockCoefficients, ClientUpdate, Strategy
from .cmga import CMGA
from .fedavg import FedAvg
from .server import ServerOptimizer

STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg, "cmga": CMGA}


def make_strategy(name: str, **options) -> Strategy:
    """Build a strategy by registry name, e.g. make_strategy("cmga", harmonize_norms=True, seed=1)."""
    cls = STRATEGIES.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; valid: {sorted(STRATEGIES)}")
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"strategy {name!r} got unknown option(s) {unknown}; valid: {valid}")
    return cls(**options)


__all__ = ["BlockCoefficients", "CMGA", "ClientUpdate", "FedAvg", "STRATEGIES", "ServerOptimizer", "Strategy", "make_strategy"]
