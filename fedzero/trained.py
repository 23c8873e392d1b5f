"""A trained client's model, ready to run: from an exported adapter directory (`fedzero export`) or
straight from a run (a client after a round, read by fedzero/run_dirs.py and built by fedzero.export's
`dema_model_of`, the code the export itself uses). `fedzero generate` and `fedzero evaluate` load
their model here.

    load_trained(adapter="adapters/airlines")                       # base model: --base, else the run
    load_trained(run="runs/demo", client="airlines", round=3)       #   the adapter came from, else the
                                                                    #   adapter's base_model_name_or_path
Besides the model and tokenizer it carries what the run knew about the client: its eval settings
(max_length, eval_batch_size, max_eval_examples), its held-out data file and the run's label words,
so that evaluating a run's client with no other input repeats the run's own evaluation exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

# Only the standard library at import time (cli.py builds its parser from the modules that use this).
from fedzero.config.arguments import non_negative_int

DEFAULT_MAX_LENGTH = 128          # TrainSettings' default, for an adapter whose run is unknown
DEFAULT_BATCH_SIZE = 32


@dataclass
class Trained:
    model: object                      # a PeftModel (DeMA or LoRA) on the client's backbone, in eval mode
    tokenizer: object
    description: str                   # "client airlines after round 3 of simulate run /…" / "adapter /…"
    client_id: str | None = None
    round: int | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = DEFAULT_BATCH_SIZE            # eval loss: the client's train.eval_batch_size
    label_batch_size: int = DEFAULT_BATCH_SIZE      # label scoring: what simulate's evaluation uses (32)
    max_eval_examples: int | None = None
    test_data: Path | None = None      # the client's held-out data in its run (None: unknown)
    run_labels: list[str] | None = None    # the label words the run scored (summary.json), if any
    provenance: dict = field(default_factory=dict)


def add_source_arguments(p) -> None:
    """The options that name the model: --adapter DIR, or --run DIR --client ID [--round R]."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="an adapter directory written by `fedzero export` (or any PEFT adapter "
                                       "of a fedzero client)")
    src.add_argument("--run", help="straight from a run: simulate's --out, a federate run directory, or a "
                                   "federation store (with --client-config)")
    p.add_argument("--client", help="with --run: the client id")
    p.add_argument("--round", type=non_negative_int, help="with --run: the round after which to take the model "
                                             "(default: the latest finished)")
    p.add_argument("--base", help="with --adapter: the base model directory (default: the backbone of the run and "
                                  "client the adapter was exported from, else its base_model_name_or_path)")
    p.add_argument("--client-config", help="with --run on a bare federation store: the client's CLIENT.yaml")
    p.add_argument("--config", help="with --run on a simulate run: the original run config, if the copy in the "
                                    "run does not resolve (relative backbone paths)")


def trained_from_args(args) -> Trained:
    if args.run is not None:
        if not args.client:
            raise ValueError("--run needs --client ID (the client whose model to use)")
        if args.base:
            raise ValueError("--base is for --adapter; with --run the client's backbone comes from the run")
        return load_trained(run=args.run, client=args.client, round=args.round,
                            client_config=args.client_config, config=args.config)
    for name in ("client", "round", "client_config", "config"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name.replace('_', '-')} is for --run; an adapter directory names its own client "
                             "and round")
    return load_trained(adapter=args.adapter, base=args.base)


def load_trained(*, adapter: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
                 run: str | os.PathLike | None = None, client: str | None = None, round: int | None = None,
                 client_config: str | os.PathLike | None = None,
                 config: str | os.PathLike | None = None) -> Trained:
    """The model of an adapter directory (`adapter`, on `base` or the backbone its provenance names) or
    of client `client` after `round` of `run` (default: the latest finished round)."""
    if (adapter is None) == (run is None):
        raise ValueError("give an adapter directory or a run, not both")
    if run is not None:
        return _from_run(run, client, round, client_config, config)
    return _from_adapter(Path(adapter).expanduser().absolute(), base)


