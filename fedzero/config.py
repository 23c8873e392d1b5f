"""The run configuration (one YAML file): DeMA settings, the federation, and its clients.

Paths inside the file are relative to the file itself; `fedzero:<path>` names a file bundled in
the package (fedzero/resources/<path>).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedzero.adapters.dema import DeMAConfig
from fedzero.backbones import BackboneSpec
from fedzero.client import TrainSettings
from fedzero.distill.settings import DistillSettings

RESOURCES = Path(__file__).parent / "resources"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


def resolve_path(value: str, base: Path) -> Path:
    if value.startswith("fedzero:"):
        return RESOURCES / value[len("fedzero:"):]
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


@dataclass
class FederationSettings:
    rounds: int = 3
    strategy: str = "cmga"
    strategy_options: dict = field(default_factory=dict)
    server_lr: float = 1.0
    server_momentum: float = 0.0

    def __post_init__(self):
        if int(self.rounds) < 1:
            raise ValueError(f"federation.rounds must be >= 1, got {self.rounds!r}")
        self.make_strategy(seed=0)  # refuse an unknown strategy or option now, not after the clients load

    def make_strategy(self, *, seed: int):
        from fedzero.strategies import make_strategy

        try:
            return make_strategy(self.strategy, seed=seed, server_lr=self.server_lr,
                                 server_momentum=self.server_momentum, **self.strategy_options)
        except TypeError as err:  # unknown option
            raise ValueError(f"federation: {err}") from None


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
    clients: list[ClientConfig]
    source: Path | None = None
    distill: DistillSettings | None = None    # output distillation on the public anchors (off when absent)


def _only(section: str, data: dict, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def parse_run_config(data: dict, base: Path, source: Path | None = None) -> RunConfig:
    if not isinstance(data, dict):
        raise ValueError("a run config must be a YAML mapping")
    _only("config", data, {"seed", "dema", "federation", "train", "clients", "distill"})
    seed = int(data.get("seed", 0))
    dema = DeMAConfig.from_dict({"seed": seed, **(data.get("dema") or {})})
    fed_data = data.get("federation") or {}
    _only("federation", fed_data, {"rounds", "strategy", "strategy_options", "server_lr", "server_momentum"})
    federation = FederationSettings(**fed_data)
    defaults = data.get("train") or {}
    clients_data = data.get("clients")
    if not clients_data:
        raise ValueError("config: 'clients' must list at least one client")
    clients, seen = [], set()
    for i, c in enumerate(clients_data):
        where = f"clients[{i}]"
        _only(where, c, {"id", "backbone", "data", "train"})
        cid = str(c.get("id", ""))
        if not _CLIENT_ID.match(cid):
            raise ValueError(f"{where}: id {cid!r} must be letters, digits, '.', '_' or '-'")
        if cid in seen:
            raise ValueError(f"{where}: duplicate client id {cid!r}")
        seen.add(cid)
        if "backbone" not in c or "data" not in c:
            raise ValueError(f"{where} ({cid}): needs 'backbone' and 'data'")
        backbone = dict(c["backbone"])
        if "path" in backbone:
            backbone["path"] = str(resolve_path(backbone["path"], base))
        try:
            spec = BackboneSpec.from_dict(backbone)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"{where} ({cid}): {err}") from None
        data_cfg = c["data"]
        _only(f"{where}.data", data_cfg, {"train", "test"})
        paths = {}
        for split in ("train", "test"):
            if split not in data_cfg:
                raise ValueError(f"{where}.data needs '{split}' (a JSONL file)")
            paths[split] = resolve_path(data_cfg[split], base)
            if not paths[split].is_file():
                raise FileNotFoundError(f"{where}.data.{split}: no such file {paths[split]}")
        train = TrainSettings.from_dict({**copy.deepcopy(defaults), **(c.get("train") or {})})
        clients.append(ClientConfig(cid, spec, paths["train"], paths["test"], train))
    distill = None
    if data.get("distill") is not None:
        distill = DistillSettings.from_dict(dict(data["distill"]))
        if distill.anchor_file is not None:
            distill.anchor_file = str(resolve_path(distill.anchor_file, base))
            if not Path(distill.anchor_file).is_file():
                raise FileNotFoundError(f"distill.anchor_file: no such file {distill.anchor_file}")
        if distill.teacher_rule.needs_quality:
            _check_held_out_data(clients, distill)
    return RunConfig(seed, dema, federation, clients, source, distill)


def _check_held_out_data(clients: list[ClientConfig], distill: DistillSettings) -> None:
    """teacher 'quality' and only_stronger weigh every client by its loss on its own held-out examples:
    the first train.max_eval_examples records of its data.test (read_jsonl refuses an empty file when
    the client loads it). Refused now, not after a round of training: a client set to use none."""
    for c in clients:
        if c.train.max_eval_examples is not None and int(c.train.max_eval_examples) < 1:
            raise ValueError(f"client {c.id!r}: train.max_eval_examples is {c.train.max_eval_examples}, but "
                             f"{distill.teacher_rule} "
                             f"needs every client's loss on its held-out examples (data.test {c.test_data})")


def read_yaml(path: str | Path, what: str = "config file") -> tuple[object, Path]:
    """(parsed YAML, path), with a clear error when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    with open(path) as f:
        return yaml.safe_load(f), path


def load_run_config(path: str | Path) -> RunConfig:
    data, path = read_yaml(path)
    return parse_run_config(data, path.parent, source=path)
