"""Frozen backbones: loading a local HF directory or building a small random model inline, the
decoder layout DeMA and the baselines need (found from the model's own module structure, see
docs/backbones.md), and the fingerprint that groups clients by backbone."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Config fields that define the architecture; volatile fields (paths, versions, dtype) are left out
# so the same backbone loaded on two machines gets the same fingerprint.
_ARCH_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta",
    "tie_word_embeddings", "hidden_act", "rms_norm_eps",
)
# The model types fedzero accepted before it found layouts structurally: their fingerprints are
# hashed exactly as then, so existing stores and saved private adapters stay valid.
_LEGACY_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Further fields that change what a model of the other families computes (Gemma's soft-capping and
# sliding windows, GPT-NeoX's parallel residual and partial rotary, OLMo's qkv clipping, ...).
_FAMILY_FIELDS = (
    "rope_parameters", "layer_types", "sliding_window", "partial_rotary_factor", "use_parallel_residual",
    "final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar", "clip_qkv",
    "layer_norm_eps", "attention_bias", "hidden_activation",
)

# Child names of a decoder layer, tried before the class-name rule (…MLP, …Attention).
_FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn")
_ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
# Child names of a decoder layer for the norm applied to the feed-forward block's output before the
# residual add (Gemma 2/3, OLMo2/3, Exaone 4: post_feedforward_layernorm; GLM-4: post_mlp_layernorm;
# LFM: post_ffn_norm), tried before the name rule (_is_post_feed_forward_norm). Not post_attention_layernorm:
# in LLaMA-like layers that is the norm *before* the MLP, in Gemma 2/3 and OLMo2 the attention branch's.
_POST_FEED_FORWARD_NAMES = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_ffn_norm", "post_mlp_norm",
                            "post_ffn_layernorm", "post_feed_forward_layernorm", "ffn_post_norm", "mlp_post_norm")
_FEED_FORWARD_TOKENS = {"mlp", "ffn", "ffw", "ff", "feedforward"}


# =========================================================================== layout

@dataclass(frozen=True)
class DecoderLayout:
    """Where a decoder model keeps what the adapters touch, by attribute name (so callers can swap a
    module in place): decoder.<layers_name>[i].<mlp_name> is layer i's feed-forward block (the parallel
    adapter reads its input), layer.<post_mlp_norm_name> the norm the layer applies to that block's
    output before adding it to the residual stream (Gemma 2/3, OLMo2: the parallel adapter adds its
    output after it; None where no layer has one), decoder.<norm_name> the final norm (the side stream
    adds its output there), layer.<attention_name> the attention block (the LoRA baselines' targets;
    None if not found)."""

    model_class: str
    decoder: nn.Module
    layers_name: str
    mlp_name: str
    norm_name: str
    attention_name: str | None
    post_mlp_norm_name: str | None = None

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.decoder, self.layers_name)

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self.decoder, self.norm_name)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_name)

    def post_mlp_norm(self, layer: nn.Module) -> nn.Module | None:
        """The norm `layer` applies to its feed-forward block's output, or None (no such norm in this
        layer: most families; some layers of hybrid models)."""
        return getattr(layer, self.post_mlp_norm_name, None) if self.post_mlp_norm_name is not None else None

    def attention(self, layer: nn.Module) -> nn.Module:
        if self.attention_name is None:
            found = [_block(dict(each.named_children()), _ATTENTION_NAMES, "attention") for each in self.layers]
            index = next((i for i, names in enumerate(found) if len(names) != 1 or names != found[0]), 0)
            raise ValueError(f"{self.model_class}: no attention block found in every decoder layer (layer {index}: "
                             f"{_children(self.layers[index])}); the LoRA baselines need their targets given: "
                             "LoRASettings(targets=...)")
        return getattr(layer, self.attention_name)


def decoder_layout(model: nn.Module) -> DecoderLayout:
    """Find the layout from module structure and config alone (no parameter values: under ZeRO-3
    every parameter is an empty shard). The decoder is the first module, in module order under
    model.get_decoder() (else under the model), with a child ModuleList of num_hidden_layers modules:
    the layers. In each layer the feed-forward block is the child named mlp/feed_forward/ffn or of
    class …MLP, the attention block likewise (self_attn/attention/attn/self_attention or …Attention);
    the final norm is the decoder's one child of class …Norm registered after the layers (found by
    class, not by a weight: OLMo's LayerNorm has none). A layer's post-feed-forward norm, where it has
    one, is its child named post_feedforward_layernorm / post_mlp_layernorm / post_ffn_norm / … (else
    the one child whose name has the tokens 'post' and mlp/ffn/ff/feedforward and whose class is a
    …Norm); every layer that has one must use the same name."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_decoder"):
        raise ValueError(f"{name}: not a transformers model (no config or get_decoder()); a backbone must be "
                         "a transformers causal LM")
    depth = getattr(config.get_text_config(), "num_hidden_layers", None)
    decoder, candidates = _decoder(model, depth)
    where = f"in {type(decoder).__name__} (children: {_children(decoder)})"
    layers_name = _one(name, candidates, f"decoder layer list of length num_hidden_layers={depth}", where)
    layers = getattr(decoder, layers_name)
    children = list(decoder.named_children())
    after = children[[n for n, _ in children].index(layers_name) + 1:]
    norm_name = _one(name, [n for n, c in after if "norm" in type(c).__name__.lower()],
                     "final norm (a …Norm module registered after the layers)", where)
    first = dict(layers[0].named_children())
    mlp_name = _one(name, _block(first, _FEED_FORWARD_NAMES, "mlp"), "feed-forward block (mlp)",
                    f"in decoder layer 0 ({type(layers[0]).__name__}; children: {_children(layers[0])})")
    for index, layer in enumerate(layers):
        if not hasattr(layer, mlp_name):
            raise ValueError(f"{name}: decoder layer {index} has no {mlp_name!r} like layer 0 "
                             f"(children: {_children(layer)})")
    # Optional (only the LoRA baselines need it), and absent from some layers of hybrid models.
    attention = _block(first, _ATTENTION_NAMES, "attention")
    every_layer = len(attention) == 1 and all(hasattr(layer, attention[0]) for layer in layers)
    attention_name = attention[0] if every_layer else None
    return DecoderLayout(name, decoder, layers_name, mlp_name, norm_name, attention_name,
                         _post_mlp_norm_name(name, layers, mlp_name))


