"""Screening client updates before they are aggregated, and the quarantine of those refused
(docs/store.md, "Quarantine"; docs/security.md).

Both aggregation paths use this module: the in-process one (fedzero.simulate) and the MPI
aggregator (fedzero.aggregator: rank 0 in the wait and the plan). An update that fails a check is
*left out*, not fatal: its client directory is moved to ``rounds/rNNNNNN/quarantine/<seq>/files``
with a ``reason.json`` naming the client, the file and the reason, and the round goes on with the
others if the quorum still holds.

What is checked, per client directory under ``rounds/rNNNNNN/updates/`` (:func:`scan_updates`):

- the directory name is a plain client id (:func:`fedzero.store.layout.validate_client_id`);
- the directory, its manifest and its tensor file are not symlinks, the tensor file is a regular
  file with one link, inside the store;
- the manifest parses (fedzero.store.manifest: field types), ``num_samples`` is an int in
  ``[1, max_num_samples]``, every ``slot_use`` value a finite number >= 0;
- with keys (federation.authenticate), the manifest's HMAC verifies with the key of the client
  whose directory it lies in (fedzero.store.auth);
- the manifest's ``global_sha256``, when present (every fedzero client writes it; a signed
  manifest must), is the round's global's: an update is bound to the global it was trained from,
  so an old round's update with its round edited, or a replay, is refused;
- the tensor file has the manifest's size, a safetensors header of a bounded size (from the
  global's own header) that reads as JSON and describes exactly the file's bytes, only tensors
  the global has, each with the global's dtype and shape, holding each block whole or not at all,
  and exactly the tensors the manifest lists.

The data checks (sha256 against the manifest, every value finite) need the whole file: the
in-process path does them here (:func:`load_screened`), the MPI aggregator spreads them over its
ranks (fedzero.aggregator.plan.verify_files, and the Gram diagonal for finiteness).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from .atomic import atomic_write_json, ensure_dir, fsync_dir, is_temp_name
from .errors import StoreError, StoreNotFoundError
from .layout import MANIFEST, QUARANTINE_FILES, QUARANTINE_REASON, UPDATE_TENSORS, validate_client_id
from .header import Header, read_header
from .manifest import UpdateManifest, load_manifest

if TYPE_CHECKING:
    from .auth import KeySet

__all__ = [
    "DEFAULT_MAX_NUM_SAMPLES", "SAFETENSORS_DTYPES", "Rejection", "UpdateRejected", "GlobalSpec", "Header",
    "read_header", "scan_updates", "check_update", "load_screened", "nonfinite_reason", "quarantine",
    "quarantined",
]

DEFAULT_MAX_NUM_SAMPLES = 1_000_000_000      # federation.max_num_samples (docs/config.md)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_HEADER_SLACK = 4096


@dataclass(frozen=True)
class Rejection:
    """Why one client's update was left out. ``file`` is relative to the store root."""
    client: str
    file: str
    reason: str

    def __str__(self) -> str:
        return f"client {self.client!r}, file {self.file}: {self.reason}"

    def to_dict(self) -> dict:
        return {"client": self.client, "file": self.file, "reason": self.reason}


class UpdateRejected(StoreError):
    """One update failed a check; ``rejection`` says whose, which file and why."""

    def __init__(self, rejection: Rejection):
        super().__init__(f"update left out: {rejection}")
        self.rejection = rejection


