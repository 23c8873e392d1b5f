"""A whole federation in one process on the CPU: every client and the aggregator take turns.

Everything goes through the same federation store the distributed launchers use, so a simulated
run leaves exactly the files a real one would (docs/store.md).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fedzero.adapters.dema import DeMAModel
from fedzero.adapters.dema.canonical_exchange import inject_awaiting_map
from fedzero.adapters.dema.io import load_part, read_part, save_part
from fedzero.backbones import load_backbone
from fedzero.client import LocalClient
from fedzero.client.bootstrap import round0_meta, union_of_parts
from fedzero.client.canonical import exchange_in_process
from fedzero.comm import lora_params
from fedzero.config import RunConfig
from fedzero.data import build_examples, collate, load_tokenizer, read_jsonl
from fedzero.diagnostics import gate_entropy
from fedzero.distill.tokens import check_one_tokenizer
from fedzero.evaluate import evaluate_classification
from fedzero.federation_round import FederationRound
from fedzero.reporting import check_report_to, default_report_to, open_reporter
from fedzero.run_dirs import (CLIENTS_DIR, FEDERATE_MARKER, RUN_CONFIG_COPY, SIMULATE_LOCAL_SHARED, SIMULATE_PRIVATE,
                              STORE_DIR)
from fedzero.run_record import config_document, differences, input_digests, read_config_document, write_config
from fedzero.store import FederationStore
from fedzero.store.layout import STORE_FILE, round_dirname, round_of_dirname
from fedzero.store_transport import StoreTransport        # the round through the store


def build_client(cfg, run: RunConfig) -> LocalClient:
    model, fp = load_backbone(cfg.backbone)
    tokenizer = load_tokenizer(cfg.backbone.tokenizer, cfg.backbone.path)
    # canonical projectors: zero maps until the round-0 exchange (fedzero/client/canonical.py) sets them
    handle: DeMAModel = inject_awaiting_map(model, run.dema, tokenizer=tokenizer)
    train = build_examples(read_jsonl(cfg.train_data), tokenizer, cfg.train.max_length)
    test_records = read_jsonl(cfg.test_data)[: cfg.train.max_eval_examples]
    test = build_examples(test_records, tokenizer, cfg.train.max_length)
    distiller = (run.distill.make_distiller(tokenizer, max_length=cfg.train.max_length, seed=run.seed)
                 if run.distill is not None else None)
    return LocalClient(cfg.id, handle, fp, train, test, cfg.train, pad_id=tokenizer.pad_token_id,
                       seed=run.seed, total_rounds=run.federation.rounds, tokenizer=tokenizer,
                       eval_records=test_records, distiller=distiller)


def initial_global(clients: list[LocalClient]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Round 0's global state and its blocks: the union of the clients' seeded initial shared
    states and of the blocks their shared containers declare (fedzero.client.bootstrap)."""
    return union_of_parts((c.handle.shared_state_dict(), c.handle.shared_blocks()) for c in clients)


def initial_global_state(clients: list[LocalClient]) -> dict[str, torch.Tensor]:
    """Round 0's global state alone, from the clients' shared states (their blocks are not asked for)."""
    return union_of_parts((c.handle.shared_state_dict(), None) for c in clients)[0]


def label_set(clients: list[LocalClient]) -> list[str] | None:
    """The label words of a prompt -> label task, if every test record carries a label."""
    records = [r for c in clients for r in c.eval_records]
    if not records or any("label" not in r or "prompt" not in r for r in records):
        return None
    return sorted({r["label"] for r in records})


def evaluate_client(client: LocalClient, labels: list[str] | None) -> dict:
    metrics = {"eval_loss": client.evaluate()}
    if labels:
        metrics.update(evaluate_classification(client.handle.model, client.tokenizer, client.eval_records, labels,
                                               max_length=client.settings.max_length))
    return metrics


