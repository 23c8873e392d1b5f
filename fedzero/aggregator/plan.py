"""Planning a round (rank 0): what the global holds, its blocks, which update holds which block,
the server state to continue from; and checking every file against its manifest (all ranks).

The plan is small (headers, manifests, weights; no tensor data) and broadcast to every rank.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from fedzero.store import FederationStore, StoreError
from fedzero.store.artifact import check_file, check_keys, check_size
from fedzero.strategies import ClientUpdate, Strategy
from fedzero.strategies.blocks import block_coverage, group_blocks
from fedzero.strategies.depth import DepthPlan, require_declarations

from .mpi import AggregationError, all_ok, gather_small, rank_of, size_of
from .shards import TensorInfo, header


@contextmanager
def store_refusals():
    """A store refusal (missing file, bad manifest, size or checksum mismatch) as an AggregationError
    with the store's own message."""
    try:
        yield
    except StoreError as err:
        raise AggregationError(str(err)) from err


@dataclass
class Source:
    """One file every rank reads slices of: a client update, the global, or the server state."""
    name: str                      # "client a", "global of round 3", ...
    path: str
    sha256: str
    bytes: int


@dataclass
class RoundPlan:
    """Everything rank 0 decides before the heavy work; small, broadcast to all ranks (pickled)."""
    round: int
    infos: list[TensorInfo]                       # the global's tensors, sorted by key
    blocks: list[str]                             # block names, in order of first appearance
    block_of_key: dict[str, int]                  # key -> index into blocks
    updates: list[ClientUpdate]                   # delta left empty: weights and groups only
    update_files: list[Source]
    covered: np.ndarray                           # [K, B] bool: whether client k's update holds block b
    global_file: Source
    state_file: Source | None                     # server state after round-1 (momentum), if loaded
    state_keys: list[str] = field(default_factory=list)

    def block_assignment(self) -> dict[str, str]:
        """Key -> block name: what the next global's manifest declares."""
        return {info.key: self.blocks[self.block_of_key[info.key]] for info in self.infos}


def make_plan(store: FederationStore, round: int, manifests: list[dict], strategy: Strategy,
              block_of: Callable[[str], str] | Mapping[str, str] | None = None, *,
              reset_server_state: bool) -> RoundPlan:
    """Rank 0: read headers and manifests, check every update against the global, build the plan.
    block_of None: the blocks the global's manifest declares (or the key-name rule for a global
    published without them)."""
    gpath = store.global_path(round)
    with store_refusals():
        gman = store.global_manifest(round)
        ginfo = header(gpath)
        check_keys(list(ginfo), gman, gpath, f"global of round {round}")
    infos = [ginfo[k] for k in sorted(ginfo)]
    keys = [i.key for i in infos]
    if block_of is None:
        from fedzero.adapters.dema.blocks import global_blocks

        block_of = global_blocks(keys, gman.blocks)
    grouped = group_blocks(keys, block_of)
    block_of_key = {key: b for b, members in enumerate(grouped.values()) for key in members}
    updates, files, covered = _check_updates(store, round, manifests, ginfo, grouped, keys)
    try:                                                  # depth-aware projector banks: declarations agree
        if any(u.depth is not None for u in updates):
            DepthPlan(updates, list(grouped), covered, strategy.block_weights(updates, list(grouped)))
        else:
            require_declarations(updates, list(grouped), covered)
    except ValueError as err:
        raise AggregationError(str(err)) from None
    state_file, state_keys = _server_state(store, round, strategy, ginfo, reset_server_state)
    return RoundPlan(round, infos, list(grouped), block_of_key, updates, files, covered,
                     Source(f"global of round {round}", str(gpath), gman.sha256, gman.bytes),
                     state_file, state_keys)


