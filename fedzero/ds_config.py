"""The one place where a DeepSpeed config is completed.

A file under ds_configs/ says *how* to shard (ZeRO stage, offload, bucket sizes) and names the
optimizer type. Everything that is a number of the training run comes from the client's own
settings and is written here, once:

    train_micro_batch_size_per_gpu = batch_size / (world_size × gradient_accumulation_steps)
    train_batch_size               = micro × world_size × gradient_accumulation_steps  (= batch_size)
    optimizer lr / weight_decay    = train.lr / train.weight_decay (the schedule is applied per step)
    gradient_clipping              = train.grad_clip
    bf16 / fp16                    = precision, "auto" = bf16 on a GPU that has it, else fp16 on a
                                     GPU, fp32 on the CPU (DeepSpeed refuses fp16 there)

`batch_size` is the number of examples per optimizer step, the same number the single-process
LocalClient uses, so the same YAML trains the same way on 1 or N processes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

# Keys the loader owns. A file that sets one of them (other than to "auto", the HF convention)
# is refused: the number would be written twice and could disagree.
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "bf16", "fp16")
OWNED_OPTIMIZER_PARAMS = ("lr", "weight_decay")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def read_ds_config(path: str | Path) -> dict:
    """Read a DeepSpeed JSON config (plain JSON, no comments)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no DeepSpeed config at {path}")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); DeepSpeed configs here are comment-free JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a DeepSpeed config must be a JSON object")
    return data


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_precision(precision: str, device_type: str, bf16_supported: bool) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device_type == "cpu":
        if precision == "fp16":
            raise ValueError("fp16 is refused by DeepSpeed on the CPU; use fp32 or bf16")
        return "fp32" if precision == "auto" else precision
    if precision == "auto":
        return "bf16" if bf16_supported else "fp16"
    return precision


def complete_ds_config(config: dict | str | Path, *, batch_size: int, world_size: int,
                       gradient_accumulation_steps: int = 1, lr: float, weight_decay: float = 0.0,
                       grad_clip: float | None = 1.0, precision: str = "auto", device_type: str = "cpu",
                       bf16_supported: bool = False, overrides: dict | None = None) -> dict:
    """Return a complete DeepSpeed config (a new dict) from a partial one.

    `overrides` are merged into the file's content first (nested dicts merge key by key); they
    may not set the owned keys either.
    """
    base = read_ds_config(config) if isinstance(config, (str, Path)) else copy.deepcopy(config)
    ds = _merge(base, overrides or {})
    for key in OWNED_KEYS:
        if key in ds and ds[key] != "auto" and not (key in ("bf16", "fp16") and ds[key] == {"enabled": "auto"}):
            raise ValueError(f"DeepSpeed config sets {key!r}; fedzero computes it from the client's settings "
                             f"(batch_size, gradient_accumulation_steps, grad_clip, precision): remove it")
    optimizer = ds.get("optimizer")
    if not isinstance(optimizer, dict) or "type" not in optimizer:
        # Without an optimizer block DeepSpeed builds no optimizer and fails at the first step.
        raise ValueError("DeepSpeed config needs an 'optimizer' block with a 'type' "
                         "(e.g. {\"type\": \"AdamW\", \"params\": {\"torch_adam\": true}})")
    params = optimizer.setdefault("params", {})
    for key in OWNED_OPTIMIZER_PARAMS:
        if key in params and params[key] != "auto":
            raise ValueError(f"DeepSpeed config sets optimizer.params.{key}; it comes from the client's train "
                             f"settings: remove it")

    world_size, accum = int(world_size), int(gradient_accumulation_steps)
    if world_size < 1 or accum < 1:
        raise ValueError(f"world_size and gradient_accumulation_steps must be >= 1, got {world_size}, {accum}")
    if batch_size % (world_size * accum):
        raise ValueError(f"train.batch_size={batch_size} is not divisible by world_size × gradient_accumulation_steps "
                         f"= {world_size} × {accum}; the per-process micro-batch must be a whole number")
    micro = batch_size // (world_size * accum)
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * world_size * accum
    params["lr"] = float(lr)
    params["weight_decay"] = float(weight_decay)
    if grad_clip:
        ds["gradient_clipping"] = float(grad_clip)
    else:
        ds.pop("gradient_clipping", None)
    chosen = resolve_precision(precision, device_type, bf16_supported)
    ds["bf16"] = {"enabled": chosen == "bf16"}
    ds["fp16"] = {"enabled": chosen == "fp16"}
    return ds


def precision_of(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def check_ds_config_file(path: str | Path) -> dict:
    """Check a DeepSpeed config where it is chosen (`fedzero prepare`, `federate`, `submit`), not after
    the queue wait: plain JSON, none of the keys fedzero owns, an optimizer DeepSpeed or torch knows,
    and every section DeepSpeed validates itself (its own DeepSpeedConfig, on the file completed as a
    one-process fp32 client would complete it; no GPU needed). Errors name the file and the key."""
    path = Path(path)
    data = read_ds_config(path)
    try:
        completed = complete_ds_config(data, batch_size=1, world_size=1, lr=1e-3, precision="fp32", device_type="cpu")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    optimizer = str(completed["optimizer"]["type"])
    import torch

    try:
        from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    except ImportError:               # an older or newer layout: DeepSpeed's own check below still runs
        DEEPSPEED_OPTIMIZERS = []
    if DEEPSPEED_OPTIMIZERS and optimizer.lower() not in [o.lower() for o in DEEPSPEED_OPTIMIZERS] \
            and not hasattr(torch.optim, optimizer):
        raise ValueError(f"{path}: optimizer.type {optimizer!r} is neither a DeepSpeed optimizer "
                         f"({', '.join(DEEPSPEED_OPTIMIZERS)}) nor one of torch.optim")
    try:
        import pydantic
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        return data
    import logging

    quiet = logging.getLogger("DeepSpeed")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        DeepSpeedConfig(completed)
    except pydantic.ValidationError as err:
        section = err.title         # e.g. DeepSpeedZeroConfig: the key paths are inside its section
        prefix = {"DeepSpeedZeroConfig": "zero_optimization."}.get(section, "")
        problems = [f"{prefix}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" + (
                    f" (got {e['input']!r})" if not isinstance(e.get("input"), dict) else "") for e in err.errors()]
        raise ValueError(f"{path}: DeepSpeed refuses this config ({section}): " + "; ".join(problems)) from None
    except (AssertionError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: DeepSpeed refuses this config: {err}") from None
    finally:
        quiet.setLevel(level)
    return data