def _post_mlp_norm_name(model_class: str, layers: nn.ModuleList, mlp_name: str) -> str | None:
    """The name of the layers' post-feed-forward norm (None if no layer has one). Per layer: the child
    named as in _POST_FEED_FORWARD_NAMES, else the one …Norm child whose name reads as a post-norm of
    the feed-forward block; hybrid models may have it in some layers only (OLMo-Hybrid)."""
    names = set()
    for index, layer in enumerate(layers):
        children = dict(layer.named_children())
        found = [n for n in _POST_FEED_FORWARD_NAMES if n in children]
        if not found:
            found = [n for n, c in children.items() if n != mlp_name and _is_post_feed_forward_norm(n, c)]
        if len(found) > 1:
            raise ValueError(f"{model_class}: needs at most one post-feed-forward norm in decoder layer {index} "
                             f"({type(layer).__name__}; children: {_children(layer)}); found several ({found}) "
                             "(how layouts are found: docs/backbones.md)")
        names.update(found)
    if len(names) > 1:
        raise ValueError(f"{model_class}: its decoder layers name their post-feed-forward norms differently "
                         f"({sorted(names)}) (how layouts are found: docs/backbones.md)")
    return names.pop() if names else None


def _is_post_feed_forward_norm(name: str, child: nn.Module) -> bool:
    tokens = set(name.lower().split("_"))
    feed_forward = bool(tokens & _FEED_FORWARD_TOKENS) or {"feed", "forward"} <= tokens
    return "post" in tokens and feed_forward and "norm" in type(child).__name__.lower()


