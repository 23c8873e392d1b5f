"""Frozen backbones: loading from a local HF directory or building a small LLaMA inline, the
layer layout DeMA needs, and the fingerprint that groups clients by backbone."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Decoder models whose layers look like LLaMA's: model.model.layers[i].mlp, model.model.norm.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Config fields that define the architecture; volatile fields (paths, versions, dtype) are left out
# so the same backbone loaded on two machines gets the same fingerprint.
_ARCH_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta",
    "tie_word_embeddings", "hidden_act", "rms_norm_eps",
)


def check_supported(model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"DeMA supports decoder models with the LLaMA layer layout {SUPPORTED_MODEL_TYPES}; "
            f"got model_type={model_type!r} ({type(model).__name__})"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    check_supported(model)
    return model.model.layers


def final_norm(model: nn.Module) -> nn.Module:
    check_supported(model)
    return model.model.norm


def fingerprint(config, identity: str | None = None) -> str:
    """12 hex digits naming a backbone: its architecture plus an optional identity string (for
    example the seed of a randomly initialised model), so clients can be grouped by backbone."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    arch = {key: cfg.get(key) for key in _ARCH_FIELDS}
    arch["identity"] = identity
    blob = json.dumps(arch, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class BackboneSpec:
    """Where a client's frozen backbone comes from: `path` (a local HF model directory) or
    `llama_config` (kwargs of transformers.LlamaConfig, built with random weights from `init_seed`)."""

    path: str | None = None
    llama_config: dict | None = None
    init_seed: int = 0
    dtype: str = "float32"
    tokenizer: str | None = None  # "byte" for inline models; default: the model directory's tokenizer
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.path is None) == (self.llama_config is None):
            raise ValueError("a backbone needs exactly one of 'path' (local HF directory) or 'llama_config'")
        if self.path is not None and not Path(self.path).is_dir():
            raise FileNotFoundError(f"backbone path {self.path!r} is not a directory (model hubs are not used: give a local HF model directory)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"backbone dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.extra:
            raise ValueError(f"unknown backbone field(s) {sorted(self.extra)}")

    @classmethod
    def from_dict(cls, data: dict) -> "BackboneSpec":
        known = {"path", "llama_config", "init_seed", "dtype", "tokenizer"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def load_backbone(spec: BackboneSpec) -> tuple[nn.Module, str]:
    """Returns (frozen model in eval mode, fingerprint)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if spec.path is not None:
        config = AutoConfig.from_pretrained(spec.path, local_files_only=True)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{spec.path}: model_type {config.model_type!r} is not supported; DeMA needs the LLaMA "
                f"layer layout {SUPPORTED_MODEL_TYPES}"
            )
        model = AutoModelForCausalLM.from_pretrained(spec.path, local_files_only=True, dtype=spec.torch_dtype)
        fp = fingerprint(config)
    else:
        config = LlamaConfig(**spec.llama_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = LlamaForCausalLM(config).to(spec.torch_dtype)
        fp = fingerprint(config, identity=f"random-init-seed-{spec.init_seed}")
    model.requires_grad_(False)
    model.eval()
    return model, fp
