"""One federation run per (setting, method, seed): every method's round loop, in one process.

A method is a dict from the suite (see suites.py), run by one of two runners:

    {"name": "dema-cmga", "runner": "dema", "strategy": "cmga", "strategy_options": {...},
     "dema": {DeMAConfig fields}}
        DeMA adapters on every client (fedzero.client.LocalClient); strategy "local" (no
        federation), or any fedzero.strategies name ("fedavg", "cmga"), aggregating the shared
        state with block_of = shared_block (one block per depth slot), group = backbone.
    {"name": "fedit", "runner": "lora", "strategy": "fedit", "rank": 16}
        PEFT LoRA on every client (fedzero.baselines.LoRAClient); strategy any
        fedzero.baselines name ("local", "fedit", "hetlora", "flora", "flexlora"), aggregated
        within each same-backbone group (a client alone on its backbone trains alone and sends
        nothing). "rank": an int for every client, or "client" for each client's own `rank`
        from the setting (heterogeneous budgets).

Common optional fields: "lr" (overrides the suite's lr for the runner), "description".
DeMA only: "distill": {"weight", "anchors", "batch_size"} adds output distillation on the first
`anchors` public anchor texts framed as task prompts (fedzero.distill), on top of the
weight strategy (which may be "local": then only anchor predictions travel). Its optional
"anchor_source": "topic:<name>" takes the anchors from that corpus topic in place of the bundled
public texts: in-domain but unlabelled, a topic no client of the setting holds (refused otherwise),
disjoint from every train/val/test record (data.topic_anchor_texts); the result's "distill_anchors"
names them (uids). Without it the method runs exactly as before.
The dema dict is passed to DeMAConfig.from_dict as is, so new DeMA options become suite entries
without touching this file (the run seed is DeMAConfig.seed unless the dict sets it).

Every run starts from fresh backbones, trains `rounds` × `local_steps` steps per client with the
same data order and lr schedule for every method, and records per client and round: train loss,
seconds per step and (every `eval_every` rounds and at the end) label-scoring metrics on the
per-round eval subset; at the end, metrics on the full test sets per view; bytes sent and received;
and the first-round cosine between clients' updates (all clients start that round from the same
state, so it is the clean alignment signal, method.md). Per client also: its train label counts,
optimizer steps and training seconds (the budget), and the label scores of every final test record
(the run's "test_records" name them): the report's prior-only control and bootstrap intervals are
computed from these after the fact (fedzero.bench.stats, which defines the format). A client with a
"label_map" (data.py: conflicting objectives) is scored against its mapped labels; its record names
the map, and its train label counts and label scores are in its own labels.

A CMGA run also records, per round, how often and how much CMGA's aggregate differs from FedAvg's
of the same updates ("cmga_effect", see `cmga_effect`): where CMGA has nothing to resolve, the two
methods train identically, and this says so.

The LM task (a suite with task "lm"; ctx.split is then a fedzero.bench.lm_data.LMSplit): clients
train on their domains' text records with the same runners, unchanged (LM loss on every token).
Evaluation is held-out NLL instead of label scoring, from lm_data.score_records (forward only): per
client, every domain's test records at the final round (stored per record: NLL, tokens, bytes, for
the report's bootstrap), and the first round_eval_docs documents of each domain at the eval rounds
(the curves); views own / unseen / global as for topics, metrics NLL per token and per byte (ratios
of sums over a view's records). Distillation exchanges label predictions, so it is classification
only: an LM suite refuses it.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fedzero.adapters.dema import DeMAConfig, inject_dema, shared_block
from fedzero.backbones import load_backbone
from fedzero.backbones.recipes import Backbone
from fedzero.baselines import LORA_STRATEGIES, make_lora_strategy, same_backbone_groups
from fedzero.client import LocalClient, TrainSettings
from fedzero.data import LABELS, PROMPT_TEMPLATE, build_examples, collate, load_tokenizer
from fedzero.diagnostics import gate_entropy, update_diagnostics
from fedzero.distill.settings import DistillSettings
from fedzero.distill.teachers import leave_one_out_teachers
from fedzero.evaluate import classification_metrics, label_scores
from fedzero.simulate import initial_global_state
from fedzero.strategies import STRATEGIES, ClientUpdate, FedAvg, make_strategy

from .data import Split, topic_anchor_texts
from .lm_data import LMSplit, score_records
from .stats import (decode_lm_scores, encode_lm_records, encode_lm_scores, encode_records, encode_scores,
                    label_counts, lm_view_metrics)

METHOD_FIELDS = {"name", "runner", "strategy", "strategy_options", "dema", "distill", "rank", "lr", "replica",
                 "description"}
# A method's "distill" fields: DistillSettings' own, with its defaults (labels and template are the task's)
DISTILL_FIELDS = {f.name: f.default for f in dataclasses.fields(DistillSettings)
                  if f.name in ("weight", "anchors", "batch_size")}
# ... and optional ones without a default: in a run's "distill" only when its method sets them, so a method
# without them has the record (and, runs being keyed by their method dicts, the runs) it had before they existed
DISTILL_OPTIONS = {"anchor_source"}
ANCHOR_TOPIC = "topic:"           # anchor_source "topic:<name>": the anchors are texts of that corpus topic


@dataclass
class RunContext:
    """Everything a runner needs that is the same for every method of one (setting, seed)."""

    setting: str
    seed: int
    clients: list[dict]                       # [{"id", "backbone", "topics" (LM: "domains"), "rank"?}]
    backbones: dict[str, Backbone]
    split: Split | LMSplit                    # an LMSplit makes this an LM-task run
    rounds: int
    train: dict                               # TrainSettings fields (without lr)
    lr: dict                                  # {"dema": float, "lora": float}
    eval_every: int = 1
    zero_shot: dict = field(default_factory=dict)   # client id -> {topic: [N, C] scores} on the test sets
    corpus: list[dict] = field(default_factory=list)   # the records the split was cut from (distill.anchor_source)
    max_chars: int | None = None                    # data.max_chars: prompts' texts are cut to it
    log: object = print
    _tokenizers: dict = field(default_factory=dict)

    def tokenizer(self, backbone: str):
        if backbone not in self._tokenizers:
            b = self.backbones[backbone]
            self._tokenizers[backbone] = load_tokenizer(b.tokenizer_source, b.spec.path)
        return self._tokenizers[backbone]

    def settings(self, runner: str, method: dict) -> TrainSettings:
        return TrainSettings.from_dict({**self.train, "lr": float(method.get("lr", self.lr[runner]))})

    def client_seed(self, index: int) -> int:
        return self.seed * 1009 + index         # data order: distinct per client, same for every method

    @property
    def lm(self) -> bool:
        return isinstance(self.split, LMSplit)

    def round_eval_size(self) -> int:
        """Per-round eval subset per topic (records) or, for the LM task, per domain (documents); 0: none."""
        return self.split.round_eval_docs if self.lm else self.split.round_eval_per_topic


def check_method(method: dict) -> None:
    """Refuse a malformed method spec before any compute is spent on it."""
    name = method.get("name")
    unknown = sorted(set(method) - METHOD_FIELDS)
    if unknown:
        raise ValueError(f"method {name!r}: unknown field(s) {unknown}; allowed {sorted(METHOD_FIELDS)}")
    replica = method.get("replica", 0)
    if not (isinstance(replica, int) and not isinstance(replica, bool) and replica >= 0):
        raise ValueError(f"method {name!r}: replica must be an integer >= 1 (0: not a replica), got {replica!r}")
    runner = method.get("runner")
    if runner not in RUNNERS:
        raise ValueError(f"method {name!r}: runner must be one of {sorted(RUNNERS)}, got {runner!r}")
    strategy = method.get("strategy")
    valid = ["local", *STRATEGIES] if runner == "dema" else list(LORA_STRATEGIES)
    if strategy not in valid:
        raise ValueError(f"method {name!r}: strategy must be one of {valid} for runner {runner!r}, got {strategy!r}")
    if method.get("distill") is not None:
        allowed = set(DISTILL_FIELDS) | DISTILL_OPTIONS
        bad = sorted(set(method["distill"]) - allowed) if isinstance(method["distill"], dict) else ["?"]
        if runner != "dema" or bad:
            raise ValueError(f"method {name!r}: 'distill' is a DeMA option with fields {sorted(allowed)}")
        d = {**DISTILL_FIELDS, **method["distill"]}
        if not (d["weight"] > 0 and int(d["anchors"]) >= 1 and int(d["batch_size"]) >= 1):
            raise ValueError(f"method {name!r}: distill needs weight > 0, anchors >= 1, batch_size >= 1")
        source = d.get("anchor_source")
        if source is not None and not (isinstance(source, str) and source.startswith(ANCHOR_TOPIC)
                                       and source[len(ANCHOR_TOPIC):]):
            raise ValueError(f"method {name!r}: distill.anchor_source must be '{ANCHOR_TOPIC}<name>' (a corpus topic "
                             f"no client holds), got {source!r}")
    if runner == "dema":
        DeMAConfig.from_dict({"seed": 0, **(method.get("dema") or {})})
        if strategy == "local" and method.get("strategy_options"):
            raise ValueError(f"method {name!r}: strategy 'local' takes no options")
    else:
        if method.get("dema"):
            raise ValueError(f"method {name!r}: a LoRA method takes no 'dema' settings")
        rank = method.get("rank", 16)
        if rank != "client" and not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"method {name!r}: rank must be a positive int or 'client', got {rank!r}")
        make_lora_strategy(strategy, **(method.get("strategy_options") or {}))


def training_seed(seed: int, method: dict) -> int:
    """The seed a run's randomness comes from (adapter init, data order, strategy): the run's seed,
    or for a replica (a method's "replica": k) another one, so that a method against its own
    replica measures what training randomness alone moves: the instrument's noise floor. The data
    split, and so the test records, stay those of the run's seed."""
    return seed + 1_000_003 * int(method.get("replica", 0))


def run_method(method: dict, ctx: RunContext) -> dict:
    check_method(method)
    started = time.time()
    seed = training_seed(ctx.seed, method)
    torch.manual_seed(seed)
    result = RUNNERS[method["runner"]](method, dataclasses.replace(ctx, seed=seed))
    result.update({"setting": ctx.setting, "method": method["name"], "seed": ctx.seed, "spec": method,
                   "rounds": ctx.rounds, "wall_seconds": round(time.time() - started, 1),
                   "test_records": encode_lm_records(ctx.split.test) if ctx.lm
                   else encode_records(ctx.split.test, list(LABELS))})
    return result


# -- evaluation ------------------------------------------------------------------------------------

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
    """{domain: lm_data.RecordNLL} on every domain's test set (subset: its per-round eval prefix)."""
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


def _round_zero(ctx: RunContext, client_id: str) -> dict | None:
    scores = ctx.zero_shot.get(client_id)
    n = ctx.round_eval_size()
    if scores is None or n == 0:
        return None
    if ctx.lm:
        return lm_metrics(decode_lm_scores(scores), ctx.split, client_id, subset=True)
    return view_metrics({t: np.asarray(s)[:n] for t, s in scores.items()}, ctx.split, client_id)


def _eval_round(rnd: int, ctx: RunContext) -> bool:
    return rnd == ctx.rounds or (ctx.round_eval_size() > 0 and rnd % ctx.eval_every == 0)


# -- update geometry -------------------------------------------------------------------------------

def flat(state: dict[str, torch.Tensor], keys: list[str] | None = None) -> torch.Tensor:
    keys = list(state) if keys is None else keys
    return torch.cat([state[k].detach().reshape(-1).to(torch.float64) for k in keys])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = float(a.norm()), float(b.norm())
    return None if na == 0 or nb == 0 else float(a @ b) / (na * nb)


def pairwise_cosines(updates: dict[str, dict[str, torch.Tensor]], *, common: bool = False) -> list[dict]:
    """Cosine between every two clients' updates. common=False: only pairs with the same keys and
    shapes (LoRA: same backbone and rank); True: over the keys both hold with equal shapes (DeMA:
    the experts and gates always, shape-matched projectors only between clients of one width)."""
    pairs = []
    for (a, ua), (b, ub) in itertools.combinations(updates.items(), 2):
        if common:
            keys = [k for k in ua if k in ub and ua[k].shape == ub[k].shape]
        elif list(ua) == list(ub) and all(ua[k].shape == ub[k].shape for k in ua):
            keys = list(ua)
        else:
            keys = []
        c = cosine(flat(ua, keys), flat(ub, keys)) if keys else None
        if c is not None:
            pairs.append({"a": a, "b": b, "cos": c})
    return pairs


def first_round_cosine(updates: dict[str, dict[str, torch.Tensor]], block_of=None) -> dict:
    """Mean pairwise cosine; with `block_of` (DeMA), over common keys and also per block."""
    pairs = pairwise_cosines(updates, common=block_of is not None)
    out = {"mean": float(np.mean([p["cos"] for p in pairs])) if pairs else None, "pairs": pairs}
    if block_of is not None and updates:
        per_block = {}
        blocks = list(dict.fromkeys(block_of(k) for u in updates.values() for k in u))
        for block in blocks:
            sub = {cid: {k: v for k, v in u.items() if block_of(k) == block} for cid, u in updates.items()}
            cs = [p["cos"] for p in pairwise_cosines({c: u for c, u in sub.items() if u}, common=True)]
            per_block[block] = float(np.mean(cs)) if cs else None
        out["per_block"] = per_block
    return out


def lora_dw_factors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                    scaling: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per LoRA module, the change of its weight update as a low-rank product U V:
    s (B1 A1 - B0 A0) = [s B1, -s B0] [A1; A0], U [out, 2r], V [2r, in] (never formed out x in)."""
    from fedzero.baselines import lora_modules

    b, a = lora_modules(before), lora_modules(after)
    return {m: (torch.cat([scaling * a[m][1], -scaling * b[m][1]], dim=1).double(),
                torch.cat([a[m][0], b[m][0]], dim=0).double()) for m in a}


def dw_cosines(changes: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> list[dict]:
    """Cosine of the weight-update changes <dW_a, dW_b>_F over all modules, for clients with the same
    modules and weight shapes, whatever their LoRA ranks: <U_a V_a, U_b V_b> = Σ (U_aᵀ U_b) ⊙ (V_a V_bᵀ)."""
    def inner(x, y):
        return sum(float(((x[m][0].T @ y[m][0]) * (x[m][1] @ y[m][1].T)).sum()) for m in x)

    pairs = []
    for (a, ca), (b, cb) in itertools.combinations(changes.items(), 2):
        if list(ca) != list(cb) or any((ca[m][0].shape[0], ca[m][1].shape[1]) != (cb[m][0].shape[0], cb[m][1].shape[1])
                                       for m in ca):
            continue
        na, nb = inner(ca, ca), inner(cb, cb)
        if na > 0 and nb > 0:
            pairs.append({"a": a, "b": b, "cos": inner(ca, cb) / (na * nb) ** 0.5})
    return pairs


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# -- CMGA's effect on the aggregate ------------------------------------------------------------------

class _FedAvgWithGram(FedAvg):
    """FedAvg that also returns each block's Gram in its stats: CMGA's and FedAvg's aggregates are both
    Σ_k β_k Δ_k over the same updates, so their difference is measured from β and the Gram alone."""

    def coefficients(self, gram, weights, groups, *, block, round):
        beta, stats = super().coefficients(gram, weights, groups, block=block, round=round)
        return beta, {**stats, "gram": gram}


def block_effect(gram: np.ndarray, beta: np.ndarray, beta_fedavg: np.ndarray) -> tuple[bool, float | None]:
    """(changed, relative difference) of one block's aggregate Σ_k β_k Δ_k against FedAvg's Σ_k β^f_k Δ_k.

    changed: β differs from FedAvg's at all. CMGA's β is FedAvg's bit for bit when it neither projects
    nor harmonises (math.cmga_coefficients; tests/test_strategies.py), so this is exact, not a threshold.
    relative difference ‖Σ(β − β^f)Δ‖ / ‖Σ β^f Δ‖ from the Gram (squared norms dᵀGd); 0 when unchanged,
    None when FedAvg's aggregate is zero but CMGA's is not (no scale to compare against).
    """
    beta, beta_fedavg = np.asarray(beta, dtype=np.float64), np.asarray(beta_fedavg, dtype=np.float64)
    if np.array_equal(beta, beta_fedavg):
        return False, 0.0
    d = beta - beta_fedavg
    diff, ref = float(max(d @ gram @ d, 0.0)) ** 0.5, float(max(beta_fedavg @ gram @ beta_fedavg, 0.0)) ** 0.5
    if ref == 0:
        return True, 0.0 if diff == 0 else None
    return True, diff / ref


def _sig(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")      # run files stay compact


def cmga_effect(rnd: int, global_state: dict[str, torch.Tensor], updates: list[ClientUpdate], blocks: dict,
                block_of=shared_block) -> dict:
    """One round's record of what CMGA did: `blocks` is CMGA's aggregate(...)["blocks"] for `updates`
    in round `rnd` (0-based, as aggregate takes it; recorded 1-based, as the run's other per-round
    lists); FedAvg aggregates the same updates with the same weights (one more Gram per block).

    Returns {"round", "changed_blocks", "total_blocks" (the blocks aggregated, i.e. not skipped),
    "rel_diff_mean", "rel_diff_max" (over those blocks, unchanged ones counting 0; None if none is
    defined), "conflicts", "pairs" (CMGA's own stats summed over blocks: group pairs whose means have a
    negative inner product before alignment, and all group pairs), "cos_before_mean" (mean over blocks
    of CMGA's mean pairwise cosine of group means; None with one group), "rel_diff" {block: value}}."""
    _, reference = _FedAvgWithGram().aggregate(global_state, updates, round=rnd, block_of=block_of)
    per_block = {}
    for block, ref in reference["blocks"].items():
        if not ref.get("skipped"):
            per_block[block] = block_effect(ref["gram"], blocks[block]["beta"], ref["beta"])
    rel = [r for _, r in per_block.values() if r is not None]
    stats = [blocks[b] for b in per_block]
    cos = [s["mean_cos_before"] for s in stats if s.get("mean_cos_before") is not None]
    return {"round": rnd + 1, "changed_blocks": sum(changed for changed, _ in per_block.values()),
            "total_blocks": len(per_block), "rel_diff_mean": _sig(float(np.mean(rel))) if rel else None,
            "rel_diff_max": _sig(max(rel)) if rel else None,
            "conflicts": sum(int(s.get("n_conflicts", 0)) for s in stats),
            "pairs": sum(int(s.get("n_pairs", 0)) for s in stats),
            "cos_before_mean": _sig(float(np.mean(cos))) if cos else None,
            "rel_diff": {b: _sig(r) for b, (_, r) in per_block.items()}}


# -- runners ----------------------------------------------------------------------------------------

def _client_record(c: dict, fp: str, n_train: int, trainable: int, ctx: RunContext) -> dict:
    train = ctx.split.client(c["id"]).train
    if ctx.lm:      # no labels: the train set's size in characters in place of its label counts
        data = {"domains": list(c["domains"]), "fingerprint": fp, "train_examples": n_train,
                "train_chars": sum(len(r["text"]) for r in train)}
    else:       # train_labels and test_scores are in the client's own labels (its label_map, if any)
        data = {"topics": list(c["topics"]), "fingerprint": fp, "train_examples": n_train,
                "train_labels": label_counts(train, list(LABELS)),
                **({"label_map": dict(c["label_map"])} if c.get("label_map") else {})}
    return {"id": c["id"], "backbone": c["backbone"], **data,
            "trainable_params": trainable, "train_steps": 0, "train_seconds": 0.0, "rounds": [], "final": None}


def _record_training(rec: dict, rnd: int, loss: float, seconds: float, steps: int, total_steps: int) -> None:
    """One round's training of one client: its loss and time per step, and the client's running budget
    (steps taken so far by its optimizer; seconds in train_round, plus, with distillation, in
    predicting the anchors: the client-side compute a method costs, evaluation aside)."""
    rec["rounds"].append({"round": rnd, "train_loss": loss, "seconds_per_step": seconds / steps})
    rec["train_steps"] = total_steps
    rec["train_seconds"] = round(rec["train_seconds"] + seconds, 3)


def run_dema(method: dict, ctx: RunContext) -> dict:
    config = DeMAConfig.from_dict({"seed": ctx.seed, **(method.get("dema") or {})})
    settings = ctx.settings("dema", method)
    federated = method["strategy"] != "local"
    strategy = (make_strategy(method["strategy"], seed=ctx.seed, **(method.get("strategy_options") or {}))
                if federated else None)

    distill = {**DISTILL_FIELDS, **method["distill"]} if method.get("distill") is not None else None
    if distill and ctx.lm:
        raise ValueError(f"method {method['name']!r}: distillation exchanges label predictions; the LM task has none")
    distill_settings = (DistillSettings(labels=list(LABELS), template=PROMPT_TEMPLATE, weight=float(distill["weight"]),
                                        anchors=int(distill["anchors"]), batch_size=int(distill["batch_size"]))
                        if distill else None)
    anchors = distill_anchors(method, distill, ctx) if distill and distill.get("anchor_source") else None

    clients, records = [], []
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
        client._probe = train[:8]           # the gate-entropy probe at the end: the client's own examples
        clients.append(client)
        rec = _client_record(c, fp, client.num_samples, sum(p.numel() for p in handle.trainable_parameters()), ctx)
        rec["shared_params"] = handle.num_shared_parameters()
        rec["rounds"].append({"round": 0, "eval": _round_zero(ctx, c["id"])})
        records.append(rec)

    # Round 0's global state: the union of the clients' seeded initial shared states (identical where
    # they overlap; with shape-matched sharing each width adds its own projector bank).
    global_state = initial_global_state(clients)
    states = [c.handle.shared_state_dict() for c in clients]   # local-only: each client's own shared state
    comm, aggregation, diagnostics, first, effect = [], [], [], None, []
    for rnd in range(ctx.rounds):
        updates, deltas = [], {}
        for k, client in enumerate(clients):
            start = global_state if federated else states[k]
            t0 = time.time()
            delta, metrics = client.train_round(start)           # delta: the client's own shared keys
            seconds = time.time() - t0
            deltas[client.client_id] = delta
            updates.append(ClientUpdate(client.client_id, delta, client.num_samples, client.fingerprint,
                                        client.handle.slot_use()))
            if not federated:
                states[k] = client.handle.shared_state_dict()
            _record_training(records[k], rnd + 1, metrics["train_loss"], seconds, settings.local_steps, client.step)
        distill_bytes = [0] * len(clients)
        if distill:     # each sends its anchor predictions and receives the others' mean (N x C float32)
            predictions = {}
            for client, rec in zip(clients, records):
                t0 = time.time()
                predictions[client.client_id] = client.distiller.predict(client.handle.model)
                rec["train_seconds"] = round(rec["train_seconds"] + time.time() - t0, 3)   # the method's own client work
            teachers = leave_one_out_teachers(predictions, {c.client_id: c.num_samples for c in clients})
            for client in clients:
                client.distiller.set_teacher(teachers.get(client.client_id))
            distill_bytes = [predictions[c.client_id].size * 4 for c in clients]
        if rnd == 0:
            first = first_round_cosine(deltas, shared_block)
        diagnostics.append(update_diagnostics(updates, shared_block))    # per block: cosines, norms
        if federated:
            round_start = global_state
            global_state, agg = strategy.aggregate(round_start, updates, round=rnd, block_of=shared_block)
            if method["strategy"] == "cmga":     # on the side: FedAvg's aggregate is never applied
                effect.append(cmga_effect(rnd, round_start, updates, agg["blocks"]))
            for client in clients:
                client.handle.load_shared_state_dict(global_state)
            aggregation.append({block: {k: v for k, v in stats.items() if k not in ("beta", "group_norms")}
                                for block, stats in agg["blocks"].items()})
            sizes = [_nbytes(deltas[c.client_id]) + d for c, d in zip(clients, distill_bytes)]   # own keys both ways
            comm.append({"round": rnd + 1, "upload_bytes": sizes, "download_bytes": list(sizes)})
        else:
            comm.append({"round": rnd + 1, "upload_bytes": list(distill_bytes), "download_bytes": list(distill_bytes)})
        _evaluate_round(rnd + 1, ctx, [(c.handle.model, ctx.tokenizer(cc["backbone"])) for c, cc in zip(clients, ctx.clients)],
                        records)
        _log_round(ctx, method, rnd + 1, records)
    for client, rec in zip(clients, records):
        rec["gate_entropy"] = gate_entropy(client.handle, collate(client._probe, client.pad_id))
    out = {"runner": "dema", "strategy": method["strategy"], "dema": config.to_dict(), "distill": distill, "clients": records,
           "comm": comm, "first_round_cosine": first, "aggregation": aggregation, "diagnostics": diagnostics}
    if anchors:
        out["distill_anchors"] = {"source": distill["anchor_source"], "uids": [a["uid"] for a in anchors]}
    if method["strategy"] == "cmga":        # only CMGA runs carry it: every other run file stays as it was
        out["cmga_effect"] = effect
    return out


def distill_anchors(method: dict, distill: dict, ctx: RunContext) -> list[dict]:
    """The anchors of a method's distill.anchor_source "topic:<name>": that topic's texts (data.topic_anchor_texts:
    no client of the setting may hold it), chosen by the split's seed, so a method and its replica (another
    training seed) distil on the same anchors, as they are tested on the same records."""
    topic = distill["anchor_source"][len(ANCHOR_TOPIC):]
    if not ctx.corpus:
        raise ValueError(f"method {method['name']!r}: distill.anchor_source {distill['anchor_source']!r} needs the "
                         "corpus the split was cut from (RunContext.corpus)")
    try:
        return topic_anchor_texts(ctx.corpus, topic, int(distill["anchors"]), clients=ctx.clients,
                                  seed=ctx.split.seed, max_chars=ctx.max_chars)
    except ValueError as err:
        raise ValueError(f"method {method['name']!r}, setting {ctx.setting!r}: distill.anchor_source: {err}") from None


def run_lora(method: dict, ctx: RunContext) -> dict:
    from fedzero.baselines import LoRAClient, LoRASettings

    settings = ctx.settings("lora", method)
    strategy = make_lora_strategy(method["strategy"], **(method.get("strategy_options") or {}))
    rank = method.get("rank", 16)

    clients, records = [], []
    for i, c in enumerate(ctx.clients):
        r = c.get("rank") if rank == "client" else rank
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"method {method['name']!r}: client {c['id']!r} has no LoRA rank (setting 'rank')")
        model, fp = load_backbone(ctx.backbones[c["backbone"]].spec)
        tok = ctx.tokenizer(c["backbone"])
        train = build_examples(ctx.split.client(c["id"]).train, tok, settings.max_length)
        client = LoRAClient(c["id"], model, f"{c['backbone']}:{fp}", train, [], settings,
                            LoRASettings(rank=r, init_seed=ctx.seed), pad_id=tok.pad_token_id,
                            seed=ctx.client_seed(i), total_rounds=ctx.rounds)
        clients.append(client)
        rec = _client_record(c, fp, client.num_samples, sum(p.numel() for p in client.trainable_parameters()), ctx)
        rec["rank"] = r
        rec["rounds"].append({"round": 0, "eval": _round_zero(ctx, c["id"])})
        records.append(rec)

    groups = same_backbone_groups([c.fingerprint for c in clients])
    comm, first, aggregation = [], None, []
    for rnd in range(ctx.rounds):
        states, deltas, changes = [], {}, {}
        for k, client in enumerate(clients):
            before = client.lora_state()
            t0 = time.time()
            state, metrics = client.train_round(None)
            seconds = time.time() - t0
            states.append(state)
            if rnd == 0:
                deltas[client.client_id] = {key: state[key] - before[key] for key in state}
                changes[client.client_id] = lora_dw_factors(before, state, client.scaling)
            _record_training(records[k], rnd + 1, metrics["train_loss"], seconds, settings.local_steps, client.step)
        if rnd == 0:
            first = first_round_cosine(deltas)       # of the LoRA factors (same rank and backbone only)
            pairs = dw_cosines(changes)               # of the weight updates dW (any ranks, same backbone)
            first["dw_mean"] = float(np.mean([p["cos"] for p in pairs])) if pairs else None
            first["dw_pairs"] = pairs
        up, down = [0] * len(clients), [0] * len(clients)
        round_metrics = {}
        for fp, members in groups.items():
            if len(members) < 2:
                continue            # alone on its backbone: nothing to federate with, nothing sent
            agg = strategy.aggregate([states[k] for k in members], [clients[k].num_samples for k in members],
                                     [clients[k].rank for k in members], rnd,
                                     fingerprints=[clients[k].fingerprint for k in members],
                                     scalings=[clients[k].scaling for k in members])
            for j, k in enumerate(members):
                clients[k].apply(agg, j)
                size = next(iter(states[k].values())).element_size()
                up[k] = int(agg.metrics["upload_params"][j]) * size
                down[k] = int(agg.metrics["download_params"][j]) * size
            round_metrics[fp] = {key: v for key, v in agg.metrics.items() if key not in ("upload_params", "download_params")}
        aggregation.append(round_metrics)
        comm.append({"round": rnd + 1, "upload_bytes": up, "download_bytes": down})
        _evaluate_round(rnd + 1, ctx, [(c.model, ctx.tokenizer(cc["backbone"])) for c, cc in zip(clients, ctx.clients)],
                        records)
        _log_round(ctx, method, rnd + 1, records)
    return {"runner": "lora", "strategy": method["strategy"], "clients": records, "comm": comm,
            "first_round_cosine": first, "aggregation": aggregation,
            "groups": {fp: [clients[k].client_id for k in m] for fp, m in groups.items()}}


def _evaluate_round(rnd: int, ctx: RunContext, models: list, records: list[dict]) -> None:
    """Score the per-round eval subset (a prefix of each test set); at the last round, the full test
    sets (the subset's metrics are then read off the same scores)."""
    if not _eval_round(rnd, ctx):
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
    """The LM task's _evaluate_round: held-out NLL of the eval prefix, or at the last round of the
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


def _log_round(ctx: RunContext, method: dict, rnd: int, records: list[dict]) -> None:
    parts = []
    for rec in records:
        r = rec["rounds"][-1]
        parts.append(f"{rec['id']} loss {r['train_loss']:.3f} {r['seconds_per_step']:.2f} s/step"
                     + headline(ctx.lm, r.get("eval")))
    ctx.log(f"[bench]   {ctx.setting} / {method['name']} / seed {ctx.seed} round {rnd}/{ctx.rounds}: " + "; ".join(parts))


RUNNERS = {"dema": run_dema, "lora": run_lora}
