"""Depth ranges for depth-aware projector sharing (`share: depth-aware`, docs/method.md).

Every client places its decoder layers on one depth axis common to the federation, [0, 1]:
- by default layer l of L covers [l/L, (l+1)/L] (relative depth), so the layers of any backbone tile
  [0, 1] and two backbones compare by proportion;
- a backbone cut from a deeper model declares where its layers sit in the source model with the
  HF config attribute `fedzero_layer_depths` (a list of [start, end] per decoder layer, fractions
  of the source model's depth), which `keep_decoder_layers` (fedzero/backbones/layout.py) writes
  when it cuts, so the cut's saved config.json carries it. A kept layer covers the source span from
  its own position up to the next kept layer's (the last kept layer: its own source layer): the
  input of kept layer j stands where source layer kept[j]'s input stood, its output where the next
  kept layer's input does.

A slot covers the union of its layers' ranges (`slot_ranges`: merged, sorted intervals). Clients
of one width whose per-slot ranges are identical hold one projector bank, named by their width and
a digest of the ranges (`depth_tag`); the aggregator averages each bank's slot projector over the
clients whose ranges for that slot overlap it (fedzero/strategies/depth.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Sequence

LAYER_DEPTHS_KEY = "fedzero_layer_depths"
_DIGITS = 12                  # ranges are rounded to 12 decimals, so every client computes the same digest

Interval = tuple[float, float]


def relative_layer_depths(num_layers: int) -> list[Interval]:
    """The default: layer l of L covers [l/L, (l+1)/L]."""
    return [(l / num_layers, (l + 1) / num_layers) for l in range(num_layers)]


def cut_layer_depths(kept: Sequence[int], source: Sequence[Interval]) -> list[Interval]:
    """The ranges of the layers `kept` (sorted source indices) of a model whose layers cover `source`:
    kept layer j spans from source layer kept[j]'s start to kept[j+1]'s start; the last spans its
    own source layer."""
    kept = list(kept)
    if not kept or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= len(source):
        raise ValueError(f"kept layers {kept} are not sorted, distinct indices of the {len(source)} source layers")
    out = [(source[i][0], source[nxt][0]) for i, nxt in zip(kept, kept[1:])]
    return out + [tuple(source[kept[-1]])]


def layer_depths(model_config, num_layers: int) -> list[Interval]:
    """Each decoder layer's [start, end] on the common depth axis: the config's declared
    `fedzero_layer_depths` if it has them (checked), else the relative default."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    declared = getattr(text, LAYER_DEPTHS_KEY, None)
    if declared is None:
        return relative_layer_depths(num_layers)
    where = f"backbone config {LAYER_DEPTHS_KEY}"
    if not isinstance(declared, (list, tuple)) or len(declared) != num_layers:
        raise ValueError(f"{where} must list one [start, end] per decoder layer ({num_layers}), got {declared!r}")
    out = []
    for l, pair in enumerate(declared):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in pair)
                and 0 <= pair[0] < pair[1] <= 1):
            raise ValueError(f"{where}[{l}] must be [start, end] with 0 <= start < end <= 1 (fractions of the "
                             f"source model's depth), got {pair!r}")
        out.append((float(pair[0]), float(pair[1])))
    return out


def merge(intervals: Sequence[Interval]) -> list[list[float]]:
    """Sorted, disjoint [lo, hi] lists covering the union of `intervals` (touching ones joined),
    rounded to 12 decimals."""
    merged: list[list[float]] = []
    for lo, hi in sorted((round(a, _DIGITS), round(b, _DIGITS)) for a, b in intervals):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


def slot_ranges(depths: Sequence[Interval], slot_of_layer: Sequence[int], num_slots: int) -> list[list[list[float]]]:
    """Per slot, the union of its layers' ranges (empty for a slot no layer uses)."""
    return [merge([d for d, s in zip(depths, slot_of_layer) if s == slot]) for slot in range(num_slots)]


def depth_tag(ranges: list[list[list[float]]]) -> str:
    """A short digest of a client's per-slot ranges: clients with identical ranges share a bank."""
    return hashlib.sha256(json.dumps(ranges, separators=(",", ":")).encode()).hexdigest()[:10]
