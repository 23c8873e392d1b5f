"""fedzero simulate's transport for fedzero.federation_round.FederationRound: the round through the
federation store, as the distributed launchers run it (the global read from the store; updates and
anchor predictions written there; updates screened as the MPI aggregator screens them, a bad one
quarantined; nothing non-finite published; the aggregation report, server state and next teachers
written back)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from fedzero.adapters.dema.blocks import global_blocks
from fedzero.config import RunConfig
from fedzero.diagnostics import update_diagnostics
from fedzero.distill.publish import publish_teachers
from fedzero.federation_round import Transport
from fedzero.store import FederationStore
from fedzero.store.auth import KeySet
from fedzero.store.screen import GlobalSpec, nonfinite_reason, quarantined, screen_round
from fedzero.strategies import ClientUpdate
from fedzero.strategies.blocks import group_blocks
from fedzero.strategies.server import publish_refusal


class StoreTransport(Transport):
    """The round through the federation store (fedzero.federation_round): every client starts from the
    store's global (under "local", from its own shared state), writes its update and anchor predictions
    there; the updates are screened as the MPI aggregator screens them, the strategy aggregates them and
    the aggregation report, server state and next teachers are written. `finish` returns the new global
    (still to publish), its blocks, the strategy's report and the update diagnostics."""

    def __init__(self, run: RunConfig, store: FederationStore, strategy, clients: list,
                 own_states: dict | None, bar):
        self.run, self.store, self.strategy, self.clients = run, store, strategy, clients
        self.own_states, self.bar = own_states, bar
        # federation.authenticate: in-memory HMAC keys, one per client (fedzero.store.auth), as the MPI path's files
        self.keys = KeySet.generate([c.client_id for c in clients]) if run.federation.authenticate else None

    def open(self, rnd: int) -> None:
        self.global_state, manifest = self.store.read_global(rnd)
        self.global_sha256 = manifest["sha256"]        # every update is bound to the global it was trained from
        # the blocks the global declares, as the MPI aggregator reads them
        self.block_of = global_blocks(self.global_state, manifest["meta"].get("blocks"))
        self.uploaded = 0

    def receive(self, rnd: int, k: int, client) -> None:
        self.bar.set_postfix_str(f"round {rnd} (of 0..{self.run.federation.rounds - 1}) client {client.client_id}")
        if client.distiller is not None:
            client.distiller.set_teacher(client.distiller.read_teacher(self.store, rnd, client.client_id))

    def start(self, rnd: int, k: int, client) -> dict[str, torch.Tensor]:
        if self.own_states is None:
            return self.global_state
        return self.own_states.get(client.client_id, self.global_state)

    def send(self, rnd: int, k: int, client, delta: dict, metrics: dict, seconds: float) -> None:
        store = self.store
        if client.distiller is not None:     # sent before the update, whose manifest closes the round
            # its quality: the held-out loss of the model that made these predictions (trained, not yet averaged)
            quality = client.evaluate() if client.distiller.reports_quality else None
            sent = client.distiller.write_predictions(store, rnd, client.client_id,
                                                      client.distiller.predict(client.handle.model), quality=quality)
            self.uploaded += sent.stat().st_size
        store.write_update(rnd, client.client_id, delta, fingerprint=client.fingerprint,
                           num_samples=client.num_samples, metrics=metrics, slot_use=client.handle.slot_use(),
                           depth=client.handle.depth_declaration(), global_sha256=self.global_sha256,
                           key=self.keys.get(client.client_id) if self.keys is not None else None)
        if self.own_states is not None:
            self.own_states[client.client_id] = client.handle.shared_state_dict()
        self.bar.update(1)

    def finish(self, rnd: int, outcome) -> tuple[dict, dict, dict, dict]:
        store, strategy, fed = self.store, self.strategy, self.run.federation
        global_state, block_of = self.global_state, self.block_of
        # every update screened as the MPI aggregator screens it: a bad one is left out and quarantined
        updates, left_out = screened_updates(store, rnd, global_state, block_of, fed.max_num_samples, keys=self.keys)
        for u in updates:
            self.uploaded += store.update_path(rnd, u.client_id).stat().st_size if self.own_states is None else 0  # local: never sent
        carried_in = strategy.server_opt.state_dict()
        new_state, agg = strategy.aggregate(global_state, updates, round=rnd, block_of=block_of)
        refuse_nonfinite(rnd, strategy, new_state, carried_in, agg)      # before anything of the round is written
        diagnostics = {"updates": update_diagnostics(updates, block_of.__getitem__)}
        store.write_server_state(rnd, strategy.server_opt.state_dict())   # as the MPI aggregator does: resumable
        distill = publish_teachers(store, rnd, {u.client_id: u.num_samples for u in updates},
                                   self.run.distill.teacher_rule if self.run.distill is not None else None)
        store.write_result(rnd, {"strategy": fed.strategy, **agg, "diagnostics": diagnostics, "distill": distill,
                                 "left_out": {r.client: {"file": r.file, "reason": r.reason} for r in left_out},
                                 "quarantined": quarantined(store, rnd)})
        if self.own_states is None:
            for client in self.clients:
                client.handle.load_shared_state_dict(new_state)   # evaluate what the federation produced
        return new_state, block_of, agg, diagnostics



def screened_updates(store: FederationStore, rnd: int, global_state: dict[str, torch.Tensor], block_of,
                     max_num_samples: int, log=tqdm.write, keys=None) -> tuple[list[ClientUpdate], list]:
    """The round's updates that pass the store's checks (fedzero.store.screen, as the MPI aggregator
    screens them), as ClientUpdates; the others are quarantined and returned as rejections. A round
    with no update left fails naming them."""
    spec = GlobalSpec.from_file(store.global_path(rnd), group_blocks(sorted(global_state), block_of))
    screened, left_out = screen_round(store, rnd, spec, max_num_samples=max_num_samples, keys=keys,
                                      log=lambda msg: log(f"round {rnd}: {msg}"))
    if not screened:
        raise ValueError(f"round {rnd}: no client update passed the checks; left out: "
                           + ("; ".join(str(r) for r in left_out) or "none (no update was written)"))
    return [ClientUpdate(m["client_id"], delta, m["num_samples"], m["fingerprint"], m.get("slot_use"), m.get("depth"))
            for m, delta in screened], left_out


def refuse_nonfinite(rnd: int, strategy, new_state: dict[str, torch.Tensor], carried_in: dict[str, torch.Tensor],
                     agg: dict) -> None:
    """Nothing non-finite is published (as in the MPI aggregator): checked before anything of the
    round is written; the message names the server lr, the momentum carried in and the coefficients."""
    beta = [b for st in agg.get("blocks", {}).values() for b in st.get("beta", [])]
    refusal = publish_refusal(rnd, strategy, new_state, strategy.server_opt.state_dict(),
                              state_from_round=rnd - 1 if carried_in else None,
                              loaded_state_finite=not any(nonfinite_reason(k, t) for k, t in carried_in.items()),
                              beta=beta)
    if refusal:
        raise ValueError(refusal)