@dataclass(frozen=True)
class GlobalSpec:
    """What every update of a round is checked against: the global's tensors (dtype name, shape),
    its header length and data size (the bounds on an update's), and its blocks."""
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    header_bytes: int
    data_bytes: int
    blocks: dict[str, list[str]] | None = None        # block -> keys (None: no block check)
    global_sha256: str | None = None    # the round's global: an update must be bound to it (filled from the store)
    keys: "KeySet | None" = None        # federation.authenticate: every update signed by its client's key

    @classmethod
    def from_file(cls, path: str | os.PathLike, blocks: dict[str, list[str]] | None = None) -> "GlobalSpec":
        h = read_header(path)
        return cls(h.tensors, h.length, h.data_bytes, blocks)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], blocks: dict[str, list[str]] | None = None) -> "GlobalSpec":
        names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
        tensors = {k: (names.get(t.dtype, str(t.dtype)), tuple(t.shape)) for k, t in state.items()}
        header = json.dumps({k: {"dtype": d, "shape": list(s), "data_offsets": [0, 10 ** 15]}
                             for k, (d, s) in tensors.items()})
        return cls(tensors, len(header), sum(t.numel() * t.element_size() for t in state.values()), blocks)

    @property
    def max_header(self) -> int:
        return 2 * self.header_bytes + _HEADER_SLACK

    @property
    def max_file(self) -> int:
        return 8 + self.max_header + self.data_bytes


# --------------------------------------------------------------------------- one update

def _rel(store, path: Path) -> str:
    try:
        return str(Path(path).relative_to(store.root))
    except ValueError:
        return str(path)


def _regular(path: Path, what: str) -> str | None:
    """Why ``path`` is not a regular, singly linked file (None if it is)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{what} is missing"
    if stat.S_ISLNK(st.st_mode):
        return f"{what} is a symlink (to {os.readlink(path)}); updates must be regular files inside the store"
    if not stat.S_ISREG(st.st_mode):
        return f"{what} is not a regular file"
    if st.st_nlink != 1:
        return f"{what} has {st.st_nlink} hard links; an update must be a file of its own"
    return None


def _inside(store, path: Path) -> bool:
    root = os.path.realpath(store.root)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _manifest_problem(m: UpdateManifest, max_num_samples: int) -> str | None:
    if m.num_samples < 1:
        return f"manifest field 'num_samples' must be >= 1, got {m.num_samples}"
    if m.num_samples > max_num_samples:
        return (f"manifest field 'num_samples' is {m.num_samples}, above federation.max_num_samples "
                f"({max_num_samples})")
    for block, use in (m.slot_use or {}).items():
        if isinstance(use, bool) or not isinstance(use, numbers.Real) or not math.isfinite(use) or use < 0:
            return f"manifest field 'slot_use' must map blocks to finite numbers >= 0, got {block!r}: {use!r}"
    return None


def check_update(store, round: int, name: str, spec: GlobalSpec, *,
                 max_num_samples: int = DEFAULT_MAX_NUM_SAMPLES) -> UpdateManifest | None:
    """Every check short of the data (module docstring) on the directory ``updates/<name>`` of
    ``round``; its manifest if it passes, ``None`` if it is not complete (no manifest yet, or it
    changed while it was read: a client retrying), :class:`UpdateRejected` if it fails."""
    updates_dir = store.layout.updates_dir(round)
    folder = updates_dir / name

    def refuse(path: Path, reason: str):
        raise UpdateRejected(Rejection(name, _rel(store, path), reason))

    try:
        validate_client_id(name)
    except ValueError as e:
        refuse(folder, f"not a plain client id: {e}")
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode):
        refuse(folder, f"the client's directory is a symlink (to {os.readlink(folder)})")
    if not stat.S_ISDIR(st.st_mode):
        refuse(folder, "not a directory")
    files = store.layout.update_files(round, name)
    if not os.path.lexists(files.manifest):
        return None                                            # not complete yet
    why = _regular(files.manifest, MANIFEST)
    if why:
        refuse(files.manifest, why)
    what = f"update of client {name} in round {round}"
    try:
        text = files.manifest.read_bytes()
        manifest = load_manifest(UpdateManifest, files.manifest, round=round, client_id=name, what=what)
    except StoreNotFoundError:
        return None                                            # removed under us: a client retrying
    except StoreError as e:
        refuse(files.manifest, str(e))
    why = _manifest_problem(manifest, max_num_samples) or _origin_problem(name, text, manifest, spec)
    if why:
        refuse(files.manifest, why)
    why = _regular(files.tensors, UPDATE_TENSORS)
    if why is None and not _inside(store, files.tensors):
        why = f"{UPDATE_TENSORS} lies outside the store ({os.path.realpath(files.tensors)})"
    if why is None:
        size = os.path.getsize(files.tensors)
        if size != manifest.bytes:
            why = f"size mismatch: the manifest says {manifest.bytes} bytes, the file has {size}"
    if why is None:
        try:
            header = read_header(files.tensors, max_header=spec.max_header, max_file=spec.max_file)
            why = _tensor_problem(name, header, spec) or _keys_problem(header, manifest)
        except ValueError as e:
            why = str(e)
    if why:
        try:
            if files.manifest.read_bytes() != text:
                return None                                    # rewritten while we looked: look again later
        except FileNotFoundError:
            return None
        refuse(files.tensors, why)
    return manifest


def _origin_problem(name: str, text: bytes, manifest: UpdateManifest, spec: GlobalSpec) -> str | None:
    """The signature (with keys) and the binding to the round's global (docs/security.md)."""
    if spec.keys is not None:
        from .auth import signature_problem

        why = signature_problem(json.loads(text), spec.keys, name)
        if why:
            return why
    if spec.global_sha256 is not None:
        bound = manifest.global_sha256
        if bound is None:
            # Without keys an unbound update is accepted (written before its global was known, or by an
            # older fedzero): anyone able to drop the field could forge the whole manifest anyway, which
            # only authentication stops. With keys, the signature covers the binding (checked above).
            return None
        if bound != spec.global_sha256:
            return (f"the update is bound to global sha256 {bound[:16]}..., this round's global is "
                    f"{spec.global_sha256[:16]}...: trained from another global (an old round's update with its "
                    "round edited, a replay, or a client that read a stale global)")
    return None


