"""The federation store: a directory layout for rounds, shared by the in-process simulator,
DeepSpeed clients (one process per client, possibly on other nodes over a shared file system)
and the MPI aggregator (several ranks reading slices of the same update files).

Layout (see docs/store.md for the full description)::

    STORE/
      store.json                                         {"format": "fedzero-store", "version": 1}
      rounds/r000000/global/shared.safetensors           global shared state at the START of round r
      rounds/r000000/global/manifest.json
      rounds/r000000/global/teachers.safetensors         optional: per-client anchor teachers (distillation)
      rounds/r000000/global/teachers.manifest.json
      rounds/r000000/updates/<client_id>/update.safetensors   client delta (theta_k - theta)
      rounds/r000000/updates/<client_id>/manifest.json
      rounds/r000000/updates/<client_id>/anchor_predictions.safetensors   optional (distillation)
      rounds/r000000/updates/<client_id>/anchor_predictions.manifest.json
      rounds/r000000/aggregate/result.json               aggregation report
      rounds/r000000/aggregate/server_state.safetensors  optional server optimizer state
      rounds/r000000/aggregate/server_state.manifest.json

Every tensor file is committed before its manifest; a manifest's existence marks its tensor
file complete, and readers check the manifest's sha256/round/client id before trusting data.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from .atomic import (
    atomic_save_safetensors,
    atomic_write_json,
    commit_temp,
    ensure_dir,
    fsync_dir,
    is_temp_name,
    json_dumps,
    remove_quietly,
    save_safetensors_temp,
    sha256_bytes,
    sha256_file,
)

__all__ = [
    "STORE_FORMAT",
    "STORE_VERSION",
    "StoreError",
    "StoreNotFoundError",
    "StoreIntegrityError",
    "StoreConflictError",
    "StoreTimeoutError",
    "FederationStore",
    "validate_client_id",
    "round_dirname",
    "is_valid_quality",
]

log = logging.getLogger(__name__)

STORE_FORMAT = "fedzero-store"
STORE_VERSION = 1

STORE_FILE = "store.json"
ROUNDS_DIR = "rounds"
GLOBAL_DIR = "global"
GLOBAL_TENSORS = "shared.safetensors"
UPDATES_DIR = "updates"
UPDATE_TENSORS = "update.safetensors"
MANIFEST = "manifest.json"
AGGREGATE_DIR = "aggregate"
RESULT_FILE = "result.json"
SERVER_STATE_TENSORS = "server_state.safetensors"
SERVER_STATE_MANIFEST = "server_state.manifest.json"
PREDICTIONS_TENSORS = "anchor_predictions.safetensors"
TEACHERS_TENSORS = "teachers.safetensors"
ALL_CLIENTS = "*"           # the teachers file's key for a client that sent no predictions that round

_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.-]+")
_CLIENT_ID_MAX = 128
_ROUND_DIR_RE = re.compile(r"r(\d{6,})")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


# =========================================================================== errors

class StoreError(Exception):
    """Any refusal by the federation store. Messages name the path and what is wrong."""


class StoreNotFoundError(StoreError):
    """The requested global/update/result/state does not exist (or is not complete yet)."""


class StoreIntegrityError(StoreError):
    """Data exists but does not match its manifest (checksum, size, round, client id, keys) or
    the manifest itself is malformed."""


class StoreConflictError(StoreError):
    """A write would replace different, already committed data (e.g. a second, different
    global for the same round)."""


class StoreTimeoutError(StoreError, TimeoutError):
    """``wait_for_global`` gave up."""


# =========================================================================== validation

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


def _validate_round(round: Any) -> int:
    if isinstance(round, bool) or not isinstance(round, numbers.Integral):
        raise ValueError(f"round must be an int, got {type(round).__name__}: {round!r}")
    round = int(round)
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    return round


def round_dirname(round: int) -> str:
    """``r000003`` for round 3 (at least six digits; larger rounds simply get more)."""
    return f"r{_validate_round(round):06d}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_jsonable(obj: Any, what: str) -> None:
    try:
        json_dumps(obj)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON serializable: {e}") from e


def _prepare_tensors(tensors: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    """Detach, move to CPU and make contiguous; dtypes are kept as given. Tensors sharing
    storage with an earlier entry are cloned (safetensors refuses shared memory)."""
    if not isinstance(tensors, Mapping):
        raise ValueError(f"{what} must be a mapping str -> torch.Tensor, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: tensor names must be non-empty str, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}[{name!r}] is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise ValueError(f"{what}[{name!r}] has layout {t.layout}; only dense tensors are stored")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage:
                t = t.clone()
            else:
                seen_storage.add(ptr)
        out[name] = t
    return out


def _require(manifest: dict, field: str, types: tuple, where: str, allow_none: bool = False):
    if field not in manifest:
        raise StoreIntegrityError(f"{where}: manifest lacks field {field!r}")
    v = manifest[field]
    if v is None and allow_none:
        return v
    if isinstance(v, bool) and bool not in types:
        raise StoreIntegrityError(f"{where}: manifest field {field!r} has bad type bool")
    if not isinstance(v, types):
        raise StoreIntegrityError(
            f"{where}: manifest field {field!r} has bad type {type(v).__name__}"
        )
    return v


def is_valid_quality(value: Any) -> bool:
    """A client's quality (its held-out loss, sent with its anchor predictions): a real number,
    finite and >= 0 (a bool is not one). The store and the teachers (fedzero.strategies.distill) check it."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# =========================================================================== the store

