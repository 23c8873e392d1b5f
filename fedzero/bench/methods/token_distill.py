"""Token-level output distillation for the bench's LM task (distill.level: token; the math:
fedzero.distill.tokens). What the label-level path of methods/dema.py does with label predictions,
this does with next-token ones, for clients that share one tokenizer (the hetero testbed's four
backbones all use SmolLM2's): each client's top-k next-token rows at every position of the public
anchor texts, and its leave-one-out teacher from the others' (mean or quality rule).

The anchors: "domain:<name>", a fortunes domain no client holds (lm_data.domain_anchor_texts: refused
when a client holds it; chosen by the split's seed, so a method and its replica distil on the same
anchors; cut to the task's max_chars like its records). The anchors are `{"text"}` records scored
at every position, the positions the LM loss trains (template '{text}').

Not wired into run_dema (the bench is the lead's): the lines that wire it are in the session's report.
"""

from __future__ import annotations

import time

from fedzero.distill.settings import DistillSettings
from fedzero.distill.teachers import TeacherRule
from fedzero.distill.token_distiller import TokenDistiller
from fedzero.distill.tokens import check_one_tokenizer, leave_one_out_token_teachers

ANCHOR_DOMAIN = "domain:"


def token_distill_settings(record: dict) -> DistillSettings:
    """A method's "distill" record ({"weight", "anchors", "batch_size"} and optionally "top_k", "teacher",
    "only_stronger") as token-level DistillSettings (template '{text}': every position scored)."""
    return DistillSettings(level="token", template="{text}", weight=float(record["weight"]),
                           anchors=int(record["anchors"]), batch_size=int(record["batch_size"]),
                           top_k=int(record.get("top_k", 16)), teacher=record.get("teacher", "mean"),
                           only_stronger=record.get("only_stronger", False))


def token_anchor_texts(source: str, ctx, count: int, where: str) -> list[dict]:
    """[{"uid", "text"}] of anchor_source "domain:<name>" for this run (ctx: RunContext of an LM run,
    whose corpus and max_chars the runner sets); a ValueError naming `where` otherwise."""
    from fedzero.bench.lm_data import domain_anchor_texts

    if not (isinstance(source, str) and source.startswith(ANCHOR_DOMAIN) and source[len(ANCHOR_DOMAIN):]):
        raise ValueError(f"{where}: token-level distill.anchor_source must be '{ANCHOR_DOMAIN}<name>' (a fortunes "
                         f"domain no client holds), got {source!r}")
    if not getattr(ctx, "corpus", None):
        raise ValueError(f"{where}: distill.anchor_source {source!r} needs the LM corpus (RunContext.corpus)")
    try:
        return domain_anchor_texts(ctx.corpus, source[len(ANCHOR_DOMAIN):], count, clients=ctx.clients,
                                   seed=ctx.split.seed, max_chars=ctx.max_chars)
    except ValueError as err:
        raise ValueError(f"{where}, setting {ctx.setting!r}: distill.anchor_source: {err}") from None


def make_token_distiller(settings: DistillSettings, tokenizer, *, max_length: int, seed: int,
                         anchors: list[dict]) -> TokenDistiller:
    """A client's TokenDistiller on these anchors (token_anchor_texts)."""
    return settings.make_distiller(tokenizer, max_length=max_length, seed=seed, texts=[a["text"] for a in anchors])


def exchange_token_predictions(clients: list, records: list[dict], rule: TeacherRule | None = None) -> dict:
    """Token-level distillation's round in one process (the bench's counterpart of the store's
    publish_token_teachers): each client (a LocalClient with a TokenDistiller) sends its top-k rows and,
    for a rule that needs it, its loss on its own val examples (recorded in the round as "val_loss");
    each receives its leave-one-out teacher. Clients of different tokenizers are refused, naming them.
    Returns {"upload": [bytes per client], "download": [bytes per client]}: ids + probabilities, 4 + 4
    bytes per kept token (a teacher is as wide as the union of the others' supports). Predicting and
    the val loss count in the client's training seconds (they are its own work)."""
    check_one_tokenizer({c.client_id: c.distiller.tokenizer for c in clients})
    predictions, val_losses = {}, {}
    for client, rec in zip(clients, records):
        t0 = time.time()
        predictions[client.client_id] = client.distiller.predict(client.handle.model)
        if rule is not None and rule.needs_quality:
            val_losses[client.client_id] = rec["rounds"][-1]["val_loss"] = client.evaluate()
        rec["train_seconds"] = round(rec["train_seconds"] + time.time() - t0, 3)
    teachers = leave_one_out_token_teachers(predictions, {c.client_id: c.num_samples for c in clients}, rule,
                                            val_losses or None)
    for client in clients:
        client.distiller.set_teacher(teachers.get(client.client_id))
    return {"upload": [TokenDistiller.payload_bytes(predictions[c.client_id]) for c in clients],
            "download": [TokenDistiller.payload_bytes(teachers[c.client_id]) if c.client_id in teachers else 0
                         for c in clients]}
