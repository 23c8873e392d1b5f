"""The aggregator's part of the canonical projector's round-0 exchange: wait for the clients' anchor
bases, compute one canonical target per slot, publish them (docs/method.md, "A canonical shared space").

    run_canonical(store_root, expected=[...], quorum=..., deadline_s=..., comm=MPI.COMM_WORLD)
    mpirun -np 2 python launch/aggregate.py --store STORE --canonical --config RUN.yaml

Small (N x m numbers per client layer): rank 0 does all of it, the other ranks wait for its outcome.
The wait (wait_for_bases) has the rules of a round's wait for updates: quorum, deadline, expected
clients. The targets are computed exactly as fit_canonical
computes them in one process, the clients in client-id order (fedzero.adapters.dema.canonical_exchange).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from fedzero.adapters.dema.canonical_exchange import slot_targets
from fedzero.store import FederationStore
from fedzero.store import canonical as exchange

from .mpi import AggregationError, QuorumError, all_ok, on_root

__all__ = ["run_canonical", "publish_canonical_targets", "wait_for_bases"]


def wait_for_bases(store: FederationStore, *, expected: Sequence[str] | None, quorum: int, deadline_s: float | None,
                   poll_s: float = 1.0, log: Callable[[str], None] = print,
                   clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
                   ) -> tuple[list[dict], list[str], list[str]]:
    """(manifests used, missing, ignored): the rules of a round's wait for updates
    (fedzero.aggregator.runner.wait_for_updates) over the clients' bases: poll until the quorum is met
    AND (every expected client arrived OR the deadline passed); without an expected list, go as soon
    as the quorum is met. QuorumError naming the missing clients when the deadline passes below the
    quorum. Bases of clients outside a given expected list are ignored (and reported)."""
    expected_set = None if expected is None else set(expected)
    start = last_report = clock()
    while True:
        now = clock()
        present = {m["client_id"]: m for m in exchange.list_bases(store)}
        used = sorted(c for c in present if expected_set is None or c in expected_set)
        ignored = sorted(c for c in present if expected_set is not None and c not in expected_set)
        missing = sorted(expected_set - set(present)) if expected_set is not None else []
        passed = deadline_s is not None and now - start >= deadline_s
        if len(used) >= quorum and (expected_set is None or not missing or passed):
            return [present[c] for c in used], missing, ignored
        if passed:
            raise QuorumError(
                f"canonical exchange: deadline of {deadline_s:g} s passed with the bases of {len(used)} client(s), "
                f"the quorum needs {quorum}; missing: {', '.join(missing) or 'none'} (no complete "
                f"{exchange.BASES_TENSORS} + manifest under {exchange.bases_files(store, 'x').manifest.parent.parent}); "
                f"arrived: {', '.join(used) or 'none'}", missing=missing, arrived=used)
        if now - last_report >= 30:
            log(f"[aggregate canonical] waiting for bases: {len(used)} arrived, quorum {quorum}"
                + (f", missing {', '.join(missing)}" if missing else "")
                + ("" if deadline_s is None else f", {deadline_s - (now - start):.0f} s to the deadline"))
            last_report = now
        sleep(poll_s if deadline_s is None else max(0.0, min(poll_s, deadline_s - (now - start))))


def publish_canonical_targets(store: FederationStore, manifests: list[dict]) -> dict:
    """Read the bases of `manifests` (verified), check the clients agree on the anchor set and the
    fit's sizes, compute and publish the targets. Returns the report."""
    if not manifests:
        raise AggregationError("no client's canonical bases to compute the targets from")
    manifests = sorted(manifests, key=lambda m: m["client_id"])
    _check_agreement(manifests)
    bases, slots = {}, {}
    for m in manifests:
        cid = m["client_id"]
        bases[cid], _ = exchange.read_bases(store, cid)
        slots[cid] = list(m["slots"])
    first = manifests[0]
    try:
        targets, shared = slot_targets(bases, slots, first["rank"])
    except ValueError as err:
        raise AggregationError(f"canonical targets: {err}") from None
    path = exchange.publish_targets(store, targets, anchors=first["anchors"], anchor_source=first["anchor_source"],
                                    num_anchors=first["num_anchors"], components=first["components"],
                                    rank=first["rank"], clients=sorted(bases), shared=shared)
    return {"clients": sorted(bases), "slots": sorted(targets), "anchors": first["anchors"],
            "anchor_source": first["anchor_source"], "num_anchors": first["num_anchors"],
            "components": first["components"], "rank": first["rank"], "targets": str(path),
            "shared_mean": {str(s): round(float(v.mean()), 4) for s, v in sorted(shared.items())}}


