"""Train one fedzero client for a round (or serve several) on a DeepSpeed-sharded backbone.

    deepspeed --hostfile hostfile --no_ssh --node_rank 0 --master_addr 127.0.0.1 \
        launch/client.py --config configs/client_example.yaml --store runs/cluster/store --round 0
    deepspeed --num_gpus 8 launch/client.py --config CLIENT.yaml --store STORE --serve --round 0
    torchrun --nproc_per_node 2 launch/client.py --config CLIENT.yaml --store STORE --round 3
    python launch/client.py --config CLIENT.yaml --store STORE --round 3          # one process

One invocation = one round: wait for round N's global in the store, train, write the update and
save the private state. --serve keeps the engine (and the backbone) for rounds N, N+1, ... .
On CPU: OMP_NUM_THREADS=1 with several processes; distinct --master_port for concurrent launches.
Everything else: docs/cluster.md.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from fedzero.config.arguments import non_negative_int, positive_int

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="client YAML (see configs/client_example.yaml)")
    p.add_argument("--store", required=True, help="federation store directory (docs/store.md)")
    p.add_argument("--round", type=non_negative_int, required=True, help="the round to train (the first one with --serve)")
    p.add_argument("--serve", action="store_true", help="one long-lived process serving consecutive rounds")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="with --serve: how many rounds (default: up to federation.rounds)")
    p.add_argument("--init-store", action="store_true",
                   help="create the store and publish round 0's global (the seeded initial DeMA state) if "
                        "absent; for trying a client alone. In a federation the run's launcher does this")
    p.add_argument("--canonical-bases", action="store_true",
                   help="canonical projectors, before round 0: send this client's anchor bases to the store and "
                        "exit (the launcher then runs launch/aggregate.py --canonical; round 0 fits onto the targets)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # set by the deepspeed launcher
    return p.parse_args(argv)


def main(argv=None, *, after_step=None) -> int:
    """`after_step(round, steps_done)`, if given, runs on every rank after each optimizer step (an
    entry script that wraps this one installs it; the tests kill a client mid-round with one)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from fedzero.client.bootstrap import init_store
    from fedzero.client.client_config import load_client_config
    from fedzero.client.deepspeed_client import run_client

    try:
        cfg = load_client_config(args.config)
        if args.init_store:
            init_store(cfg, args.store)
        if args.canonical_bases:
            from fedzero.client.deepspeed_client import DeepSpeedClient

            DeepSpeedClient(cfg, args.store, canonical_bases_only=True)
            return 0
        rounds = 1
        if args.serve:
            rounds = args.rounds if args.rounds is not None else cfg.total_rounds - args.round
        run_client(cfg, args.store, args.round, rounds, after_step=after_step)
    except (ValueError, FileNotFoundError, KeyError, TimeoutError) as err:
        print(f"client: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
