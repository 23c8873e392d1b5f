"""A DeMA method's strategy as its runner uses it: where each client starts a round from, and what
happens to the shared state at the end of the round.

DEMA_STRATEGIES registers every strategy a DeMA method may name: fedzero.strategies' (aggregation of
the shared state, `Aggregation`) and "local" (`NoAggregation`: each client trains on from its own
state and nothing is sent). The runner treats both alike; only what they do differs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fedzero.adapters.dema import shared_block
from fedzero.simulate import initial_global_state
from fedzero.strategies import CMGA, STRATEGIES, ClientUpdate, Strategy, make_strategy

from .geometry import cmga_effect, nbytes


@dataclass
class RoundExchange:
    """What one round's exchange of weights did."""

    weight_bytes: list[int]           # per client, each way: its own shared keys (0: nothing sent)
    aggregation: dict | None          # per block: the strategy's stats (None: nothing aggregated)


class Exchange(ABC):
    """One run's strategy, stateful over the run: `begin` once the clients exist, then per round
    `start` (client k's starting state), `trained` (client k finished training) and `finish`."""

    @abstractmethod
    def begin(self, clients: list) -> None: ...

    @abstractmethod
    def start(self, k: int) -> dict[str, torch.Tensor]: ...

    def trained(self, k: int, client) -> None:
        """Client k has trained this round (its update is in `finish`'s updates)."""

    @abstractmethod
    def finish(self, rnd: int, clients: list, updates: list[ClientUpdate]) -> RoundExchange: ...

    def record(self) -> dict:
        """Fields the run record gains from this strategy (none by default)."""
        return {}


class NoAggregation(Exchange):
    """Strategy "local": no federation. Each client goes on from its own shared state; nothing is
    aggregated and no weights travel (distillation, if the method has it, still exchanges predictions)."""

    name = "local"

    def __init__(self, *, seed: int = 0, **options):
        if options:
            raise TypeError(f"strategy {self.name!r} takes no options, got {sorted(options)}")

    def begin(self, clients: list) -> None:
        self.states = [c.handle.shared_state_dict() for c in clients]

    def start(self, k: int) -> dict[str, torch.Tensor]:
        return self.states[k]

    def trained(self, k: int, client) -> None:
        self.states[k] = client.handle.shared_state_dict()

    def finish(self, rnd: int, clients: list, updates: list[ClientUpdate]) -> RoundExchange:
        return RoundExchange([0] * len(clients), None)


class Aggregation(Exchange):
    """A fedzero.strategies strategy over the clients' shared states, one block per depth slot
    (block_of = shared_block), groups by backbone. Every client starts each round from the global
    state and sends its own shared keys. A CMGA run also records, per round, how its aggregate
    differs from FedAvg's of the same updates (geometry.cmga_effect): where CMGA has nothing to
    resolve the two methods train identically, and this says so."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy
        self.effect = [] if isinstance(strategy, CMGA) else None

    def begin(self, clients: list) -> None:
        # Round 0's global state: the union of the clients' seeded initial shared states (identical where
        # they overlap; with shape-matched sharing each width adds its own projector bank).
        self.global_state = initial_global_state(clients)

    def start(self, k: int) -> dict[str, torch.Tensor]:
        return self.global_state

    def finish(self, rnd: int, clients: list, updates: list[ClientUpdate]) -> RoundExchange:
        round_start = self.global_state
        self.global_state, agg = self.strategy.aggregate(round_start, updates, round=rnd, block_of=shared_block)
        if self.effect is not None:      # on the side: FedAvg's aggregate is never applied
            self.effect.append(cmga_effect(rnd, round_start, updates, agg["blocks"]))
        for client in clients:
            client.handle.load_shared_state_dict(self.global_state)
        stats = {block: {k: v for k, v in s.items() if k not in ("beta", "group_norms")}
                 for block, s in agg["blocks"].items()}
        return RoundExchange([nbytes(u.delta) for u in updates], stats)

    def record(self) -> dict:
        return {} if self.effect is None else {"cmga_effect": self.effect}


def _aggregation(name: str):
    def build(*, seed: int = 0, **options) -> Aggregation:
        return Aggregation(make_strategy(name, seed=seed, **options))
    return build


# fedzero.strategies registers "local" too (fedzero simulate's no-aggregation control, which aggregates
# nothing); the bench's own NoAggregation stays its "local".
DEMA_STRATEGIES = {NoAggregation.name: NoAggregation,
                   **{name: _aggregation(name) for name in STRATEGIES if name != NoAggregation.name}}


def make_exchange(name: str, options: dict, *, seed: int) -> Exchange:
    """A DeMA method's strategy by registry name with its options, for one run of training seed `seed`."""
    if name not in DEMA_STRATEGIES:
        raise ValueError(f"unknown DeMA strategy {name!r}; valid: {list(DEMA_STRATEGIES)}")
    if "seed" in options:
        raise ValueError("'seed' is the run's training seed, not a strategy option")
    return DEMA_STRATEGIES[name](seed=seed, **options)
