"""The client's part of the canonical projector's round-0 exchange (docs/method.md, "A canonical
shared space"; the protocol: fedzero/adapters/dema/canonical_exchange.py; the files:
fedzero/store/canonical.py).

    1. a saved map beside the private parts (canonical.safetensors)?  load it: no exchange
    2. read the anchor states H_l of the frozen backbone; send Q_l = client_basis(H_l, m) (unless the
       targets are published already: a late or restarted client only fits)
    3. wait for the targets; fit (mu_l, W_l) onto its slots' targets; save them; set them in the model

`exchange_in_process` runs it for every client of `fedzero simulate` with the aggregator's step in
between; `exchange_for_engine` for a DeepSpeed client (every rank reads the states, a collective
forward under ZeRO-3; rank 0 alone touches the store and the state directory and sends the map to the
others).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from fedzero.adapters.dema import DeMAConfig, DeMAModel
from fedzero.adapters.dema.canonical_exchange import (MAP_FILE, AnchorSet, Map, anchor_set, apply_map,
                                                      check_map_header, client_bases, fit_client, map_header,
                                                      read_anchor_states, read_map, save_map)
from fedzero.store import FederationStore
from fedzero.store import canonical as exchange

__all__ = ["MAP_FILE", "saved_map", "send_bases", "fit_from_targets", "exchange_in_process", "exchange_for_engine"]


def saved_map(path: Path, config: DeMAConfig, *, fingerprint: str, num_layers: int,
              anchors: AnchorSet | None = None) -> Map | None:
    """The map saved at `path`, checked to be this client's (None if there is no file)."""
    if not Path(path).is_file():
        return None
    fitted, header = read_map(path)
    check_map_header(header, path, config=config, fingerprint=fingerprint, num_layers=num_layers, anchors=anchors)
    return fitted


def send_bases(store: FederationStore, client_id: str, states: list[torch.Tensor], slots: list[int],
               config: DeMAConfig, anchors: AnchorSet, fingerprint: str) -> Path | None:
    """Write the client's bases, unless the targets are published already (then it only fits)."""
    if exchange.has_targets(store):
        return None
    bases = client_bases(states, config.canonical_dims, client_id=client_id)
    return exchange.write_bases(store, client_id, bases, fingerprint=fingerprint, anchors=anchors.digest,
                                anchor_source=anchors.source, num_anchors=len(anchors.texts),
                                components=config.canonical_dims, rank=config.rank, slots=slots)


def fit_from_targets(client_id: str, states: list[torch.Tensor], slots: list[int], found, config: DeMAConfig,
                     anchors: AnchorSet) -> Map:
    """(mu, W) per layer onto the published targets (`found`: read_targets' (targets, manifest)), after
    checking they were computed on this client's anchor texts and for its rank."""
    targets, manifest = found
    if manifest.anchors != anchors.digest:
        raise ValueError(f"client {client_id}: the canonical targets were computed on other anchor texts "
                         f"({manifest.anchor_source}, {manifest.num_anchors} texts, sha256 {manifest.anchors[:12]}) than "
                         f"this client reads ({anchors.source}, {len(anchors.texts)} texts, sha256 {anchors.digest[:12]}): "
                         "give it the run's dema.anchor_file and dema.num_anchors")
    if manifest.rank != config.rank:
        raise ValueError(f"client {client_id}: the canonical targets have rank {manifest.rank}, dema.rank is {config.rank}")
    return fit_client(states, slots, targets, config.canonical_ridge, client_id=client_id)


def _header(config: DeMAConfig, client_id: str, fingerprint: str, anchors: AnchorSet, found, handle: DeMAModel) -> dict:
    return map_header(config, client_id=client_id, fingerprint=fingerprint, anchors=anchors,
                      targets_sha256=found[1].sha256, num_layers=handle.num_layers, hidden_size=handle.hidden_size)


# =========================================================================== fedzero simulate

