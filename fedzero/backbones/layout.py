"""The decoder layout DeMA and the baselines need: where a decoder model keeps its layers, their
feed-forward and attention blocks, their post-feed-forward norms and the final norm, found from the
model's own module structure (docs/backbones.md); the LoRA baselines' default targets in it; and the
layer surgery the bench's depth variants use."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
    config read: each submodule's layer_idx, config.num_hidden_layers and config.layer_types; and
    recording the kept layers' depth ranges in the source model (config.fedzero_layer_depths)."""
    layout = decoder_layout(model)
    layers = nn.ModuleList([layout.layers[i] for i in kept])
    setattr(layout.decoder, layout.layers_name, layers)
    for new, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config.get_text_config()
    # where the kept layers sit in the source model, for DeMA's depth-aware sharing: saved with the
    # config (config.json), read by fedzero/adapters/dema/depth.py
    from fedzero.adapters.dema.depth import LAYER_DEPTHS_KEY, cut_layer_depths, layer_depths

    source = layer_depths(config, config.num_hidden_layers)
    setattr(config, LAYER_DEPTHS_KEY, [list(d) for d in cut_layer_depths(kept, source)])
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