def _tensor_problem(name: str, header: Header, spec: GlobalSpec) -> str | None:
    if spec.blocks is not None:
        from fedzero.strategies.blocks import block_coverage     # as Strategy.aggregate checks it

        try:
            block_coverage(name, sorted(header.tensors), spec.blocks, sorted(spec.tensors))
        except ValueError as e:
            return str(e)
    for key, (dtype, shape) in sorted(header.tensors.items()):
        if key not in spec.tensors:
            return f"tensor {key!r} is not in the global state"
        gdtype, gshape = spec.tensors[key]
        if dtype != gdtype:
            return f"tensor {key!r} has dtype {dtype}, the global's is {gdtype}"
        if shape != gshape:
            return f"tensor {key!r} has shape {list(shape)}, the global's is {list(gshape)}"
    return None


def _keys_problem(header: Header, manifest: UpdateManifest) -> str | None:
    if sorted(header.tensors) != sorted(manifest.keys):
        return f"the file holds tensors {sorted(header.tensors)}, the manifest lists {sorted(manifest.keys)}"
    return None


def scan_updates(store, round: int, spec: GlobalSpec, *, max_num_samples: int = DEFAULT_MAX_NUM_SAMPLES
                 ) -> tuple[list[dict], list[Rejection]]:
    """(manifests of the updates that pass :func:`check_update`, sorted by client id; the
    rejections). Temp files and directories without a manifest are skipped: writes in progress."""
    try:
        names = sorted(os.listdir(store.layout.updates_dir(round)))
    except FileNotFoundError:
        return [], []
    spec = bound_spec(store, round, spec)
    good, bad = [], []
    for name in names:
        if is_temp_name(name):
            continue
        try:
            manifest = check_update(store, round, name, spec, max_num_samples=max_num_samples)
        except UpdateRejected as e:
            bad.append(e.rejection)
            continue
        except FileNotFoundError:
            continue                                   # the directory vanished under us
        if manifest is not None:
            good.append(manifest.to_dict())
    return good, bad


# --------------------------------------------------------------------------- the data (in-process)

def nonfinite_reason(key: str, tensor: torch.Tensor) -> str | None:
    """``tensor 'k' holds non-finite values (2 NaN, 1 Inf)``, or None if every value is finite."""
    if not tensor.dtype.is_floating_point or bool(torch.isfinite(tensor).all()):
        return None
    nan = int(torch.isnan(tensor).sum())
    return f"tensor {key!r} holds non-finite values ({nan} NaN, {int((~torch.isfinite(tensor)).sum()) - nan} Inf)"


