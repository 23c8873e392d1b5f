"""The DeMA runner: DeMA adapters on every client (fedzero.client.LocalClient), the method's
strategy over their shared state (exchange.py), and with "distill" output distillation on anchor
prompts: each client sends its label predictions on the anchors (the LM task: its top-k next-token
rows, token_distill.py) and distils from the leave-one-out mixture of the others'
(fedzero.distill.teachers; the "quality" rule weighs each by its loss on its own val split). With
"projector_anchors" the anchor or canonical projectors read in-domain public texts (a tweet topic or
fortunes domain no client holds; the canonical space is fitted across the clients on them), and the
run records the round-0 alignment of the shared space (fedzero.adapters.dema.alignment) on other
texts of that source."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from fedzero.adapters.dema import inject_dema, shared_block
from fedzero.adapters.dema.alignment import alignment_report
from fedzero.adapters.dema.canonical import anchor_states, fit_canonical
from fedzero.backbones import load_backbone
from fedzero.client import LocalClient
from fedzero.data import LABELS, PROMPT_TEMPLATE, build_examples, collate
from fedzero.diagnostics import gate_entropy, update_diagnostics
from fedzero.federation_round import FederationRound, Transport, client_update
from fedzero.distill.teachers import leave_one_out_teachers

from ..data import relabel, topic_anchor_texts
from ..lm_data import domain_anchor_texts
from .context import RunContext, client_record, log_round, record_training, send_predictions
from .evaluation import evaluate_round, round_zero
from .geometry import first_round_cosine
from .spec import DeMAMethod
from .token_distill import exchange_token_predictions

PROBE_EXAMPLES = 8      # the gate-entropy probe at the end: the first of each client's own train examples
ALIGNMENT_TEXTS = 96    # projector_anchors: texts of the topic, beyond the projectors' own, that measure alignment


def run_dema(spec: DeMAMethod, ctx: RunContext) -> dict:
    if spec.projector_anchors is None:
        return _run_dema(spec, ctx, spec.config(ctx.seed))
    # In-domain projector anchors: the texts go to inject_dema as an anchor file, written for this run only;
    # the run records its config with the source in place of that file's temporary path.
    config = spec.config(ctx.seed)
    anchors = public_anchors(spec.projector_anchors, config.num_anchors + ALIGNMENT_TEXTS, ctx,
                             f"method {spec.name!r}, setting {ctx.setting!r}: projector_anchors")
    fit, measure = anchors[:config.num_anchors], anchors[config.num_anchors:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "anchors.jsonl"
        path.write_text("".join(json.dumps({"text": a["text"]}) + "\n" for a in fit))
        out = _run_dema(spec, ctx, dataclasses.replace(config, anchor_file=str(path)),
                        alignment_texts=[a["text"] for a in measure])
    out["dema"] = config.to_dict()
    out["projector_anchors"] = {"source": spec.raw["projector_anchors"], "uids": [a["uid"] for a in fit],
                                "alignment_uids": [a["uid"] for a in measure]}
    return out


def _run_dema(spec: DeMAMethod, ctx: RunContext, config, alignment_texts: list[str] | None = None) -> dict:
    settings = ctx.settings(spec)
    exchange = spec.exchange(ctx.seed)
    distill = spec.distill
    token = distill is not None and distill.level == "token"     # the LM task's (spec.check_setting)
    distill_settings = distill.settings(LABELS, PROMPT_TEMPLATE) if distill else None
    anchors = public_anchors(distill.anchor, distill.anchors, ctx,
                             f"method {spec.name!r}, setting {ctx.setting!r}: distill.anchor_source") \
        if distill and distill.anchor else None

    rule = distill_settings.teacher_rule if distill else None
    loaded = [load_backbone(ctx.backbones[c["backbone"]].spec) for c in ctx.clients]
    canonical, fit = canonical_fit(config, ctx, [m for m, _ in loaded], settings.max_length) \
        if config.uses_canonical else ({}, None)
    clients, records, probes = [], [], []
    for i, (c, (model, fp)) in enumerate(zip(ctx.clients, loaded)):
        tok = ctx.tokenizer(c["backbone"])
        # anchor projectors run the backbone on the anchors; canonical ones take the fit across clients
        handle = inject_dema(model, config, tokenizer=tok, canonical=canonical.get(i))
        data = ctx.split.client(c["id"])
        train = build_examples(data.train, tok, settings.max_length)
        # the quality teacher weighs each client by its loss on its own val split (never the test sets)
        val = build_examples(val_records(ctx, data), tok, settings.max_length) \
            if rule is not None and rule.needs_quality else []
        if rule is not None and rule.needs_quality and not val:
            raise ValueError(f"method {spec.name!r}: distill.teacher {rule.teacher!r} needs each client's val split; "
                             f"client {c['id']!r} has none ({'lm_data.val_docs' if ctx.lm else 'data.val_per_topic'})")
        distiller = (distill_settings.make_distiller(tok, max_length=settings.max_length, seed=ctx.client_seed(i),
                                                     texts=[a["text"] for a in anchors] if anchors else None)
                     if distill else None)
        client = LocalClient(c["id"], handle, f"{c['backbone']}:{fp}", train, val, settings, pad_id=tok.pad_token_id,
                             seed=ctx.client_seed(i), total_rounds=ctx.rounds, distiller=distiller)
        clients.append(client)
        probes.append(train[:PROBE_EXAMPLES])
        rec = client_record(c, fp, client.num_samples, sum(p.numel() for p in handle.trainable_parameters()), ctx)
        rec["shared_params"] = handle.num_shared_parameters()
        rec["rounds"].append({"round": 0, "eval": round_zero(ctx, c["id"])})
        records.append(rec)

    alignment = summarize_alignment(alignment_report(
        {c.client_id: c.handle for c in clients}, {c["id"]: ctx.tokenizer(c["backbone"]) for c in ctx.clients},
        alignment_texts, max_length=settings.max_length)) if alignment_texts else None
    exchange.begin(clients)
    transport = MemoryTransport(exchange, clients, records, settings.local_steps,
                                distill=None if distill is None else ("token" if token else "label"), rule=rule)
    federation = FederationRound(clients, transport)
    for rnd in range(ctx.rounds):
        federation.run(rnd)
        evaluate_round(rnd + 1, ctx, [(c.handle.model, ctx.tokenizer(cc["backbone"]))
                                      for c, cc in zip(clients, ctx.clients)], records)
        log_round(ctx, spec.name, rnd + 1, records)
    for client, probe, rec in zip(clients, probes, records):
        rec["gate_entropy"] = gate_entropy(client.handle, collate(probe, client.pad_id))
    out = {"runner": "dema", "strategy": spec.strategy, "dema": config.to_dict(),
           "distill": distill.record if distill else None, "clients": records, "comm": transport.comm,
           "first_round_cosine": transport.first, "aggregation": transport.aggregation,
           "diagnostics": transport.diagnostics}
    if anchors:
        out["distill_anchors"] = {"source": distill.anchor_source, "uids": [a["uid"] for a in anchors]}
    if alignment is not None:
        out["alignment"] = alignment
    if fit is not None:
        out["canonical_fit"] = fit
    out.update(exchange.record())
    return out


class MemoryTransport(Transport):
    """The bench's round in memory (fedzero.federation_round): each client starts from what the method's
    strategy exchange gives it (fedzero.bench.methods.exchange: the global, or its own state under
    "local"); its training goes into its run record; at the end of the round, with distillation, the
    clients exchange predictions (label or token level), then the exchange aggregates the updates.
    Keeps the run's per-round records: comm bytes, the aggregation stats, the update diagnostics and
    the first round's cosines."""

    def __init__(self, exchange, clients: list[LocalClient], records: list[dict], local_steps: int, *,
                 distill: str | None, rule=None):
        self.exchange, self.clients, self.records, self.local_steps = exchange, clients, records, local_steps
        self.distill, self.rule = distill, rule
        self.comm, self.aggregation, self.diagnostics, self.first = [], [], [], None

    def start(self, rnd: int, k: int, client: LocalClient):
        return self.exchange.start(k)

    def send(self, rnd: int, k: int, client: LocalClient, delta: dict, metrics: dict, seconds: float) -> None:
        self.exchange.trained(k, client)
        record_training(self.records[k], rnd + 1, metrics["train_loss"], seconds, self.local_steps, client.step)

    def finish(self, rnd: int, outcome) -> None:
        clients, records = self.clients, self.records
        updates = [client_update(c, delta) for c, delta in zip(clients, outcome.sent)]
        if self.distill == "token":
            moved = exchange_token_predictions(clients, records, self.rule)
            up, down = moved["upload"], moved["download"]
        else:
            up = down = exchange_predictions(clients, records, self.rule) if self.distill else [0] * len(clients)
        if rnd == 0:
            self.first = first_round_cosine({u.client_id: u.delta for u in updates}, shared_block)
        self.diagnostics.append(update_diagnostics(updates, shared_block))    # per block: cosines, norms
        sent = self.exchange.finish(rnd, clients, updates)
        if sent.aggregation is not None:
            self.aggregation.append(sent.aggregation)
        self.comm.append({"round": rnd + 1, "upload_bytes": [w + d for w, d in zip(sent.weight_bytes, up)],
                          "download_bytes": [w + d for w, d in zip(sent.weight_bytes, down)]})


