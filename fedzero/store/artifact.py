"""Tensor files with manifests: write the tensors, then the manifest last; read and verify.

A manifest's existence marks its tensor file complete. Writers therefore commit the tensor file
(atomically, :mod:`fedzero.store.atomic`) before the manifest, and a rewrite removes the old
manifest first, so a reader never pairs new tensors with an old manifest. Readers check the
manifest (:mod:`fedzero.store.manifest`), then size and sha256 on exactly the bytes they parse.
The size/sha256 checks here are the only ones in fedzero; the aggregator, which reads slices of
the files itself, calls them too.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .atomic import (atomic_save_safetensors, atomic_write_json, commit_temp, ensure_dir, fsync_dir,
                     remove_quietly, save_safetensors_temp, sha256_bytes, sha256_file)
from .errors import StoreConflictError, StoreError, StoreIntegrityError, StoreNotFoundError
from .layout import ArtifactFiles
from .manifest import M, TensorManifest, load_manifest

__all__ = [
    "prepare_tensors", "write_artifact", "publish_artifact", "remove_artifact", "read_artifact",
    "read_artifact_if_present", "verify_artifact", "check_size", "check_file", "read_checked",
    "check_keys", "load_tensors",
]


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def prepare_tensors(tensors: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
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


def _manifest(kind: type[M], digest: str, size: int, tensors: Mapping[str, torch.Tensor], fields: dict) -> M:
    return kind(sha256=digest, bytes=size, keys=sorted(tensors), created=_now_iso(), **fields)


# --------------------------------------------------------------------------- writing

def write_artifact(files: ArtifactFiles, tensors: dict[str, torch.Tensor], kind: type[TensorManifest],
                   sign: Callable[[dict], dict] | None = None, **fields: Any) -> Path:
    """Write ``tensors`` (already :func:`prepare_tensors`'d) and then a ``kind`` manifest with
    ``fields`` (``round`` and the kind's own) plus sha256, size, keys and time; returns the tensor
    path. An existing pair is replaced: its manifest is removed first (the old data becomes
    invisible), so a crash in between leaves the artifact absent, never mixed. ``sign``: called
    with the finished manifest (digests included), returns it with fields added (a signature)."""
    ensure_dir(files.tensors.parent)
    if files.manifest.exists():
        remove_quietly(files.manifest)
        fsync_dir(files.manifest.parent)
    digest, size = atomic_save_safetensors(files.tensors, tensors)
    manifest = _manifest(kind, digest, size, tensors, fields).to_dict()
    atomic_write_json(files.manifest, sign(manifest) if sign is not None else manifest)
    return files.tensors


def publish_artifact(files: ArtifactFiles, tensors: dict[str, torch.Tensor], kind: type[TensorManifest], *,
                     what: str, **fields: Any) -> Path:
    """Write-once :func:`write_artifact`: if a complete pair exists, identical tensors (same
    sha256) make this a no-op that keeps the existing manifest; different ones raise
    :class:`StoreConflictError`. A tensor file without a manifest (a crashed publish) is replaced."""
    ensure_dir(files.tensors.parent)
    tmp, digest, size = save_safetensors_temp(files.tensors, tensors)
    try:
        if files.manifest.exists():
            existing = load_manifest(kind, files.manifest, round=fields["round"],
                                     client_id=fields.get("client_id"), what=what)
            if existing.sha256 == digest:
                return files.tensors
            raise StoreConflictError(
                f"refusing to overwrite {what} at {files.tensors}: a different one is already "
                f"published (sha256 {existing.sha256}, new state has {digest})"
            )
        commit_temp(tmp, files.tensors)
    finally:
        remove_quietly(tmp)
    atomic_write_json(files.manifest, _manifest(kind, digest, size, tensors, fields).to_dict())
    return files.tensors


def remove_artifact(files: ArtifactFiles) -> None:
    """Remove a pair, manifest first (so it is never seen half removed)."""
    if files.manifest.exists() or files.tensors.exists():
        remove_quietly(files.manifest)
        fsync_dir(files.manifest.parent)
        remove_quietly(files.tensors)


# --------------------------------------------------------------------------- checking a file against its manifest

def _missing(path: Path, what: str) -> StoreIntegrityError:
    return StoreIntegrityError(f"{what}: manifest present but tensor file {path} is missing")


def _size_mismatch(path: Path, expected: int, found: int, what: str) -> StoreIntegrityError:
    return StoreIntegrityError(
        f"size mismatch for {what}: manifest says {expected} bytes, file {path} has {found}")


def _checksum(path: Path, expected: str, found: str, what: str) -> None:
    if found != expected:
        raise StoreIntegrityError(
            f"checksum mismatch for {what}: manifest says sha256 {expected}, file {path} has {found}")


def check_size(path: str | os.PathLike, nbytes: int, what: str) -> int:
    """The size of ``path`` if it is ``nbytes``; else ``StoreIntegrityError`` (also when missing)."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise _missing(Path(path), what) from None
    if size != nbytes:
        raise _size_mismatch(Path(path), nbytes, size, what)
    return size


def check_file(path: str | os.PathLike, nbytes: int, sha256: str, what: str) -> None:
    """Size, then the sha256 streamed from disk (the tensors are not loaded)."""
    check_size(path, nbytes, what)
    try:
        digest = sha256_file(path)
    except FileNotFoundError:
        raise _missing(Path(path), what) from None
    _checksum(Path(path), sha256, digest, what)


def read_checked(path: Path, nbytes: int, sha256: str, what: str) -> bytes:
    """Read the file once and check size and sha256 on exactly those bytes, so a concurrent
    replace cannot slip in between checking and loading."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _missing(path, what) from None
    except OSError as e:
        raise StoreError(f"cannot read {path} ({what}): {e}") from e
    if len(data) != nbytes:
        raise _size_mismatch(path, nbytes, len(data), what)
    _checksum(path, sha256, sha256_bytes(data), what)
    return data


def check_keys(found: list[str], manifest: TensorManifest, path: Path, what: str) -> None:
    """The tensor names in the file must be those the manifest lists."""
    if sorted(found) != sorted(manifest.keys):
        raise StoreIntegrityError(
            f"key mismatch for {what}: file {path} holds {sorted(found)}, manifest lists {sorted(manifest.keys)}")


def load_tensors(data: bytes, path: Path, manifest: TensorManifest, what: str) -> dict[str, torch.Tensor]:
    """Parse checked safetensors bytes and check their names against the manifest."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types
        raise StoreIntegrityError(f"cannot parse {path} ({what}) as safetensors: {e}") from e
    check_keys(list(tensors), manifest, path, what)
    return tensors


# --------------------------------------------------------------------------- reading

def _read(files: ArtifactFiles, manifest: M, what: str) -> tuple[dict[str, torch.Tensor], M]:
    data = read_checked(files.tensors, manifest.bytes, manifest.sha256, what)
    return load_tensors(data, files.tensors, manifest, what), manifest


def read_artifact(files: ArtifactFiles, kind: type[M], *, round: int, client_id: str | None = None,
                  what: str) -> tuple[dict[str, torch.Tensor], M]:
    """``(tensors, manifest)``, verified: manifest fields, size, sha256, tensor names.
    ``StoreNotFoundError`` if there is no manifest."""
    return _read(files, load_manifest(kind, files.manifest, round=round, client_id=client_id, what=what), what)


def read_artifact_if_present(files: ArtifactFiles, kind: type[M], *, round: int, client_id: str | None = None,
                             what: str) -> tuple[dict[str, torch.Tensor], M] | None:
    """:func:`read_artifact`, or ``None`` if there is no manifest (nothing was written)."""
    try:
        manifest = load_manifest(kind, files.manifest, round=round, client_id=client_id, what=what)
    except StoreNotFoundError:
        return None
    return _read(files, manifest, what)


def verify_artifact(files: ArtifactFiles, kind: type[M], *, round: int, client_id: str | None = None,
                    what: str) -> M:
    """Check the manifest and stream the tensor file's sha256 without loading tensors."""
    manifest = load_manifest(kind, files.manifest, round=round, client_id=client_id, what=what)
    check_file(files.tensors, manifest.bytes, manifest.sha256, what)
    return manifest