SUMMARY = "summary.json"
METRICS = "metrics.csv"
ROUNDS_DIR = "rounds"          # clients/<id>/rounds/r<R>.private.safetensors: the resume points (last two rounds)
METRIC_COLUMNS = ("train_loss", "eval_loss", "accuracy", "macro_f1", "label_nll")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `simulate` after its partial summary.json was written; the message says how to resume."""


def simulate(run: RunConfig, out: str | Path, *, progress: bool = True, report_to: str | None = None) -> dict:
    """Run the federation of `run` into `out`, or resume the run already there.

    Everything that can be refused is checked before `out` is created: the config, the report sink,
    every client's data and backbone (the clients are built first). An `out` that holds a simulate run
    of the same config (OUT/config.yaml, fedzero.run_record) continues from its last completed round
    with the results an uninterrupted run would give; a different config is refused, naming what
    differs. Each round commits when its global is published, after its evaluation, the clients'
    resume points and the partial summary.json are written. Ctrl-C raises Interrupted after writing
    summary.json with the completed rounds (status "interrupted")."""
    out = Path(out)
    note = None
    if report_to is None:
        report_to, note = default_report_to()
    check_report_to(report_to)
    doc = config_document(run)
    resuming = _existing_run(out, doc)
    previous = _read_summary(out) if resuming else None
    started = time.time()
    torch.manual_seed(run.seed)

    clients = [build_client(c, run) for c in run.clients]       # data and backbones checked here, before `out`
    if run.distill is not None and run.distill.level == "token":     # refused before any training
        check_one_tokenizer({c.client_id: c.distiller.tokenizer for c in clients})
    fed = run.federation
    strategy = fed.make_strategy(seed=run.seed)
    inputs = input_digests(run)
    if note:
        tqdm.write(note)
    store = FederationStore(out / STORE_DIR) if resuming else None
    done = (store.latest_global_round() or 0) if resuming else 0
    if resuming:
        _check_inputs(out, previous, inputs, clients, done)
        if done >= fed.rounds and previous.get("status") == "complete":
            tqdm.write(f"{out}: all {fed.rounds} rounds are complete already; nothing to do")
            return previous
        tqdm.write(f"{out}: resuming from round {done} ({done} of {fed.rounds} rounds complete)")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_config(doc, out / RUN_CONFIG_COPY)
        store = FederationStore(out / STORE_DIR)

    # strategy local: nothing aggregated; each client starts every round from its own shared state,
    # which it keeps beside its private part (clients/<id>/shared.safetensors; never in the store)
    own_states = None if getattr(strategy, "aggregates", True) else {}
    labels = label_set(clients)
    try:
        if not store.has_global(0):
            global_state, blocks = initial_global(clients)
            store.publish_global(0, global_state, meta=round0_meta(run.seed, run.dema, blocks))
        exchange_in_process(store, clients, run.dema, lambda cid: out / CLIENTS_DIR / cid)   # canonical projectors
        if done > 0:
            _restore(out, store, strategy, clients, own_states, done)
            before = previous["before"]
        else:
            before = {c.client_id: evaluate_client(c, labels) for c in clients}
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted before round {done} started ({done} of {fed.rounds} rounds complete in "
                          f"{out}); rerun the same command to resume") from None
    summary = {
        "strategy": fed.strategy,
        "seed": run.seed,
        "dema": run.dema.to_dict(),
        "distill": dataclasses.asdict(run.distill) if run.distill is not None else None,
        "shared_params_per_client": clients[0].handle.num_shared_parameters(),
        "clients": [{"id": c.client_id, "fingerprint": c.fingerprint, "num_layers": c.handle.num_layers,
                     "hidden_size": c.handle.hidden_size, "train_examples": c.num_samples,
                     "eval_examples": len(c.eval_examples),
                     # what FedIT-style PEFT LoRA (r=16 on q,k,v,o) would send for this backbone
                     "lora_r16_qkvo_params": lora_params(c.handle.model.config, 16)} for c in clients],
        "labels": labels,
        "inputs": inputs,
        "before": before,
        "rounds": previous["rounds"][:done] if done > 0 else [],
    }
    prior_seconds = float(previous.get("wall_seconds") or 0.0) if previous else 0.0

    def write_summary(status: str) -> None:
        summary["status"] = status
        summary["rounds_complete"] = len(summary["rounds"])
        summary["wall_seconds"] = round(prior_seconds + time.time() - started, 2)
        _write_json(out / SUMMARY, summary)
        _write_metrics(out / METRICS, summary["rounds"], len(clients))

    write_summary("running")
    reporter = open_reporter(report_to, out, start_round=done)
    bar = tqdm(total=fed.rounds * len(clients), initial=done * len(clients), desc="federation",
               unit="client-round", disable=not progress)
    federation = FederationRound(clients, StoreTransport(run, store, strategy, clients, own_states, bar))
    try:
        for rnd in range(done, fed.rounds):
            record, new_state, block_of = _round(rnd, run, federation, clients, labels)
            for client in clients:     # the resume points of this round, before it commits
                _save_round(out, client, rnd, own_states)
            summary["rounds"].append(record)
            write_summary("running")
            reporter.report_round(record)
            # The commit: once the global of rnd+1 is published, round rnd is complete.
            store.publish_global(rnd + 1, new_state, meta={"aggregated_from_round": rnd, "blocks": block_of,
                                                          "strategy": fed.strategy})
            _prune(out, clients, rnd)
            tqdm.write(f"round {rnd}: " + "  ".join(
                f"{r['id']} train {r['train_loss']:.3f} eval {r['eval_loss']:.3f}"
                + (f" acc {r['accuracy']:.2f}" if "accuracy" in r else "") for r in record["clients"]))
    except KeyboardInterrupt:
        bar.close()
        reporter.close()
        complete = store.latest_global_round() or 0
        summary["rounds"] = summary["rounds"][:complete]
        write_summary("interrupted")
        raise Interrupted(f"interrupted: {complete} of {fed.rounds} rounds complete; partial summary "
                          f"{out / SUMMARY}; rerun the same command to resume from round {complete}") from None
    bar.close()
    reporter.close()

    last = summary["rounds"][-1]["clients"]
    summary["final"] = [{"id": c.client_id,
                         **{f"{k}_before": v for k, v in before[c.client_id].items()},
                         **{f"{k}_after": last[i][k] for k in before[c.client_id]}}
                        for i, c in enumerate(clients)]
    write_summary("complete")
    return summary


def _round(rnd: int, run: RunConfig, federation: FederationRound, clients: list[LocalClient],
           labels: list[str] | None) -> tuple[dict, dict, dict]:
    """Train, aggregate and evaluate round `rnd` (its updates and aggregation report go to the store).
    Returns its summary record, and the new global and its blocks, still to publish."""
    outcome = federation.run(rnd)
    new_state, block_of, agg, diagnostics = outcome.finished
    round_rows = [{"id": c.client_id, "fingerprint": c.fingerprint, **m} for c, m in zip(clients, outcome.metrics)]
    for client, row in zip(clients, round_rows):
        # Label scoring costs several forward passes per example: only before and after the run.
        row.update(evaluate_client(client, labels if rnd == run.federation.rounds - 1 else None))
        row["gate_entropy"] = gate_entropy(client.handle, collate(client.eval_examples[:8], client.pad_id))
    record = {"round": rnd, "uploaded_bytes": federation.transport.uploaded, "clients": round_rows,
              "aggregation": _block_summary(agg), "diagnostics": diagnostics}
    return record, new_state, block_of


# ------------------------------------------------------------------------------ resuming

def _existing_run(out: Path, doc: dict) -> bool:
    """Whether `out` holds a simulate run to resume (of this config: else refused); False for a new
    or empty directory."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    if not any(out.iterdir()):
        return False
    if (out / FEDERATE_MARKER).is_file():
        raise FileExistsError(f"{out} is a `fedzero federate` run directory: resume it with fedzero federate, "
                              "or choose a new --out")
    if not (out / STORE_DIR / STORE_FILE).is_file() or not (out / RUN_CONFIG_COPY).is_file():
        raise FileExistsError(f"output directory {out} is not empty and holds no fedzero simulate run "
                              f"({STORE_DIR}/{STORE_FILE} and {RUN_CONFIG_COPY}); choose a new one")
    recorded = read_config_document(out / RUN_CONFIG_COPY)
    if recorded is None:
        raise ValueError(f"{out / RUN_CONFIG_COPY} cannot be read: the run in {out} cannot be resumed; "
                         "choose a new --out")
    diff = differences(recorded, doc)
    if diff:
        raise ValueError(f"{out} holds a run of another config, so this one cannot resume it (rerun with the "
                         f"same config and options, or choose a new --out). What differs, "
                         f"{out / RUN_CONFIG_COPY} vs now:\n  " + "\n  ".join(diff))
    return True


