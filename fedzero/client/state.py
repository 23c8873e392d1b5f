"""Reading and writing a DeepSpeed client's state directory (paths: fedzero.client.state_layout).

Only rank 0 calls these: the other ranks may run on nodes that do not see the store. (DeepSpeed's
checkpoint tags themselves are written by every rank, through the engine.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fedzero.client.state_layout import ClientStateLayout, round_of_private, step_of_tag
from fedzero.store import FederationStore, atomic_write_json


def latest_private_before(state_dir: str | Path, rnd: int) -> tuple[int, Path] | None:
    """(round, path) of the private state saved after the latest round < rnd, if any."""
    folder = ClientStateLayout(state_dir).private_dir
    best = None
    if folder.is_dir():
        for name in os.listdir(folder):
            saved = round_of_private(name)
            if saved is not None and saved < rnd and (best is None or saved > best[0]):
                best = (saved, folder / name)
    return best


def round_is_done(store: FederationStore, client_id: str, state_dir: str | Path, rnd: int) -> bool:
    """Nothing to train in round rnd: it is closed (the next global exists, so an update would change
    nothing), or this client's update is in the store and its private state was saved after this
    round or a later one. So a restarted client never rewrites an update that may be being aggregated."""
    if store.has_global(rnd + 1):
        return True
    latest = latest_private_before(state_dir, 1 << 62)
    return store.has_update(rnd, client_id) and latest is not None and latest[0] >= rnd


def prune_private(state_dir: str | Path, rnd: int) -> None:
    """After round rnd's private state is saved: keep it and round rnd-1's (a rerun of round rnd
    starts from rnd-1's), delete older ones."""
    folder = ClientStateLayout(state_dir).private_dir
    if not folder.is_dir():
        return
    for name in os.listdir(folder):
        saved = round_of_private(name)
        if saved is not None and saved < rnd - 1:
            (folder / name).unlink(missing_ok=True)


def read_checkpoint_info(state_dir: str | Path, rnd: int) -> dict | None:
    """The info of round rnd's last complete checkpoint (round, step, tag, global_sha256, losses), if any."""
    path = ClientStateLayout(state_dir).checkpoint_info(rnd)
    return json.loads(path.read_text()) if path.is_file() else None


def mark_checkpoint_complete(state_dir: str | Path, rnd: int, step: int, *, global_sha256: str,
                             losses: list[float]) -> None:
    """Once every rank has written the tag of step `step`: record it as round rnd's checkpoint, then
    delete the round's other tags."""
    layout = ClientStateLayout(state_dir)
    tag = layout.checkpoint_tag_dir(rnd, step).name
    atomic_write_json(layout.checkpoint_info(rnd), {"round": rnd, "step": step, "tag": tag,
                                                    "global_sha256": global_sha256, "losses": losses})
    for old in layout.checkpoint_dir(rnd).iterdir():
        if old.is_dir() and step_of_tag(old.name) is not None and old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


def remove_checkpoints(state_dir: str | Path, rnd: int) -> None:
    """A finished round leaves no checkpoint."""
    shutil.rmtree(ClientStateLayout(state_dir).checkpoint_dir(rnd), ignore_errors=True)
