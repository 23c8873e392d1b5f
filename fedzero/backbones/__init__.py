"""Frozen backbones: where they come from, how they are loaded, the decoder layout the adapters need,
and the fingerprint that groups clients by backbone (docs/backbones.md).

Modules: ``spec`` (BackboneSpec, load_backbone), ``layout`` (DecoderLayout found from module
structure, the LoRA baselines' targets, dropping decoder layers), ``fingerprints``, ``zero3`` (a local
HF directory loaded ZeRO-3-partitioned, weights streamed one tensor at a time), ``smollm``
(SmolLM2-135M converted once from its GGUF package) and ``recipes`` (the bench's testbed backbones:
healed depth variants and small models of other widths, built and cached); those last three are
imported by their module name where they are used.
"""

from .fingerprints import fingerprint
from .layout import DecoderLayout, attention_projections, decoder_layout, keep_decoder_layers
from .spec import BackboneSpec, inline_config, load_backbone

__all__ = [
    "BackboneSpec",
    "DecoderLayout",
    "attention_projections",
    "decoder_layout",
    "fingerprint",
    "inline_config",
    "keep_decoder_layers",
    "load_backbone",
]
