"""A CLIENT.yaml: one client of a federation, as a DeepSpeed process group runs it (launch/client.py).

`seed`, `dema`, `federation` and `train` mean what they mean in a run config (configs/demo.yaml);
`client` is one entry of its `clients:` list. Example: configs/client_example.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedzero.adapters.dema import DeMAConfig
from fedzero.config import ClientConfig, _only, parse_run_config, read_yaml, resolve_path
from fedzero.distill.settings import DistillSettings


@dataclass
class DeepSpeedSettings:
    config: Path                                   # a file under ds_configs/
    gradient_accumulation_steps: int = 1
    precision: str = "auto"                        # auto | fp32 | bf16 | fp16 (auto: bf16 on GPU, fp32 on CPU)
    overrides: dict = field(default_factory=dict)  # merged into the file (e.g. bucket sizes)
    checkpoint_every: int = 0                      # optimizer steps between mid-round checkpoints (0: none)


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


_TOP_KEYS = {"seed", "dema", "federation", "train", "client", "deepspeed", "state_dir", "wait", "distill"}


def parse_client_config(data: dict, base: Path, source: Path | None = None) -> ClientRunConfig:
    """Parse a CLIENT.yaml mapping; relative paths are relative to `base`."""
    if not isinstance(data, dict):
        raise ValueError("a client config must be a YAML mapping")
    _only("client config", data, _TOP_KEYS)
    for key in ("client", "deepspeed", "state_dir"):
        if key not in data:
            raise ValueError(f"client config: '{key}' is required")
    federation = dict(data.get("federation") or {})
    # The client only needs the schedule's horizon; the rest of the section belongs to the aggregator.
    run = parse_run_config({"seed": data.get("seed", 0), "dema": data.get("dema") or {},
                            "federation": {"rounds": federation.get("rounds", 1)},
                            "train": data.get("train") or {}, "clients": [data["client"]],
                            "distill": data.get("distill")}, base, source)
    ds_data = dict(data["deepspeed"])
    _only("deepspeed", ds_data, {"config", "gradient_accumulation_steps", "precision", "overrides", "checkpoint_every"})
    if "config" not in ds_data:
        raise ValueError("deepspeed.config (a file under ds_configs/) is required")
    ds_path = resolve_path(str(ds_data["config"]), base)
    if not ds_path.is_file():
        raise FileNotFoundError(f"deepspeed.config: no such file {ds_path}")
    ds = DeepSpeedSettings(config=ds_path,
                           gradient_accumulation_steps=int(ds_data.get("gradient_accumulation_steps", 1)),
                           precision=str(ds_data.get("precision", "auto")),
                           overrides=dict(ds_data.get("overrides") or {}),
                           checkpoint_every=int(ds_data.get("checkpoint_every", 0)))
    if ds.checkpoint_every < 0 or ds.gradient_accumulation_steps < 1:
        raise ValueError("deepspeed.checkpoint_every must be >= 0 and gradient_accumulation_steps >= 1")
    wait = dict(data.get("wait") or {})
    _only("wait", wait, {"timeout", "poll"})
    timeout = wait.get("timeout", 3600.0)
    return ClientRunConfig(seed=run.seed, dema=run.dema, total_rounds=run.federation.rounds, client=run.clients[0],
                           deepspeed=ds, state_dir=resolve_path(str(data["state_dir"]), base),
                           wait_timeout=None if timeout is None else float(timeout),
                           poll=float(wait.get("poll", 2.0)), source=source, distill=run.distill)


def load_client_config(path: str | Path) -> ClientRunConfig:
    data, path = read_yaml(path, "client config")
    return parse_client_config(data, path.parent, source=path)
