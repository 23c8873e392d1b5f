"""The federation store's refusals. Every message names the thing, the round and the path."""

from __future__ import annotations

__all__ = ["StoreError", "StoreNotFoundError", "StoreIntegrityError", "StoreConflictError", "StoreTimeoutError"]


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
