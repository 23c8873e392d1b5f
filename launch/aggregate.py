"""Aggregate one federation round, sharded over MPI ranks, and publish the next round's global.

    mpirun -np 4 python launch/aggregate.py --store runs/demo/store --round 3 --config RUN.yaml \
        --deadline 600            # add --quorum 2 to go ahead with 2 of the clients after 600 s
    mpirun -np 1 python launch/aggregate.py --store STORE --canonical --config RUN.yaml   # canonical
        projectors, before round 0: wait for the clients' anchor bases, publish the canonical targets

Strategy and server optimizer come from the YAML's `federation:` section (and `seed`), the anchor
teachers' rule from `distill.teacher` and `distill.only_stronger`; the expected clients are the ids
under `clients:` unless --expected lists them. Exit status: 0 done (or the round
was already complete; updates that failed a check were left out and quarantined), 2 too few updates
(the deadline passed below the quorum, or too few passed the checks), 1 any other failure. On 1–2 cores,
set OMP_NUM_THREADS=1. Everything else: docs/aggregator.md.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from fedzero.aggregator.runner import VERIFY_MODES
    from fedzero.config.arguments import client_id, non_negative_float, non_negative_int, positive_float, positive_int

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="federation store directory (docs/store.md)")
    p.add_argument("--round", type=non_negative_int, default=None,
                   help="round R to aggregate; publishes round R+1's global (required unless --canonical)")
    p.add_argument("--canonical", action="store_true",
                   help="canonical projectors, before round 0: wait for the clients' anchor bases and publish the "
                        "canonical targets (rank 0 alone; --quorum/--deadline/--expected as for a round)")
    p.add_argument("--config", required=True,
                   help="run YAML: reads seed, federation:, the ids under clients:, and distill.teacher/only_stronger")
    p.add_argument("--quorum", type=positive_int, default=None,
                   help="minimum number of updates (default: every expected client; 1 without an expected list)")
    p.add_argument("--deadline", type=non_negative_float, default=None,
                   help="seconds after the start: then go ahead with what arrived if it meets the quorum, else "
                        "fail (default: wait for every expected client)")
    p.add_argument("--expected", nargs="+", type=client_id, default=None, metavar="ID",
                   help="client ids to wait for (default: the ids under clients: in the YAML)")
    p.add_argument("--verify", choices=VERIFY_MODES, default="sha256",
                   help="sha256: hash every file once, spread over the ranks; size: manifest sizes and headers only")
    p.add_argument("--poll", type=positive_float, default=1.0, help="seconds between looks at the store while waiting")
    p.add_argument("--cache-gb", type=non_negative_float, default=8.0,
                   help="per rank: keep the slices in memory between the two passes if they fit, else read twice")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="with federation.authenticate: the aggregator's key folder, <client id>.key per client, "
                        "mode 0600 (default: RUN/aggregator/keys beside the store RUN/store, as fedzero prepare makes it)")
    p.add_argument("--reset-server-state", action="store_true",
                   help="with server momentum: start afresh if the previous round left no server state")
    args = p.parse_args(argv)
    if args.round is None and not args.canonical:
        p.error("--round is required (or --canonical)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from mpi4py import MPI

    from fedzero.aggregator import AggregationError, QuorumError, load_aggregator_settings, run_aggregation

    comm = MPI.COMM_WORLD
    try:
        settings = load_aggregator_settings(args.config)
        if args.canonical:
            from fedzero.aggregator.canonical import run_canonical

            run_canonical(args.store, expected=args.expected or settings.client_ids, quorum=args.quorum,
                          deadline_s=args.deadline, comm=comm, poll_s=args.poll)
            return 0
        strategy = settings.make_strategy()
        keys = None
        if settings.federation.authenticate:
            from pathlib import Path

            from fedzero.store.auth import KeySet, aggregator_keys_dir

            folder = args.keys or aggregator_keys_dir(Path(args.store).absolute().parent)
            keys = KeySet.load(folder, args.expected or settings.client_ids)
        run_aggregation(args.store, args.round, strategy, quorum=args.quorum, deadline_s=args.deadline,
                        expected=args.expected or settings.client_ids, comm=comm, verify=args.verify,
                        poll_s=args.poll, cache_bytes=int(args.cache_gb * (1 << 30)),
                        reset_server_state=args.reset_server_state, teacher_rule=settings.teacher_rule,
                        max_num_samples=settings.federation.max_num_samples, keys=keys)
    except (AggregationError, ValueError, TypeError, OSError) as e:
        # Every rank raises the same error (the aggregator's collectives see to it); one prints it.
        if comm.Get_rank() == 0:
            print(f"aggregate: error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, QuorumError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
