"""Waiting for a round's global, one poll at a time."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .errors import StoreIntegrityError, StoreTimeoutError
from .layout import validate_round

if TYPE_CHECKING:
    from .store import FederationStore

__all__ = ["GlobalWait"]


class GlobalWait:
    """The wait for one round's global, one :meth:`poll` at a time.

    :meth:`FederationStore.wait_for_global` sleeps between polls; a caller that must keep other
    processes in step between polls (the DeepSpeed client's ranks) polls itself and so waits by
    the same rules: the same deadline, and an integrity failure right after the manifest appears
    retried for up to three polls (network file systems may show a manifest before its data)."""

    def __init__(self, store: FederationStore, round: int, timeout: float | None):
        self.store, self.round, self.timeout = store, validate_round(round), timeout
        self.deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        self.integrity_failures = 0

    def seconds_left(self) -> float | None:
        """Seconds to the deadline (``None``: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def poll(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """:meth:`FederationStore.read_global` once the global is published and verified; ``None``
        while it is not and time is left. Raises :class:`StoreTimeoutError` past the deadline and
        :class:`StoreIntegrityError` when a published global fails its checks a third time."""
        if self.store.has_global(self.round):
            try:
                return self.store.read_global(self.round)
            except StoreIntegrityError:
                self.integrity_failures += 1
                if self.integrity_failures >= 3:
                    raise
        left = self.seconds_left()
        if left is not None and left <= 0:
            raise StoreTimeoutError(
                f"timed out after {self.timeout}s waiting for the global of round {self.round} "
                f"(no complete manifest at {self.store.layout.global_files(self.round).manifest})")
        return None