def load_screened(store, round: int, manifest: dict) -> dict[str, torch.Tensor]:
    """The update's tensors, read once and checked against its manifest (size, sha256, keys), every
    value finite; :class:`UpdateRejected` otherwise. Call after :func:`check_update`."""
    cid = manifest["client_id"]
    path = store.update_path(round, cid)
    try:
        tensors, _ = store.read_update(round, cid)
    except StoreError as e:
        raise UpdateRejected(Rejection(cid, _rel(store, path), str(e))) from None
    for key in sorted(tensors):
        why = nonfinite_reason(key, tensors[key])
        if why:
            raise UpdateRejected(Rejection(cid, _rel(store, path), why))
    return tensors


def bound_spec(store, round: int, spec: GlobalSpec) -> GlobalSpec:
    """``spec`` with the round's global sha256 filled in from the store's global manifest (when
    the spec lacks it and the store has the global): every update is checked against it."""
    if spec.global_sha256 is not None or not store.has_global(round):
        return spec
    from dataclasses import replace

    return replace(spec, global_sha256=store.global_manifest(round).sha256)


# --------------------------------------------------------------------------- quarantine

def quarantine(store, round: int, rejection: Rejection) -> Path | None:
    """Move the client's directory ``updates/<client>`` to ``quarantine/<seq>/files`` and write
    ``quarantine/<seq>/reason.json`` (client, file, reason, round, time). Returns the entry, or
    None if the directory was already gone. The directory is renamed, never followed: a symlinked
    directory moves as the link."""
    name = rejection.client
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"cannot quarantine {name!r}: not an entry of the updates directory")
    source = store.layout.updates_dir(round) / name
    if not os.path.lexists(source):
        return None
    ensure_dir(store.layout.quarantine_dir(round))
    seq = 1
    while True:
        entry = store.layout.quarantine_entry(round, seq)
        try:
            os.mkdir(entry)
            break
        except FileExistsError:
            seq += 1
    atomic_write_json(entry / QUARANTINE_REASON, {
        **rejection.to_dict(), "round": round, "moved_to": _rel(store, entry / QUARANTINE_FILES),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    try:
        os.rename(source, entry / QUARANTINE_FILES)
    except FileNotFoundError:
        pass
    fsync_dir(entry)
    fsync_dir(source.parent)
    return entry


def quarantined(store, round: int) -> list[dict]:
    """Every reason file of the round's quarantine, in order (``entry``: the folder, store-relative)."""
    folder = store.layout.quarantine_dir(round)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            info = json.loads((folder / name / QUARANTINE_REASON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict):
            out.append({"entry": _rel(store, folder / name), **{k: info.get(k) for k in ("client", "file", "reason")}})
    return out


def screen_round(store, round: int, spec: GlobalSpec, *, max_num_samples: int = DEFAULT_MAX_NUM_SAMPLES,
                 log: Callable[[str], None] | None = None, keys: "KeySet | None" = None) -> tuple[list[tuple[dict, dict[str, torch.Tensor]]],
                                                                  list[Rejection]]:
    """The in-process path's whole screening: :func:`scan_updates`, then :func:`load_screened`;
    every refused update quarantined. Returns ([(manifest, tensors)], rejections). ``keys``: the
    clients' keys (federation.authenticate), checked as ``spec.keys``."""
    if keys is not None:
        from dataclasses import replace

        spec = replace(spec, keys=keys)
    good, bad = scan_updates(store, round, spec, max_num_samples=max_num_samples)
    out = []
    for manifest in good:
        try:
            out.append((manifest, load_screened(store, round, manifest)))
        except UpdateRejected as e:
            bad.append(e.rejection)
    for rejection in bad:
        entry = quarantine(store, round, rejection)
        if log is not None:
            log(f"left out {rejection} (quarantined in {_rel(store, entry) if entry else 'nothing: gone'})")
    return out, bad