def _read_summary(out: Path) -> dict | None:
    path = out / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return summary if isinstance(summary, dict) else None


def _check_inputs(out: Path, previous: dict | None, inputs: dict, clients: list[LocalClient], done: int) -> None:
    """A resumed run must see the same data files and backbones as the rounds it continues."""
    if done > 0 and (previous is None or not isinstance(previous.get("before"), dict)
                     or len(previous.get("rounds", [])) < done):
        raise ValueError(f"{out}: {done} rounds are complete in its store, but {out / SUMMARY} does not record "
                         "them (written by an older fedzero, or damaged): it cannot be resumed; choose a new --out")
    if previous is None:
        return
    problems = []
    for cid, digests in (previous.get("inputs") or {}).items():
        for key, value in digests.items():
            if inputs.get(cid, {}).get(key) != value:
                problems.append(f"client {cid!r}: its data.{key.split('_')[0]} file changed since the run started")
    recorded = {c["id"]: c.get("fingerprint") for c in previous.get("clients", [])}
    for c in clients:
        if c.client_id in recorded and recorded[c.client_id] != c.fingerprint:
            problems.append(f"client {c.client_id!r}: its backbone changed since the run started (fingerprint "
                            f"{recorded[c.client_id]} in the run, {c.fingerprint} now)")
    if problems:
        raise ValueError(f"{out} cannot be resumed with these inputs (choose a new --out):\n  " + "\n  ".join(problems))