def exchange_predictions(clients: list[LocalClient], records: list[dict], rule=None) -> list[int]:
    """Distillation's round: each client sends its anchor predictions (and, for a rule that needs it,
    its loss on its own val split, recorded in the round as "val_loss") and receives its teacher
    (N x C float32 each way); returns those bytes per client. Predicting and the val loss count in the
    client's training seconds: they are the method's own client work."""
    predictions, val_losses = send_predictions(clients, records, rule)
    teachers = leave_one_out_teachers(predictions, {c.client_id: c.num_samples for c in clients}, rule, val_losses)
    for client in clients:
        client.distiller.set_teacher(teachers.get(client.client_id))
    return [predictions[c.client_id].size * 4 for c in clients]


def public_anchors(source: tuple[str, str], count: int, ctx: RunContext, where: str) -> list[dict]:
    """[{"uid", "text"}]: `count` in-domain public anchors of a source ("topic", name) of the tweet corpus
    (data.topic_anchor_texts) or ("domain", name) of the LM task's (lm_data.domain_anchor_texts), which no
    client of the setting may hold, chosen by the split's seed: a method and its replica (another training
    seed) read the same anchors, as they are tested on the same records."""
    kind, name = source
    if not ctx.corpus:
        raise ValueError(f"{where}: '{kind}:{name}' needs the corpus the split was cut from (RunContext.corpus)")
    carve = domain_anchor_texts if kind == "domain" else topic_anchor_texts
    try:
        return carve(ctx.corpus, name, count, clients=ctx.clients, seed=ctx.split.seed, max_chars=ctx.max_chars)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def val_records(ctx: RunContext, data) -> list[dict]:
    """A client's own val split (its topics', read through its label map; the LM task: its domains')."""
    if ctx.lm:
        return [r for d in data.domains for r in ctx.split.val.get(d, [])]
    return [relabel(r, data.label_map) for t in data.topics for r in ctx.split.val.get(t, [])]


