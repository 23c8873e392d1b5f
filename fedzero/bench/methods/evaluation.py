"""Evaluation in the bench's runs: label scores and view metrics (classification), held-out NLL
(the LM task, lm_score), the frozen backbones' zero-shot scores (every method's round 0), and the
per-round evaluation of a run's clients."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedzero.backbones import load_backbone
from fedzero.data import LABELS
from fedzero.evaluate import classification_metrics, label_scores

from ..data import Split
from ..lm_data import LMSplit
from ..lm_score import score_records
from ..stats import decode_lm_scores, encode_lm_scores, encode_scores, lm_view_metrics

if TYPE_CHECKING:
    from .context import RunContext


def true_labels(records: list[dict], label_map: dict[str, str] | None = None) -> np.ndarray:
    """Class indices of the records' labels, read through a client's label_map (data.py) if it has one."""
    label_map = label_map or {}
    return np.array([LABELS.index(label_map.get(r["label"], r["label"])) for r in records])


def score_test_sets(model, tokenizer, split: Split, max_length: int, batch_size: int,
                    limit: int | None = None) -> dict[str, np.ndarray]:
    """{topic: [N, C] label scores} on every topic's test set (its first `limit` records)."""
    return {t: label_scores(model, tokenizer, recs[:limit] if limit is not None else recs, list(LABELS),
                                 max_length=max_length, batch_size=batch_size)
            for t, recs in split.test.items()}


def view_metrics(scores: dict[str, np.ndarray], split: Split, client_id: str) -> dict[str, dict]:
    """{view: {accuracy, macro_f1, label_nll, n}} from per-topic scores (any prefix of each test set),
    against the true labels as the client reads them (its label_map, if any: data.py)."""
    out = {}
    label_map = split.client(client_id).label_map
    for view, topics in split.views(client_id).items():
        s = np.concatenate([scores[t] for t in topics])
        y = np.concatenate([true_labels(split.test[t][: len(scores[t])], label_map) for t in topics])
        out[view] = {**classification_metrics(s, y), "n": int(len(y))}
    return out


def lm_test_scores(model, tokenizer, split: LMSplit, max_length: int, batch_size: int, *,
                   subset: bool = False) -> dict:
    """{domain: lm_score.RecordNLL} on every domain's test set (subset: its per-round eval prefix)."""
    return {d: score_records(model, tokenizer, recs[: split.round_eval_records(d)] if subset else recs,
                             max_length, batch_size)
            for d, recs in split.test.items()}


def lm_metrics(per_domain: dict, split: LMSplit, client_id: str, *, subset: bool = False) -> dict[str, dict]:
    """{view: {nll_per_token, nll_per_byte, tokens, bytes, n}} from per-domain per-record NLL (of the full
    test sets; subset: read on the per-round eval prefix of each)."""
    limit = {d: split.round_eval_records(d) for d in split.domains} if subset else None
    return lm_view_metrics(per_domain, split.views(client_id), limit)


def zero_shot_scores(ctx: RunContext) -> dict[str, dict[str, list]]:
    """Every client's frozen backbone, scored once per backbone on the full test sets: round 0 of
    every method (DeMA's out-projector and LoRA's B start at zero, so every method starts exactly
    here). Returns {client id: {topic: [N, C] scores as lists}}; for the LM task {client id:
    stats.encode_lm_scores of its per-record NLL}."""
    per_backbone = {}
    for name in dict.fromkeys(c["backbone"] for c in ctx.clients):
        model, _ = load_backbone(ctx.backbones[name].spec)
        max_length, batch_size = ctx.train["max_length"], ctx.train.get("eval_batch_size", 32)
        if ctx.lm:
            per_backbone[name] = encode_lm_scores(lm_test_scores(model, ctx.tokenizer(name), ctx.split, max_length,
                                                                 batch_size))
        else:
            scores = score_test_sets(model, ctx.tokenizer(name), ctx.split, max_length, batch_size)
            per_backbone[name] = {t: s.tolist() for t, s in scores.items()}
        del model
    return {c["id"]: per_backbone[c["backbone"]] for c in ctx.clients}


def zero_shot_metrics(ctx: RunContext) -> dict[str, dict]:
    """{client id: final-view metrics} of the frozen backbones (the report's zero-shot row)."""
    if ctx.lm:
        return {cid: lm_metrics(decode_lm_scores(sc), ctx.split, cid) for cid, sc in ctx.zero_shot.items()}
    return {cid: view_metrics({t: np.asarray(s) for t, s in sc.items()}, ctx.split, cid)
            for cid, sc in ctx.zero_shot.items()}


def round_zero(ctx: RunContext, client_id: str) -> dict | None:
    """A client's round-0 eval metrics: its frozen backbone's zero-shot scores on the per-round subset."""
    scores = ctx.zero_shot.get(client_id)
    n = ctx.round_eval_size()
    if scores is None or n == 0:
        return None
    if ctx.lm:
        return lm_metrics(decode_lm_scores(scores), ctx.split, client_id, subset=True)
    return view_metrics({t: np.asarray(s)[:n] for t, s in scores.items()}, ctx.split, client_id)


def is_eval_round(rnd: int, ctx: RunContext) -> bool:
    return rnd == ctx.rounds or (ctx.round_eval_size() > 0 and rnd % ctx.eval_every == 0)


def evaluate_round(rnd: int, ctx: RunContext, models: list, records: list[dict]) -> None:
    """Score the per-round eval subset (a prefix of each test set); at the last round, the full test
    sets (the subset's metrics are then read off the same scores)."""
    if not is_eval_round(rnd, ctx):
        return
    if ctx.lm:
        return _evaluate_round_lm(rnd, ctx, models, records)
    final = rnd == ctx.rounds
    n = ctx.split.round_eval_per_topic
    for (model, tok), rec in zip(models, records):
        scores = score_test_sets(model, tok, ctx.split, ctx.train["max_length"], ctx.train.get("eval_batch_size", 32),
                                 None if final else n)
        if n > 0:
            rec["rounds"][-1]["eval"] = view_metrics({t: s[:n] for t, s in scores.items()}, ctx.split, rec["id"])
        if final:
            rec["final"] = view_metrics(scores, ctx.split, rec["id"])
            rec["test_scores"] = encode_scores(scores)


def _evaluate_round_lm(rnd: int, ctx: RunContext, models: list, records: list[dict]) -> None:
    """The LM task's evaluate_round: held-out NLL of the eval prefix, or at the last round of the
    full test sets, whose per-record NLL is stored (client["test_nll"])."""
    final = rnd == ctx.rounds
    subset = ctx.round_eval_size() > 0
    for (model, tok), rec in zip(models, records):
        scores = lm_test_scores(model, tok, ctx.split, ctx.train["max_length"], ctx.train.get("eval_batch_size", 32),
                                subset=not final)
        if subset:
            rec["rounds"][-1]["eval"] = lm_metrics(scores, ctx.split, rec["id"], subset=True)
        if final:
            rec["final"] = lm_metrics(scores, ctx.split, rec["id"])
            rec["test_nll"] = encode_lm_scores(scores)


def headline(lm: bool, metrics: dict | None) -> str:
    """The progress line's number: global accuracy, or global NLL per token for the LM task."""
    key, label, digits = ("nll_per_token", "nll/tok", 3) if lm else ("accuracy", "acc", 2)
    value = (metrics or {}).get("global", {}).get(key)
    return "" if value is None else f" {label} {value:.{digits}f}"

