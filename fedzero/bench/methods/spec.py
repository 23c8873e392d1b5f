"""A suite's method dict, parsed once into a typed spec that the runners take.

The dict format (the suite file's, unchanged):

    {"name": "dema-cmga", "runner": "dema", "strategy": "cmga", "strategy_options": {...},
     "dema": {DeMAConfig fields}, "projector_anchors": "topic:<name>" or "domain:<name>",
     "distill": {"weight", "anchors", "batch_size", "anchor_source", "teacher", "only_stronger", "level", "top_k"}}
        DeMA adapters on every client. "strategy": a name of fedzero.strategies ("fedavg", "cmga"),
        or "local" (no aggregation, methods/exchange.py). The dema dict goes to DeMAConfig.from_dict
        as is, so a new DeMA option is a suite entry without touching the bench (the run seed is
        DeMAConfig.seed unless the dict sets it). "distill" adds output distillation (fedzero.distill)
        on the first `anchors` public anchor texts framed as task prompts, on top of the weight
        strategy (with "local", only anchor predictions travel); its optional "anchor_source":
        "topic:<name>" takes the anchors from that corpus topic instead (data.topic_anchor_texts), or
        on the LM task "domain:<name>" from that fortunes domain (lm_data.domain_anchor_texts);
        "teacher" and "only_stronger" are DistillSettings' (quality-weighted teachers: each client
        reports its loss on its own val split); "level": "token" (the LM task) exchanges top-"top_k"
        next-token distributions at every position of the anchors (methods/token_distill.py). "projector_anchors": "topic:<name>" (classification)
        or "domain:<name>" (the LM task: a fortunes domain) gives anchor and canonical projectors
        in-domain public anchors (dema.num_anchors texts of that topic or domain, which no client may
        hold) in place of dema.anchor_file; with a canonical projector the space is fitted across the
        clients on them, and every such run measures the round-0 alignment of the shared space on
        other texts of the same source (dema.py).
    {"name": "fedit", "runner": "lora", "strategy": "fedit", "rank": 16}
        PEFT LoRA on every client; "strategy" a fedzero.baselines name ("local", "fedit", "hetlora",
        "flora", "flexlora"); "rank" an int for every client, or "client" for each client's own
        `rank` from the setting (heterogeneous budgets).

Common optional fields: "lr" (overrides the suite's lr for the runner), "replica" (k >= 1: the
method again with other training randomness, `training_seed`), "description".

A spec keeps the dict as written (`raw`): the run records it as its "spec", and resuming compares it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from fedzero.adapters.dema import DeMAConfig
from fedzero.baselines import LORA_STRATEGIES, make_lora_strategy
from fedzero.distill.settings import DistillSettings

from .exchange import DEMA_STRATEGIES, make_exchange

COMMON_FIELDS = {"name", "runner", "strategy", "strategy_options", "lr", "replica", "description"}
# A method's "distill" fields: DistillSettings' own, with its defaults (labels and template are the task's)
DISTILL_FIELDS = {f.name: f.default for f in dataclasses.fields(DistillSettings)
                  if f.name in ("weight", "anchors", "batch_size")}
# ... and optional ones without a default: in a run's "distill" only when its method sets them, so the run
# records (and resuming, which compares method dicts) of methods that leave them out do not mention them
DISTILL_OPTIONS = {"anchor_source", "teacher", "only_stronger", "level", "top_k"}
ANCHOR_TOPIC = "topic:"           # anchor_source "topic:<name>": the anchors are texts of that corpus topic
ANCHOR_DOMAIN = "domain:"         # projector_anchors "domain:<name>" (LM task): texts of that fortunes domain
CLIENT_RANK = "client"            # a LoRA method's "rank": each client's own rank from the setting
REPLICA_SEED_STRIDE = 1_000_003


@dataclass
class DistillSpec:
    """A DeMA method's output distillation."""

    weight: float
    anchors: int
    batch_size: int
    anchor: tuple[str, str] | None   # ("topic" | "domain", name): in-domain anchors; None: the bundled public texts
    record: dict                     # the run's "distill": the defaults, then the fields as written

    @property
    def anchor_source(self) -> str | None:
        return self.record.get("anchor_source")

    @property
    def level(self) -> str:
        return self.record.get("level", "label")

    def settings(self, labels: list[str], template: str) -> DistillSettings:
        """The clients' DistillSettings: label-level in `labels` framed by `template`; token-level scores
        every position of the anchor texts (template '{text}', no labels)."""
        common = {"weight": self.weight, "anchors": self.anchors, "batch_size": self.batch_size,
                  "teacher": self.record.get("teacher", "mean"), "only_stronger": self.record.get("only_stronger", False)}
        if self.level == "token":
            return DistillSettings(level="token", template="{text}", top_k=self.record.get("top_k", 16), **common)
        return DistillSettings(labels=list(labels), template=template, **common)

    @classmethod
    def parse(cls, distill, where: str) -> DistillSpec:
        allowed = set(DISTILL_FIELDS) | DISTILL_OPTIONS
        bad = sorted(set(distill) - allowed) if isinstance(distill, dict) else ["?"]
        if bad:
            raise ValueError(f"{where}: 'distill' is a DeMA option with fields {sorted(allowed)}, got {bad}")
        record = {**DISTILL_FIELDS, **distill}
        try:
            weight, anchors, batch_size = float(record["weight"]), int(record["anchors"]), int(record["batch_size"])
        except (TypeError, ValueError):
            weight = anchors = batch_size = 0
        if not (weight > 0 and anchors >= 1 and batch_size >= 1):
            raise ValueError(f"{where}: distill needs weight > 0, anchors >= 1, batch_size >= 1, got "
                             f"{ {k: record[k] for k in DISTILL_FIELDS} }")
        spec = cls(weight, anchors, batch_size, anchor_source_of(record.get("anchor_source"), f"{where}: distill.anchor_source"),
                   record)
        try:
            spec.settings(["a", "b"], "{text}")          # the level, top_k and teacher rule, checked as clients will
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        return spec


