"""A whole federation in one process on the CPU: every client and the aggregator take turns.

Everything goes through the same federation store the distributed launchers use, so a simulated
run leaves exactly the files a real one would (docs/store.md).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fedzero.adapters.dema import DeMAModel, inject_dema
from fedzero.adapters.dema.blocks import global_blocks
from fedzero.adapters.dema.io import save_part
from fedzero.backbones import load_backbone
from fedzero.client import LocalClient
from fedzero.client.bootstrap import round0_meta, union_of_parts
from fedzero.comm import lora_params
from fedzero.config import RunConfig
from fedzero.data import build_examples, collate, load_tokenizer, read_jsonl
from fedzero.diagnostics import gate_entropy, update_diagnostics
from fedzero.distill.publish import publish_teachers
from fedzero.distill.tokens import check_one_tokenizer
from fedzero.evaluate import evaluate_classification
from fedzero.store import FederationStore
from fedzero.strategies import ClientUpdate


def build_client(cfg, run: RunConfig) -> LocalClient:
    model, fp = load_backbone(cfg.backbone)
    tokenizer = load_tokenizer(cfg.backbone.tokenizer, cfg.backbone.path)
    handle: DeMAModel = inject_dema(model, run.dema, tokenizer=tokenizer)
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


def simulate(run: RunConfig, out: str | Path, *, progress: bool = True) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {out} is not empty; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    if run.source is not None:
        shutil.copy(run.source, out / "config.yaml")
    torch.manual_seed(run.seed)
    started = time.time()

    clients = [build_client(c, run) for c in run.clients]
    if run.distill is not None and run.distill.level == "token":     # refused before any training
        check_one_tokenizer({c.client_id: c.distiller.tokenizer for c in clients})
    fed = run.federation
    strategy = fed.make_strategy(seed=run.seed)
    # strategy local: nothing aggregated; each client starts every round from its own shared state,
    # which it keeps beside its private part (clients/<id>/shared.safetensors; never in the store)
    own_states = None if getattr(strategy, "aggregates", True) else {}
    store = FederationStore(out / "store")
    global_state, blocks = initial_global(clients)
    store.publish_global(0, global_state, meta=round0_meta(run.seed, run.dema, blocks))

    labels = label_set(clients)
    before = {c.client_id: evaluate_client(c, labels) for c in clients}
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
        "rounds": [],
    }
    metrics_path = out / "metrics.csv"
    with open(metrics_path, "w", newline="") as f:
        csv.writer(f).writerow(["round", "client", "fingerprint", "train_loss", "eval_loss", "accuracy", "macro_f1",
                                "label_nll", "uploaded_bytes"])

    bar = tqdm(total=fed.rounds * len(clients), desc="federation", unit="client-round", disable=not progress)
    for rnd in range(fed.rounds):
        global_state, manifest = store.read_global(rnd)
        # the blocks the global declares, as the MPI aggregator reads them
        block_of = global_blocks(global_state, manifest["meta"].get("blocks"))
        round_rows, updates = [], []
        uploaded = 0
        for client in clients:
            bar.set_postfix_str(f"round {rnd} (of 0..{fed.rounds - 1}) client {client.client_id}")
            if client.distiller is not None:
                client.distiller.set_teacher(client.distiller.read_teacher(store, rnd, client.client_id))
            start = global_state if own_states is None else own_states.get(client.client_id, global_state)
            delta, metrics = client.train_round(start)
            if client.distiller is not None:     # sent before the update, whose manifest closes the round
                # its quality: the held-out loss of the model that made these predictions (trained, not yet averaged)
                quality = client.evaluate() if client.distiller.reports_quality else None
                sent = client.distiller.write_predictions(store, rnd, client.client_id,
                                                          client.distiller.predict(client.handle.model), quality=quality)
                uploaded += sent.stat().st_size
            store.write_update(rnd, client.client_id, delta, fingerprint=client.fingerprint,
                               num_samples=client.num_samples, metrics=metrics, slot_use=client.handle.slot_use(),
                               depth=client.handle.depth_declaration())
            # Private projectors persist locally between rounds and never enter the store.
            save_part(client.handle, out / "clients" / client.client_id / "private.safetensors", "private",
                      fingerprint=client.fingerprint)
            if own_states is not None:
                own_states[client.client_id] = client.handle.shared_state_dict()
                save_part(client.handle, out / "clients" / client.client_id / "shared.safetensors", "shared",
                          fingerprint=client.fingerprint)
            round_rows.append({"id": client.client_id, "fingerprint": client.fingerprint, **metrics})
            bar.update(1)
        for manifest in store.list_updates(rnd):
            delta, _ = store.read_update(rnd, manifest["client_id"])
            uploaded += manifest["bytes"] if own_states is None else 0      # local: recorded, never sent
            updates.append(ClientUpdate(manifest["client_id"], delta, manifest["num_samples"],
                                        manifest["fingerprint"], manifest.get("slot_use"), manifest.get("depth")))
        new_state, agg = strategy.aggregate(global_state, updates, round=rnd, block_of=block_of)
        diagnostics = {"updates": update_diagnostics(updates, block_of.__getitem__)}
        store.write_server_state(rnd, strategy.server_opt.state_dict())   # as the MPI aggregator does: resumable
        distill = publish_teachers(store, rnd, {u.client_id: u.num_samples for u in updates},
                                   run.distill.teacher_rule if run.distill is not None else None)
        store.write_result(rnd, {"strategy": fed.strategy, **agg, "diagnostics": diagnostics, "distill": distill})
        store.publish_global(rnd + 1, new_state, meta={"aggregated_from_round": rnd, "blocks": block_of,
                                                       "strategy": fed.strategy})

        for client, row in zip(clients, round_rows):
            if own_states is None:
                client.handle.load_shared_state_dict(new_state)   # evaluate what the federation produced
            # Label scoring costs several forward passes per example: only before and after the run.
            row.update(evaluate_client(client, labels if rnd == fed.rounds - 1 else None))
            row["gate_entropy"] = gate_entropy(client.handle, collate(client.eval_examples[:8], client.pad_id))
        summary["rounds"].append({"round": rnd, "uploaded_bytes": uploaded, "clients": round_rows,
                                  "aggregation": _block_summary(agg), "diagnostics": diagnostics})
        with open(metrics_path, "a", newline="") as f:
            writer = csv.writer(f)
            for row in round_rows:
                writer.writerow([rnd, row["id"], row["fingerprint"]]
                                + [_fmt(row.get(k)) for k in ("train_loss", "eval_loss", "accuracy", "macro_f1", "label_nll")]
                                + [uploaded // len(clients)])
        tqdm.write(f"round {rnd}: " + "  ".join(
            f"{r['id']} train {r['train_loss']:.3f} eval {r['eval_loss']:.3f}"
            + (f" acc {r['accuracy']:.2f}" if "accuracy" in r else "") for r in round_rows))
    bar.close()

    last = summary["rounds"][-1]["clients"]
    summary["final"] = [{"id": c.client_id,
                         **{f"{k}_before": v for k, v in before[c.client_id].items()},
                         **{f"{k}_after": last[i][k] for k in before[c.client_id]}}
                        for i, c in enumerate(clients)]
    summary["wall_seconds"] = round(time.time() - started, 2)
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _fmt(value) -> str:
    return "" if value is None else f"{value:.6f}"


def _block_summary(agg: dict) -> dict:
    """Per-block conflict statistics, without the coefficient vectors."""
    return {block: {k: v for k, v in stats.items() if k != "beta"} for block, stats in agg.get("blocks", {}).items()}