def _round_file(out: Path, client_id: str, rnd: int, part: str) -> Path:
    return out / CLIENTS_DIR / client_id / ROUNDS_DIR / f"{round_dirname(rnd)}.{part}.safetensors"


def _save_round(out: Path, client: LocalClient, rnd: int, own_states: dict | None) -> None:
    """The client's parts after round `rnd`: its resume point, and the latest copy fedzero export reads.
    Private projectors persist locally between rounds and never enter the store."""
    parts = ("private",) if own_states is None else ("private", "shared")
    for part in parts:
        save_part(client.handle, _round_file(out, client.client_id, rnd, part), part, fingerprint=client.fingerprint,
                  tensors=None if part == "private" else own_states[client.client_id])
        latest = SIMULATE_PRIVATE if part == "private" else SIMULATE_LOCAL_SHARED
        save_part(client.handle, out / CLIENTS_DIR / client.client_id / latest, part, fingerprint=client.fingerprint,
                  tensors=None if part == "private" else own_states[client.client_id])


def _prune(out: Path, clients: list[LocalClient], rnd: int) -> None:
    """After round `rnd` commits, only its resume point is needed."""
    for client in clients:
        folder = out / CLIENTS_DIR / client.client_id / ROUNDS_DIR
        for path in folder.glob("r*.safetensors"):
            saved = round_of_dirname(path.name.split(".")[0])
            if saved is not None and saved < rnd:
                path.unlink(missing_ok=True)


def _restore(out: Path, store: FederationStore, strategy, clients: list[LocalClient], own_states: dict | None,
             done: int) -> None:
    """Each client as it stood after round done-1 (its parts, its place in the batch stream and the
    schedule), and the server optimizer's state."""
    for client in clients:
        path = _round_file(out, client.client_id, done - 1, "private")
        if not path.is_file():
            raise ValueError(f"{out}: client {client.client_id!r} has no resume point for round {done - 1} ({path}): "
                             "the run cannot be resumed; choose a new --out")
        load_part(client.handle, path, "private", fingerprint=client.fingerprint)
        if own_states is not None:
            own_states[client.client_id] = read_part(_round_file(out, client.client_id, done - 1, "shared"))[0]
        client.resume_at(done * client.settings.local_steps)
    server = store.read_server_state(done - 1)
    if server is not None:
        strategy.server_opt.load_state_dict(server)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _write_metrics(path: Path, rounds: list[dict], num_clients: int) -> None:
    """metrics.csv from the summary's rounds: one row per client and round."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "client", "fingerprint", *METRIC_COLUMNS, "uploaded_bytes"])
        for record in rounds:
            for row in record["clients"]:
                writer.writerow([record["round"], row["id"], row["fingerprint"]]
                                + [_fmt(row.get(k)) for k in METRIC_COLUMNS] + [record["uploaded_bytes"] // num_clients])
    tmp.replace(path)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.6f}"


def _block_summary(agg: dict) -> dict:
    """Per-block conflict statistics, without the coefficient vectors."""
    return {block: {k: v for k, v in stats.items() if k != "beta"} for block, stats in agg.get("blocks", {}).items()}
