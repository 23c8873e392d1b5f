"""Every path and file name of the federation store (docs/store.md, "Layout").

    STORE/
      store.json                                             {"format": "fedzero-store", "version": 1}
      rounds/r000000/global/shared.safetensors               global shared state at the START of round r
      rounds/r000000/global/manifest.json
      rounds/r000000/global/teachers.safetensors             optional: anchor teachers (distillation)
      rounds/r000000/global/teachers.manifest.json
      rounds/r000000/updates/<client_id>/update.safetensors  client delta (theta_k - theta)
      rounds/r000000/updates/<client_id>/manifest.json
      rounds/r000000/updates/<client_id>/anchor_predictions.safetensors           optional (distillation)
      rounds/r000000/updates/<client_id>/anchor_predictions.manifest.json
      rounds/r000000/aggregate/result.json                   aggregation report
      rounds/r000000/aggregate/server_state.safetensors      optional server optimizer state
      rounds/r000000/aggregate/server_state.manifest.json
      rounds/r000000/quarantine/0001/reason.json             a left-out update: who, which file, why
      rounds/r000000/quarantine/0001/files/                  ... and its client directory, moved here

No other module builds a path inside a store: they ask a :class:`StoreLayout` (or the
``FederationStore`` facade, which holds one). Round numbers and client ids are validated here,
before any path is formed, so a bad id can never point outside the store.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "STORE_FORMAT", "STORE_VERSION", "STORE_FILE", "ROUNDS_DIR", "GLOBAL_DIR", "GLOBAL_TENSORS", "MANIFEST",
    "UPDATES_DIR", "UPDATE_TENSORS", "AGGREGATE_DIR", "RESULT_FILE", "SERVER_STATE_TENSORS",
    "SERVER_STATE_MANIFEST", "PREDICTIONS_TENSORS", "PREDICTIONS_MANIFEST", "TEACHERS_TENSORS",
    "TEACHERS_MANIFEST", "QUARANTINE_DIR", "QUARANTINE_REASON", "QUARANTINE_FILES", "ALL_CLIENTS", "ArtifactFiles", "StoreLayout", "validate_client_id",
    "validate_round", "round_dirname", "round_of_dirname",
]

STORE_FORMAT = "fedzero-store"
STORE_VERSION = 1

STORE_FILE = "store.json"
ROUNDS_DIR = "rounds"
GLOBAL_DIR = "global"
GLOBAL_TENSORS = "shared.safetensors"
MANIFEST = "manifest.json"                       # the manifest of a directory's main tensor file
UPDATES_DIR = "updates"
UPDATE_TENSORS = "update.safetensors"
AGGREGATE_DIR = "aggregate"
RESULT_FILE = "result.json"
SERVER_STATE_TENSORS = "server_state.safetensors"
SERVER_STATE_MANIFEST = "server_state.manifest.json"
PREDICTIONS_TENSORS = "anchor_predictions.safetensors"
PREDICTIONS_MANIFEST = "anchor_predictions.manifest.json"
TEACHERS_TENSORS = "teachers.safetensors"
TEACHERS_MANIFEST = "teachers.manifest.json"
QUARANTINE_DIR = "quarantine"       # rounds/rNNNNNN/quarantine/<seq>/: updates the aggregator left out
QUARANTINE_REASON = "reason.json"   # {"client", "file", "reason", "round", "created"}
QUARANTINE_FILES = "files"          # the client's update directory as it was found, moved here
ALL_CLIENTS = "*"           # the teachers file's key for a client that sent no predictions that round

_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.-]+")
_CLIENT_ID_MAX = 128
_ROUND_DIR_RE = re.compile(r"r(\d{6,})")


def validate_client_id(client_id: Any) -> str:
    """Return ``client_id`` if it is a valid client id, else raise ``ValueError``.

    Valid: a non-empty ``str`` of at most 128 characters from ``[A-Za-z0-9_.-]`` that does not
    start with ``.`` (which rules out ``.``/``..`` path traversal and hidden/temp names)."""
    if not isinstance(client_id, str):
        raise ValueError(f"client id must be a str, got {type(client_id).__name__}: {client_id!r}")
    if not client_id:
        raise ValueError("client id must not be empty")
    if len(client_id) > _CLIENT_ID_MAX:
        raise ValueError(f"client id longer than {_CLIENT_ID_MAX} characters: {client_id!r}")
    if not _CLIENT_ID_RE.fullmatch(client_id):
        raise ValueError(
            f"invalid client id {client_id!r}: only letters, digits, '-', '_' and '.' are allowed"
        )
    if client_id.startswith("."):
        raise ValueError(f"invalid client id {client_id!r}: must not start with '.'")
    return client_id


def validate_round(round: Any) -> int:
    """``round`` as an int if it is an integer >= 0 (a bool is not one), else ``ValueError``."""
    if isinstance(round, bool) or not isinstance(round, numbers.Integral):
        raise ValueError(f"round must be an int, got {type(round).__name__}: {round!r}")
    round = int(round)
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    return round


def round_dirname(round: int) -> str:
    """``r000003`` for round 3 (at least six digits; larger rounds simply get more)."""
    return f"r{validate_round(round):06d}"


def round_of_dirname(name: str) -> int | None:
    """The round whose directory is called ``name`` (``r000003`` -> 3), or ``None`` for any other
    name, including a differently padded one (``r0000003``) that :func:`round_dirname` never writes."""
    m = _ROUND_DIR_RE.fullmatch(name)
    return int(m.group(1)) if m and round_dirname(int(m.group(1))) == name else None


@dataclass(frozen=True)
class ArtifactFiles:
    """A tensor file and its manifest, which is written after it and marks it complete."""
    tensors: Path
    manifest: Path


@dataclass(frozen=True)
class StoreLayout:
    """The paths of a store rooted at ``root`` (an absolute path). Paths only: nothing is read."""
    root: Path

    @property
    def marker(self) -> Path:
        return self.root / STORE_FILE

    @property
    def rounds_dir(self) -> Path:
        return self.root / ROUNDS_DIR

    def round_dir(self, round: int) -> Path:
        return self.rounds_dir / round_dirname(round)

    def global_files(self, round: int) -> ArtifactFiles:
        folder = self.round_dir(round) / GLOBAL_DIR
        return ArtifactFiles(folder / GLOBAL_TENSORS, folder / MANIFEST)

    def teachers_files(self, round: int) -> ArtifactFiles:
        folder = self.round_dir(round) / GLOBAL_DIR
        return ArtifactFiles(folder / TEACHERS_TENSORS, folder / TEACHERS_MANIFEST)

    def updates_dir(self, round: int) -> Path:
        return self.round_dir(round) / UPDATES_DIR

    def update_dir(self, round: int, client_id: str) -> Path:
        return self.updates_dir(round) / validate_client_id(client_id)

    def update_files(self, round: int, client_id: str) -> ArtifactFiles:
        folder = self.update_dir(round, client_id)
        return ArtifactFiles(folder / UPDATE_TENSORS, folder / MANIFEST)

    def predictions_files(self, round: int, client_id: str) -> ArtifactFiles:
        folder = self.update_dir(round, client_id)
        return ArtifactFiles(folder / PREDICTIONS_TENSORS, folder / PREDICTIONS_MANIFEST)

    def aggregate_dir(self, round: int) -> Path:
        return self.round_dir(round) / AGGREGATE_DIR

    def result_path(self, round: int) -> Path:
        return self.aggregate_dir(round) / RESULT_FILE

    def quarantine_dir(self, round: int) -> Path:
        return self.round_dir(round) / QUARANTINE_DIR

    def quarantine_entry(self, round: int, seq: int) -> Path:
        """``quarantine/0001``: the seq-th update left out in ``round`` (numbered, not named by client:
        a refused directory name need not be a valid client id)."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise ValueError(f"quarantine sequence number must be an int >= 1, got {seq!r}")
        return self.quarantine_dir(round) / f"{seq:04d}"

    def server_state_files(self, round: int) -> ArtifactFiles:
        folder = self.aggregate_dir(round)
        return ArtifactFiles(folder / SERVER_STATE_TENSORS, folder / SERVER_STATE_MANIFEST)
