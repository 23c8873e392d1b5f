"""A CLIENT.yaml: one client of a federation, as a DeepSpeed process group runs it (launch/client.py).

`seed`, `dema`, `federation`, `train` and `distill` mean what they mean in a run config
(configs/demo.yaml) and are read by the run config's own section readers (fedzero.config.run);
`client` is one entry of its `clients:` list. Example: configs/client_example.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedzero.adapters.dema import DeMAConfig
from fedzero.config.files import read_yaml, resolve_path
from fedzero.config.problems import Problems
from fedzero.config.run import ClientConfig, check_held_out_data, read_client, read_common, read_distill, section
from fedzero.config.values import MISSING, Rule, above, at_least, check_fields, checked, refuse_unknown
from fedzero.distill.settings import DistillSettings
from fedzero.ds_config import PRECISIONS


@dataclass
class DeepSpeedSettings:
    config: Path                                   # a file under ds_configs/
    gradient_accumulation_steps: int = 1
    precision: str = "auto"                        # auto | fp32 | bf16 | fp16 (auto: bf16 on GPU, fp32 on CPU)
    overrides: dict = field(default_factory=dict)  # merged into the file (e.g. bucket sizes)
    checkpoint_every: int = 0                      # optimizer steps between mid-round checkpoints (0: none)


DEEPSPEED_RULES = {"gradient_accumulation_steps": at_least(1), "precision": Rule(choices=PRECISIONS),
                   "checkpoint_every": at_least(0)}


@dataclass
class ClientRunConfig:
    """A parsed CLIENT.yaml."""

    seed: int
    dema: DeMAConfig
    total_rounds: int            # the schedule's horizon (federation.rounds)
    client: ClientConfig         # id, backbone, data, train (parsed by fedzero.config)
    deepspeed: DeepSpeedSettings
    state_dir: Path              # private state and checkpoints (fedzero.client.state_layout)
    wait_timeout: float | None = 3600.0
    poll: float = 2.0
    source: Path | None = None
    distill: DistillSettings | None = None    # output distillation on the public anchors


_TOP_KEYS = ("seed", "dema", "federation", "train", "client", "deepspeed", "state_dir", "wait", "distill")
# A CLIENT.yaml without federation.rounds schedules over one round: a client tried on its own.
_CLIENT_FEDERATION_DEFAULTS = {"rounds": 1}


def parse_client_config(data, base: Path, source: Path | None = None) -> ClientRunConfig:
    """Parse a CLIENT.yaml mapping; relative paths are relative to `base`. Every problem of the
    file is reported at once (fedzero.config.ConfigError), each with its key path."""
    problems = Problems(source, "client config")
    seed, dema, federation, defaults = read_common(data, _TOP_KEYS, "client config", base, problems,
                                                   federation_defaults=_CLIENT_FEDERATION_DEFAULTS)
    if "client" in data:
        entry = read_client(data["client"], "client", defaults, base, problems, local=True)
    else:
        problems.add("client", "is required (one entry of a run config's clients: list)")
        entry = None
    deepspeed = _read_deepspeed(data, base, problems)
    state_dir = checked(data, "state_dir", str, "", problems)
    wait = _read_wait(data, problems)
    distill = read_distill(data, base, problems, local=True)
    if distill is not None and entry is not None:
        check_held_out_data([entry], distill, problems)
    problems.raise_if_any()
    return ClientRunConfig(seed=seed, dema=dema, total_rounds=federation.rounds, client=entry.client,
                           deepspeed=deepspeed, state_dir=resolve_path(state_dir, base),
                           wait_timeout=wait["timeout"], poll=wait["poll"], source=source, distill=distill)


def _read_deepspeed(data: dict, base: Path, problems: Problems) -> DeepSpeedSettings | None:
    ds = section(data, "deepspeed", "deepspeed", problems, required=True)
    if ds is None or not check_fields(DeepSpeedSettings, ds, "deepspeed", problems, DEEPSPEED_RULES,
                                      types={"config": str}):
        return None
    path = resolve_path(ds["config"], base)
    if not path.is_file():
        problems.add("deepspeed.config", f"names no such file: {path} (see ds_configs/README.md)", missing_file=True)
        return None
    return DeepSpeedSettings(**{**ds, "config": path})


def _read_wait(data: dict, problems: Problems) -> dict:
    """`wait: {timeout, poll}`: seconds to wait for a round's global (timeout null: forever)."""
    wait = section(data, "wait", "wait", problems) or {}
    refuse_unknown(wait, ("timeout", "poll"), "wait", problems)
    timeout = checked(wait, "timeout", float, "wait", problems, Rule(min=0, nullable=True), default=3600.0)
    poll = checked(wait, "poll", float, "wait", problems, above(0), default=2.0)
    # MISSING (a problem, already recorded) is never returned: the caller raises first
    return {"timeout": timeout if timeout in (None, MISSING) else float(timeout),
            "poll": poll if poll is MISSING else float(poll)}


def load_client_config(path: str | Path) -> ClientRunConfig:
    data, path = read_yaml(path, "client config")
    return parse_client_config(data, path.parent, source=path)
