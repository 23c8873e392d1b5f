"""Authenticated updates: one HMAC-SHA256 key per client (docs/security.md, "Authenticated updates").

A client signs its update's manifest with its own key; the aggregator, holding a copy of every
client's key (its key set), refuses an update whose signature is missing or does not verify with
the key of the client whose directory it lies in. The signature covers every field of the
manifest (client id, round, the sha256 of the global it was trained from, the tensor file's sha256,
size and keys, the sample count, slot use, metrics, fingerprint, time), so an update cannot be
altered, moved to another client's directory, or replayed into another round or against another
global without the signature failing.

Key files hold the key as 64 hex characters (32 random bytes) and must be readable by their owner
only (mode 0600 or stricter): a key file that group or others may read or write is refused, naming
the file and its mode. Key material never appears in a message, a log line or a ``repr``.

Where the keys live (``fedzero prepare``): the client's copy in its state directory
(``RUN/clients/<id>/update.key``), the aggregator's in ``RUN/aggregator/keys/<id>.key``; both
outside the store, the folder every party writes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Iterable, Mapping

from .layout import validate_client_id

__all__ = ["KEY_BYTES", "CLIENT_KEY_FILE", "KeyFileError", "KeySet", "new_key", "write_key", "read_key",
           "client_key_path", "client_key", "aggregator_keys_dir", "sign_manifest", "signature_problem", "create_keys"]

KEY_BYTES = 32
CLIENT_KEY_FILE = "update.key"         # in the client's state directory
AGGREGATOR_KEYS = Path("aggregator") / "keys"   # under the run directory: <id>.key per client
SIGNATURE_FIELD = "hmac"
_DOMAIN = b"fedzero-update-v1\n"


class KeyFileError(ValueError):
    """A key file that cannot be used (missing, a symlink, readable by others, malformed)."""


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def client_key_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / CLIENT_KEY_FILE


def client_key(state_dir: str | os.PathLike) -> bytes | None:
    """The DeepSpeed client's key (``<state_dir>/update.key``, written by fedzero prepare), or None
    when there is none (a run without federation.authenticate); checked by :func:`read_key`."""
    path = client_key_path(state_dir)
    if not os.path.lexists(path):
        return None
    return read_key(path, whose="this client's update key")


def aggregator_keys_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / AGGREGATOR_KEYS


def write_key(path: str | os.PathLike, key: bytes) -> bool:
    """Create ``path`` holding ``key`` (hex), mode 0600, never replacing a file that exists
    (returns False then: an existing key is kept, so re-running prepare does not change keys)."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"a key is {KEY_BYTES} bytes")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, 0o600)            # whatever the umask
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def read_key(path: str | os.PathLike, *, whose: str = "") -> bytes:
    """The key in ``path``; :class:`KeyFileError` naming the file (never its contents) if it is
    missing, a symlink, not a regular file, readable or writable by group/other, or not 64 hex digits."""
    path = Path(path)
    who = f" ({whose})" if whose else ""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path}{who} is missing") from None
    if stat.S_ISLNK(st.st_mode):
        raise KeyFileError(f"key file {path}{who} is a symlink; a key must be a regular file of its own")
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"key file {path}{who} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(f"key file {path}{who} has mode {mode:04o}: group or others may read or write it; "
                           f"make it private (chmod 600 {path}) or create a new key")
    text = path.read_bytes().strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise KeyFileError(f"key file {path}{who} does not hold a key ({2 * KEY_BYTES} hex digits)") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"key file {path}{who} holds {len(key)} bytes, a key is {KEY_BYTES}")
    return key


