"""Communication accounting from configs alone (no weights needed).

Counts are of parameters; bytes = parameters × bytes per element of what travels.
"""

from __future__ import annotations

from fedzero.adapters.dema import DeMAConfig


def dema_shared_params(config: DeMAConfig, hidden_size: int | None = None) -> int:
    """What one client sends per round with DeMA: every slot's experts (A, B) and gate, whatever the
    backbone; with shared projectors (share='shape-matched', learned projectors) also its width's
    bank: per slot in- and out-projector (d x r each; side placement: the in-projectors and one
    out-projector)."""
    r, h, m, s = config.rank, config.expert_hidden, config.num_experts, config.num_slots
    experts = s * (m * 2 * r * h + m * r)
    if not config.shares_projectors:
        return experts
    if hidden_size is None:
        raise ValueError("with shared projectors (share='shape-matched') what travels depends on the "
                         "backbone's width: pass hidden_size")
    bank = s * hidden_size * r + (hidden_size * r if config.placement == "side" else s * hidden_size * r)
    return experts + bank


def lora_params(model_config, rank: int, targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> int:
    """PEFT LoRA trainable parameters on the attention projections of every layer (A: r×in, B: out×r)."""
    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    d = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or d // heads
    inter = cfg.get("intermediate_size")
    shapes = {  # (in_features, out_features)
        "q_proj": (d, heads * head_dim), "k_proj": (d, kv_heads * head_dim),
        "v_proj": (d, kv_heads * head_dim), "o_proj": (heads * head_dim, d),
        "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d),
    }
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; known: {sorted(shapes)}")
    per_layer = sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    return cfg["num_hidden_layers"] * per_layer


def full_model_params(model_config) -> int:
    """Parameters of a LLaMA-layout model from its config (embeddings, layers, norms, LM head)."""
    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    d, v, inter, layers = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or d // heads
    attn = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    mlp = 3 * d * inter
    per_layer = attn + mlp + 2 * d
    lm_head = 0 if cfg.get("tie_word_embeddings") else v * d
    return v * d + layers * per_layer + d + lm_head
