"""A federation's directory read back after (or while) it runs: which kind it is, its clients, and for
one client and round the pieces of that client's model (for fedzero.export).

Three kinds, told apart by their marker files:

    simulate's --out     store/ (a federation store), config.yaml (a copy of the run config),
                         clients/<id>/private.safetensors: each client's private part, overwritten
                         every round (so only the latest round's is kept)
    a federate run dir   federate.json (written by `fedzero prepare` / `federate`; launch/slurm/ uses the
                         same layout), store/, clients/<id>/client.yaml, whose state_dir keeps
                         private/r<R>.safetensors of the client's last two rounds (fedzero.client.state_layout)
    a federation store   store.json: a cluster run's store alone; the client's CLIENT.yaml (its backbone and
                         state_dir) must be given, as the store never holds private parts

Client C's model after round R is the global of round R+1 (what aggregating round R produced) with
C's private part as it stood after round R: the latest one saved after a round <= R, which is what
the client itself would load to start round R+1 (fedzero.client.state.latest_private_before).
Round R is finished once the global of round R+1 is published.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from fedzero.backbones import BackboneSpec
from fedzero.client.state import latest_private_before
from fedzero.client.state_layout import ClientStateLayout, round_of_private
from fedzero.client.local import TrainSettings
from fedzero.config import read_yaml, resolve_path
from fedzero.config.problems import Problems
from fedzero.config.run import read_client, read_train
from fedzero.store import FederationStore
from fedzero.store.layout import STORE_FILE, validate_client_id, validate_round

FEDERATE_MARKER = "federate.json"          # fedzero.federate.prepare writes it
STORE_DIR = "store"                        # where simulate and prepare put the store in a run dir
CLIENTS_DIR = "clients"
RUN_CONFIG_COPY = "config.yaml"
SIMULATE_PRIVATE = "private.safetensors"   # simulate.py: clients/<id>/private.safetensors
SIMULATE_LOCAL_SHARED = "shared.safetensors"  # simulate.py, strategy local: clients/<id>/shared.safetensors
LOCAL_STRATEGY = "local"                   # a global published with meta strategy "local" aggregated nothing
CLIENT_YAML = "client.yaml"                # federate.write_client_configs: clients/<id>/client.yaml


class RunDirError(ValueError):
    """A run directory, client or round that cannot be exported; the message names the path."""


@dataclass(frozen=True)
class ClientSource:
    """Where one client's backbone and private parts are."""
    client_id: str
    backbone: BackboneSpec
    described_in: Path                 # the YAML file the backbone came from
    state_dir: Path | None = None      # federate / cluster: private/r<R>.safetensors under it
    private_file: Path | None = None   # simulate: its one private file
    train: TrainSettings | None = None  # its train settings (the run's `train:` under its own): eval batch, length
    test_data: Path | None = None      # its data.test, resolved (not checked to exist)
    local_shared_file: Path | None = None   # simulate, strategy local: its own shared part (never in the store)


@dataclass(frozen=True)
class ClientRound:
    """The pieces of client C's model after round R."""
    client: ClientSource
    round: int
    private_path: Path
    private_round: int | None          # the round it was saved after (None: an empty part, the same after every round)
    shared_path: Path | None = None    # strategy local: the client's own shared part (else: the global of round R+1)


