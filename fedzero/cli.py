"""The `fedzero` command. Each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from fedzero import __version__, logs
from fedzero.compare import add_compare_parser
from fedzero.config.arguments import non_negative_float, positive_float, positive_int
from fedzero.export import add_export_parser
from fedzero.generate import add_evaluate_parser, add_generate_parser
from fedzero.plot import add_plot_parser
from fedzero.reporting import REPORT_TO, TENSORBOARD_DIR


def _simulate(args) -> int:
    from pathlib import Path

    from fedzero.config import load_run_config
    from fedzero.simulate import simulate

    run = load_run_config(args.config)
    fed = run.federation
    if args.strategy and args.strategy != fed.strategy:
        if fed.strategy_options:
            print(f"note: --strategy {args.strategy} drops the config's options for "
                  f"{fed.strategy}: {fed.strategy_options}", file=sys.stderr)
        fed = dataclasses.replace(fed, strategy=args.strategy, strategy_options={})
    if args.rounds is not None:
        fed = dataclasses.replace(fed, rounds=args.rounds)
    run.federation = fed          # replace() checks the overridden settings as the loader did
    summary = simulate(run, args.out, progress=not args.quiet and logs.progress_enabled(), report_to=args.report_to)
    with_acc = summary.get("labels") is not None
    print(f"\n{'client':<16}{'eval loss before':>18}{'after':>10}" + (f"{'accuracy before':>18}{'after':>10}" if with_acc else ""))
    for row in summary["final"]:
        line = f"{row['id']:<16}{row['eval_loss_before']:>18.4f}{row['eval_loss_after']:>10.4f}"
        if with_acc:
            line += f"{row['accuracy_before']:>18.3f}{row['accuracy_after']:>10.3f}"
        print(line)
    distill = summary.get("distill")
    print(f"\nstrategy {summary['strategy']}, {len(summary['rounds'])} rounds, "
          f"{summary['shared_params_per_client']:,} shared parameters per client-round, "
          + (f"output distillation on {distill['anchors']} anchor prompts, " if distill else "") +
          f"{summary['wall_seconds']:.1f} s; summary: {args.out}/summary.json, metrics: {args.out}/metrics.csv")
    if (Path(args.out) / TENSORBOARD_DIR).is_dir():
        print(f"TensorBoard: tensorboard --logdir {Path(args.out) / TENSORBOARD_DIR}")
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


def _memory_estimate(args) -> int:
    from fedzero.adapters.dema import DeMAConfig
    from fedzero.memory import MARKDOWN_HEADER, estimate, format_estimate, load_model_config, markdown_rows, model_name

    dema = DeMAConfig(rank=args.rank, num_experts=args.experts, num_slots=args.slots, placement=args.placement)
    models = args.model or []
    if not models:
        raise ValueError("name a backbone: --model DIR (a local HF model directory) or --model config.json")
    configs = [(model_name(m), load_model_config(m)) for m in models]       # every path checked first
    results = [(name, estimate(cfg, gpus_per_node=args.gpus, nodes=args.nodes, dema=dema, seq_len=args.seq_len,
                               micro_batch=args.micro_batch)) for name, cfg in configs]
    if args.json:
        print(json.dumps(results[0][1] if len(results) == 1 else dict(results), indent=2))
    elif args.markdown:
        print("\n".join(MARKDOWN_HEADER + [row for name, est in results for row in markdown_rows(est, name)]))
    else:
        print("\n\n".join(format_estimate(est, name) for name, est in results))
    return 0


def _bench(args) -> int:
    from pathlib import Path

    from fedzero.bench import run_bench

    results = run_bench(args.suite, args.out, seeds=args.seeds, threads=args.threads, cache_dir=args.cache_dir,
                        memory=not args.no_memory, settings=args.settings, report_only=args.report_only,
                        command="fedzero " + " ".join(sys.argv[1:]))
    print((Path(args.out) / "report.md").read_text())
    print(f"{len(results['runs'])} runs ({results['runs_this_invocation']} this invocation), "
          f"{results['wall_seconds']:.0f} s; report: {args.out}/report.md, data: {args.out}/results.json")
    return 0


def _federate(args) -> int:
    from pathlib import Path

    from fedzero.bundled import bundled_path
    from fedzero.federate import LaunchSettings, federate

    launch = LaunchSettings(ds_config=Path(args.ds_config) if args.ds_config else bundled_path("ds_configs/zero3.json"),
                            procs_per_client=args.procs_per_client, aggregator_ranks=args.aggregator_ranks,
                            quorum=args.quorum, deadline_s=args.deadline)
    summary = federate(args.config, args.out, launch)
    print(f"\n{'round':<7}" + "".join(f"{c['id']:>14}" for c in summary["rounds"][0]["clients"]) + "   (train loss)")
    for rnd in summary["rounds"]:
        print(f"{rnd['round']:<7}" + "".join(f"{c['train_loss']:>14.4f}" for c in rnd["clients"]))
    print(f"\nsummary: {args.out}/summary.json, logs: {args.out}/logs/, store: {args.out}/store/")
    return 0


def _prepare(args) -> int:
    from pathlib import Path

    from fedzero.bundled import bundled_path
    from fedzero.federate import prepare

    ds_config = Path(args.ds_config) if args.ds_config else bundled_path("ds_configs/zero3.json")
    if not ds_config.is_file():
        raise FileNotFoundError(f"DeepSpeed config {ds_config} not found")
    run, client_yaml = prepare(args.config, args.out, ds_config)
    for cid, path in client_yaml.items():
        print(f"{cid}: {path}")
    print(f"store: {args.out}/store (round 0 published); hand the client files to launch/client.py")
    return 0


def _submit(args) -> int:
    from pathlib import Path

    from fedzero.bundled import bundled_path
    from fedzero.slurm import submit

    ds_config = Path(args.ds_config) if args.ds_config else bundled_path("ds_configs/zero3.json")
    results = submit(args.config, args.out, ds_config, resources=args.resources, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"{sum(r['state'] == 'submitted' for r in results)} job(s) submitted; record: "
              f"{Path(args.out) / 'slurm' / 'submitted.json'}; logs: {Path(args.out) / 'logs'}/slurm-*.out")
    return 0


def _align(args) -> int:
    from fedzero.adapters.dema import alignment
    from fedzero.config import load_run_config

    run = load_run_config(args.config)
    if args.projector:
        try:    # replace() re-validates: anchor_out without an anchor projector is refused here
            run.dema = dataclasses.replace(run.dema, projector=args.projector)
        except ValueError as err:
            raise ValueError(f"--projector {args.projector}: {err}") from None
    fit_texts, fit_source = None, None
    if run.dema.uses_canonical:
        fit_texts, fit_source = alignment.canonical_fit_texts(run.dema, args.fit_texts)
    elif args.fit_texts:
        raise ValueError(f"--fit-texts is for projector 'canonical' or 'canonical+learned', not {run.dema.projector!r}")
    texts, source = alignment.measurement_texts(run.dema, args.texts, args.max_texts, fit_texts)
    handles, tokenizers, canonical = alignment.build_handles(run, fit_texts=fit_texts, max_length=args.max_length)
    report = alignment.alignment_report(handles, tokenizers, texts, max_length=args.max_length, canonical=canonical)
    report.update(config=str(args.config), texts_source=source)
    if fit_source:
        report["canonical"]["fit_source"] = fit_source
    print(alignment.format_report(report))
    print(f"\ntexts: {source}")
    if fit_source:
        print(f"canonical space fitted on: {fit_source}")
    if args.out:
        print(f"report: {alignment.write_report(report, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # choices come from the registries and the settings' own tuples, so they cannot drift
    from fedzero.adapters.dema.config import PLACEMENTS, PROJECTORS
    from fedzero.strategies import STRATEGIES

    parser = argparse.ArgumentParser(prog="fedzero", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedzero {__version__}")
    parser.add_argument("--log-level", choices=logs.LEVELS, default=logs.DEFAULT,
                        help="debug: third-party warnings, loading bars and DeepSpeed notices too; info (default): "
                             "fedzero's own output, third-party noise filtered; warning: also no progress bars")
    parser.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="warning",
                        help="no progress bars (= --log-level warning)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run a whole federation in one process (CPU is fine)")
    p.add_argument("--config", required=True, help="run config YAML (see configs/demo.yaml)")
    p.add_argument("--out", required=True, help="output directory; rerun the same command into it to resume")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), help="override federation.strategy")
    p.add_argument("--rounds", type=positive_int, help="override federation.rounds")
    p.add_argument("--report-to", choices=REPORT_TO,
                   help="where per-round scalars go while it trains: tensorboard (OUT/tensorboard/), csv "
                        "(OUT/scalars.csv) or none; default tensorboard when the package is installed, else csv")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("federate", help="run a federation on this machine through the real launchers "
                                          "(deepspeed per client, mpirun for the aggregator)")
    p.add_argument("--config", required=True, help="run config YAML (the same file `simulate` takes)")
    p.add_argument("--out", required=True, help="output directory (rerun into it to resume)")
    p.add_argument("--ds-config", help="DeepSpeed config for every client (default ds_configs/zero3.json)")
    p.add_argument("--procs-per-client", type=positive_int, default=1, help="DeepSpeed processes per client")
    p.add_argument("--aggregator-ranks", type=positive_int, default=1, help="MPI ranks of the aggregator")
    p.add_argument("--quorum", type=positive_int, help="clients needed per round (default: all)")
    p.add_argument("--deadline", type=non_negative_float, help="seconds the aggregator waits for the quorum")
    p.set_defaults(func=_federate)

    p = sub.add_parser("prepare", help="lay out a run directory for the launchers: client YAMLs and the store "
                                         "with round 0 published (launch/slurm/ starts from it)")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--out", required=True, help="run directory (on a file system every node sees)")
    p.add_argument("--ds-config", help="DeepSpeed config for every client (default ds_configs/zero3.json)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("submit", help="prepare a run and submit it to Slurm: one job per client and the "
                                        "aggregator job (docs/cluster.md); rerun it: jobs still queued are kept")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--out", required=True, help="run directory (on a file system every node sees)")
    p.add_argument("--ds-config", help="DeepSpeed config for every client (default ds_configs/zero3.json)")
    p.add_argument("--resources", help="the Slurm settings file (default RUN_DIR/slurm.env; "
                                       "launch/slurm/slurm.env.example lists its keys)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands and job scripts; submit "
                                                          "nothing, write nothing")
    p.set_defaults(func=_submit)

    p = sub.add_parser("align", help="before any training: is the shared r-space aligned across the clients? "
                                       "(per client pair and depth slot; forward passes only; docs/method.md)")
    p.add_argument("--config", required=True, help="run config YAML (the same file `simulate` takes)")
    p.add_argument("--texts", help="JSONL of texts ({'text': ...}, or {'prompt': ...}: the prompt is read); "
                                   "default: the DeMA config's anchor file (the bundled public anchors)")
    p.add_argument("--max-texts", type=int, help="use only the first N texts (at least 3)")
    p.add_argument("--max-length", type=positive_int, default=256, help="tokens read per text, bos included; a longer "
                                                               "text loses its beginning (default 256)")
    p.add_argument("--projector", choices=PROJECTORS,
                   help="override dema.projector, to compare projector kinds on one config")
    p.add_argument("--fit-texts", help="canonical projectors: JSONL of public texts to fit the canonical space on "
                                       "(its first dema.num_anchors; default: the DeMA config's anchor file); "
                                       "the measured texts leave them out")
    p.add_argument("--out", help="also write the report as JSON to this file")
    p.set_defaults(func=_align)

    p = sub.add_parser("split", help="split a labelled JSONL dataset non-IID across clients")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--clients", type=positive_int, required=True)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--by", metavar="FIELD", help="one client per value group of FIELD (e.g. topic)")
    how.add_argument("--dirichlet", metavar="LABEL_FIELD", help="Dirichlet over the labels in LABEL_FIELD")
    p.add_argument("--alpha", type=positive_float, default=0.5, help="Dirichlet concentration (smaller = more skew)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_split)

    p = sub.add_parser("memory-estimate", help="memory per GPU and per node for a backbone config (no weights)")
    p.add_argument("--model", "--model-config", dest="model", nargs="+", metavar="DIR_OR_CONFIG",
                   help="one or more backbones: a local HF model directory (only its config.json is read) or a "
                        "config.json (e.g. configs/models/llama-2-7b.json)")
    p.add_argument("--gpus", type=positive_int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--seq-len", type=positive_int, default=4096, help="tokens per sequence for the activation estimate")
    p.add_argument("--micro-batch", type=positive_int, default=1, help="sequences per GPU per micro-step")
    p.add_argument("--rank", type=positive_int, default=64, help="DeMA r")
    p.add_argument("--experts", type=positive_int, default=4, help="DeMA M")
    p.add_argument("--slots", type=positive_int, default=8, help="DeMA S")
    p.add_argument("--placement", choices=PLACEMENTS, default="parallel")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the numbers as JSON")
    out.add_argument("--markdown", action="store_true", help="print docs/cluster.md's table rows for the models")
    p.set_defaults(func=_memory_estimate)

    p = sub.add_parser("bench", help="benchmark DeMA/CMGA against the LoRA baselines (docs/benchmarks.md)")
    p.add_argument("--suite", required=True, help="quick, full, tune (val-split sweep), long (8 rounds), depth30 (a 30-layer client), hetero / hetero-quick / hetero-budget (three widths, two layouts), hetero-lm / hetero-lm-quick (the LM task, docs/lm_task.md), conflict / conflict-quick (conflicting label maps, CMGA), or a suite file (JSON/YAML; see fedzero/bench/suites.py)")
    p.add_argument("--out", required=True, help="output directory (rerun into it to resume)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the suite's seeds")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores, or 1 if the machine is busy)")
    p.add_argument("--cache-dir", help="where built backbones are cached (default ~/.cache/fedzero/bench)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--settings", nargs="+", help="run only these settings now (e.g. one process per setting "
                                                 "into the same --out; a last run without it writes the full report)")
    p.add_argument("--report-only", action="store_true", help="run nothing: write the report from the runs in --out "
                                                             "(a run not there is left out of it)")
    p.set_defaults(func=_bench)

    add_export_parser(sub)          # its options live with the export code (fedzero/export.py)
    add_generate_parser(sub)        # generate / evaluate: fedzero/generate.py
    add_evaluate_parser(sub)
    add_compare_parser(sub)         # compare / plot: fedzero/compare.py, fedzero/plot.py
    add_plot_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    try:
        return args.func(args)
    except KeyboardInterrupt as err:        # Ctrl-C: no traceback; simulate says how to resume
        print(f"\nfedzero {args.command}: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"fedzero {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from fedzero.store import StoreError      # a refusal by the federation store names its path

        if not isinstance(err, StoreError):
            raise
        print(f"fedzero {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
