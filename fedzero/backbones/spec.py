"""Where a client's frozen backbone comes from (BackboneSpec: a local HF directory or a small random
model built inline) and loading it frozen, with its fingerprint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedzero.fields import from_known_fields

from .fingerprints import causal_lm_class, fingerprint
from .layout import decoder_layout


@dataclass
class BackboneSpec:
    """Where a client's frozen backbone comes from: `path` (a local HF model directory), or a small
    model built inline with random weights from `init_seed`: `llama_config` (kwargs of
    transformers.LlamaConfig) or `model_config` (any family: {"model_type": "qwen3", ...that
    family's config fields}, built with AutoConfig.for_model and AutoModelForCausalLM.from_config)."""

    path: str | None = None
    llama_config: dict | None = None
    model_config: dict | None = None
    init_seed: int = 0
    dtype: str = "float32"
    tokenizer: str | None = None  # "byte" for inline models; default: the model directory's tokenizer
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        given = [k for k in ("path", "llama_config", "model_config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a backbone needs exactly one of 'path' (local HF directory), 'llama_config' or "
                             f"'model_config' (an inline random model); got {given or 'none'}")
        if self.path is not None and not Path(self.path).is_dir():
            raise FileNotFoundError(f"backbone path {self.path!r} is not a directory (model hubs are not used: give a local HF model directory)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"backbone dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.extra:
            raise ValueError(f"unknown backbone field(s) {sorted(self.extra)}")
        if self.model_config is not None:
            self.hf_config()        # validates the fields now, not when a client first builds it

    @classmethod
    def from_dict(cls, data: dict) -> "BackboneSpec":
        """From a config mapping, with the settings classes' one builder (unknown keys refused)."""
        if "extra" in data:             # a field of the class, but no setting a config may give
            raise ValueError("unknown backbone field(s) ['extra']")
        return from_known_fields(cls, data, "backbone field")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def hf_config(self):
        """The backbone's transformers config: the directory's config.json, or the inline fields."""
        from transformers import AutoConfig, LlamaConfig

        if self.path is not None:
            return AutoConfig.from_pretrained(self.path, local_files_only=True)
        if self.llama_config is not None:
            return LlamaConfig(**self.llama_config)
        return inline_config(self.model_config, "backbone model_config")


def inline_config(fields: dict, where: str):
    """A transformers config from {"model_type": ..., fields}; errors name the field and the reason."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(fields, dict):
        raise ValueError(f"{where} must be a mapping of config fields, got {type(fields).__name__}")
    model_type = fields.get("model_type")
    if causal_lm_class(model_type) is None or model_type not in CONFIG_MAPPING:
        raise ValueError(f"{where}.model_type: {model_type!r} is not a transformers model type with a causal "
                         "LM (e.g. 'llama', 'qwen3', 'gemma3_text', 'phi3', 'olmo2', 'gpt_neox')")
    rest = {k: v for k, v in fields.items() if k != "model_type"}
    config_class = CONFIG_MAPPING[model_type]
    try:
        config = AutoConfig.for_model(model_type, **rest)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ValueError(f"{where} ({config_class.__name__}): {error.__cause__ or error}") from error
    # The config classes keep an unknown keyword as a plain attribute: a misspelt field would
    # silently build a different model. Known legacy keywords (rope_theta) are consumed, not kept.
    known = {f.name for f in dataclasses.fields(config_class)} | set(config_class.attribute_map)
    stray = sorted(k for k in rest if k not in known and hasattr(config, k))
    if stray:
        raise ValueError(f"{where}: {config_class.__name__} has no field(s) {stray}")
    vocab = config.get_text_config().vocab_size
    for token in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, token, None)
        ids = value if isinstance(value, list) else [value]
        if any(isinstance(i, int) and not 0 <= i < vocab for i in ids):
            raise ValueError(f"{where}.{token}: {value} is outside vocab_size {vocab} (unless given, it is the "
                             f"{model_type} default); set it (the byte tokenizer's: bos 256, eos 257, pad 258)")
    return config


def load_backbone(spec: BackboneSpec) -> tuple[nn.Module, str]:
    """Returns (frozen model in eval mode, fingerprint). Fails early, with what is missing, on a
    model whose decoder layout is not found."""
    from transformers import AutoModelForCausalLM

    config = spec.hf_config()
    with torch.device("meta"):      # no memory, no weights: a model that does not fit fails before loading
        decoder_layout(AutoModelForCausalLM.from_config(config))
    if spec.path is not None:
        model = AutoModelForCausalLM.from_pretrained(spec.path, local_files_only=True, dtype=spec.torch_dtype)
        fp = fingerprint(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(config).to(spec.torch_dtype)
        fp = fingerprint(config, identity=f"random-init-seed-{spec.init_seed}")
    model.requires_grad_(False)
    model.eval()
    return model, fp