class RunDir:
    def __init__(self, root: Path, kind: str, store: FederationStore, clients: dict[str, ClientSource]):
        self.root, self.kind, self.store, self.clients = root, kind, store, clients

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r}, kind={self.kind!r}, clients={sorted(self.clients)})"

    def finished_rounds(self) -> list[int]:
        latest = self.store.latest_global_round()
        return list(range(latest)) if latest else []

    def client(self, client_id: str) -> ClientSource:
        validate_client_id(client_id)
        if client_id not in self.clients:
            raise RunDirError(f"unknown client {client_id!r} in {self.kind} run {self.root}: its clients are "
                              f"{sorted(self.clients)}")
        return self.clients[client_id]

    def client_round(self, client_id: str, round: int | None = None) -> ClientRound:
        """Client `client_id`'s model after `round` (default: the latest finished round)."""
        client = self.client(client_id)
        finished = self.finished_rounds()
        done = f"finished rounds: 0..{finished[-1]}" if finished else "no round has finished yet"
        if round is None:
            if not finished:
                raise RunDirError(f"{self.kind} run {self.root}: no round has finished yet (the global of round 1 "
                                  f"is not published in {self.store.root})")
            round = finished[-1]
        round = validate_round(round)
        if not self.store.has_global(round + 1):
            raise RunDirError(f"round {round} of {self.kind} run {self.root} has not finished: the global of round "
                              f"{round + 1} is not published ({self.store.global_path(round + 1)}); {done}")
        if self.is_local(round):
            return self._local_round(client, round)
        if client.private_file is not None:
            return self._simulate_private(client, round)
        found = latest_private_before(client.state_dir, round + 1)
        if found is None:
            saved = _private_rounds(client.state_dir)
            raise RunDirError(f"client {client_id!r} has no private part for round {round} in "
                              f"{ClientStateLayout(client.state_dir).private_dir} (saved after rounds {saved or 'none'}; "
                              "a client keeps those of its last two rounds)")
        return ClientRound(client, round, found[1], found[0])

    def is_local(self, round: int) -> bool:
        """Whether round `round` aggregated nothing (strategy local): its global of round R+1 is round R's,
        and each client's model is its own shared part."""
        return (self.store.global_manifest(round + 1).meta or {}).get("strategy") == LOCAL_STRATEGY

    def _local_round(self, client: ClientSource, round: int) -> ClientRound:
        """Strategy local: the client's own shared part, kept beside its private part after every round it
        trains (simulate keeps the latest only)."""
        if client.local_shared_file is None:
            raise RunDirError(f"round {round} of {self.kind} run {self.root} used strategy local (nothing aggregated), "
                              f"but client {client.client_id!r} keeps no shared part of its own here: only "
                              "`fedzero simulate` runs strategy local")
        path = client.local_shared_file
        trained = [r for r in self.store.list_global_rounds() if self.store.has_update(r, client.client_id)]
        latest = trained[-1] if trained else None
        if not path.is_file() or latest != round:
            raise RunDirError(f"strategy local: simulate keeps only each client's latest own shared part: {path} is "
                              f"client {client.client_id!r}'s after round {latest}, not round {round}"
                              + (f"; use round {latest}" if latest is not None and self.store.has_global(latest + 1)
                                 else " (that round has not finished)"))
        found = self._simulate_private(client, round)
        return ClientRound(client, round, found.private_path, found.private_round, shared_path=path)

    def _simulate_private(self, client: ClientSource, round: int) -> ClientRound:
        path = client.private_file
        if not path.is_file():
            raise RunDirError(f"client {client.client_id!r} has no private part in {path}: it has not trained a round")
        if not _holds_tensors(path):
            # Projectors shared (shape-matched): the private part is empty, the same after every round.
            return ClientRound(client, round, path, None)
        trained = [r for r in self.store.list_global_rounds() if self.store.has_update(r, client.client_id)]
        latest = trained[-1] if trained else None
        if latest != round:
            # The file is rewritten after every round the client trains: only its latest round survives.
            raise RunDirError(f"simulate keeps only each client's latest private part: {path} is client "
                              f"{client.client_id!r}'s after round {latest}, not round {round}"
                              + (f"; export round {latest}" if latest is not None and self.store.has_global(latest + 1)
                                 else " (that round has not finished)"))
        return ClientRound(client, round, path, latest)


def open_run(path: str | os.PathLike, *, client_config: str | os.PathLike | None = None,
             config: str | os.PathLike | None = None) -> RunDir:
    """Read a run directory. `client_config`: the client's CLIENT.yaml, needed for a bare federation
    store. `config`: for a simulate run, the run config to read the backbones from instead of
    OUT/config.yaml (a copy whose relative paths still mean the original file's directory)."""
    root = Path(path).expanduser().absolute()
    if not root.is_dir():
        raise RunDirError(f"run directory {root} does not exist")
    if (root / FEDERATE_MARKER).is_file():
        store = _store(root / STORE_DIR, root)
        clients = {}
        for yaml_path in sorted((root / CLIENTS_DIR).glob(f"*/{CLIENT_YAML}")):
            source = _client_yaml(yaml_path)
            clients[source.client_id] = source
        if client_config is not None:
            source = _client_yaml(Path(client_config))
            clients[source.client_id] = source
        return RunDir(root, "federate", store, clients)
    if (root / STORE_FILE).is_file():
        store = _store(root, root)
        if client_config is None:
            inside = root.parent if (root.parent / FEDERATE_MARKER).is_file() or (root.parent / CLIENTS_DIR).is_dir() \
                else None
            raise RunDirError(f"{root} is a federation store alone: it holds no private parts and no backbones; "
                              "give the client's CLIENT.yaml (--client-config)"
                              + (f", or the run directory around it ({inside})" if inside else ""))
        source = _client_yaml(Path(client_config))
        return RunDir(root, "store", store, {source.client_id: source})
    if (root / STORE_DIR / STORE_FILE).is_file() and (root / CLIENTS_DIR).is_dir():
        store = _store(root / STORE_DIR, root)
        return RunDir(root, "simulate", store, _simulate_clients(root, config))
    hint = ""
    if (root / "suite.json").is_file() or (root / "runs").is_dir():
        hint = (" It looks like a `fedzero bench` directory: the bench records metrics per run and keeps no "
                "adapter tensors, so there is nothing to export.")
    raise RunDirError(f"{root} is not a fedzero run: expected simulate's --out ({STORE_DIR}/{STORE_FILE} and "
                      f"{CLIENTS_DIR}/), a federate run directory ({FEDERATE_MARKER}) or a federation store "
                      f"({STORE_FILE}).{hint}")