def exchange_in_process(store: FederationStore, clients: list, config: DeMAConfig,
                        map_dir: Callable[[str], Path]) -> dict | None:
    """The exchange for `clients` (LocalClient: client_id, handle, tokenizer, fingerprint) in one
    process: each sends its bases, the aggregator's step publishes the targets, each fits, saves its
    map in map_dir(client_id) and sets it. A client with a saved map (a resumed run) loads it instead.
    Returns the aggregator's report (None when every client loaded its map)."""
    from fedzero.aggregator.canonical import run_canonical

    if not config.uses_canonical:
        return None
    anchors = anchor_set(config)
    pending = {}
    for client in clients:
        cid, handle = client.client_id, client.handle
        path = Path(map_dir(cid)) / MAP_FILE
        fitted = saved_map(path, config, fingerprint=client.fingerprint, num_layers=handle.num_layers, anchors=anchors)
        if fitted is not None:
            apply_map(handle, fitted)
            continue
        states = read_anchor_states(handle.model, client.tokenizer, anchors.texts, placement=config.placement)
        slots = handle.slot_of_layer()
        send_bases(store, cid, states, slots, config, anchors, client.fingerprint)
        pending[cid] = (client, states, slots, path)
    if not pending:
        return None
    # Everyone is here: nothing to wait for (deadline 0: a missing client's bases are named at once).
    report = run_canonical(store, expected=[c.client_id for c in clients], deadline_s=0.0, log=lambda msg: None)
    found = exchange.read_targets(store)
    for cid, (client, states, slots, path) in pending.items():
        fitted = fit_from_targets(cid, states, slots, found, config, anchors)
        save_map(path, fitted, _header(config, cid, client.fingerprint, anchors, found, client.handle))
        apply_map(client.handle, fitted)
    return report


# =========================================================================== the DeepSpeed client

def exchange_for_engine(client, *, send_only: bool = False) -> str:
    """The exchange for a DeepSpeedClient (fedzero/client/deepspeed_client.py) after its engine is
    built, on every rank. Returns what happened: "loaded" (a saved map), "sent" (send_only: bases
    written, or targets already there; the map is not set) or "fitted"."""
    from fedzero.client.distributed import broadcast_object, poll_in_lock_step
    from fedzero.store import StoreIntegrityError, StoreTimeoutError

    cfg, handle, rank = client.cfg, client.handle, client.rank
    config, cid = cfg.dema, cfg.client.id
    path = client.layout.private_dir / MAP_FILE
    anchors = anchor_set(config)

    def on_root(fn):
        """fn() on rank 0, its value (or its error, raised as ValueError) on every rank."""
        outcome = None
        if rank == 0:
            try:
                outcome = ("ok", fn())
            except (ValueError, OSError) as err:
                outcome = ("err", f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err))
        outcome = broadcast_object(outcome, client.device)
        if outcome[0] == "err":
            raise ValueError(outcome[1])
        return outcome[1]

    fitted = on_root(lambda: saved_map(path, config, fingerprint=client.fingerprint, num_layers=handle.num_layers,
                                       anchors=anchors))
    if fitted is not None:
        apply_map(handle, fitted)
        return "loaded"
    # Every rank: under ZeRO-3 the forward gathers the partitioned backbone collectively.
    states = read_anchor_states(client.engine, client.built.tokenizer, anchors.texts, placement=config.placement,
                                device=client.device)
    slots = handle.slot_of_layer()
    on_root(lambda: send_bases(client.store, cid, states, slots, config, anchors, client.fingerprint) and None)
    if send_only:
        return "sent"
    wait = exchange.TargetsWait(client.store, cfg.wait_timeout, client_id=cid) if rank == 0 else None
    found_box = {}

    def poll():
        found = wait.poll()
        if found is not None:
            found_box["found"] = found
            return True
        return None

    poll_in_lock_step(poll if rank == 0 else None, interval=cfg.poll, device=client.device,
                      give_up=(StoreIntegrityError, StoreTimeoutError))

    def fit() -> Map:
        found = found_box["found"]
        fitted = fit_from_targets(cid, states, slots, found, config, anchors)
        save_map(path, fitted, _header(config, cid, client.fingerprint, anchors, found, handle))
        return fitted

    apply_map(handle, on_root(fit))
    return "fitted"
