"""The `fedzero` command. Each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import sys


def _simulate(args) -> int:
    from fedzero.config import load_run_config
    from fedzero.simulate import simulate

    run = load_run_config(args.config)
    if args.strategy:
        run.federation.strategy = args.strategy
    if args.rounds:
        run.federation.rounds = args.rounds
    summary = simulate(run, args.out, progress=not args.quiet)
    print(f"\n{'client':<16}{'eval loss before':>18}{'after':>10}")
    for row in summary["final"]:
        print(f"{row['id']:<16}{row['eval_loss_before']:>18.4f}{row['eval_loss_after']:>10.4f}")
    print(f"\nstrategy {summary['strategy']}, {len(summary['rounds'])} rounds, "
          f"{summary['shared_params_per_client']:,} shared parameters per client-round, "
          f"{summary['wall_seconds']:.1f} s; summary: {args.out}/summary.json, metrics: {args.out}/metrics.csv")
    return 0


def _split(args) -> int:
    from fedzero.data import read_jsonl, split_by_field, split_dirichlet, train_test_split
    from pathlib import Path

    records = read_jsonl(args.input)
    if args.by:
        parts = split_by_field(records, args.by, args.clients, seed=args.seed)
    else:
        parts = split_dirichlet(records, args.dirichlet, args.clients, args.alpha, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts):
        train, test = train_test_split(part, args.test_fraction, seed=args.seed)
        for name, rows in (("train", train), ("test", test)):
            with open(out / f"client{i}.{name}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        print(f"client{i}: {len(train)} train, {len(test)} test -> {out}/client{i}.{{train,test}}.jsonl")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedzero", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run a whole federation in one process (CPU is fine)")
    p.add_argument("--config", required=True, help="run config YAML (see configs/demo.yaml)")
    p.add_argument("--out", required=True, help="new output directory")
    p.add_argument("--strategy", choices=["fedavg", "cmga"], help="override federation.strategy")
    p.add_argument("--rounds", type=int, help="override federation.rounds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("split", help="split a labelled JSONL dataset non-IID across clients")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--clients", type=int, required=True)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--by", metavar="FIELD", help="one client per value group of FIELD (e.g. topic)")
    how.add_argument("--dirichlet", metavar="LABEL_FIELD", help="Dirichlet over the labels in LABEL_FIELD")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more skew)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_split)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"fedzero {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
