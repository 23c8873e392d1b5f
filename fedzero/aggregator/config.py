"""The aggregator's slice of a run YAML: `seed`, the `federation:` section, the client ids, and the
teacher rule of the `distill:` section (its `teacher` and `only_stronger` keys).

`fedzero.config.parse_run_config` builds whole clients (backbones, data); the aggregator needs none
of that, so it reads just these keys and leaves the rest of the file to its owners.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedzero.distill.teachers import TeacherRule
from fedzero.strategies import Strategy, make_strategy

_FEDERATION_KEYS = {"rounds", "strategy", "strategy_options", "server_lr", "server_momentum"}


@dataclass
class AggregatorSettings:
    strategy: str = "cmga"
    strategy_options: dict = field(default_factory=dict)
    server_lr: float = 1.0
    server_momentum: float = 0.0
    seed: int = 0
    client_ids: list[str] | None = None        # ids listed under `clients:`, if any
    teacher_rule: TeacherRule = field(default_factory=TeacherRule)   # how anchor teachers are mixed (distill:)

    def make_strategy(self) -> Strategy:
        return make_strategy(self.strategy, seed=self.seed, server_lr=self.server_lr,
                             server_momentum=self.server_momentum, **self.strategy_options)


def aggregator_settings(data: dict) -> AggregatorSettings:
    """From a parsed run YAML (a dict). Unknown `federation` keys are refused, as the run config does."""
    if not isinstance(data, dict):
        raise ValueError(f"run config must be a mapping, got {type(data).__name__}")
    fed = data.get("federation") or {}
    if not isinstance(fed, dict):
        raise ValueError("config: 'federation' must be a mapping")
    unknown = sorted(set(fed) - _FEDERATION_KEYS)
    if unknown:
        raise ValueError(f"federation: unknown key(s) {unknown}; valid: {sorted(_FEDERATION_KEYS)}")
    options = fed.get("strategy_options") or {}
    if not isinstance(options, dict):
        raise ValueError("federation.strategy_options must be a mapping")
    clients = data.get("clients")
    ids = None
    if clients:
        ids = [str(c["id"]) for c in clients if isinstance(c, dict) and "id" in c]
        if len(ids) != len(clients):
            raise ValueError("config: every entry under 'clients' needs an 'id'")
    return AggregatorSettings(strategy=str(fed.get("strategy", "cmga")), strategy_options=dict(options),
                              server_lr=float(fed.get("server_lr", 1.0)),
                              server_momentum=float(fed.get("server_momentum", 0.0)),
                              seed=int(data.get("seed", 0)), client_ids=ids,
                              teacher_rule=TeacherRule.from_config(data.get("distill")))


def load_aggregator_settings(path: str | Path) -> AggregatorSettings:
    with open(path, encoding="utf-8") as f:
        return aggregator_settings(yaml.safe_load(f) or {})