def anchor_source_of(source, where: str) -> tuple[str, str] | None:
    """("topic" | "domain", name) of an anchor source "topic:<name>" (a tweet topic) or "domain:<name>" (a
    fortunes domain of the LM task), naming a source no client holds; None: none given; a ValueError naming
    `where` else."""
    if source is None:
        return None
    prefix = next((p for p in (ANCHOR_TOPIC, ANCHOR_DOMAIN) if isinstance(source, str) and source.startswith(p)
                   and source[len(p):]), None)
    if prefix is None:
        raise ValueError(f"{where} must be '{ANCHOR_TOPIC}<name>' (classification) or '{ANCHOR_DOMAIN}<name>' (LM), "
                         f"naming a source no client holds; got {source!r}")
    return prefix[:-1], source[len(prefix):]


@dataclass
class MethodSpec:
    """What every method has. Subclasses: one per runner (RUNNERS)."""

    runner: ClassVar[str]
    strategies: ClassVar[dict]        # the strategy names this runner takes

    name: str
    strategy: str
    strategy_options: dict
    lr: float | None                  # None: the suite's lr for the runner
    replica: int                      # 0: not a replica
    raw: dict                         # the method dict as written

    def training_seed(self, seed: int) -> int:
        """The seed a run's randomness comes from (adapter init, data order, strategy): the run's seed,
        or for a replica another one, so that a method against its own replica measures what training
        randomness alone moves: the instrument's noise floor. The data split, and so the test records,
        stay those of the run's seed."""
        return seed + REPLICA_SEED_STRIDE * self.replica

    def check_setting(self, clients: list[dict], *, lm: bool, where: str) -> None:
        """Refuse a setting this method cannot run in (the suite check)."""

    def run(self, ctx) -> dict:
        """The runner's record of one run in `ctx` (a context.RunContext); context.run_method completes it."""
        raise NotImplementedError

    @classmethod
    def _parse(cls, method: dict, common: dict, where: str) -> MethodSpec:
        """The runner's own fields of `method` checked; `common`: the fields every method has, parsed."""
        raise NotImplementedError


@dataclass
class DeMAMethod(MethodSpec):
    runner: ClassVar[str] = "dema"
    strategies: ClassVar[dict] = DEMA_STRATEGIES

    dema: dict = dataclasses.field(default_factory=dict)      # DeMAConfig fields as written (seed aside)
    distill: DistillSpec | None = None
    projector_anchors: tuple[str, str] | None = None   # ("topic" | "domain", name): in-domain projector anchors

    def config(self, seed: int) -> DeMAConfig:
        """The DeMAConfig of a run whose training seed is `seed` (the dict's own seed wins)."""
        return DeMAConfig.from_dict({"seed": seed, **self.dema})

    def exchange(self, seed: int):
        """A fresh instance of the method's strategy (methods/exchange.py) for one run."""
        return make_exchange(self.strategy, self.strategy_options, seed=seed)

    def check_setting(self, clients: list[dict], *, lm: bool, where: str) -> None:
        if self.distill is not None and (self.distill.level == "token") != lm:
            raise ValueError(f"{where}: 'distill' at level {self.distill.level!r} cannot run in "
                             f"{'an LM' if lm else 'a classification'} suite: label-level distillation exchanges "
                             "label predictions (classification), token-level next-token ones on plain texts (the LM task)")
        kind = "domain" if lm else "topic"
        for key, source in (("projector_anchors", self.projector_anchors),
                            ("distill.anchor_source", self.distill.anchor if self.distill else None)):
            if source is not None and source[0] != kind:
                raise ValueError(f"{where}: {key} of {'an LM' if lm else 'a classification'} suite must be "
                                 f"'{kind}:<name>', got '{source[0]}:{source[1]}'")

    def run(self, ctx) -> dict:
        from .dema import run_dema

        return run_dema(self, ctx)

    @classmethod
    def _parse(cls, method: dict, common: dict, where: str) -> DeMAMethod:
        dema = method.get("dema") or {}
        if not isinstance(dema, dict):
            raise ValueError(f"{where}: dema must be a mapping of DeMAConfig fields, got {dema!r}")
        try:
            DeMAConfig.from_dict({"seed": 0, **dema})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: dema: {err}") from None
        distill = DistillSpec.parse(method["distill"], where) if method.get("distill") is not None else None
        anchors = anchor_source_of(method.get("projector_anchors"), f"{where}: projector_anchors")
        if anchors is not None:
            config = DeMAConfig.from_dict({"seed": 0, **dema})
            if not (config.uses_anchors or config.uses_canonical):
                raise ValueError(f"{where}: projector_anchors is for projectors 'anchor' and 'canonical' (with or "
                                 f"without '+learned'), not {config.projector!r}")
            if config.anchor_file is not None:
                raise ValueError(f"{where}: give dema.anchor_file or projector_anchors, not both")
        spec = cls(**common, dema=dema, distill=distill, projector_anchors=anchors)
        try:
            spec.exchange(0)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: strategy_options: {err}") from None
        return spec


