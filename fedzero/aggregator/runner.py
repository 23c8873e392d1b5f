"""One round of aggregation end to end: wait for a quorum, aggregate sharded, publish, log.

    run_aggregation(store_root, round, strategy, quorum=..., deadline_s=..., comm=MPI.COMM_WORLD)

Every rank of the communicator calls it (comm=None: one process, no MPI). Rank 0 waits, plans,
computes the coefficients, writes and logs; all ranks read and reduce their slices. The commit
order is the store's (docs/store.md): server state of round R, then result of round R, then the
global of round R+1, whose existence marks round R complete.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from fedzero.distill.publish import publish_teachers
from fedzero.distill.teachers import TeacherRule
from fedzero.store import FederationStore, StoreError, validate_client_id
from fedzero.store.screen import (DEFAULT_MAX_NUM_SAMPLES, GlobalSpec, Rejection, quarantine, quarantined,
                                  scan_updates)
from fedzero.strategies import Strategy
from fedzero.strategies.server import publish_refusal

from .mpi import AggregationError, QuorumError, all_ok, gather_small, on_root, rank_of, size_of
from .plan import global_spec, make_plan, verify_files
from .sharded import aggregate_sharded

VERIFY_MODES = ("sha256", "size")


@dataclass
class Arrivals:
    """Which updates rank 0 decided to aggregate, and why."""
    manifests: list[dict]                     # the updates used, sorted by client id
    arrived_after_s: dict[str, float]         # client -> seconds after the wait began (0.0: already there)
    missing: list[str]                        # expected but absent at the cut-off
    ignored: list[str] = field(default_factory=list)   # present but not expected
    waited_s: float = 0.0
    deadline_passed: bool = False
    left_out: dict[str, Rejection] = field(default_factory=dict)   # refused by the checks (quarantined)

    @property
    def clients(self) -> list[str]:
        return [m["client_id"] for m in self.manifests]


def wait_for_updates(store: FederationStore, round: int, *, expected: Sequence[str] | None, quorum: int,
                     deadline_s: float | None, poll_s: float = 1.0, log: Callable[[str], None] = print,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep, spec: GlobalSpec | None = None,
                     max_num_samples: int = DEFAULT_MAX_NUM_SAMPLES) -> Arrivals:
    """Poll the round's updates until quorum AND (every expected client arrived OR the deadline
    passed). Without an expected list, proceed as soon as the quorum is met.

    Every update is screened as it is seen (fedzero.store.screen.scan_updates against `spec`, the
    global's; default: read from the store): one that fails is quarantined at once and left out
    (`Arrivals.left_out`), and an expected client so refused is no longer waited for (it may still
    send a good update before the cut-off). Raises QuorumError (naming the missing and the left-out
    clients) when the deadline passes below the quorum, or when every expected client has been
    heard from and too few passed.
    Updates from clients outside a given expected list are ignored (and reported).
    """
    expected_set = None if expected is None else set(expected)
    if spec is None:
        spec = global_spec(store, round)
    start = clock()
    first_seen: dict[str, float] = {}
    left_out: dict[str, Rejection] = {}
    last_report = start
    tag = f"[aggregate r{round}]"
    while True:
        now = clock()
        found, refused = scan_updates(store, round, spec, max_num_samples=max_num_samples)
        for rejection in refused:
            entry = quarantine(store, round, rejection)
            left_out[rejection.client] = rejection
            log(f"{tag} left out {rejection} (quarantined in "
                f"{entry.relative_to(store.root) if entry else 'nothing: it was gone'})")
        present = {m["client_id"]: m for m in found}
        for cid in present:
            first_seen.setdefault(cid, 0.0 if now == start else round_s(now - start))
        used = sorted(c for c in present if expected_set is None or c in expected_set)
        ignored = sorted(c for c in present if expected_set is not None and c not in expected_set)
        missing = sorted(expected_set - set(present) - set(left_out)) if expected_set is not None else []
        passed = deadline_s is not None and now - start >= deadline_s
        if len(used) >= quorum and (expected_set is None or not missing or passed):
            return Arrivals([present[c] for c in used], {c: first_seen[c] for c in used}, missing, ignored,
                            round_s(now - start), passed,
                            {c: r for c, r in left_out.items() if c not in present})
        bad = [r for c, r in sorted(left_out.items()) if c not in present]
        why = "; left out: " + "; ".join(str(r) for r in bad) if bad else ""
        if passed or (expected_set is not None and not missing):
            who = f"missing: {', '.join(missing) or 'none'}" if expected_set is not None else "(no expected list given)"
            when = f"deadline of {deadline_s:g} s passed" if passed else "every expected client was heard from"
            raise QuorumError(
                f"round {round}: {when} with {len(used)} of the {quorum} updates the quorum needs; {who}; "
                f"arrived: {', '.join(used) or 'none'}{why}",
                missing=missing, arrived=used)
        if now - last_report >= 30:
            left = "" if deadline_s is None else f", {deadline_s - (now - start):.0f} s to the deadline"
            log(f"{tag} waiting: {len(used)} arrived, quorum {quorum}"
                + (f", missing {', '.join(missing)}" if missing else "") + left)
            last_report = now
        wait = poll_s if deadline_s is None else max(0.0, min(poll_s, deadline_s - (now - start)))
        sleep(wait)


def leave_out(store: FederationStore, round: int, arrivals: Arrivals, bad: dict[str, str], quorum: int,
              log: Callable[[str], None]) -> list[dict]:
    """Rank 0: quarantine the updates that failed a check after the wait (checksum, finiteness),
    record them in `arrivals.left_out`, and return the remaining manifests; QuorumError if they
    no longer meet the quorum."""
    for cid, reason in bad.items():
        rejection = Rejection(cid, str(store.update_path(round, cid).relative_to(store.root)), reason)
        entry = quarantine(store, round, rejection)
        arrivals.left_out[cid] = rejection
        log(f"[aggregate r{round}] left out {rejection} (quarantined in "
            f"{entry.relative_to(store.root) if entry else 'nothing: it was gone'})")
    arrivals.manifests = [m for m in arrivals.manifests if m["client_id"] not in bad]
    for cid in bad:
        arrivals.arrived_after_s.pop(cid, None)
    if len(arrivals.manifests) < quorum:
        raise QuorumError(
            f"round {round}: {len(arrivals.manifests)} of the {quorum} updates the quorum needs passed the checks; "
            f"used: {', '.join(arrivals.clients) or 'none'}; left out: "
            + "; ".join(str(r) for _, r in sorted(arrivals.left_out.items())),
            missing=arrivals.missing, arrived=arrivals.clients)
    return arrivals.manifests


def round_s(x: float) -> float:
    return round(x, 3)


def _gb(n: int) -> str:
    """Decimal units, e.g. 1.234 GB, 56.7 MB, 812 B."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} B"


def _fmt_cos(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def run_aggregation(store_root: str | Path | FederationStore, round: int, strategy: Strategy, *,
                    quorum: int | None = None, deadline_s: float | None = None,
                    expected: Sequence[str] | None = None, comm=None,
                    block_of: Callable[[str], str] | None = None, verify: str = "sha256",
                    poll_s: float = 1.0, cache_bytes: int = 8 << 30, chunk_bytes: int = 64 << 20,
                    reset_server_state: bool = False, teacher_rule: TeacherRule | None = None,
                    max_num_samples: int = DEFAULT_MAX_NUM_SAMPLES, log: Callable[[str], None] | None = None,
                    keys=None) -> dict:
    """Aggregate round `round` of the store and publish the global of round+1. Collective.

    quorum: minimum number of updates (default: all expected clients, or 1 without an expected list).
    deadline_s: seconds to wait for stragglers after the call starts (None: wait for every expected
      client; without an expected list, go as soon as the quorum is met).
    expected: client ids this round should hear from; updates from other ids are ignored.
    comm: an mpi4py communicator, or None for one process without MPI.
    block_of: parameter key -> block name (default None: the blocks the global's manifest declares;
      a global published without them: DeMA's key-name rule, fedzero/adapters/dema/blocks.py).
    verify: "sha256" (every file hashed once, by one rank) or "size" (manifest sizes and headers only).
    cache_bytes: keep this rank's slices in memory between the two passes if they fit; else read twice.
    reset_server_state: with momentum, start afresh when round-1 left no server state (else an error).
    teacher_rule: how clients' anchor predictions become teachers (output distillation; None: the
      sample-weighted mean; the run YAML's distill.teacher / only_stronger, AggregatorSettings.teacher_rule).
    max_num_samples: an update whose manifest claims more samples is left out (federation.max_num_samples).
    log: where rank 0 writes its progress lines (default: print to stdout, flushed).
    keys: the clients' HMAC keys (fedzero.store.auth.KeySet; federation.authenticate): an update
      unsigned, or whose signature does not verify with its client's key, is left out.

    A bad update (unreadable, of another dtype or shape, non-finite, a checksum mismatch, a bad
    manifest, a symlink: fedzero.store.screen) is left out and quarantined, and the round goes on
    if the quorum still holds; `left_out` and `quarantined` in the result say who and why. Nothing
    non-finite is published: a new global or server state holding a NaN or Inf fails the round
    before anything is written.

    Returns the result dict written to rounds/r<round>/aggregate/result.json (on every rank). If the
    round is already complete (round+1's global exists), nothing is recomputed: the stored result
    is returned with "already_complete": True. Raises QuorumError / AggregationError on every rank.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if expected is not None:
        expected = sorted(dict.fromkeys(validate_client_id(c) for c in expected))   # one id rule everywhere
        if not expected:
            raise ValueError("expected must list at least one client id (or be None)")
    if quorum is None:
        quorum = len(expected) if expected is not None else 1
    if quorum < 1:
        raise ValueError(f"quorum must be >= 1, got {quorum}")
    if expected is not None and quorum > len(expected):
        raise ValueError(f"quorum {quorum} exceeds the {len(expected)} expected clients")
    if deadline_s is not None and deadline_s < 0:
        raise ValueError(f"deadline_s must be >= 0, got {deadline_s}")
    rank, world = rank_of(comm), size_of(comm)
    say = (log or (lambda msg: print(msg, flush=True))) if rank == 0 else (lambda msg: None)
    tag = f"[aggregate r{round}]"
    t0 = time.monotonic()

    # ---- every rank opens the store; rank 0 checks there is something to do
    store = all_ok(comm, lambda: store_root if isinstance(store_root, FederationStore)
                   else FederationStore(store_root, create=False), "opening the store")

    def check_round() -> dict | None:
        if store.has_global(round + 1):
            try:
                done = store.read_result(round)
            except StoreError:
                done = {"round": round}
            say(f"{tag} already complete: the global of round {round + 1} is published; nothing to do")
            return {**done, "already_complete": True}
        if not store.has_global(round):
            raise AggregationError(f"the global of round {round} is not published in {store.root}; "
                                   "nothing to aggregate against")
        return None

    done = on_root(comm, check_round, "checking the round")
    if done is not None:
        return done

    # ---- rank 0 waits for the quorum; the other ranks sleep in a non-blocking broadcast
    def wait() -> Arrivals:
        say(f"{tag} waiting for updates: "
            + (f"expected {len(expected)} ({', '.join(expected)})" if expected is not None else "no expected list")
            + f", quorum {quorum}, deadline " + ("none" if deadline_s is None else f"{deadline_s:g} s"))
        return wait_for_updates(store, round, expected=expected, quorum=quorum, deadline_s=deadline_s,
                                poll_s=poll_s, log=say,
                                spec=dataclasses.replace(global_spec(store, round, block_of), keys=keys),
                                max_num_samples=max_num_samples)

    arrivals: Arrivals = on_root(comm, wait, "waiting for updates", sleepy=True)
    t_wait = time.monotonic() - t0
    say(f"{tag} arrived {len(arrivals.clients)}"
        + (f"/{len(expected)}" if expected is not None else "") + ": "
        + ", ".join(f"{c} (+{arrivals.arrived_after_s[c]:.1f} s)" for c in arrivals.clients)
        + f"; missing: {', '.join(arrivals.missing) or 'none'}"
        + (f"; ignored (not expected): {', '.join(arrivals.ignored)}" if arrivals.ignored else ""))

    # ---- rank 0 plans (headers, manifests, blocks); then everyone reads, reduces and combines. An
    # update that fails verification (checksum) or holds a NaN/Inf (seen in pass 1) is left out and
    # the round planned again without it, while the quorum holds.
    t1 = time.monotonic()
    while True:
        plan = on_root(comm, lambda: make_plan(store, round, arrivals.manifests, strategy, block_of,
                                               reset_server_state=reset_server_state), "planning")
        t_verify = time.monotonic()
        hashed, bad = verify_files(comm, plan, verify)
        t_verify = time.monotonic() - t_verify
        if not bad:
            res = aggregate_sharded(comm, plan, strategy, cache_bytes=cache_bytes, chunk_bytes=chunk_bytes)
            bad = res.nonfinite
        if not bad:
            break
        arrivals.manifests = on_root(comm, lambda: leave_out(store, round, arrivals, bad, quorum, say),
                                     "leaving out bad updates")
    io = gather_small(comm, (res.update_bytes, res.other_bytes, hashed, res.passes))   # per rank
    t_agg = time.monotonic() - t1

    # ---- rank 0 commits: server state, result, then the global of round+1 (the commit point)
    def commit() -> dict:
        # nothing non-finite is published: checked before anything is written (the store is unchanged)
        def refusal(state_finite: bool = True) -> str | None:
            return publish_refusal(round, strategy, res.state, res.buffers,
                                   state_from_round=round - 1 if plan.state_file else None,
                                   loaded_state_finite=state_finite, beta=res.beta)

        if refusal():
            raise AggregationError(refusal(_state_file_finite(plan)))
        late = sorted(m["client_id"] for m in store.list_updates(round)
                      if m["client_id"] not in arrivals.clients and m["client_id"] not in arrivals.ignored
                      and (expected is None or m["client_id"] in expected))
        update_total = sum(m["bytes"] for m in arrivals.manifests)
        result = {
            "strategy": strategy.name,
            "clients": arrivals.clients,
            "fingerprints": {u.client_id: u.group for u in plan.updates},
            "num_samples": {u.client_id: u.num_samples for u in plan.updates},
            "expected": expected, "quorum": quorum, "deadline_s": deadline_s,
            "missing": arrivals.missing, "late": late, "ignored": arrivals.ignored,
            "arrived_after_s": arrivals.arrived_after_s, "deadline_passed": arrivals.deadline_passed,
            "left_out": {c: {"file": r.file, "reason": r.reason} for c, r in sorted(arrivals.left_out.items())},
            "quarantined": quarantined(store, round),
            "blocks": dict(zip(plan.blocks, res.stats)),
            "server": {"lr": strategy.server_opt.lr, "momentum": strategy.server_opt.momentum,
                       "state_from_round": round - 1 if plan.state_file else None},
            "ranks": world, "verify": verify,
            "io": {"update_file_bytes": update_total, "update_bytes_read": sum(r[0] for r in io),
                   "global_and_state_bytes_read": sum(r[1] for r in io), "bytes_hashed": sum(r[2] for r in io),
                   "passes": max(r[3] for r in io)},
            "timing": {"wait_s": round_s(t_wait), "aggregate_s": round_s(t_agg),
                       # each stage ends in a collective: these are the slowest rank's times
                       "stages_s": {"verify_s": round_s(t_verify), **res.seconds}},
            "published_round": round + 1,
        }
        if res.defense is not None:              # robust aggregation / DP: norms, clip factors, epsilon
            result["defense"] = res.defense
        store.write_server_state(round, res.buffers)
        # output distillation: the anchor predictions sent with these updates become round+1's teachers
        result["distill"] = publish_teachers(store, round, result["num_samples"], teacher_rule)
        store.write_result(round, result)
        store.publish_global(round + 1, res.state, meta={"aggregated_from_round": round, "strategy": strategy.name,
                                                          "clients": arrivals.clients,
                                                          "blocks": plan.block_assignment()})
        result["timing"]["total_s"] = round_s(time.monotonic() - t0)
        return result

    # sleepy: the other ranks must not spin on the cores rank 0 serialises, hashes and writes with
    result = on_root(comm, commit, "publishing", sleepy=True, poll_s=0.01)
    _log_round(say, tag, result)
    return result


def _state_file_finite(plan) -> bool:
    """Whether the server state the round started from holds only finite values (read only when a
    refusal is being explained)."""
    if plan.state_file is None:
        return True
    from safetensors import safe_open

    from fedzero.store.screen import nonfinite_reason

    with safe_open(plan.state_file.path, framework="pt") as f:
        return not any(nonfinite_reason(k, f.get_tensor(k)) for k in f.keys())


def _log_round(say, tag: str, result: dict) -> None:
    io, timing = result["io"], result["timing"]
    secs = timing["aggregate_s"]
    rate = _gb(int(io["update_bytes_read"] / secs)) + "/s" if secs > 0 else "n/a"
    say(f"{tag} {result['ranks']} rank(s), verify {result['verify']}: read {_gb(io['update_bytes_read'])} of updates "
        f"(+{_gb(io['global_and_state_bytes_read'])} global/state, {_gb(io['bytes_hashed'])} hashed, "
        f"{io['passes']} pass(es)) in {secs:.2f} s = {rate}")
    for block, st in result["blocks"].items():
        if st.get("skipped"):
            say(f"{tag} {block}: skipped (total weight 0)")
            continue
        say(f"{tag} {block}: {st['n_groups']} group(s), {st['n_conflicts']}/{st['n_pairs']} pairs conflicted, "
            f"mean cos {_fmt_cos(st['mean_cos_before'])} -> {_fmt_cos(st['mean_cos_after'])}, "
            f"beta [{', '.join(f'{b:.4f}' for b in st['beta'])}]")
    say(f"{tag} published the global of round {result['published_round']}; "
        f"late (arrived after the cut-off, not used): {', '.join(result['late']) or 'none'}; "
        f"wait {timing['wait_s']:.2f} s, total {timing.get('total_s', 0):.2f} s")
