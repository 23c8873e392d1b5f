"""One federation round over a transport.

`FederationRound.run(rnd)` is the round of `fedzero simulate` and of the bench's DeMA and LoRA
runners: every client, in order, receives what it needs before training (its teacher, with
distillation), starts from the state the transport gives it (the global, or its own under a strategy
that aggregates nothing), trains its local steps (`train_round`) and sends what it trained (a DeMA
client: the delta of its own shared keys, sent as a fedzero.strategies.ClientUpdate, `client_update`;
a LoRA client: its LoRA state); then the transport finishes the round: it collects what was sent,
the strategy aggregates it, and the clients take the result.

What differs between them is only the transport:
- fedzero.store_transport.StoreTransport (fedzero simulate's): through the federation store, as the
  distributed launchers go (the global read from the store, updates and anchor predictions written
  there, screened as the MPI aggregator screens them, the aggregation report, the server state and
  the next teachers written back);
- fedzero.bench.methods.dema.MemoryTransport: in memory, the bench's strategy exchange
  (fedzero.bench.methods.exchange) and its per-round records;
- fedzero.bench.methods.lora.LoRATransport: in memory, a LoRA baseline's strategy within each
  same-backbone group, and its per-round records.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fedzero.strategies import ClientUpdate


@dataclass
class RoundOutcome:
    """What one round did."""
    round: int
    sent: list                               # per client, in order: what train_round returned to send
    metrics: list[dict]                      # per client: train_round's metrics
    seconds: list[float]                     # per client: time in train_round
    finished: object = None                  # what the transport's `finish` returned


class Transport(ABC):
    """How one round's states travel. FederationRound calls, for round rnd: `open`, then per client k
    `receive`, `start`, (the client trains), `send`; then `finish`."""

    def open(self, rnd: int) -> None:
        """Before any client trains (the store: read the round's global)."""

    def receive(self, rnd: int, k: int, client) -> None:
        """What client k gets before it trains, beside its starting state (its teacher)."""

    @abstractmethod
    def start(self, rnd: int, k: int, client) -> dict[str, torch.Tensor]:
        """The shared state client k starts round rnd from."""

    @abstractmethod
    def send(self, rnd: int, k: int, client, sent, metrics: dict, seconds: float) -> None:
        """Client k has trained: what it sends (and, with distillation, what it sends beside it)."""

    @abstractmethod
    def finish(self, rnd: int, outcome: RoundOutcome):
        """Collect the round's updates and aggregate them into the next global (the clients load it)."""


class FederationRound:
    """The round every in-process federation runs: `run(rnd)` for each round in turn."""

    def __init__(self, clients: list, transport: Transport):
        self.clients = clients
        self.transport = transport

    def run(self, rnd: int) -> RoundOutcome:
        transport = self.transport
        transport.open(rnd)
        outcome = RoundOutcome(rnd, [], [], [])
        for k, client in enumerate(self.clients):
            transport.receive(rnd, k, client)
            start = transport.start(rnd, k, client)
            started = time.time()
            sent, metrics = client.train_round(start)
            seconds = time.time() - started
            outcome.sent.append(sent)
            outcome.metrics.append(metrics)
            outcome.seconds.append(seconds)
            transport.send(rnd, k, client, sent, metrics, seconds)
        outcome.finished = transport.finish(rnd, outcome)
        return outcome


def client_update(client, delta: dict[str, torch.Tensor]) -> ClientUpdate:
    """A DeMA client's (LocalClient's) update as the strategies take it: the delta of its own shared
    keys, its samples, backbone fingerprint, per-block use and depth declaration."""
    return ClientUpdate(client.client_id, delta, client.num_samples, client.fingerprint, client.handle.slot_use(),
                        client.handle.depth_declaration())
