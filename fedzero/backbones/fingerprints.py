"""The fingerprint that groups clients by backbone: a hash of the architecture (and an optional
identity, e.g. the seed of a random model), the same for the same backbone on any machine."""

from __future__ import annotations

import hashlib
import json

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
        arch["architecture"] = causal_lm_class(arch["model_type"])
        arch.update({key: cfg[key] for key in _FAMILY_FIELDS if key in cfg})
    blob = json.dumps(arch, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def causal_lm_class(model_type: str | None) -> str | None:
    """The class AutoModelForCausalLM builds for a model type (None if it builds none)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