def _check_updates(store: FederationStore, round: int, manifests: list[dict], ginfo: dict[str, TensorInfo],
                   grouped: dict[str, list[str]], keys: list[str]
                   ) -> tuple[list[ClientUpdate], list[Source], np.ndarray]:
    """As Strategy._validate, in the same order and with the same messages: an update holds each
    block whole or not at all (DeMA's shape-matched clients hold only their own width's projector
    blocks), with the global's shapes; a partly held block, a key the global lacks, or no block at
    all is an error. Returns the updates (weights and groups only), their files and covered [K, B]."""
    updates, files = [], []
    covered = np.zeros((len(manifests), len(grouped)), dtype=bool)
    for i, m in enumerate(manifests):
        cid = m["client_id"]
        path = store.update_path(round, cid)
        uinfo = header(path)
        try:
            covered[i] = block_coverage(cid, sorted(uinfo), grouped, keys)
        except ValueError as err:
            raise AggregationError(str(err)) from None
        for key in sorted(uinfo):
            if uinfo[key].shape != ginfo[key].shape:
                raise AggregationError(f"client {cid!r}, key {key!r}: update shape {list(uinfo[key].shape)} "
                                       f"!= global shape {list(ginfo[key].shape)}")
        updates.append(ClientUpdate(cid, {}, m["num_samples"], m["fingerprint"], m.get("slot_use"), m.get("depth")))
        files.append(Source(f"update of client {cid}", str(path), m["sha256"], m["bytes"]))
    return updates, files, covered


def _server_state(store: FederationStore, round: int, strategy: Strategy, ginfo: dict[str, TensorInfo],
                  reset: bool) -> tuple[Source | None, list[str]]:
    """The server state (momentum buffers) round R-1 left, to continue from if the strategy has momentum."""
    momentum = strategy.server_opt.momentum
    if not momentum or round == 0 or reset:
        return None, []
    spath = store.server_state_path(round - 1)
    with store_refusals():
        sman = store.server_state_manifest(round - 1)
    if sman is None:
        raise AggregationError(
            f"server momentum is {momentum} but round {round - 1} left no server state "
            f"({store.layout.server_state_files(round - 1).manifest}); a restart would not continue exactly. "
            "Pass reset_server_state=True (--reset-server-state) to start the momentum afresh.")
    sinfo = header(spath)
    for key, info in sinfo.items():
        if key not in ginfo or info.shape != ginfo[key].shape:
            raise AggregationError(f"server state of round {round - 1}: tensor {key!r} "
                                   f"{list(info.shape)} does not match the global state")
    return Source(f"server state of round {round - 1}", str(spath), sman.sha256, sman.bytes), sorted(sinfo)


def verify_files(comm, plan: RoundPlan, mode: str) -> tuple[int, dict[str, str]]:
    """sha256 of every file against its manifest, files dealt round-robin to the ranks (each file is
    hashed by exactly one rank). mode "size": sizes only. Returns (bytes hashed on this rank, client
    -> reason for every update that failed, on every rank): a bad update is left out by the caller,
    not fatal; a bad global or server state fails the round."""
    files = plan.update_files + [plan.global_file] + ([plan.state_file] if plan.state_file else [])
    rank, world = rank_of(comm), size_of(comm)
    n_updates = len(plan.update_files)

    def check() -> tuple[int, dict[str, str]]:
        hashed, bad = 0, {}
        for i, src in enumerate(files):
            try:
                with store_refusals():
                    if mode == "sha256" and i % world == rank:
                        check_file(src.path, src.bytes, src.sha256, src.name)
                        hashed += src.bytes
                    else:
                        check_size(src.path, src.bytes, src.name)
            except AggregationError as err:
                if i >= n_updates:
                    raise
                bad[plan.updates[i].client_id] = str(err)
        return hashed, bad

    hashed, bad = all_ok(comm, check, "verification")
    merged: dict[str, str] = {}
    for found in gather_small(comm, bad):
        for cid, why in found.items():
            merged.setdefault(cid, why)
    return hashed, dict(sorted(merged.items()))


def global_spec(store: FederationStore, round: int, block_of=None):
    """What rank 0 screens the round's updates against (fedzero.store.screen.GlobalSpec): the
    global's header and the blocks the plan will use."""
    from fedzero.store.screen import GlobalSpec

    gpath = store.global_path(round)
    with store_refusals():
        gman = store.global_manifest(round)
    try:
        spec = GlobalSpec.from_file(gpath)
    except (OSError, ValueError) as err:
        raise AggregationError(f"global of round {round} ({gpath}): {err}") from None
    keys = sorted(spec.tensors)
    try:
        if block_of is None:
            from fedzero.adapters.dema.blocks import global_blocks

            block_of = global_blocks(keys, gman.blocks)
        grouped = group_blocks(keys, block_of)
    except ValueError as err:
        raise AggregationError(str(err)) from None
    return GlobalSpec(spec.tensors, spec.header_bytes, spec.data_bytes, grouped)
