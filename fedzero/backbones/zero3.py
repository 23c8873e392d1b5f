"""Loading a local HF model directory as a ZeRO-3-partitioned backbone, without ever holding it whole.

transformers' own ZeRO-3 `from_pretrained` reads every shard into rank 0's CPU memory first (140 GB
for a 70B model in bf16). Here the model is built partitioned and its weights are streamed one
tensor at a time. Uses transformers' key-renaming helpers (conversion_mapping, core_model_loading)
so that checkpoint keys map to parameters exactly as transformers' own loading maps them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .fingerprints import fingerprint
from .layout import decoder_layout
from .spec import BackboneSpec


def load_backbone_zero3(spec: BackboneSpec) -> tuple[torch.nn.Module, str]:
    """Build a local HF model directory's model partitioned (zero.Init), then stream its weights.

    Requires a live HfDeepSpeedConfig with ZeRO-3 (transformers then wraps construction in
    deepspeed.zero.Init, so every parameter is born as a shard: shape [0], real shape in ds_shape).
    Weights are streamed one tensor at a time from the (sharded) safetensors files: rank 0 reads a
    tensor, the parameter is gathered, filled on rank 0 and re-partitioned. So no process ever holds
    the whole backbone, on the GPU or in CPU memory. Returns (model, fingerprint), as load_backbone.
    """
    import deepspeed
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = Path(spec.path)
    config = spec.hf_config()
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (path / "model.safetensors").is_file():
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors(.index.json); ZeRO-3 loading streams safetensors only")

    model = AutoModelForCausalLM.from_config(config, dtype=spec.torch_dtype)   # partitioned, not initialised
    decoder_layout(model)     # from structure alone (shards hold no values): fail before streaming weights
    params = dict(model.named_parameters())   # tied weights appear once
    names = _parameter_names(model, params, sorted(weight_map), path)
    rank = torch.distributed.get_rank()
    by_file: dict[str, list[str]] = {}
    for key, file in weight_map.items():
        by_file.setdefault(file, []).append(key)
    loaded = set()
    for file, keys in sorted(by_file.items()):
        reader = safe_open(str(path / file), framework="pt") if rank == 0 else None
        try:
            for key in sorted(keys):
                if names[key] not in params:
                    continue   # e.g. lm_head.weight of a tied model, rotary buffers of old checkpoints
                param = params[names[key]]
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if rank == 0:
                        value = reader.get_tensor(key)
                        if tuple(value.shape) != tuple(param.shape):
                            raise ValueError(f"{path}/{file}: {key} has shape {tuple(value.shape)}, "
                                             f"the model expects {tuple(param.shape)}")
                        param.data.copy_(value.to(param.dtype))
                loaded.add(names[key])
        finally:
            if reader is not None:
                del reader
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: no weights for {missing[:5]}{'…' if len(missing) > 5 else ''}")
    model.requires_grad_(False)
    model.eval()
    return model, fingerprint(config)


def _parameter_names(model, params: dict, keys: list[str], path: Path) -> dict[str, str]:
    """Checkpoint key -> the parameter it fills, renamed as transformers' own loading renames
    checkpoint keys (GPT-NeoX's embed_out is the model's lm_head). Tensors that transformers would
    merge or split on loading cannot be streamed one at a time: refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = {}
    for key in keys:          # in sorted order, as transformers applies its grouped renamings
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, params)
        if converted is not None:
            raise ValueError(f"{path}: checkpoint tensor {key} is converted ({converted}) when "
                             f"{type(model).__name__} loads it; ZeRO-3 streaming loads tensors one by one as stored")
        names[key] = name
    return names
