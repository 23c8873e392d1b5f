"""The aggregator's distillation step through the store: read the round's anchor predictions, drop
unusable ones, write the next round's teachers (fedzero simulate and the MPI aggregator alike)."""

from __future__ import annotations

import torch

from fedzero.distill.teachers import TeacherRule, round_teachers


def check_predictions(probs: torch.Tensor) -> str | None:
    """Why a client's anchor predictions cannot be used (None: they can): rows of finite,
    non-negative probabilities summing to 1. One NaN row would poison every other client's teacher."""
    if probs.dim() != 2 or probs.numel() == 0:
        return f"shape {tuple(probs.shape)} is not [anchors, labels]"
    p = probs.double()
    if not torch.isfinite(p).all() or (p < 0).any():
        return "holds non-finite or negative values"
    if not torch.allclose(p.sum(dim=1), torch.ones(len(p), dtype=p.dtype), atol=1e-3):
        return "rows do not sum to 1"
    return None


def _read_usable(read, rnd: int, num_samples: dict[str, int], rule: TeacherRule, check, quality_of):
    """Each client's round-rnd predictions through read(rnd, client) (None: it sent none), kept when
    check(sent) finds nothing wrong and, where the rule needs one, quality_of(sent) is not None.
    Returns ({client: sent}, {client: reason it was left out}), both in client order."""
    from fedzero.store import StoreError

    found, dropped = {}, {}
    for c in sorted(num_samples):
        try:
            sent = read(rnd, c)
        except StoreError as err:
            dropped[c] = f"unreadable: {err}"
            continue
        if sent is None:
            continue
        reason = check(sent)
        if not reason and rule.needs_quality and quality_of(sent) is None:
            reason = f"sent no quality (its held-out loss), which {rule} needs"
        if reason:
            dropped[c] = reason
        else:
            found[c] = sent
    return found, dropped


def publish_teachers(store, rnd: int, num_samples: dict[str, int], rule: TeacherRule | None = None) -> dict:
    """The aggregator's step (simulator and MPI aggregator alike): the anchor predictions sent with
    round rnd's aggregated updates ({client: num_samples}) become round rnd+1's teachers under `rule`
    (None: the "mean" teacher), written before that round's global, whose publication marks the round
    ready. A client whose predictions cannot be read, are malformed, are shaped unlike the majority's
    (other anchors or labels), or, when the rule needs it, came without a quality (held-out loss) is
    left out, not fatal. Returns {"used": [clients], "dropped": {client: reason}} for the result; a
    rule that needs qualities adds "teacher", "only_stronger", "quality" ({client: held-out loss})
    and "without_teacher" (used clients that got none: under only_stronger, the strongest)."""
    rule = rule or TeacherRule()
    if rule.level == "token":
        return publish_token_teachers(store, rnd, num_samples, rule)
    found, dropped = _read_usable(store.read_anchor_predictions_with_quality, rnd, num_samples, rule,
                                  lambda sent: check_predictions(sent[0]), lambda sent: sent[1])
    predictions = {c: p.numpy() for c, (p, _) in found.items()}
    qualities = {c: quality for c, (_, quality) in found.items()}
    shapes = [p.shape for p in predictions.values()]
    if shapes:
        common = max(set(shapes), key=lambda s: (shapes.count(s), s))
        for c in [c for c, p in predictions.items() if p.shape != common]:
            dropped[c] = f"shape {predictions.pop(c).shape}, the others' is {common} (other anchors or labels)"
    val_losses = {c: qualities[c] for c in predictions} if rule.needs_quality else None
    teachers = round_teachers(predictions, num_samples, rule, val_losses) if predictions else {}
    if teachers:
        store.write_teachers(rnd + 1, teachers)
    else:
        store.clear_teachers(rnd + 1)
    out = {"used": sorted(predictions), "dropped": dropped}
    if rule.needs_quality:
        out.update(teacher=rule.teacher, only_stronger=rule.only_stronger, quality=val_losses,
                   without_teacher=sorted(c for c in predictions if c not in teachers))
    return out


def publish_token_teachers(store, rnd: int, num_samples: dict[str, int], rule: TeacherRule) -> dict:
    """publish_teachers at `distill.level: token` (fedzero.distill.tokens): the sparse next-token
    predictions sent with round rnd's updates become round rnd+1's token teachers. Left out, named with
    the reason in "dropped": unreadable or label-level files, malformed rows, no quality where the rule
    needs one, and predictions over other positions than the majority's (other anchors, template or
    max_length). Clients of different tokenizers are refused (ValueError naming them): their token ids
    do not mean the same. The result also holds "level": "token" and the shared "tokenizer"."""
    from fedzero.distill.tokens import check_one_tokenizer, check_sparse, round_token_teachers

    found, dropped = _read_usable(store.read_token_predictions, rnd, num_samples, rule,
                                  lambda sent: check_sparse(sent["ids"].numpy(), sent["probs"].numpy()),
                                  lambda sent: sent["quality"])
    tokenizer = check_one_tokenizer({c: sent["tokenizer"] for c, sent in found.items()}, f" (round {rnd})")
    digests = [sent["anchors"] for sent in found.values()]
    if digests:
        common = max(set(digests), key=lambda d: (digests.count(d), d))
        for c in [c for c, sent in found.items() if sent["anchors"] != common]:
            found.pop(c)
            dropped[c] = "scored other anchor positions than the others (other anchors, template or max_length)"
    predictions = {c: (sent["ids"].numpy(), sent["probs"].numpy()) for c, sent in found.items()}
    val_losses = {c: found[c]["quality"] for c in found} if rule.needs_quality else None
    teachers = round_token_teachers(predictions, num_samples, rule, val_losses) if predictions else {}
    if teachers:
        store.write_token_teachers(rnd + 1, teachers)
    else:
        store.clear_teachers(rnd + 1)
    out = {"used": sorted(predictions), "dropped": dropped, "level": "token",
           "tokenizer": tokenizer}
    if rule.needs_quality:
        out.update(teacher=rule.teacher, only_stronger=rule.only_stronger, quality=val_losses,
                   without_teacher=sorted(c for c in predictions if c not in teachers))
    return out
