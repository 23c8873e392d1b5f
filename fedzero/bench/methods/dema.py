"""The DeMA runner: DeMA adapters on every client (fedzero.client.LocalClient), the method's
strategy over their shared state (exchange.py), and with "distill" output distillation on anchor
prompts: each client sends its label predictions on the anchors and distils from the leave-one-out
mean of the others' (fedzero.distill.teachers)."""

from __future__ import annotations

import time

from fedzero.adapters.dema import inject_dema, shared_block
from fedzero.backbones import load_backbone
from fedzero.client import LocalClient
from fedzero.data import LABELS, PROMPT_TEMPLATE, build_examples, collate
from fedzero.diagnostics import gate_entropy, update_diagnostics
from fedzero.distill.teachers import leave_one_out_teachers
from fedzero.strategies import ClientUpdate

from ..data import topic_anchor_texts
from .context import RunContext, client_record, log_round, record_training
from .evaluation import evaluate_round, round_zero
from .geometry import first_round_cosine
from .spec import DeMAMethod

PROBE_EXAMPLES = 8      # the gate-entropy probe at the end: the first of each client's own train examples


def run_dema(spec: DeMAMethod, ctx: RunContext) -> dict:
    config = spec.config(ctx.seed)
    settings = ctx.settings(spec)
    exchange = spec.exchange(ctx.seed)
    distill = spec.distill
    if distill and ctx.lm:
        raise ValueError(f"method {spec.name!r}: distillation exchanges label predictions; the LM task has none")
    distill_settings = distill.settings(LABELS, PROMPT_TEMPLATE) if distill else None
    anchors = distill_anchors(spec, ctx) if distill and distill.anchor_topic else None

    clients, records, probes = [], [], []
    for i, c in enumerate(ctx.clients):
        model, fp = load_backbone(ctx.backbones[c["backbone"]].spec)
        tok = ctx.tokenizer(c["backbone"])
        handle = inject_dema(model, config, tokenizer=tok)     # anchor projectors run the backbone on anchors
        train = build_examples(ctx.split.client(c["id"]).train, tok, settings.max_length)
        distiller = (distill_settings.make_distiller(tok, max_length=settings.max_length, seed=ctx.client_seed(i),
                                                     texts=[a["text"] for a in anchors] if anchors else None)
                     if distill else None)
        client = LocalClient(c["id"], handle, f"{c['backbone']}:{fp}", train, [], settings, pad_id=tok.pad_token_id,
                             seed=ctx.client_seed(i), total_rounds=ctx.rounds, distiller=distiller)
        clients.append(client)
        probes.append(train[:PROBE_EXAMPLES])
        rec = client_record(c, fp, client.num_samples, sum(p.numel() for p in handle.trainable_parameters()), ctx)
        rec["shared_params"] = handle.num_shared_parameters()
        rec["rounds"].append({"round": 0, "eval": round_zero(ctx, c["id"])})
        records.append(rec)

    exchange.begin(clients)
    comm, aggregation, diagnostics, first = [], [], [], None
    for rnd in range(ctx.rounds):
        updates, deltas = [], {}
        for k, client in enumerate(clients):
            t0 = time.time()
            delta, metrics = client.train_round(exchange.start(k))     # delta: the client's own shared keys
            seconds = time.time() - t0
            deltas[client.client_id] = delta
            updates.append(ClientUpdate(client.client_id, delta, client.num_samples, client.fingerprint,
                                        client.handle.slot_use()))
            exchange.trained(k, client)
            record_training(records[k], rnd + 1, metrics["train_loss"], seconds, settings.local_steps, client.step)
        distill_bytes = exchange_predictions(clients, records) if distill else [0] * len(clients)
        if rnd == 0:
            first = first_round_cosine(deltas, shared_block)
        diagnostics.append(update_diagnostics(updates, shared_block))    # per block: cosines, norms
        sent = exchange.finish(rnd, clients, updates)
        if sent.aggregation is not None:
            aggregation.append(sent.aggregation)
        sizes = [w + d for w, d in zip(sent.weight_bytes, distill_bytes)]      # the same both ways
        comm.append({"round": rnd + 1, "upload_bytes": sizes, "download_bytes": list(sizes)})
        evaluate_round(rnd + 1, ctx, [(c.handle.model, ctx.tokenizer(cc["backbone"]))
                                      for c, cc in zip(clients, ctx.clients)], records)
        log_round(ctx, spec.name, rnd + 1, records)
    for client, probe, rec in zip(clients, probes, records):
        rec["gate_entropy"] = gate_entropy(client.handle, collate(probe, client.pad_id))
    out = {"runner": "dema", "strategy": spec.strategy, "dema": config.to_dict(),
           "distill": distill.record if distill else None, "clients": records, "comm": comm,
           "first_round_cosine": first, "aggregation": aggregation, "diagnostics": diagnostics}
    if anchors:
        out["distill_anchors"] = {"source": distill.anchor_source, "uids": [a["uid"] for a in anchors]}
    out.update(exchange.record())
    return out


def exchange_predictions(clients: list[LocalClient], records: list[dict]) -> list[int]:
    """Distillation's round: each client sends its anchor predictions and receives the others' mean
    (N x C float32 each way); returns those bytes per client. Predicting counts in the client's
    training seconds: it is the method's own client work."""
    predictions = {}
    for client, rec in zip(clients, records):
        t0 = time.time()
        predictions[client.client_id] = client.distiller.predict(client.handle.model)
        rec["train_seconds"] = round(rec["train_seconds"] + time.time() - t0, 3)
    teachers = leave_one_out_teachers(predictions, {c.client_id: c.num_samples for c in clients})
    for client in clients:
        client.distiller.set_teacher(teachers.get(client.client_id))
    return [predictions[c.client_id].size * 4 for c in clients]


def distill_anchors(spec: DeMAMethod, ctx: RunContext) -> list[dict]:
    """The anchors of a method's distill.anchor_source "topic:<name>": that topic's texts (data.topic_anchor_texts:
    no client of the setting may hold it), chosen by the split's seed, so a method and its replica (another
    training seed) distil on the same anchors, as they are tested on the same records."""
    source = spec.distill.anchor_source
    if not ctx.corpus:
        raise ValueError(f"method {spec.name!r}: distill.anchor_source {source!r} needs the "
                         "corpus the split was cut from (RunContext.corpus)")
    try:
        return topic_anchor_texts(ctx.corpus, spec.distill.anchor_topic, spec.distill.anchors, clients=ctx.clients,
                                  seed=ctx.split.seed, max_chars=ctx.max_chars)
    except ValueError as err:
        raise ValueError(f"method {spec.name!r}, setting {ctx.setting!r}: distill.anchor_source: {err}") from None
