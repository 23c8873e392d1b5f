"""The few collective operations the aggregator needs, for an mpi4py communicator or none at all.

`comm=None` means one process without MPI (mpi4py is never imported): every operation is then the
identity. Tensors and arrays move only with the buffer methods on contiguous numpy arrays
(`Allreduce`, `Bcast`, and `Isend`/`Irecv` for the result slices); the lowercase, pickling methods
carry small Python objects only (client lists, error messages, per-block statistics, byte counts).

Error discipline: a rank must never raise alone while the others block in a collective. Work that
can fail locally runs inside `all_ok` (every rank reports, every rank raises the same error) or
`on_root` (rank 0 works, the outcome is broadcast).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


class AggregationError(RuntimeError):
    """The aggregation of a round failed; raised on every rank with the same message."""


class QuorumError(AggregationError):
    """The deadline passed with fewer complete updates than the quorum."""

    def __init__(self, message: str, *, missing: list[str] | None = None, arrived: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])
        self.arrived = list(arrived or [])


def rank_of(comm) -> int:
    return 0 if comm is None else comm.Get_rank()


def size_of(comm) -> int:
    return 1 if comm is None else comm.Get_size()


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, AggregationError) else f"{type(exc).__name__}: {exc}"


def _as_error(payload: tuple) -> AggregationError:
    kind, message, extra = payload
    if kind == "quorum":
        return QuorumError(message, **extra)
    return AggregationError(message)


def _error_payload(exc: BaseException, where: str) -> tuple:
    if isinstance(exc, QuorumError):
        return ("quorum", str(exc), {"missing": exc.missing, "arrived": exc.arrived})
    return ("error", f"{where}: {_describe(exc)}", {})


def all_ok(comm, fn: Callable[[], Any], what: str) -> Any:
    """Run fn() on every rank; if any rank fails, every rank raises AggregationError naming the
    first failing rank. Returns fn()'s value on success."""
    try:
        value, err = fn(), None
    except Exception as exc:        # reported collectively below, then re-raised everywhere
        value, err = None, _error_payload(exc, f"{what} failed on rank {rank_of(comm)}")
        if comm is None:
            raise _as_error(err) from exc
    if comm is None:
        return value
    errors = [e for e in comm.allgather(err) if e is not None]
    if errors:
        raise _as_error(errors[0])
    return value


def on_root(comm, fn: Callable[[], Any], what: str, *, sleepy: bool = False, poll_s: float = 0.05) -> Any:
    """Run fn() on rank 0 only and broadcast its (small, picklable) return value or its error.

    sleepy=True: the other ranks wait in a non-blocking broadcast they test every `poll_s` seconds
    instead of a blocking one, which MPI implementations serve by spinning a core (it matters while
    rank 0 waits minutes for clients that may be training on the same machine).
    """
    rank = rank_of(comm)
    if rank == 0:
        try:
            outcome = ("ok", fn())
        except Exception as exc:    # broadcast, then raised on every rank
            outcome = ("err", _error_payload(exc, f"{what} failed on rank 0"))
            if comm is None:
                raise _as_error(outcome[1]) from exc
    if comm is None:
        return outcome[1]
    if sleepy:
        flag = np.zeros(1, dtype=np.int64)           # "rank 0 is done": a buffer, tested while sleeping
        req = comm.Ibcast(flag, root=0)
        while not req.Test():
            time.sleep(poll_s)
    outcome = comm.bcast(outcome if rank == 0 else None, root=0)
    if outcome[0] == "err":
        raise _as_error(outcome[1])
    return outcome[1]


def gather_small(comm, obj: Any) -> list:
    """Every rank's small picklable object (numbers, short strings), on every rank, in rank order."""
    return [obj] if comm is None else comm.allgather(obj)


def allreduce_sum(comm, array: np.ndarray) -> np.ndarray:
    """Elementwise sum over ranks of a contiguous float64 array (in place; returned)."""
    if array.dtype != np.float64 or not array.flags.c_contiguous:
        raise TypeError("allreduce_sum needs a C-contiguous float64 array")
    if comm is not None:
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
    return array


def bcast_array(comm, array: np.ndarray) -> np.ndarray:
    """Broadcast rank 0's contents of a contiguous array (same shape and dtype on every rank)."""
    if not array.flags.c_contiguous:
        raise TypeError("bcast_array needs a C-contiguous array")
    if comm is not None:
        comm.Bcast(array, root=0)
    return array


_RESULT_TAG = 17   # one tag: MPI keeps messages between two ranks in order, so order is the protocol


def send_to_root(comm, arrays: list[np.ndarray]) -> None:
    """Send contiguous arrays to rank 0, in order (rank 0 posts the matching `recv_into`)."""
    if comm is None or not arrays:
        return
    from mpi4py import MPI

    MPI.Request.Waitall([comm.Isend(a, dest=0, tag=_RESULT_TAG) for a in arrays])


def recv_into(comm, targets: list[tuple[int, np.ndarray]]) -> None:
    """Rank 0: receive into each contiguous array from its source rank, in each source's send order."""
    if comm is None or not targets:
        return
    from mpi4py import MPI

    MPI.Request.Waitall([comm.Irecv(a, source=src, tag=_RESULT_TAG) for src, a in targets])