class FederationStore:
    """A federation store rooted at ``root`` (see the module docstring and docs/store.md).

    The object holds no state besides its root, so any number of processes (and threads) may
    open the same store. Argument errors (bad round, client id, tensors, non-JSON metadata)
    raise ``ValueError``; every refusal concerning the store's contents raises
    :class:`StoreError` or a subclass.
    """

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root).expanduser().absolute()
        marker = self.root / STORE_FILE
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store root {self.root} exists and is not a directory")
        if marker.exists():
            self._check_marker(marker)
            return
        if not create:
            raise StoreNotFoundError(
                f"no federation store at {self.root} (missing {STORE_FILE}); "
                "pass create=True to create one"
            )
        if self.root.exists():
            foreign = sorted(n for n in os.listdir(self.root) if not is_temp_name(n))
            if foreign:
                # Another process may have created the store between our two checks.
                if marker.exists():
                    self._check_marker(marker)
                    return
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise StoreError(
                    f"refusing to use {self.root} as a federation store: the directory is "
                    f"not empty ({shown}) and has no {STORE_FILE}"
                )
        ensure_dir(self.root)
        atomic_write_json(marker, {"format": STORE_FORMAT, "version": STORE_VERSION})
        ensure_dir(self.root / ROUNDS_DIR)

    def _check_marker(self, marker: Path) -> None:
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read store marker {marker}: {e}") from e
        if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
            raise StoreError(f"{marker} is not a fedzero store marker (format != {STORE_FORMAT!r})")
        version = info.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version > STORE_VERSION:
            raise StoreError(
                f"{marker}: unsupported store version {version!r} (this fedzero reads "
                f"version <= {STORE_VERSION})"
            )

    def __repr__(self) -> str:
        return f"FederationStore({str(self.root)!r})"

    # ------------------------------------------------------------------ paths

    def round_dir(self, round: int) -> Path:
        return self.root / ROUNDS_DIR / round_dirname(round)

    def global_path(self, round: int) -> Path:
        """Path of the global ``shared.safetensors`` of ``round`` (may not exist yet)."""
        return self.round_dir(round) / GLOBAL_DIR / GLOBAL_TENSORS

    def _global_manifest_path(self, round: int) -> Path:
        return self.round_dir(round) / GLOBAL_DIR / MANIFEST

    def _update_dir(self, round: int, client_id: str) -> Path:
        return self.round_dir(round) / UPDATES_DIR / validate_client_id(client_id)

    def update_path(self, round: int, client_id: str) -> Path:
        """Path of the client's ``update.safetensors`` (whether or not it exists), for readers
        that want ``safetensors.safe_open(path, "pt")`` and ``get_slice``. Pair it with
        :meth:`verify_update` (e.g. on one MPI rank) before trusting the data."""
        return self._update_dir(round, client_id) / UPDATE_TENSORS

    def _update_manifest_path(self, round: int, client_id: str) -> Path:
        return self._update_dir(round, client_id) / MANIFEST

    def result_path(self, round: int) -> Path:
        return self.round_dir(round) / AGGREGATE_DIR / RESULT_FILE

    def server_state_path(self, round: int) -> Path:
        return self.round_dir(round) / AGGREGATE_DIR / SERVER_STATE_TENSORS

    def _server_state_manifest_path(self, round: int) -> Path:
        return self.round_dir(round) / AGGREGATE_DIR / SERVER_STATE_MANIFEST

    def _predictions_path(self, round: int, client_id: str) -> Path:
        return self._update_dir(round, client_id) / PREDICTIONS_TENSORS

    def _teachers_path(self, round: int) -> Path:
        return self.round_dir(round) / GLOBAL_DIR / TEACHERS_TENSORS

    @staticmethod
    def _side_manifest_path(path: Path) -> Path:
        return path.with_name(path.name.replace(".safetensors", ".manifest.json"))

    # ------------------------------------------------------------------ shared reading logic

    @staticmethod
    def _load_manifest(path: Path, what: str) -> dict:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise StoreNotFoundError(f"{what} not found: no manifest at {path}") from None
        except OSError as e:
            raise StoreError(f"cannot read manifest {path} of {what}: {e}") from e
        try:
            manifest = json.loads(text)
        except ValueError as e:
            raise StoreIntegrityError(f"corrupt manifest {path} of {what}: {e}") from e
        if not isinstance(manifest, dict):
            raise StoreIntegrityError(f"corrupt manifest {path} of {what}: not a JSON object")
        return manifest

    @staticmethod
    def _check_common(manifest: dict, round: int, what: str, manifest_path: Path) -> None:
        where = f"{what} ({manifest_path})"
        m_round = _require(manifest, "round", (int,), where)
        if m_round != round:
            raise StoreIntegrityError(
                f"round mismatch for {what}: manifest {manifest_path} says round {m_round}"
            )
        sha = _require(manifest, "sha256", (str,), where)
        if not _SHA_RE.fullmatch(sha):
            raise StoreIntegrityError(f"{where}: manifest field 'sha256' is not a hex sha256")
        nbytes = _require(manifest, "bytes", (int,), where)
        if nbytes < 0:
            raise StoreIntegrityError(f"{where}: manifest field 'bytes' is negative")
        keys = _require(manifest, "keys", (list,), where)
        if not all(isinstance(k, str) for k in keys):
            raise StoreIntegrityError(f"{where}: manifest field 'keys' must be a list of str")

    @staticmethod
    def _check_update_fields(manifest: dict, round: int, client_id: str, what: str,
                             manifest_path: Path) -> None:
        where = f"{what} ({manifest_path})"
        m_client = _require(manifest, "client_id", (str,), where)
        if m_client != client_id:
            raise StoreIntegrityError(
                f"client id mismatch for {what}: manifest {manifest_path} says client "
                f"{m_client!r} but lies in the directory of client {client_id!r}"
            )
        FederationStore._check_common(manifest, round, what, manifest_path)
        _require(manifest, "fingerprint", (str,), where)
        n = _require(manifest, "num_samples", (int,), where)
        if n < 0:
            raise StoreIntegrityError(f"{where}: manifest field 'num_samples' is negative")
        _require(manifest, "metrics", (dict,), where)
        _require(manifest, "slot_use", (dict,), where, allow_none=True)
        _require(manifest, "created", (str,), where)

    @staticmethod
    def _read_verified_bytes(path: Path, manifest: dict, what: str) -> bytes:
        """Read the tensor file once and check size + sha256 on exactly those bytes (so a
        concurrent replace cannot slip in between checking and loading)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreIntegrityError(
                f"{what}: manifest present but tensor file {path} is missing"
            ) from None
        except OSError as e:
            raise StoreError(f"cannot read {path} ({what}): {e}") from e
        if len(data) != manifest["bytes"]:
            raise StoreIntegrityError(
                f"size mismatch for {what}: manifest says {manifest['bytes']} bytes, "
                f"file {path} has {len(data)}"
            )
        digest = sha256_bytes(data)
        if digest != manifest["sha256"]:
            raise StoreIntegrityError(
                f"checksum mismatch for {what}: manifest says sha256 {manifest['sha256']}, "
                f"file {path} has {digest}"
            )
        return data

    @staticmethod
    def _verify_file(path: Path, manifest: dict, what: str) -> None:
        try:
            size = os.path.getsize(path)
            if size != manifest["bytes"]:
                raise StoreIntegrityError(
                    f"size mismatch for {what}: manifest says {manifest['bytes']} bytes, "
                    f"file {path} has {size}"
                )
            digest = sha256_file(path)
        except FileNotFoundError:
            raise StoreIntegrityError(
                f"{what}: manifest present but tensor file {path} is missing"
            ) from None
        if digest != manifest["sha256"]:
            raise StoreIntegrityError(
                f"checksum mismatch for {what}: manifest says sha256 {manifest['sha256']}, "
                f"file {path} has {digest}"
            )

    @staticmethod
    def _load_tensors(data: bytes, path: Path, manifest: dict, what: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        try:
            tensors = load(data)
        except Exception as e:  # safetensors raises its own error types
            raise StoreIntegrityError(f"cannot parse {path} ({what}) as safetensors: {e}") from e
        if sorted(tensors) != sorted(manifest["keys"]):
            raise StoreIntegrityError(
                f"key mismatch for {what}: file {path} holds {sorted(tensors)}, "
                f"manifest lists {sorted(manifest['keys'])}"
            )
        return tensors

    # ------------------------------------------------------------------ global state

    def publish_global(self, round: int, state: Mapping[str, torch.Tensor],
                       meta: dict | None = None) -> Path:
        """Publish the global shared state at the start of ``round``; returns the tensor path.

        Tensor file first, manifest last. If a global for ``round`` is already published:
        identical tensors (same sha256) make this a no-op (the existing manifest, including its
        ``meta``, is kept); different tensors raise :class:`StoreConflictError`. Only one
        process (the aggregator / MPI rank 0) should publish a given round."""
        round = _validate_round(round)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):
            raise ValueError(f"meta must be a dict or None, got {type(meta).__name__}")
        _check_jsonable(meta, "global meta")
        tensors = _prepare_tensors(state, "global state")
        what = f"global of round {round}"
        path = self.global_path(round)
        mpath = self._global_manifest_path(round)
        ensure_dir(path.parent)

        tmp, digest, size = save_safetensors_temp(path, tensors)
        try:
            if mpath.exists():
                existing = self._load_manifest(mpath, what)
                self._check_common(existing, round, what, mpath)
                if existing["sha256"] == digest:
                    return path
                raise StoreConflictError(
                    f"refusing to overwrite {what} at {path}: a different global is already "
                    f"published (sha256 {existing['sha256']}, new state has {digest})"
                )
            commit_temp(tmp, path)
        finally:
            remove_quietly(tmp)
        manifest = {
            "round": round,
            "sha256": digest,
            "bytes": size,
            "keys": sorted(tensors),
            "meta": meta,
            "created": _now_iso(),
        }
        atomic_write_json(mpath, manifest)
        return path

    def has_global(self, round: int) -> bool:
        """True once the global of ``round`` is complete (its manifest exists). Not verified:
        :meth:`read_global` checks the checksum."""
        return self._global_manifest_path(round).is_file()

    def read_global(self, round: int) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, manifest)`` of the global of ``round``, verified against its manifest."""
        round = _validate_round(round)
        what = f"global of round {round}"
        mpath = self._global_manifest_path(round)
        manifest = self._load_manifest(mpath, what)
        self._check_common(manifest, round, what, mpath)
        if not isinstance(manifest.get("meta"), dict):
            raise StoreIntegrityError(f"{what} ({mpath}): manifest field 'meta' must be an object")
        path = self.global_path(round)
        data = self._read_verified_bytes(path, manifest, what)
        return self._load_tensors(data, path, manifest, what), manifest

    def list_global_rounds(self) -> list[int]:
        """Sorted rounds whose global is published (manifest present)."""
        rounds_dir = self.root / ROUNDS_DIR
        try:
            names = os.listdir(rounds_dir)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = _ROUND_DIR_RE.fullmatch(name)
            if m and (rounds_dir / name / GLOBAL_DIR / MANIFEST).is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def latest_global_round(self) -> int | None:
        """The highest round with a published global, or ``None`` if there is none."""
        rounds = self.list_global_rounds()
        return rounds[-1] if rounds else None

    def wait_for_global(self, round: int, *, timeout: float | None, poll: float = 1.0
                        ) -> tuple[dict[str, torch.Tensor], dict]:
        """Block until the global of ``round`` is published, then return :meth:`read_global`.

        ``timeout=None`` waits forever; otherwise :class:`StoreTimeoutError` after ``timeout``
        seconds. An integrity failure right after the manifest appears is retried for up to
        three polls (slow attribute/data propagation on network file systems) and then
        raised."""
        round = _validate_round(round)
        if poll <= 0 or not math.isfinite(poll):
            raise ValueError(f"poll must be a positive number of seconds, got {poll!r}")
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        integrity_failures = 0
        while True:
            if self.has_global(round):
                try:
                    return self.read_global(round)
                except StoreIntegrityError:
                    integrity_failures += 1
                    if integrity_failures >= 3:
                        raise
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreTimeoutError(
                        f"timed out after {timeout}s waiting for the global of round {round} "
                        f"(no complete manifest at {self._global_manifest_path(round)})"
                    )
                time.sleep(min(poll, left))
            else:
                time.sleep(poll)

    # ------------------------------------------------------------------ client updates

    def write_update(self, round: int, client_id: str, delta: Mapping[str, torch.Tensor], *,
                     fingerprint: str, num_samples: int, metrics: dict | None = None,
                     slot_use: dict | None = None) -> Path:
        """Write the client's delta (theta_k - theta of the shared tensors) for ``round``;
        returns the tensor path.

        Rewriting (a client retrying the round) replaces the previous update: its manifest is
        removed first (the update becomes invisible), then the tensor file is replaced
        atomically and the new manifest written last. One writer per (round, client)."""
        round = _validate_round(round)
        validate_client_id(client_id)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint must be a non-empty str, got {fingerprint!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) \
                or num_samples < 0:
            raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
        metrics = {} if metrics is None else metrics
        if not isinstance(metrics, dict):
            raise ValueError(f"metrics must be a dict or None, got {type(metrics).__name__}")
        if slot_use is not None and not isinstance(slot_use, dict):
            raise ValueError(f"slot_use must be a dict or None, got {type(slot_use).__name__}")
        _check_jsonable(metrics, "metrics")
        _check_jsonable(slot_use, "slot_use")
        tensors = _prepare_tensors(delta, f"update of client {client_id!r}")

        path = self.update_path(round, client_id)
        mpath = self._update_manifest_path(round, client_id)
        ensure_dir(path.parent)
        if mpath.exists():  # retry: make the old update invisible before touching its data
            remove_quietly(mpath)
            fsync_dir(mpath.parent)
        digest, size = atomic_save_safetensors(path, tensors)
        manifest = {
            "client_id": client_id,
            "round": round,
            "fingerprint": fingerprint,
            "num_samples": int(num_samples),
            "sha256": digest,
            "bytes": size,
            "keys": sorted(tensors),
            "metrics": metrics,
            "slot_use": slot_use,
            "created": _now_iso(),
        }
        atomic_write_json(mpath, manifest)
        return path

    def list_updates(self, round: int) -> list[dict]:
        """Manifests of the COMPLETE updates of ``round``, sorted by client id.

        Complete = manifest present, well-formed, naming this round and the client of its
        directory, and a tensor file of the recorded size. (The checksum is not computed here;
        :meth:`read_update`/:meth:`verify_update` do that.) Directories without a manifest
        (writes in progress or crashed) and temp files are skipped silently; inconsistent
        manifests are skipped with a logged warning."""
        round = _validate_round(round)
        udir = self.round_dir(round) / UPDATES_DIR
        try:
            names = sorted(os.listdir(udir))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            try:
                validate_client_id(name)
            except ValueError:
                continue  # temp files, stray entries
            mpath = udir / name / MANIFEST
            if not mpath.is_file():
                continue
            what = f"update of client {name} in round {round}"
            try:
                manifest = self._load_manifest(mpath, what)
                self._check_update_fields(manifest, round, name, what, mpath)
                tpath = udir / name / UPDATE_TENSORS
                try:
                    size = os.path.getsize(tpath)
                except FileNotFoundError:
                    raise StoreIntegrityError(
                        f"{what}: manifest present but tensor file {tpath} is missing"
                    ) from None
                if size != manifest["bytes"]:
                    raise StoreIntegrityError(
                        f"size mismatch for {what}: manifest says {manifest['bytes']} bytes, "
                        f"file {tpath} has {size}"
                    )
            except StoreNotFoundError:
                continue  # manifest removed under us (client retrying)
            except StoreError as e:
                log.warning("skipping inconsistent update: %s", e)
                continue
            out.append(manifest)
        return out

    def has_update(self, round: int, client_id: str) -> bool:
        """True if the update's manifest exists (not verified)."""
        return self._update_manifest_path(round, client_id).is_file()

    def _update_manifest(self, round: int, client_id: str) -> tuple[dict, str, Path]:
        round = _validate_round(round)
        validate_client_id(client_id)
        what = f"update of client {client_id} in round {round}"
        mpath = self._update_manifest_path(round, client_id)
        manifest = self._load_manifest(mpath, what)
        self._check_update_fields(manifest, round, client_id, what, mpath)
        return manifest, what, self.update_path(round, client_id)

    def read_update(self, round: int, client_id: str) -> tuple[dict[str, torch.Tensor], dict]:
        """``(delta tensors, manifest)`` of the client's update, verified (sha256, size, round,
        client id, keys)."""
        manifest, what, path = self._update_manifest(round, client_id)
        data = self._read_verified_bytes(path, manifest, what)
        return self._load_tensors(data, path, manifest, what), manifest

    def verify_update(self, round: int, client_id: str) -> dict:
        """Check the update's manifest and the sha256 of its tensor file; return the manifest.
        Streams the file (does not load tensors)."""
        manifest, what, path = self._update_manifest(round, client_id)
        self._verify_file(path, manifest, what)
        return manifest

    # ------------------------------------------------------------------ aggregation outputs

    def write_result(self, round: int, result: dict) -> Path:
        """Write the aggregation report of ``round`` atomically (replacing any earlier one).
        A ``"round"`` field is added if missing; a conflicting one raises ``ValueError``."""
        round = _validate_round(round)
        if not isinstance(result, dict):
            raise ValueError(f"result must be a dict, got {type(result).__name__}")
        if "round" in result and result["round"] != round:
            raise ValueError(f"result says round {result['round']!r} but is written for round {round}")
        result = {**result, "round": round}
        _check_jsonable(result, "result")
        path = self.result_path(round)
        ensure_dir(path.parent)
        atomic_write_json(path, result)
        return path

    def has_result(self, round: int) -> bool:
        return self.result_path(round).is_file()

    def read_result(self, round: int) -> dict:
        """The aggregation report of ``round`` (checked to name that round)."""
        round = _validate_round(round)
        path = self.result_path(round)
        what = f"aggregation result of round {round}"
        result = self._load_manifest(path, what)
        if result.get("round") != round:
            raise StoreIntegrityError(
                f"round mismatch for {what}: {path} says round {result.get('round')!r}"
            )
        return result

    def write_server_state(self, round: int, state: Mapping[str, torch.Tensor]) -> Path:
        """Write the server optimizer state (e.g. momentum) after aggregating ``round``:
        tensor file, then its manifest. Replaces any earlier one for that round."""
        round = _validate_round(round)
        return self._write_side_file(self.server_state_path(round), self._server_state_manifest_path(round),
                                     round, _prepare_tensors(state, "server state"))

    def read_server_state(self, round: int) -> dict[str, torch.Tensor] | None:
        """The verified server state written for ``round``, or ``None`` if there is none."""
        round = _validate_round(round)
        return self._read_side_file(self.server_state_path(round), self._server_state_manifest_path(round),
                                    round, f"server state of round {round}")

    # ------------------------------------------------------------------ output distillation

    def write_anchor_predictions(self, round: int, client_id: str, probs: torch.Tensor, *,
                                 quality: float | None = None) -> Path:
        """The client's label distribution on the public anchor prompts after training ``round``
        ([N, C], fedzero.client.distill), and optionally its quality: its mean loss on its own
        held-out examples (nats per labelled token; finite, >= 0; lower is better), which the
        quality-weighted teachers need. Written *before* the client's update: the update's
        manifest marks the client's whole round complete."""
        round = _validate_round(round)
        validate_client_id(client_id)
        if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
            raise ValueError(f"anchor predictions must be a 2-d tensor [anchors, labels], got {probs!r:.80}")
        extra = {}
        if quality is not None:
            if not is_valid_quality(quality):
                raise ValueError(f"anchor predictions of client {client_id} in round {round}: quality must be a "
                                 f"finite number >= 0 (the client's held-out loss), got {quality!r}")
            extra["quality"] = float(quality)
        path = self._predictions_path(round, client_id)
        return self._write_side_file(path, self._side_manifest_path(path), round,
                                     _prepare_tensors({"probs": probs}, "anchor predictions"), extra)

    def read_anchor_predictions(self, round: int, client_id: str) -> torch.Tensor | None:
        """A client's verified anchor predictions of ``round``, or ``None`` if it sent none."""
        found = self.read_anchor_predictions_with_quality(round, client_id)
        return None if found is None else found[0]

    def read_anchor_predictions_with_quality(self, round: int, client_id: str
                                             ) -> tuple[torch.Tensor, float | None] | None:
        """(predictions, quality) of a client in ``round`` from one read of the manifest (quality
        None: the client sent none, as files written before the field existed), or ``None`` if it
        sent no predictions. A quality that is not a finite number >= 0 is refused."""
        round = _validate_round(round)
        path = self._predictions_path(round, client_id)
        mpath = self._side_manifest_path(path)
        what = f"anchor predictions of client {client_id} in round {round}"
        found = self._read_side_file_and_manifest(path, mpath, round, what)
        if found is None:
            return None
        tensors, manifest = found
        if list(tensors) != ["probs"]:
            raise StoreIntegrityError(f"{what}: expected one tensor 'probs', found {sorted(tensors)}")
        quality = manifest.get("quality")
        if quality is not None and not is_valid_quality(quality):
            raise StoreIntegrityError(f"{what} ({mpath}): manifest field 'quality' must be a finite number >= 0 "
                                      f"(the client's held-out loss), got {quality!r}")
        return tensors["probs"], None if quality is None else float(quality)

    def write_teachers(self, round: int, teachers: Mapping[str, torch.Tensor]) -> Path:
        """The anchor teachers clients distil from in ``round`` ({client id or ALL_CLIENTS: [N, C]}),
        written by the aggregator of round-1 *before* it publishes the global of ``round``."""
        round = _validate_round(round)
        for key in teachers:
            if key != ALL_CLIENTS:
                validate_client_id(key)
        path = self._teachers_path(round)
        return self._write_side_file(path, self._side_manifest_path(path), round,
                                     _prepare_tensors(teachers, "teachers"))

    def clear_teachers(self, round: int) -> None:
        """Remove the teachers of ``round`` (manifest first): an aggregator that retries a round and
        this time has no predictions must not leave an earlier attempt's teachers beside the global."""
        path = self._teachers_path(_validate_round(round))
        mpath = self._side_manifest_path(path)
        if mpath.exists() or path.exists():
            remove_quietly(mpath)
            fsync_dir(mpath.parent)
            remove_quietly(path)

    def read_teacher(self, round: int, client_id: str) -> torch.Tensor | None:
        """The teacher for ``client_id`` in ``round``: its own (the others' mean), else the mean of
        every client that sent predictions (present only when two or more did, so it is never a
        client's own predictions alone), else ``None`` (no distillation this round)."""
        round = _validate_round(round)
        path = self._teachers_path(round)
        found = self._read_side_file(path, self._side_manifest_path(path), round, f"teachers of round {round}")
        if found is None:
            return None
        return found.get(client_id, found.get(ALL_CLIENTS))

    # ------------------------------------------------------------------ small tensor files beside the main ones

    def _write_side_file(self, path: Path, mpath: Path, round: int, tensors: dict[str, torch.Tensor],
                         extra: dict | None = None) -> Path:
        """Tensor file, then its manifest (removed first when replacing, so a reader never pairs
        a new file with an old manifest). `extra`: more manifest fields (JSON values)."""
        ensure_dir(path.parent)
        if mpath.exists():
            remove_quietly(mpath)
            fsync_dir(mpath.parent)
        digest, size = atomic_save_safetensors(path, tensors)
        atomic_write_json(mpath, {
            "round": round,
            "sha256": digest,
            "bytes": size,
            "keys": sorted(tensors),
            "created": _now_iso(),
            **(extra or {}),
        })
        return path

    def _read_side_file(self, path: Path, mpath: Path, round: int, what: str) -> dict[str, torch.Tensor] | None:
        found = self._read_side_file_and_manifest(path, mpath, round, what)
        return None if found is None else found[0]

    def _read_side_file_and_manifest(self, path: Path, mpath: Path, round: int, what: str
                                     ) -> tuple[dict[str, torch.Tensor], dict] | None:
        try:
            manifest = self._load_manifest(mpath, what)
        except StoreNotFoundError:
            return None
        self._check_common(manifest, round, what, mpath)
        data = self._read_verified_bytes(path, manifest, what)
        return self._load_tensors(data, path, manifest, what), manifest
