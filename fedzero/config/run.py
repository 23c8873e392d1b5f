"""The run configuration (one YAML file): DeMA settings, the federation, and its clients.

Every section is read by one reader here, typed and range-checked (values.py), and every problem
of the file is reported together (ConfigError) before anything is built or written. The same
readers serve the DeepSpeed client's CLIENT.yaml (fedzero.client.client_config) and the MPI
aggregator (fedzero.aggregator.config), which reads a run config without the clients' local
resources (`local=False`: data files and backbone directories are not looked for, backbones are
not built).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from fedzero.adapters.dema import DeMAConfig
from fedzero.adapters.dema.config import PLACEMENTS, PROJECTORS, SHARING, TARGETS
from fedzero.backbones import BackboneSpec
from fedzero.client import TrainSettings
from fedzero.distill.settings import DistillSettings
from fedzero.distill.teachers import LEVELS, TEACHERS
from fedzero.store.layout import validate_client_id
from fedzero.strategies import STRATEGIES

from .files import read_yaml, resolve_path
from .problems import ConfigError, Problems, join, show
from .values import (MISSING, SEED, Rule, above, at_least, build, check_fields, check_value, checked, mapping,
                     one_of, refuse_unknown)

RUN_KEYS = ("seed", "dema", "federation", "train", "clients", "distill")
CLIENT_KEYS = ("id", "backbone", "data", "train")
BACKBONE_SOURCES = ("path", "llama_config", "model_config")

# Ranges of the settings whose classes check only some of them (each class still checks its own
# cross-field rules when it is built); what is not listed here is only typed.
FEDERATION_RULES = {"rounds": at_least(1), "server_lr": above(0), "server_momentum": Rule(min=0, below=1),
                    "max_num_samples": at_least(1)}
TRAIN_RULES = {"local_steps": at_least(1), "batch_size": at_least(1), "lr": above(0), "weight_decay": at_least(0),
               "max_length": at_least(1), "grad_clip": Rule(min=0, nullable=True),    # 0 or null: no clipping
               "schedule": one_of("constant", "cosine"), "warmup_steps": at_least(0), "eval_batch_size": at_least(1),
               "max_eval_examples": at_least(0)}
DEMA_RULES = {"rank": at_least(1), "num_experts": at_least(1), "num_slots": at_least(1), "expert_hidden": at_least(1),
              "temperature": above(0), "placement": one_of(*PLACEMENTS), "target": one_of(*TARGETS),
              "projector": one_of(*PROJECTORS), "share": one_of(*SHARING), "num_anchors": at_least(1),
              "anchor_lr_scale": at_least(0), "canonical_components": at_least(1), "canonical_ridge": at_least(0),
              "anchor_penalty": at_least(0), "seed": SEED}
DISTILL_RULES = {"weight": above(0), "anchors": at_least(1), "batch_size": at_least(1), "max_chars": at_least(1),
                 "teacher": one_of(*TEACHERS), "level": one_of(*LEVELS), "top_k": at_least(1)}
BACKBONE_RULES = {"init_seed": SEED, "dtype": one_of("float32", "bfloat16", "float16")}
# Options every strategy's constructor takes that the federation section sets itself.
_SET_ELSEWHERE = {"seed": "seed", "server_lr": "federation.server_lr", "server_momentum": "federation.server_momentum"}


@dataclass
class FederationSettings:
    """The `federation:` section. Checked whole when built: every problem at once, as a ConfigError."""

    rounds: int = 3
    strategy: str = "cmga"
    strategy_options: dict = field(default_factory=dict)
    server_lr: float = 1.0
    server_momentum: float = 0.0
    max_num_samples: int = 1_000_000_000     # an update claiming more is left out (fedzero.store.screen)
    authenticate: bool = False               # every update HMAC-signed by its client's key (fedzero.store.auth)
    robust: dict | None = None               # clip_to_median, aggregate, trim (fedzero.strategies.robust)
    dp: dict | None = None                   # clip, noise_multiplier, delta (fedzero.strategies.robust)

    def __post_init__(self):
        problems = Problems()
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        clean = check_fields(FederationSettings, values, "federation", problems, FEDERATION_RULES)
        from fedzero.strategies.robust import check_composition, read_dp, read_robust

        before = len(problems)
        robust = read_robust(self.robust, problems.add) if isinstance(self.robust, dict) else None
        dp = read_dp(self.dp, problems.add) if isinstance(self.dp, dict) else None
        if len(problems) == before and isinstance(self.strategy, str):
            why = check_composition(self.strategy.lower(), robust, dp)
            if why:
                problems.error("federation", why)
        clean = clean and len(problems) == before
        if isinstance(self.strategy, str) and isinstance(self.strategy_options, dict):
            _check_strategy(self, problems, build_it=clean)
        problems.raise_if_any()

    @property
    def robust_settings(self):
        from fedzero.strategies.robust import read_robust

        return read_robust(self.robust, lambda *a: None)

    @property
    def dp_settings(self):
        from fedzero.strategies.robust import read_dp

        return read_dp(self.dp, lambda *a: None)

    def make_strategy(self, *, seed: int):
        strategy = STRATEGIES.build(self.strategy, seed=seed, server_lr=self.server_lr,
                                    server_momentum=self.server_momentum, **self.strategy_options)
        return strategy.set_defenses(self.robust_settings, self.dp_settings)


def _check_strategy(fed: FederationSettings, problems: Problems, *, build_it: bool) -> None:
    """The strategy's name, its options typed by its constructor's annotations, then the strategy
    built once, so its own range checks (e.g. CMGA's c_max >= 1) run now, not after the clients load."""
    if fed.strategy.lower() not in STRATEGIES:
        problems.add("federation.strategy", f"must be one of {sorted(STRATEGIES)}, got {show(fed.strategy)}")
        return
    path = "federation.strategy_options"
    params = STRATEGIES.options(fed.strategy)
    settable = {k: p for k, p in params.items() if k not in _SET_ELSEWHERE}
    elsewhere = [key for key in fed.strategy_options if key in _SET_ELSEWHERE]
    for key in elsewhere:
        problems.add(join(path, key), f"is set by `{_SET_ELSEWHERE[key]}`, not as a strategy option")
    options = {k: v for k, v in fed.strategy_options.items() if k not in _SET_ELSEWHERE}
    clean = refuse_unknown(options, settable, path, problems, "option") and not elsewhere
    for key, value in options.items():
        if key in settable:
            why = check_value(value, _option_type(settable[key]), None)
            if why is not None:
                problems.add(join(path, key), why)
                clean = False
    if clean and build_it:
        build(lambda _: fed.make_strategy(seed=0), None, path, problems)


def _option_type(param):
    """An option's type: its annotation, else its default's type."""
    if isinstance(param.annotation, type) or typing.get_origin(param.annotation) is not None:
        return param.annotation
    if param.default is not param.empty and param.default is not None:
        return type(param.default)
    return object          # unannotated, no default: the class checks it


@dataclass
class ClientConfig:
    id: str
    backbone: BackboneSpec
    train_data: Path
    test_data: Path
    train: TrainSettings


@dataclass
class RunConfig:
    seed: int
    dema: DeMAConfig
    federation: FederationSettings
    clients: list[ClientConfig]             # empty when read without the clients' resources (local=False)
    source: Path | None = None
    distill: DistillSettings | None = None    # output distillation on the public anchors (off when absent)
    client_ids: list[str] = field(default_factory=list)    # the ids under `clients:`, in order

    def __post_init__(self):
        if self.clients and not self.client_ids:
            self.client_ids = [c.id for c in self.clients]


# ------------------------------------------------------------------------------ section readers

def section(data: dict, key: str, path: str, problems: Problems, *, required: bool = False) -> dict | None:
    """data[key] as a mapping ({} if absent or null and not required); None after a problem."""
    if key not in data and required:
        problems.add(path, "is required")
        return None
    return mapping(data.get(key), path, problems, optional=not required)


def read_seed(data: dict, problems: Problems) -> int:
    seed = checked(data, "seed", int, "", problems, SEED, default=0)
    return 0 if seed is MISSING else seed


def read_dema(data: dict, seed: int, problems: Problems, base: Path | None = None) -> DeMAConfig | None:
    """The `dema:` section; the run's seed unless it sets its own. `base`: the directory a relative
    anchor_file is read from (the file's own, as for every path in a config)."""
    dema = section(data, "dema", "dema", problems)
    if dema is None or not check_fields(DeMAConfig, dema, "dema", problems, DEMA_RULES, what="DeMAConfig field"):
        return None
    if base is not None and isinstance(dema.get("anchor_file"), str):
        dema = {**dema, "anchor_file": str(resolve_path(dema["anchor_file"], base))}
    return build(DeMAConfig.from_dict, {"seed": seed, **dema}, "dema", problems)


def read_federation(data: dict, problems: Problems, defaults: dict | None = None) -> FederationSettings | None:
    fed = section(data, "federation", "federation", problems)
    if fed is None:
        return None
    known = [f.name for f in dataclasses.fields(FederationSettings)]
    refuse_unknown(fed, known, "federation", problems)
    values = {**(defaults or {}), **{k: v for k, v in fed.items() if k in known}}
    return build(lambda v: FederationSettings(**v), values, "federation", problems)


def read_train(data, path: str, problems: Problems) -> dict | None:
    """A `train:` mapping, checked; TrainSettings is built per client, over the run's defaults."""
    train = mapping(data, path, problems)
    if train is None or not check_fields(TrainSettings, train, path, problems, TRAIN_RULES, what="train setting"):
        return None
    return train


def read_backbone(entry: dict, path: str, base: Path, problems: Problems, *, local: bool) -> BackboneSpec | None:
    """A client's `backbone:`; read without the clients' resources, it may be left out (an
    aggregator's run YAML may list client ids alone) and is only checked, never built."""
    if "backbone" not in entry and not local:
        return None
    spec = section(entry, "backbone", path, problems, required=True)
    if spec is None:
        return None
    clean = check_fields(BackboneSpec, spec, path, problems, BACKBONE_RULES, what="backbone field", hidden=("extra",))
    given = [k for k in BACKBONE_SOURCES if spec.get(k) is not None]
    if len(given) != 1:
        problems.add(path, "needs exactly one of 'path' (a local HF model directory), 'llama_config' or "
                           f"'model_config' (an inline random model); got {given or 'none'}")
        return None
    if not clean or not local:
        return None
    spec = dict(spec)
    if spec.get("path") is not None:
        spec["path"] = str(resolve_path(spec["path"], base))
    return build(BackboneSpec.from_dict, spec, path, problems)


def read_data(entry: dict, path: str, base: Path, problems: Problems, *, local: bool) -> tuple[Path, Path] | None:
    """A client's `data: {train, test}`: JSONL files, which must exist where the client runs (and
    may be left out where it does not, as for the backbone)."""
    if "data" not in entry and not local:
        return None
    data = section(entry, "data", path, problems, required=True)
    if data is None:
        return None
    clean = refuse_unknown(data, ("train", "test"), path, problems)
    paths = []
    for split in ("train", "test"):
        value = checked(data, split, str, path, problems)
        if value is MISSING:
            clean = False
            continue
        paths.append(resolve_path(value, base))
        if local and not paths[-1].is_file():
            problems.add(join(path, split), f"names no such file: {paths[-1]}", missing_file=True)
            clean = False
    return (paths[0], paths[1]) if clean else None


class ClientEntry(NamedTuple):
    """One entry of `clients:` as read: None for what has problems (client: also when not local)."""
    path: str                        # "clients[1]", or "client" in a CLIENT.yaml
    id: str | None
    train: TrainSettings | None      # the run's `train:` under the client's own
    test: Path | None                # data.test, resolved
    client: ClientConfig | None      # with its backbone built and data files found (local only)


def read_client(entry, path: str, defaults: dict | None, base: Path, problems: Problems, *,
                local: bool) -> ClientEntry:
    """One entry of `clients:` (or a CLIENT.yaml's `client:`)."""
    entry = mapping(entry, path, problems, optional=False)
    if entry is None:
        return ClientEntry(path, None, None, None, None)
    refuse_unknown(entry, CLIENT_KEYS, path, problems)
    cid = checked(entry, "id", str, path, problems)
    if cid is not MISSING:
        try:
            validate_client_id(cid)
        except ValueError as err:
            problems.error(join(path, "id"), err)
            cid = MISSING
    cid = None if cid is MISSING else cid
    backbone = read_backbone(entry, join(path, "backbone"), base, problems, local=local)
    data = read_data(entry, join(path, "data"), base, problems, local=local)
    own = read_train(entry.get("train"), join(path, "train"), problems)
    train = None
    if defaults is not None and own is not None:
        train = build(TrainSettings.from_dict, {**copy.deepcopy(defaults), **own}, join(path, "train"), problems)
    client = None
    if local and None not in (cid, backbone, data, train):
        client = ClientConfig(cid, backbone, data[0], data[1], train)
    return ClientEntry(path, cid, train, data[1] if data else None, client)


def read_distill(data: dict, base: Path, problems: Problems, *, local: bool) -> DistillSettings | None:
    if data.get("distill") is None:
        return None
    distill = section(data, "distill", "distill", problems, required=True)
    if distill is None or not check_fields(DistillSettings, distill, "distill", problems, DISTILL_RULES,
                                           what="distill setting", required=DistillSettings.required_keys(distill)):
        return None
    distill = dict(distill)
    if local and distill.get("anchor_file") is not None:
        distill["anchor_file"] = str(resolve_path(distill["anchor_file"], base))
        if not Path(distill["anchor_file"]).is_file():
            problems.add("distill.anchor_file", f"names no such file: {distill['anchor_file']}", missing_file=True)
            return None
    return build(DistillSettings.from_dict, distill, "distill", problems)


def check_held_out_data(entries: list[ClientEntry], distill: DistillSettings, problems: Problems) -> None:
    """teacher 'quality' and only_stronger weigh every client by its loss on its own held-out examples:
    the first train.max_eval_examples records of its data.test. A client set to use none is refused
    now, not after a round of training."""
    if not distill.teacher_rule.needs_quality:
        return
    for e in entries:
        if e.train is not None and e.train.max_eval_examples is not None and e.train.max_eval_examples < 1:
            problems.error(e.path, f"client {e.id!r}: train.max_eval_examples is {e.train.max_eval_examples}, but "
                                   f"{distill.teacher_rule} needs every client's loss on its held-out examples "
                                   f"(data.test {e.test})")


# ------------------------------------------------------------------------------ the whole file

def read_common(data, keys: tuple[str, ...], what: str, base: Path, problems: Problems, *,
                federation_defaults: dict | None = None) -> tuple:
    """(seed, dema, federation, train defaults): the sections a run config and a CLIENT.yaml share,
    read the same way; `data` must be a mapping of `keys` (else the file's one problem is raised now)."""
    if not isinstance(data, dict):
        problems.add("", f"a {what} must be a YAML mapping of {list(keys)}, got {show(data)}")
        problems.raise_if_any()
    refuse_unknown(data, keys, "", problems)
    seed = read_seed(data, problems)
    return (seed, read_dema(data, seed, problems, base), read_federation(data, problems, defaults=federation_defaults),
            read_train(data.get("train"), "train", problems))


def parse_run_config(data, base: Path, source: Path | None = None, *, local: bool = True) -> RunConfig:
    """A run config from its parsed YAML; relative paths are relative to `base`. `local=False`: read
    without the clients' resources (the aggregator): `clients` may be absent, nothing is looked for
    on disk, RunConfig.clients stays empty and client_ids lists the ids."""
    problems = Problems(source, "run config")
    seed, dema, federation, defaults = read_common(data, RUN_KEYS, "run config", base, problems)
    entries = _read_clients(data, defaults, base, problems, local=local)
    distill = read_distill(data, base, problems, local=local)
    if distill is not None:
        check_held_out_data(entries, distill, problems)
    problems.raise_if_any()
    return RunConfig(seed, dema, federation, [e.client for e in entries if e.client is not None], source, distill,
                     client_ids=[e.id for e in entries])


def _read_clients(data: dict, defaults: dict | None, base: Path, problems: Problems, *,
                  local: bool) -> list[ClientEntry]:
    raw = data.get("clients")
    if not raw:
        if local:
            problems.add("clients", "must list at least one client")
        return []
    if not isinstance(raw, list):
        problems.add("clients", f"must be a list of clients, got {show(raw)}")
        return []
    entries, seen = [], {}
    for i, entry in enumerate(raw):
        path = join("clients", i)
        found = read_client(entry, path, defaults, base, problems, local=local)
        if found.id is not None and found.id in seen:
            problems.add(join(path, "id"), f"{show(found.id)} is a duplicate client id (also {seen[found.id]})")
        elif found.id is not None:
            seen[found.id] = path
        entries.append(found)
    return entries


def load_run_config(path: str | Path, *, local: bool = True) -> RunConfig:
    data, path = read_yaml(path)
    return parse_run_config(data, path.parent, source=path, local=local)


__all__ = ["ClientConfig", "ConfigError", "FederationSettings", "RunConfig", "load_run_config", "parse_run_config"]
