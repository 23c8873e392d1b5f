"""Atomic, durable file writes and sha256 helpers for the federation store.

Every write goes to a temporary file *in the same directory* as its target, is flushed and
fsync'ed, and is then moved over the target with :func:`os.replace` (atomic on POSIX, also on
NFS within one directory); the directory is fsync'ed afterwards so the rename itself survives a
crash. A reader therefore sees either the old file or the new one, never a torn one.

Temporary files are named ``.<target name>.tmp.<pid>.<random>``; readers of the store only
open exact, fixed names, so a stale temp file left by a crashed writer is simply ignored.

Only the standard library and ``safetensors``/``torch`` are used.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "TEMP_MARKER",
    "sha256_bytes",
    "sha256_file",
    "fsync_dir",
    "ensure_dir",
    "temp_path_for",
    "is_temp_name",
    "remove_quietly",
    "commit_temp",
    "atomic_write_bytes",
    "atomic_write_json",
    "json_dumps",
    "save_safetensors_temp",
    "atomic_save_safetensors",
]

TEMP_MARKER = ".tmp."
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- hashing

def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of an in-memory buffer."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- directories

def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames/creations inside it are durable.

    Silently does nothing where directories cannot be opened or fsync'ed (e.g. Windows, some
    network file systems)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and missing parents); fsync the parent of every directory created."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass  # another process created it concurrently
        fsync_dir(d.parent)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    return path


# --------------------------------------------------------------------------- temp files

def temp_path_for(path: str | os.PathLike) -> Path:
    """A fresh temp name next to ``path``: ``.<name>.tmp.<pid>.<random hex>``."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}.{secrets.token_hex(6)}")


def is_temp_name(name: str) -> bool:
    """True for names produced by :func:`temp_path_for`."""
    return name.startswith(".") and TEMP_MARKER in name


def remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(os.fspath(path), os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_temp(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Atomically move an already fsync'ed temp file onto ``path`` and fsync the directory."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


# --------------------------------------------------------------------------- writers

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, flush, fsync, os.replace)."""
    path = Path(path)
    tmp = temp_path_for(path)
    # 0o666 & ~umask, like a plain open(): on a shared file system the aggregator may run as
    # another user than the client that wrote the file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        commit_temp(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars (and 0-d arrays/tensors) -> Python numbers
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def json_dumps(obj: Any) -> str:
    """The store's JSON encoding: sorted keys, 2-space indent, trailing newline.

    numpy/torch scalars are converted with ``.item()``; anything else that is not JSON
    serializable raises ``TypeError``. NaN/inf are written as Python's json module does
    (``NaN``/``Infinity``), so a diverged client's metrics do not make the write fail."""
    return json.dumps(obj, sort_keys=True, indent=2, default=_json_default) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Serialise ``obj`` (see :func:`json_dumps`) and write it atomically."""
    atomic_write_bytes(path, json_dumps(obj).encode("utf-8"))


def save_safetensors_temp(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: dict[str, str] | None = None,
) -> tuple[Path, str, int]:
    """Save ``tensors`` with ``safetensors.torch.save_file`` to a fsync'ed temp file next to
    ``path`` **without** committing it. Returns ``(temp_path, sha256, size_in_bytes)``.

    The caller either :func:`commit_temp` s it or removes it."""
    from safetensors.torch import save_file

    tmp = temp_path_for(path)
    try:
        save_file(dict(tensors), os.fspath(tmp), metadata=metadata)
        _fsync_file(tmp)
        digest = sha256_file(tmp)
        size = os.path.getsize(tmp)
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp, digest, size


def atomic_save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: dict[str, str] | None = None,
) -> tuple[str, int]:
    """Save ``tensors`` to ``path`` atomically; returns ``(sha256, size_in_bytes)`` of exactly
    the bytes that were committed."""
    tmp, digest, size = save_safetensors_temp(path, tensors, metadata)
    try:
        commit_temp(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    return digest, size