class KeySet:
    """The aggregator's copy of the clients' keys (client id -> key). Its repr lists ids, never keys."""

    def __init__(self, keys: Mapping[str, bytes], source: str = "in memory"):
        self._keys = {validate_client_id(c): bytes(k) for c, k in keys.items()}
        if any(len(k) != KEY_BYTES for k in self._keys.values()):
            raise ValueError(f"a key is {KEY_BYTES} bytes")
        self.source = source

    @classmethod
    def generate(cls, client_ids: Iterable[str]) -> "KeySet":
        """Fresh in-memory keys (fedzero simulate with federation.authenticate: one process)."""
        return cls({c: new_key() for c in client_ids})

    @classmethod
    def load(cls, folder: str | os.PathLike, client_ids: Iterable[str] | None = None) -> "KeySet":
        """``<folder>/<id>.key`` for every id (default: every ``*.key`` there); each checked by
        :func:`read_key`. A missing folder or key is a :class:`KeyFileError` naming it."""
        folder = Path(folder)
        if not folder.is_dir():
            raise KeyFileError(f"aggregator key folder {folder} does not exist (federation.authenticate: true needs "
                               "the keys fedzero prepare creates, or --keys DIR)")
        if client_ids is None:
            client_ids = sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".key"))
        keys = {c: read_key(folder / f"{validate_client_id(c)}.key", whose=f"client {c}") for c in client_ids}
        if not keys:
            raise KeyFileError(f"aggregator key folder {folder} holds no <client id>.key file")
        return cls(keys, source=str(folder))

    def get(self, client_id: str) -> bytes | None:
        return self._keys.get(client_id)

    def __contains__(self, client_id) -> bool:
        return client_id in self._keys

    @property
    def clients(self) -> list[str]:
        return sorted(self._keys)

    def __repr__(self) -> str:
        return f"KeySet({self.clients}, from {self.source})"


def create_keys(run_dir: str | os.PathLike, client_state_dirs: Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    """``fedzero prepare``: one key per client, written to its state directory (its copy) and to the
    aggregator's key folder (the aggregator's), both 0600. An existing client key is kept (and
    copied to the aggregator if its copy is missing). Returns client id -> its key file."""
    out = {}
    agg = aggregator_keys_dir(run_dir)
    agg.mkdir(parents=True, exist_ok=True)
    os.chmod(agg, 0o700)
    for cid, state_dir in client_state_dirs.items():
        path = client_key_path(state_dir)
        if not write_key(path, new_key()):
            pass                                      # kept: prepare re-run on an existing run
        key = read_key(path, whose=f"client {cid}")
        copy = agg / f"{validate_client_id(cid)}.key"
        if not write_key(copy, key) and read_key(copy, whose=f"client {cid}") != key:
            raise KeyFileError(f"the aggregator's key file {copy} of client {cid} differs from the client's "
                               f"{path}; remove the stale one and run prepare again")
        out[cid] = path
    return out


# --------------------------------------------------------------------------- signing

def _payload(manifest: Mapping) -> bytes:
    fields = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=True, ensure_ascii=True)
    return _DOMAIN + body.encode("utf-8")


def sign_manifest(manifest: Mapping, key: bytes) -> str:
    """The hex HMAC-SHA256 of an update manifest (every field but the signature itself)."""
    for name in ("client_id", "round", "global_sha256", "sha256", "bytes", "keys"):
        if manifest.get(name) is None:
            raise ValueError(f"cannot sign an update manifest without {name!r}")
    return hmac.new(key, _payload(manifest), hashlib.sha256).hexdigest()


def signature_problem(manifest: Mapping, keys: KeySet, client_id: str) -> str | None:
    """Why ``manifest`` (found in client ``client_id``'s directory) is not signed by that client's
    key, or None if it is."""
    key = keys.get(client_id)
    if key is None:
        return (f"client {client_id!r} has no key in the aggregator's key set ({keys.source}); "
                "federation.authenticate accepts only updates of clients with keys")
    sig = manifest.get(SIGNATURE_FIELD)
    if sig is None:
        return "the update is unsigned (no 'hmac' in its manifest) and federation.authenticate is on"
    if not isinstance(sig, str):
        return "the manifest's 'hmac' is not a hex string"
    try:
        expected = sign_manifest(manifest, key)
    except ValueError as e:
        return str(e)
    if not hmac.compare_digest(expected, sig):
        return (f"the manifest's HMAC does not verify with client {client_id!r}'s key: the manifest or its file "
                "digests were altered after signing (e.g. a round or global edited, a replay), or it was "
                "signed with another key (another client's, a forgery)")
    return None