@dataclass
class LoRAMethod(MethodSpec):
    runner: ClassVar[str] = "lora"
    strategies: ClassVar[dict] = LORA_STRATEGIES

    rank: int | None = 16             # None: each client's own rank (the suite's "rank": "client")

    def make_strategy(self):
        return make_lora_strategy(self.strategy, **self.strategy_options)

    def rank_of(self, client: dict) -> int:
        rank = client.get("rank") if self.rank is None else self.rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"method {self.name!r}: client {client['id']!r} has no LoRA rank (setting 'rank')")
        return rank

    def check_setting(self, clients: list[dict], *, lm: bool, where: str) -> None:
        if self.rank is None and any(isinstance(c.get("rank"), bool) or not isinstance(c.get("rank"), int)
                                     for c in clients):
            raise ValueError(f"{where}: rank '{CLIENT_RANK}' needs a 'rank' per client")

    def run(self, ctx) -> dict:
        from .lora import run_lora

        return run_lora(self, ctx)

    @classmethod
    def _parse(cls, method: dict, common: dict, where: str) -> LoRAMethod:
        if method.get("distill") is not None:
            raise ValueError(f"{where}: 'distill' is a DeMA option with fields "
                             f"{sorted(set(DISTILL_FIELDS) | DISTILL_OPTIONS)}")
        if method.get("dema") or method.get("projector_anchors") is not None:
            raise ValueError(f"{where}: a LoRA method takes no 'dema' settings or 'projector_anchors'")
        rank = method.get("rank", 16)
        if rank != CLIENT_RANK and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"{where}: rank must be a positive int or '{CLIENT_RANK}', got {rank!r}")
        spec = cls(**common, rank=None if rank == CLIENT_RANK else rank)
        try:
            spec.make_strategy()
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: strategy_options: {err}") from None
        return spec


RUNNERS: dict[str, type[MethodSpec]] = {cls.runner: cls for cls in (DeMAMethod, LoRAMethod)}
METHOD_FIELDS = COMMON_FIELDS | {"dema", "distill", "projector_anchors", "rank"}


def parse_method(method: dict, setting: str | None = None) -> MethodSpec:
    """The typed spec of a suite's method dict; a ValueError naming the setting (if given), the method
    and the key for anything malformed, before any compute is spent on it."""
    if not isinstance(method, dict):
        raise ValueError(f"{'' if setting is None else f'setting {setting!r}: '}a method must be a mapping, "
                         f"got {method!r}")
    name = method.get("name")
    where = ("" if setting is None else f"setting {setting!r}, ") + f"method {name!r}"
    unknown = sorted(set(method) - METHOD_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed {sorted(METHOD_FIELDS)}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: name must be a non-empty string")
    replica = method.get("replica", 0)
    if not (isinstance(replica, int) and not isinstance(replica, bool) and replica >= 0):
        raise ValueError(f"{where}: replica must be an integer >= 1 (0: not a replica), got {replica!r}")
    cls = RUNNERS.get(method.get("runner"))
    if cls is None:
        raise ValueError(f"{where}: runner must be one of {sorted(RUNNERS)}, got {method.get('runner')!r}")
    strategy = method.get("strategy")
    if strategy not in cls.strategies:
        raise ValueError(f"{where}: strategy must be one of {list(cls.strategies)} for runner {cls.runner!r}, "
                         f"got {strategy!r}")
    options = method.get("strategy_options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"{where}: strategy_options must be a mapping, got {options!r}")
    lr = method.get("lr")
    if lr is not None:
        try:
            lr = float(lr)
        except (TypeError, ValueError):
            lr = 0.0
        if not lr > 0:
            raise ValueError(f"{where}: lr must be a number > 0, got {method['lr']!r}")
    common = {"name": name, "strategy": strategy, "strategy_options": dict(options), "lr": lr, "replica": replica,
              "raw": method}
    return cls._parse(method, common, where)