def _decoder(model: nn.Module, depth: int | None) -> tuple[nn.Module, list[str]]:
    """(decoder, names of its child ModuleLists of length `depth`). get_decoder() is a best-effort
    lookup: some wrappers return themselves (Llama4ForCausalLM), some their LM head
    (ModernBertDecoderForCausalLM), hence the search below it and then below the whole model."""
    decoder = model.get_decoder()
    for root in (decoder, model):
        for module in root.modules():
            found = [n for n, c in module.named_children() if isinstance(c, nn.ModuleList) and len(c) == depth]
            if found:
                return module, found
    return decoder, []


def _block(children: dict[str, nn.Module], names: tuple[str, ...], class_suffix: str) -> list[str]:
    return [n for n, c in children.items() if n in names or type(c).__name__.lower().endswith(class_suffix)]


def _one(model_class: str, candidates: list[str], what: str, where: str) -> str:
    if len(candidates) != 1:
        found = f"several ({candidates})" if candidates else "none"
        raise ValueError(f"{model_class}: needs exactly one {what} {where}; found {found} "
                         "(how layouts are found: docs/backbones.md)")
    return candidates[0]


def _children(module: nn.Module) -> str:
    return ", ".join(f"{n} ({type(c).__name__})" for n, c in module.named_children()) or "none"


def attention_projections(model: nn.Module) -> tuple[str, ...]:
    """The LoRA baselines' default targets: the nn.Linear modules (and transformers' Conv1D, GPT-2's)
    inside each decoder layer's attention block, as PEFT target names '<attention>.<linear>' (LLaMA:
    self_attn.q_proj, …k_proj, …v_proj, …o_proj; GPT-NeoX: attention.query_key_value, attention.dense;
    Phi-3: self_attn.qkv_proj, …o_proj; GPT-2: attn.c_attn, attn.c_proj). Qualified by the block's
    name, so a feed-forward Linear of the same name is never caught."""
    from transformers.pytorch_utils import Conv1D

    layout = decoder_layout(model)
    attention = layout.attention(layout.layers[0])
    names = [f"{layout.attention_name}.{n}" for n, m in attention.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    if not names:
        raise ValueError(f"{layout.model_class}: its attention block {type(attention).__name__} holds no "
                         "nn.Linear or Conv1D modules; give the LoRA targets explicitly")
    return tuple(names)


def keep_decoder_layers(model: nn.Module, kept: list[int]) -> None:
    """Drop every decoder layer not in `kept` (in place), renumbering what the cache and per-layer
    config read: each submodule's layer_idx, config.num_hidden_layers and config.layer_types."""
    layout = decoder_layout(model)
    layers = nn.ModuleList([layout.layers[i] for i in kept])
    setattr(layout.decoder, layout.layers_name, layers)
    for new, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config.get_text_config()
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]


# =========================================================================== fingerprint

def fingerprint(config, identity: str | None = None) -> str:
    """12 hex digits naming a backbone: its architecture plus an optional identity string (for
    example the seed of a randomly initialised model), so clients can be grouped by backbone."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    arch = {key: cfg.get(key) for key in _ARCH_FIELDS}
    arch["identity"] = identity
    if cfg.get("model_type") not in _LEGACY_MODEL_TYPES:
        if hasattr(config, "get_text_config"):
            # The decoder's sizes under their standard names, wherever the family keeps them: in
            # text_config (multimodal checkpoints), or under its own names (GPT-2's n_embd, n_layer).
            text = config.get_text_config()
            arch.update({key: getattr(text, key, None) for key in _ARCH_FIELDS if key != "model_type"})
            cfg = text.to_dict()
        arch["architecture"] = _causal_lm_class(arch["model_type"])
        arch.update({key: cfg[key] for key in _FAMILY_FIELDS if key in cfg})
    blob = json.dumps(arch, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _causal_lm_class(model_type: str | None) -> str | None:
    """The class AutoModelForCausalLM builds for a model type (None if it builds none)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


# =========================================================================== specs and loading

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
        known = {"path", "llama_config", "model_config", "init_seed", "dtype", "tokenizer"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

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
    if _causal_lm_class(model_type) is None or model_type not in CONFIG_MAPPING:
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