def _check_agreement(manifests: list[dict]) -> None:
    """Every client on the same anchor texts, N, m and r; a disagreement names the clients, and for
    the anchor set their anchor files."""
    digests: dict[str, list[dict]] = {}
    for m in manifests:
        digests.setdefault(m["anchors"], []).append(m)
    if len(digests) > 1:
        groups = "; ".join(f"{', '.join(m['client_id'] for m in ms)} on {ms[0]['anchor_source']} "
                           f"({ms[0]['num_anchors']} texts, sha256 {digest[:12]})" for digest, ms in digests.items())
        raise AggregationError(f"canonical exchange: the clients read different anchor texts, so their bases "
                               f"describe different things and cannot be combined: {groups}. Give every client the "
                               "same dema.anchor_file and dema.num_anchors")
    for key, setting in (("num_anchors", "dema.num_anchors"), ("components", "dema.canonical_components"),
                         ("rank", "dema.rank")):
        values: dict[int, list[str]] = {}
        for m in manifests:
            values.setdefault(m[key], []).append(m["client_id"])
        if len(values) > 1:
            groups = "; ".join(f"{v} ({', '.join(c)})" for v, c in sorted(values.items()))
            raise AggregationError(f"canonical exchange: the clients disagree on {setting}: {groups}")


def run_canonical(store_root: str | Path | FederationStore, *, expected: Sequence[str] | None = None,
                  quorum: int | None = None, deadline_s: float | None = None, comm=None, poll_s: float = 1.0,
                  log: Callable[[str], None] | None = None) -> dict:
    """Wait for the bases (quorum/deadline/expected as for a round's updates), then publish the
    targets. Collective over `comm` (None: one process). Returns the report on every rank; if the
    targets are already published, nothing is recomputed ("already_complete": True). A deadline
    passed below the quorum raises QuorumError naming the clients whose bases are missing."""
    if expected is not None:
        expected = sorted(dict.fromkeys(expected))
        if not expected:
            raise ValueError("expected must list at least one client id (or be None)")
    if quorum is None:
        quorum = len(expected) if expected is not None else 1
    if quorum < 1 or (expected is not None and quorum > len(expected)):
        raise ValueError(f"quorum {quorum}: must be in 1..{len(expected) if expected else 'the clients'}")
    rank = comm.Get_rank() if comm is not None else 0
    say = (log or (lambda msg: print(msg, flush=True))) if rank == 0 else (lambda msg: None)
    tag = "[aggregate canonical]"
    store = all_ok(comm, lambda: store_root if isinstance(store_root, FederationStore)
                   else FederationStore(store_root, create=False), "opening the store")

    def work() -> dict:
        if exchange.has_targets(store):
            _, manifest = exchange.read_targets(store)
            say(f"{tag} the canonical targets are already published ({', '.join(manifest.clients)}); nothing to do")
            return {"clients": manifest.clients, "already_complete": True}
        started = time.monotonic()
        say(f"{tag} waiting for the clients' anchor bases: "
            + (f"expected {len(expected)} ({', '.join(expected)})" if expected is not None else "no expected list")
            + f", quorum {quorum}, deadline " + ("none" if deadline_s is None else f"{deadline_s:g} s"))
        manifests, missing, ignored = wait_for_bases(store, expected=expected, quorum=quorum, deadline_s=deadline_s,
                                                     poll_s=poll_s, log=say)
        report = publish_canonical_targets(store, manifests)
        report.update(missing=missing, ignored=ignored, waited_s=round(time.monotonic() - started, 3))
        say(f"{tag} published the targets of slots {report['slots']} from {', '.join(report['clients'])}"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + f"; mean shared eigenvalue per slot {report['shared_mean']}")
        return report

    return on_root(comm, work, "the canonical exchange", sleepy=True)