def _from_run(run, client, round, client_config, config) -> Trained:
    from fedzero.export import dema_model_of
    from fedzero.run_dirs import open_run

    run_dir = open_run(run, client_config=client_config, config=config)
    found = run_dir.client_round(client, round)
    model = dema_model_of(run_dir, found, weights=True)
    provenance = model.peft_config["default"].provenance
    return _with_client(Trained(model.eval(), _tokenizer(found.client.backbone),
                                f"client {client} after round {found.round} of {run_dir.kind} run {run_dir.root}",
                                client, found.round, provenance=provenance), run_dir, found.client)


def _from_adapter(adapter: Path, base) -> Trained:
    from fedzero.export import ADAPTER_CONFIG

    config_path = adapter / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter} is not an adapter directory: no {ADAPTER_CONFIG} "
                                "(write one with `fedzero export`)")
    try:
        adapter_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not JSON ({err})") from None
    provenance = adapter_config.get("provenance") or {}
    run_dir = source = None
    if base is not None:
        spec = _base_spec(Path(base).expanduser().absolute(), "--base")
    elif provenance.get("run") and provenance.get("client"):
        from fedzero.run_dirs import open_run

        try:
            run_dir = open_run(provenance["run"])
            source = run_dir.client(provenance["client"])
        except ValueError as err:
            raise ValueError(f"{config_path}: the adapter's base model is client {provenance['client']!r}'s backbone "
                             f"in run {provenance['run']}, which cannot be read ({err}); give the base model "
                             "directory with --base") from None
        spec = source.backbone
    elif adapter_config.get("base_model_name_or_path"):
        spec = _base_spec(Path(adapter_config["base_model_name_or_path"]), f"{config_path}'s base_model_name_or_path")
    else:
        raise ValueError(f"{config_path} names no base model (no provenance run, no base_model_name_or_path): "
                         "give the base model directory with --base")
    model = _load_adapter(adapter, spec, adapter_config, config_path)
    trained = Trained(model.eval(), _tokenizer(spec), f"adapter {adapter}", provenance.get("client"),
                      provenance.get("round"), provenance=provenance)
    return _with_client(trained, run_dir, source) if source is not None else trained


def _base_spec(path: Path, what: str):
    from fedzero.backbones import BackboneSpec

    if not path.is_dir():
        raise FileNotFoundError(f"{what}: no model directory at {path}")
    return BackboneSpec(path=str(path))


def _load_adapter(adapter: Path, spec, adapter_config: dict, config_path: Path):
    import fedzero.peft  # noqa: F401  (registers DeMA with PEFT)
    from peft import PeftModel

    from fedzero.backbones import load_backbone

    base, fp = load_backbone(spec)
    expected = adapter_config.get("fingerprint")
    if expected is not None and expected != fp:
        raise ValueError(f"{config_path}: the adapter was trained on a backbone with fingerprint {expected}; the base "
                         f"model {spec.path or '(inline, from its run)'} has {fp}: give the client's own base model")
    try:
        return PeftModel.from_pretrained(base, str(adapter))
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"{adapter}: cannot load the adapter onto {spec.path or 'its backbone'}: {err}") from None


def _tokenizer(spec):
    from fedzero.data import load_tokenizer

    return load_tokenizer(spec.tokenizer, spec.path)


def _with_client(trained: Trained, run_dir, source) -> Trained:
    """The client's eval settings, held-out data and the run's label words."""
    if source.train is not None:
        trained.max_length = source.train.max_length
        trained.batch_size = source.train.eval_batch_size
        trained.max_eval_examples = source.train.max_eval_examples
    trained.test_data = source.test_data
    summary = run_dir.root / "summary.json"
    if summary.is_file():
        try:
            trained.run_labels = json.loads(summary.read_text()).get("labels")
        except json.JSONDecodeError:
            pass          # a summary being written; the labels then come from the records
    return trained
