"""A DeepSpeed client's engine: its completed DeepSpeed config, the frozen backbone with DeMA injected,
deepspeed.initialize over the DeMA parameters, and what the engine reports about itself.

Built in steps (ds config, model, engine) so that a client can fail early, between them, on what is
cheap to check (its store, its data) before what is expensive (loading the backbone, the engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedzero.adapters.dema import DeMAModel
from fedzero.adapters.dema.zero import ZeroPenalty, inject_dema_for_engine, penalty_for_engine
from fedzero.backbones import load_backbone
from fedzero.backbones.zero3 import load_backbone_zero3
from fedzero.client.client_config import ClientRunConfig
from fedzero.client.distributed import comm_device
from fedzero.data import load_tokenizer
from fedzero.ds_config import complete_ds_config, precision_of, zero_stage

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def client_ds_config(cfg: ClientRunConfig, world_size: int, device_type: str) -> dict:
    """The client's DeepSpeed config file completed with its batch, optimizer and precision."""
    from deepspeed.accelerator import get_accelerator

    settings = cfg.client.train
    return complete_ds_config(
        cfg.deepspeed.config, batch_size=settings.batch_size, world_size=world_size,
        gradient_accumulation_steps=cfg.deepspeed.gradient_accumulation_steps, lr=settings.lr,
        weight_decay=settings.weight_decay, grad_clip=settings.grad_clip, precision=cfg.deepspeed.precision,
        device_type=device_type, bf16_supported=device_type != "cpu" and get_accelerator().is_bf16_supported(),
        overrides=cfg.deepspeed.overrides)


@dataclass
class ZeroModel:
    """The frozen backbone with DeMA injected, before deepspeed.initialize."""
    model: torch.nn.Module
    handle: DeMAModel
    penalty: ZeroPenalty
    fingerprint: str
    tokenizer: object
    # transformers consults it (weakly referenced) to build the model under deepspeed.zero.Init and
    # to know that ZeRO-3 is on afterwards: kept alive as long as the model.
    hf_ds_config: object | None = None


def build_model(cfg: ClientRunConfig, ds_config: dict) -> ZeroModel:
    spec = cfg.client.backbone
    stage = zero_stage(ds_config)
    hf_ds_config = None
    if stage == 3 and spec.path is not None:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
        model, fp = load_backbone_zero3(spec)
    else:
        # ZeRO-0/1/2 keep the whole frozen backbone on every rank. An inline (llama_/model_config) model
        # is small by nature: it is built whole and deepspeed.initialize partitions it.
        model, fp = load_backbone(spec)
    tokenizer = load_tokenizer(spec.tokenizer, spec.path)
    handle = inject_dema_for_engine(model, cfg.dema, dtype=_DTYPES[precision_of(ds_config)], tokenizer=tokenizer,
                                    ds_config=ds_config)
    return ZeroModel(model=model, handle=handle, penalty=penalty_for_engine(handle, stage), fingerprint=fp,
                     tokenizer=tokenizer, hf_ds_config=hf_ds_config)


def initialize(built: ZeroModel, ds_config: dict, lr: float):
    """The DeepSpeed engine. Only the DeMA parameters reach the optimizer, so only they get optimizer
    state. Groups carry `lr_scale` (anchor+learned in-projectors train at a smaller rate), as in LocalClient."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=built.model, model_parameters=built.handle.param_groups(lr),
                                           config=ds_config)
    return engine


def describe(client_id: str, engine, handle: DeMAModel, ds_config: dict, world_size: int) -> str:
    numel = lambda p: getattr(p, "ds_numel", p.numel())   # noqa: E731  (ZeRO-3 shards have numel 0)
    frozen = sum(numel(p) for p in handle.model.parameters() if not p.requires_grad)
    trainable = handle.trainable_parameters()
    partitioned = "partitioned" if all(hasattr(p, "ds_id") for p in trainable) else "replicated"
    return (f"[fedzero] client {client_id}: ZeRO-{zero_stage(ds_config)} {precision_of(ds_config)} on {world_size} "
            f"{engine.device.type} process(es); backbone {frozen:,} frozen parameters, DeMA "
            f"{sum(numel(p) for p in trainable):,} trainable ({partitioned}); batch "
            f"{ds_config['train_batch_size']} = micro {ds_config['train_micro_batch_size_per_gpu']} x {world_size} "
            f"processes x {ds_config['gradient_accumulation_steps']} accumulation steps")


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of the processes (max and sum over ranks) and, on GPUs, peak allocated
    GPU memory (max over ranks), in MiB. Collective."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB -> MiB
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    values = torch.tensor([rss, rss, gpu], dtype=torch.float64, device=comm_device(device))
    peak = values[[0, 2]].clone()
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    total = values[1:2].clone()
    torch.distributed.all_reduce(total)
    out = {"peak_rss_mib_max": round(float(peak[0]), 1), "peak_rss_mib_sum": round(float(total[0]), 1)}
    if device.type == "cuda":
        out["peak_gpu_mib_max"] = round(float(peak[1]), 1)
    return out


def reset_optimizer_moments(engine) -> None:
    """Zero Adam's moments and step counters in place: the policy of LocalClient (a fresh optimizer
    every round, because the shared parameters jump at aggregation and old moments describe a
    point that no longer exists). Applies to shared and private parameters alike."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for opt_state in base.state.values():
        for value in opt_state.values():
            if torch.is_tensor(value):
                value.zero_()
