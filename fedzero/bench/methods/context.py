"""What every runner shares: the run context of one (setting, seed), `run_method` (one run of one
method, its record completed with what every run records), and the per-client record of a run."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from fedzero.backbones.recipes import Backbone
from fedzero.client import TrainSettings
from fedzero.data import LABELS, load_tokenizer

from ..data import Split
from ..lm_data import LMSplit
from ..stats import encode_lm_records, encode_records, label_counts
from .evaluation import headline
from .spec import MethodSpec


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
    corpus: object = field(default_factory=list)   # what the split was cut from: tweet records, or the LM task's Corpus (anchor sources)
    max_chars: int | None = None                    # data.max_chars: prompts' texts are cut to it
    log: object = print
    _tokenizers: dict = field(default_factory=dict)

    def tokenizer(self, backbone: str):
        if backbone not in self._tokenizers:
            b = self.backbones[backbone]
            self._tokenizers[backbone] = load_tokenizer(b.tokenizer_source, b.spec.path)
        return self._tokenizers[backbone]

    def settings(self, spec: MethodSpec) -> TrainSettings:
        """The method's train settings: the suite's, at the method's lr or else the suite's for its runner."""
        return TrainSettings.from_dict({**self.train, "lr": spec.lr if spec.lr is not None else float(self.lr[spec.runner])})

    def client_seed(self, index: int) -> int:
        return self.seed * 1009 + index         # data order: distinct per client, same for every method

    @property
    def lm(self) -> bool:
        return isinstance(self.split, LMSplit)

    def round_eval_size(self) -> int:
        """Per-round eval subset per topic (records) or, for the LM task, per domain (documents); 0: none."""
        return self.split.round_eval_docs if self.lm else self.split.round_eval_per_topic


def run_method(spec: MethodSpec, ctx: RunContext) -> dict:
    """One run: the method's runner from its training seed, then the fields every run record has."""
    started = time.time()
    seed = spec.training_seed(ctx.seed)
    torch.manual_seed(seed)
    result = spec.run(dataclasses.replace(ctx, seed=seed))
    result.update({"setting": ctx.setting, "method": spec.name, "seed": ctx.seed, "spec": spec.raw,
                   "rounds": ctx.rounds, "wall_seconds": round(time.time() - started, 1),
                   "test_records": encode_lm_records(ctx.split.test) if ctx.lm
                   else encode_records(ctx.split.test, list(LABELS))})
    return result


def client_record(c: dict, fp: str, n_train: int, trainable: int, ctx: RunContext) -> dict:
    """A client's run record before training: its data, trainable parameters and an empty budget."""
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


def record_training(rec: dict, rnd: int, loss: float, seconds: float, steps: int, total_steps: int) -> None:
    """One round's training of one client: its loss and time per step, and the client's running budget
    (steps taken so far by its optimizer; seconds in train_round, plus, with distillation, in
    predicting the anchors: the client-side compute a method costs, evaluation aside)."""
    rec["rounds"].append({"round": rnd, "train_loss": loss, "seconds_per_step": seconds / steps})
    rec["train_steps"] = total_steps
    rec["train_seconds"] = round(rec["train_seconds"] + seconds, 3)



def send_predictions(clients: list, records: list[dict], rule=None) -> tuple[dict, dict | None]:
    """What each client (a LocalClient with a distiller, label or token level) sends in distillation's
    round: its anchor predictions and, for a teacher rule that needs it, its loss on its own val
    examples, recorded in its round as "val_loss". Predicting and the val loss count in the client's
    training seconds: they are the method's own client work. Returns ({client: predictions},
    {client: val loss} or None)."""
    predictions, val_losses = {}, {}
    for client, rec in zip(clients, records):
        t0 = time.time()
        predictions[client.client_id] = client.distiller.predict(client.handle.model)
        if rule is not None and rule.needs_quality:
            val_losses[client.client_id] = rec["rounds"][-1]["val_loss"] = client.evaluate()
        rec["train_seconds"] = round(rec["train_seconds"] + time.time() - t0, 3)
    return predictions, val_losses or None


def log_round(ctx: RunContext, method: str, rnd: int, records: list[dict]) -> None:
    """The progress line of a round: per client its loss, time per step and headline metric."""
    parts = []
    for rec in records:
        r = rec["rounds"][-1]
        parts.append(f"{rec['id']} loss {r['train_loss']:.3f} {r['seconds_per_step']:.2f} s/step"
                     + headline(ctx.lm, r.get("eval")))
    ctx.log(f"[bench]   {ctx.setting} / {method} / seed {ctx.seed} round {rnd}/{ctx.rounds}: " + "; ".join(parts))
