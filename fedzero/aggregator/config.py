"""What the aggregator takes from a run YAML: `seed`, the `federation:` section, the client ids and
the teacher rule of the `distill:` section.

The file is read by the run config's own reader (fedzero.config.run), so every key is typed and
checked exactly as the clients check it, but without the clients' resources (`local=False`): the
aggregator runs where the clients' data and backbones are not, and may read a copy of the file
(RUN_DIR/config.yaml) from which their relative paths do not resolve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedzero.config import FederationSettings, parse_run_config, read_yaml
from fedzero.distill.teachers import TeacherRule
from fedzero.strategies import Strategy


@dataclass
class AggregatorSettings:
    federation: FederationSettings = field(default_factory=FederationSettings)
    seed: int = 0
    client_ids: list[str] | None = None        # ids listed under `clients:`, if any
    teacher_rule: TeacherRule = field(default_factory=TeacherRule)   # how anchor teachers are mixed (distill:)

    @property
    def strategy(self) -> str:
        return self.federation.strategy

    @property
    def strategy_options(self) -> dict:
        return self.federation.strategy_options

    @property
    def server_lr(self) -> float:
        return self.federation.server_lr

    @property
    def server_momentum(self) -> float:
        return self.federation.server_momentum

    def make_strategy(self) -> Strategy:
        return self.federation.make_strategy(seed=self.seed)


def aggregator_settings(data, source: str | Path | None = None) -> AggregatorSettings:
    """From a parsed run YAML (a dict); a fedzero.config.ConfigError lists every problem."""
    base = Path(source).parent if source is not None else Path(".")
    run = parse_run_config(data, base, source, local=False)
    return AggregatorSettings(federation=run.federation, seed=run.seed, client_ids=run.client_ids or None,
                              teacher_rule=run.distill.teacher_rule if run.distill is not None else TeacherRule())


def load_aggregator_settings(path: str | Path) -> AggregatorSettings:
    data, path = read_yaml(path, "run config")
    return aggregator_settings(data, path)