def canonical_fit(config, ctx: RunContext, models: list, max_length: int) -> tuple[dict, dict]:
    """The canonical space fitted across the run's clients on the anchor file's texts (the round-0
    exchange of fedzero/adapters/dema/canonical.py, run in one process): ({client index: [(mu, W) per
    layer]}, a summary: per slot, the mean over the r codes of how much of each the clients' own
    components hold)."""
    from fedzero.adapters.dema.anchors import load_anchor_texts

    texts = load_anchor_texts(config.anchor_file, config.num_anchors)
    states, slots = {}, {}
    for i, (c, model) in enumerate(zip(ctx.clients, models)):
        states[i] = anchor_states(model, ctx.tokenizer(c["backbone"]), texts, placement=config.placement,
                                  max_length=max_length)
        slots[i] = [config.slot_of_layer(layer, len(states[i])) for layer in range(len(states[i]))]
    fitted, shared = fit_canonical(states, slots, rank=config.rank, components=config.canonical_dims,
                                   ridge=config.canonical_ridge)
    return fitted, {"fit_texts": len(texts), "components": config.canonical_dims, "ridge": config.canonical_ridge,
                    "shared_per_slot": {str(k): round(float(v.mean()), 4) for k, v in shared.items()}}


def summarize_alignment(report: dict) -> dict:
    """A run's record of fedzero.adapters.dema.alignment's report: per client pair, the alignment per
    slot (None where either has no layer there) and its mean; the chance level's spread; the mean over
    pairs and slots."""
    pairs, values, chance = {}, [], []
    for row in report["rows"]:
        pair = pairs.setdefault(f"{row['a']}~{row['b']}", {"per_slot": []})
        a = row["alignment"]
        pair["per_slot"].append(None if a is None else round(float(a), 4))
        if a is not None:
            values.append(float(a))
            chance.append(float(row["chance_sd"]))
    for pair in pairs.values():
        known = [a for a in pair["per_slot"] if a is not None]
        pair["mean"] = round(sum(known) / len(known), 4) if known else None
    return {"texts": report["texts"], "token": report["token"], "pairs": pairs,
            "mean": round(sum(values) / len(values), 4) if values else None,
            "chance_sd_mean": round(sum(chance) / len(chance), 4) if chance else None}
