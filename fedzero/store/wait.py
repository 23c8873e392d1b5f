"""Waiting for a published artifact (a round's global, the canonical targets), one poll at a time."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .errors import StoreIntegrityError, StoreTimeoutError
from .layout import validate_round

if TYPE_CHECKING:
    from .store import FederationStore

__all__ = ["ArtifactWait", "GlobalWait"]


class ArtifactWait:
    """The wait for one write-once artifact, one :meth:`poll` at a time.

    A caller that must keep other processes in step between polls (the DeepSpeed client's ranks)
    polls itself; :meth:`wait` sleeps between polls. Both wait by the same rules: one deadline, and
    an integrity failure right after the manifest appears retried for up to three polls (network
    file systems may show a manifest before its data). Subclasses say what is waited for."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        self.integrity_failures = 0

    def present(self) -> bool:
        raise NotImplementedError

    def read(self):
        raise NotImplementedError

    def timeout_message(self) -> str:
        raise NotImplementedError

    def seconds_left(self) -> float | None:
        """Seconds to the deadline (``None``: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def poll(self):
        """:meth:`read` once the artifact is published and verified; ``None`` while it is not and time
        is left. Raises :class:`StoreTimeoutError` past the deadline and :class:`StoreIntegrityError`
        when a published artifact fails its checks a third time."""
        if self.present():
            try:
                return self.read()
            except StoreIntegrityError:
                self.integrity_failures += 1
                if self.integrity_failures >= 3:
                    raise
        left = self.seconds_left()
        if left is not None and left <= 0:
            raise StoreTimeoutError(self.timeout_message())
        return None

    def wait(self, poll: float = 1.0):
        """:meth:`poll` until it returns, sleeping `poll` seconds (at most to the deadline) between."""
        while (found := self.poll()) is None:
            left = self.seconds_left()
            time.sleep(poll if left is None else max(0.0, min(poll, left)))
        return found


class GlobalWait(ArtifactWait):
    """The wait for one round's global (:meth:`FederationStore.wait_for_global`)."""

    def __init__(self, store: FederationStore, round: int, timeout: float | None):
        super().__init__(timeout)
        self.store, self.round = store, validate_round(round)

    def present(self) -> bool:
        return self.store.has_global(self.round)

    def read(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.store.read_global(self.round)

    def timeout_message(self) -> str:
        return (f"timed out after {self.timeout}s waiting for the global of round {self.round} "
                f"(no complete manifest at {self.store.layout.global_files(self.round).manifest})")
