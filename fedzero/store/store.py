"""The federation store: rounds on disk, shared by the in-process simulator, the DeepSpeed clients
(one process per client, possibly on other nodes over a shared file system) and the MPI aggregator
(several ranks reading slices of the same update files). docs/store.md describes the layout and
its guarantees.

:class:`FederationStore` is the facade every caller uses. The work is done by
:mod:`~fedzero.store.layout` (every path), :mod:`~fedzero.store.manifest` (what each manifest holds
and how it is checked) and :mod:`~fedzero.store.artifact` (tensor file first, manifest last;
read and verify), on top of :mod:`~fedzero.store.atomic`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from .artifact import (check_size, prepare_tensors, publish_artifact, read_artifact, read_artifact_if_present,
                       verify_artifact, write_artifact)
from .atomic import atomic_write_json, ensure_dir, is_temp_name
from .errors import (StoreConflictError, StoreError, StoreIntegrityError, StoreNotFoundError,
                     StoreTimeoutError)
from .layout import (ALL_CLIENTS, STORE_FILE, STORE_FORMAT, STORE_VERSION, ArtifactFiles, StoreLayout,
                     round_dirname, round_of_dirname, validate_client_id, validate_round)
from .distill_files import DistillFiles
from .manifest import (GlobalManifest, ServerStateManifest, UpdateManifest, check_jsonable, is_valid_quality,
                       load_manifest, read_json_object)
from .screen import nonfinite_reason
from .wait import GlobalWait

__all__ = [
    "STORE_FORMAT", "STORE_VERSION", "ALL_CLIENTS", "StoreError", "StoreNotFoundError", "StoreIntegrityError",
    "StoreConflictError", "StoreTimeoutError", "FederationStore", "GlobalWait", "validate_client_id",
    "round_dirname", "is_valid_quality",
]

log = logging.getLogger(__name__)


class FederationStore(DistillFiles):
    """A federation store rooted at ``root`` (docs/store.md).

    The object holds no state besides its root, so any number of processes (and threads) may
    open the same store. Argument errors (bad round, client id, tensors, non-JSON metadata)
    raise ``ValueError``; every refusal concerning the store's contents raises
    :class:`StoreError` or a subclass.
    """

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root).expanduser().absolute()
        self.layout = StoreLayout(self.root)
        marker = self.layout.marker
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store root {self.root} exists and is not a directory")
        if marker.exists():
            self._check_marker(marker)
            return
        if not create:
            raise StoreNotFoundError(
                f"no federation store at {self.root} (missing {STORE_FILE}); pass create=True to create one")
        if self.root.exists():
            foreign = sorted(n for n in os.listdir(self.root) if not is_temp_name(n))
            if foreign:
                # Another process may have created the store between our two checks.
                if marker.exists():
                    self._check_marker(marker)
                    return
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise StoreError(f"refusing to use {self.root} as a federation store: the directory is "
                                 f"not empty ({shown}) and has no {STORE_FILE}")
        ensure_dir(self.root)
        atomic_write_json(marker, {"format": STORE_FORMAT, "version": STORE_VERSION})
        ensure_dir(self.layout.rounds_dir)

    @staticmethod
    def _check_marker(marker: Path) -> None:
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read store marker {marker}: {e}") from e
        if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
            raise StoreError(f"{marker} is not a fedzero store marker (format != {STORE_FORMAT!r})")
        version = info.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version > STORE_VERSION:
            raise StoreError(f"{marker}: unsupported store version {version!r} (this fedzero reads "
                             f"version <= {STORE_VERSION})")

    def __repr__(self) -> str:
        return f"FederationStore({str(self.root)!r})"

    # ------------------------------------------------------------------ public paths

    def round_dir(self, round: int) -> Path:
        return self.layout.round_dir(round)

    def global_path(self, round: int) -> Path:
        """Path of the global ``shared.safetensors`` of ``round`` (may not exist yet)."""
        return self.layout.global_files(round).tensors

    def update_path(self, round: int, client_id: str) -> Path:
        """Path of the client's ``update.safetensors`` (whether or not it exists), for readers
        that want ``safetensors.safe_open(path, "pt")`` and ``get_slice``. Pair it with
        :meth:`verify_update` (e.g. on one MPI rank) before trusting the data."""
        return self.layout.update_files(round, client_id).tensors

    def result_path(self, round: int) -> Path:
        return self.layout.result_path(round)

    def server_state_path(self, round: int) -> Path:
        return self.layout.server_state_files(round).tensors

    # ------------------------------------------------------------------ global state

    def publish_global(self, round: int, state: Mapping[str, torch.Tensor], meta: dict | None = None) -> Path:
        """Publish the global shared state at the start of ``round``; returns the tensor path.

        Tensor file first, manifest last. If a global for ``round`` is already published:
        identical tensors (same sha256) make this a no-op (the existing manifest, including its
        ``meta``, is kept); different tensors raise :class:`StoreConflictError`. Only one
        process (the aggregator / MPI rank 0) should publish a given round."""
        round = validate_round(round)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):
            raise ValueError(f"meta must be a dict or None, got {type(meta).__name__}")
        check_jsonable(meta, "global meta")
        tensors = prepare_tensors(state, "global state")
        _refuse_nonfinite(tensors, f"global of round {round}")
        return publish_artifact(self.layout.global_files(round), tensors, GlobalManifest,
                                what=f"global of round {round}", round=round, meta=meta)

    def has_global(self, round: int) -> bool:
        """True once the global of ``round`` is complete (its manifest exists). Not verified:
        :meth:`read_global` checks the checksum."""
        return self.layout.global_files(round).manifest.is_file()

    def global_manifest(self, round: int) -> GlobalManifest:
        """The checked manifest of the global of ``round`` (the tensor file is not hashed)."""
        round = validate_round(round)
        return load_manifest(GlobalManifest, self.layout.global_files(round).manifest, round=round,
                             what=f"global of round {round}")

    def read_global(self, round: int) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, manifest)`` of the global of ``round``, verified against its manifest."""
        round = validate_round(round)
        tensors, manifest = read_artifact(self.layout.global_files(round), GlobalManifest, round=round,
                                          what=f"global of round {round}")
        return tensors, manifest.to_dict()

    def list_global_rounds(self) -> list[int]:
        """Sorted rounds whose global is published (manifest present)."""
        try:
            names = os.listdir(self.layout.rounds_dir)
        except FileNotFoundError:
            return []
        rounds = (round_of_dirname(name) for name in names)
        return sorted(r for r in rounds if r is not None and self.has_global(r))

    def latest_global_round(self) -> int | None:
        """The highest round with a published global, or ``None`` if there is none."""
        rounds = self.list_global_rounds()
        return rounds[-1] if rounds else None

    def global_wait(self, round: int, *, timeout: float | None) -> GlobalWait:
        """The wait for the global of ``round`` as an object polled by its caller (see
        :class:`GlobalWait`); :meth:`wait_for_global` is the blocking form."""
        return GlobalWait(self, round, timeout)

    def wait_for_global(self, round: int, *, timeout: float | None, poll: float = 1.0
                        ) -> tuple[dict[str, torch.Tensor], dict]:
        """Block until the global of ``round`` is published, then return :meth:`read_global`.

        ``timeout=None`` waits forever; otherwise :class:`StoreTimeoutError` after ``timeout``
        seconds. An integrity failure right after the manifest appears is retried for up to
        three polls (slow attribute/data propagation on network file systems) and then
        raised."""
        round = validate_round(round)
        if poll <= 0 or not math.isfinite(poll):
            raise ValueError(f"poll must be a positive number of seconds, got {poll!r}")
        return self.global_wait(round, timeout=timeout).wait(poll)

    # ------------------------------------------------------------------ client updates

    def _update(self, round: int, client_id: str) -> tuple[int, ArtifactFiles, str]:
        round = validate_round(round)
        return round, self.layout.update_files(round, client_id), f"update of client {client_id} in round {round}"

    def write_update(self, round: int, client_id: str, delta: Mapping[str, torch.Tensor], *,
                     fingerprint: str, num_samples: int, metrics: dict | None = None,
                     slot_use: dict | None = None, depth: dict | None = None,
                     global_sha256: str | None = None, key: bytes | None = None) -> Path:
        """Write the client's delta (theta_k - theta of the shared tensors) for ``round``;
        returns the tensor path.

        Rewriting (a client retrying the round) replaces the previous update: its manifest is
        removed first (the update becomes invisible), then the tensor file is replaced
        atomically and the new manifest written last. One writer per (round, client).

        ``global_sha256``: the sha256 of the global the client trained from (it read and verified
        it); recorded in the manifest, and the aggregator refuses an update bound to another global.
        Default: the sha256 of this round's global in the store, if one is published. ``key``: the
        client's HMAC key (fedzero.store.auth); the manifest is then signed."""
        round, files, _ = self._update(round, client_id)
        if global_sha256 is None and self.has_global(round):
            global_sha256 = self.global_manifest(round).sha256
        if global_sha256 is not None and (not isinstance(global_sha256, str)
                                          or not re.fullmatch(r"[0-9a-f]{64}", global_sha256)):
            raise ValueError(f"global_sha256 must be a hex sha256, got {global_sha256!r}")
        sign = None
        if key is not None:
            if global_sha256 is None:
                raise ValueError(f"client {client_id!r}, round {round}: a signed update must name its global "
                                 "(no global_sha256 given and no global published for the round)")
            from .auth import sign_manifest

            sign = lambda m: {**m, "hmac": sign_manifest(m, key)}   # noqa: E731
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint must be a non-empty str, got {fingerprint!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 0:
            raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
        metrics = {} if metrics is None else metrics
        if not isinstance(metrics, dict):
            raise ValueError(f"metrics must be a dict or None, got {type(metrics).__name__}")
        if slot_use is not None and not isinstance(slot_use, dict):
            raise ValueError(f"slot_use must be a dict or None, got {type(slot_use).__name__}")
        check_jsonable(metrics, "metrics")
        check_jsonable(slot_use, "slot_use")
        if depth is not None:       # DeMA share 'depth-aware': the client's per-slot depth ranges
            from fedzero.strategies.depth import check_declaration

            check_declaration(client_id, depth)
            check_jsonable(depth, "depth")
        tensors = prepare_tensors(delta, f"update of client {client_id!r}")
        return write_artifact(files, tensors, UpdateManifest, round=round, client_id=client_id,
                              fingerprint=fingerprint, num_samples=int(num_samples), metrics=metrics,
                              slot_use=slot_use, depth=depth, global_sha256=global_sha256, sign=sign)

    def list_updates(self, round: int) -> list[dict]:
        """Manifests of the COMPLETE updates of ``round``, sorted by client id.

        Complete = manifest present, well-formed, naming this round and the client of its
        directory, and a tensor file of the recorded size. (The checksum is not computed here;
        :meth:`read_update`/:meth:`verify_update` do that.) Directories without a manifest
        (writes in progress or crashed) and temp files are skipped silently; inconsistent
        manifests are skipped with a logged warning."""
        round = validate_round(round)
        try:
            names = sorted(os.listdir(self.layout.updates_dir(round)))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            try:
                files = self.layout.update_files(round, name)
            except ValueError:
                continue  # temp files, stray entries
            if not files.manifest.is_file():
                continue
            what = f"update of client {name} in round {round}"
            try:
                manifest = load_manifest(UpdateManifest, files.manifest, round=round, client_id=name, what=what)
                check_size(files.tensors, manifest.bytes, what)
            except StoreNotFoundError:
                continue  # manifest removed under us (client retrying)
            except StoreError as e:
                log.warning("skipping inconsistent update: %s", e)
                continue
            out.append(manifest.to_dict())
        return out

    def has_update(self, round: int, client_id: str) -> bool:
        """True if the update's manifest exists (not verified)."""
        return self.layout.update_files(round, client_id).manifest.is_file()

    def read_update(self, round: int, client_id: str) -> tuple[dict[str, torch.Tensor], dict]:
        """``(delta tensors, manifest)`` of the client's update, verified (sha256, size, round,
        client id, keys)."""
        round, files, what = self._update(round, client_id)
        tensors, manifest = read_artifact(files, UpdateManifest, round=round, client_id=client_id, what=what)
        return tensors, manifest.to_dict()

    def verify_update(self, round: int, client_id: str) -> dict:
        """Check the update's manifest and the sha256 of its tensor file; return the manifest.
        Streams the file (does not load tensors)."""
        round, files, what = self._update(round, client_id)
        return verify_artifact(files, UpdateManifest, round=round, client_id=client_id, what=what).to_dict()

    # ------------------------------------------------------------------ aggregation outputs

    def write_result(self, round: int, result: dict) -> Path:
        """Write the aggregation report of ``round`` atomically (replacing any earlier one).
        A ``"round"`` field is added if missing; a conflicting one raises ``ValueError``."""
        round = validate_round(round)
        if not isinstance(result, dict):
            raise ValueError(f"result must be a dict, got {type(result).__name__}")
        if "round" in result and result["round"] != round:
            raise ValueError(f"result says round {result['round']!r} but is written for round {round}")
        result = {**result, "round": round}
        check_jsonable(result, "result")
        path = self.layout.result_path(round)
        ensure_dir(path.parent)
        atomic_write_json(path, result)
        return path

    def has_result(self, round: int) -> bool:
        return self.layout.result_path(round).is_file()

    def read_result(self, round: int) -> dict:
        """The aggregation report of ``round`` (checked to name that round)."""
        round = validate_round(round)
        path = self.layout.result_path(round)
        what = f"aggregation result of round {round}"
        result = read_json_object(path, what)
        if result.get("round") != round:
            raise StoreIntegrityError(f"round mismatch for {what}: {path} says round {result.get('round')!r}")
        return result

    def write_server_state(self, round: int, state: Mapping[str, torch.Tensor]) -> Path:
        """Write the server optimizer state (e.g. momentum) after aggregating ``round``:
        tensor file, then its manifest. Replaces any earlier one for that round."""
        round = validate_round(round)
        tensors = prepare_tensors(state, "server state")
        _refuse_nonfinite(tensors, f"server state of round {round}")
        return write_artifact(self.layout.server_state_files(round), tensors, ServerStateManifest, round=round)

    def server_state_manifest(self, round: int) -> ServerStateManifest | None:
        """The checked manifest of the server state of ``round`` (not hashed), or ``None``."""
        round = validate_round(round)
        try:
            return load_manifest(ServerStateManifest, self.layout.server_state_files(round).manifest,
                                 round=round, what=f"server state of round {round}")
        except StoreNotFoundError:
            return None

    def read_server_state(self, round: int) -> dict[str, torch.Tensor] | None:
        """The verified server state written for ``round``, or ``None`` if there is none."""
        round = validate_round(round)
        found = read_artifact_if_present(self.layout.server_state_files(round), ServerStateManifest,
                                         round=round, what=f"server state of round {round}")
        return None if found is None else found[0]


def _refuse_nonfinite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Nothing non-finite is ever published: a NaN global is write-once and would end the run."""
    for key in sorted(tensors):
        why = nonfinite_reason(key, tensors[key])
        if why:
            raise ValueError(f"refusing to write the {what}: {why}; nothing was written")