def _store(path: Path, root: Path) -> FederationStore:
    if not (path / STORE_FILE).is_file():
        raise RunDirError(f"run {root} has no federation store at {path} (missing {STORE_FILE})")
    return FederationStore(path, create=False)


def _simulate_clients(root: Path, config: str | os.PathLike | None) -> dict[str, ClientSource]:
    path = Path(config) if config is not None else root / RUN_CONFIG_COPY
    if not path.is_file():
        raise RunDirError(f"simulate run {root} has no {RUN_CONFIG_COPY} (simulate copies the run config only when "
                          "it was read from a file): give the run config (--config RUN.yaml)")
    data, path = read_yaml(path, "run config")
    entries = data.get("clients") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise RunDirError(f"{path}: no 'clients' list: not a run config")
    clients = {}
    problems = Problems(path, "run config")
    defaults = read_train(data.get("train"), "train", problems)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise RunDirError(f"{path}: every entry of 'clients' must be a mapping, got {entry!r}")
        cid = str(entry.get("id", ""))
        copy_note = (f" ({path} is simulate's record of the run config, with absolute paths; a run of an older "
                     "fedzero copied the file as it was, so relative paths in it mean the original file's "
                     "directory: give that file with --config)") if config is None else ""
        backbone = _backbone(entry.get("backbone"), path, f"client {cid!r}", copy_note)
        read = read_client(entry, f"clients[{i}]", defaults, path.parent, problems, local=False)
        clients[cid] = ClientSource(cid, backbone, path, private_file=root / CLIENTS_DIR / cid / SIMULATE_PRIVATE,
                                    train=read.train, test_data=read.test,
                                    local_shared_file=root / CLIENTS_DIR / cid / SIMULATE_LOCAL_SHARED)
    problems.raise_if_any()
    return clients


def _client_yaml(path: Path) -> ClientSource:
    """The client id, backbone and state_dir of a CLIENT.yaml. Read here rather than with
    load_client_config, which also requires the client's data and DeepSpeed config to exist: an
    export needs neither."""
    data, path = read_yaml(path, "client config")
    client = data.get("client") if isinstance(data, dict) else None
    if not isinstance(client, dict) or "state_dir" not in data:
        raise RunDirError(f"{path}: not a client config (needs 'client' and 'state_dir')")
    cid = validate_client_id(str(client.get("id", "")))
    backbone = _backbone(client.get("backbone"), path, f"client {cid!r}", "")
    problems = Problems(path, "client config")
    read = read_client(client, "client", read_train(data.get("train"), "train", problems), path.parent, problems,
                       local=False)
    problems.raise_if_any()
    return ClientSource(cid, backbone, path, state_dir=resolve_path(str(data["state_dir"]), path.parent),
                        train=read.train, test_data=read.test)


def _backbone(entry, path: Path, who: str, note: str) -> BackboneSpec:
    if not isinstance(entry, dict):
        raise RunDirError(f"{path}: {who} has no 'backbone' mapping")
    entry = dict(entry)
    if "path" in entry:
        entry["path"] = str(resolve_path(str(entry["path"]), path.parent))
    try:
        return BackboneSpec.from_dict(entry)
    except (ValueError, FileNotFoundError) as err:
        raise RunDirError(f"{path}: {who}: {err}{note}") from None


def _private_rounds(state_dir: Path) -> list[int]:
    folder = ClientStateLayout(state_dir).private_dir
    names = os.listdir(folder) if folder.is_dir() else []
    return sorted(r for r in (round_of_private(n) for n in names) if r is not None)


def _holds_tensors(path: Path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return len(list(f.keys())) > 0
