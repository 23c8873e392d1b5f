"""DeMA's aggregation blocks: which shared tensors a strategy aligns together.

One block per depth slot (`slot{s}`: the slot's gate and experts, CMGA aligns each slot on its own);
with shape-matched sharing also one per (slot, width) for the width-d projector bank
(`slot{s}.h{d}`) and one per width for the side stream's out-projector (`side_out.h{d}`), held
only by that width's clients.

The blocks are declared by the shared container's structure (`declared_blocks`), and the aggregator
writes them into every global it publishes (the manifest's `meta["blocks"]`). A global published
without them is read with the key-name rule (`shared_block`), which gives the same blocks for every
key DeMA declares; `global_blocks` is the one place that chooses between the two.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from torch import nn

_SLOT_KEY = re.compile(r"^slots\.(\d+)\.")
_BANK_SLOT_KEY = re.compile(r"^proj\.h(\d+)\.slots\.(\d+)\.")
_BANK_OUT_KEY = re.compile(r"^proj\.h(\d+)\.out_proj\.")


def bank_name(width: int | str) -> str:
    """The name of the width-d projector bank inside the shared container (`proj.<name>.…`)."""
    return f"h{width}"


def slot_block(slot: int | str) -> str:
    return f"slot{slot}"


def bank_block(slot: int | str, bank: str) -> str:
    return f"{slot_block(slot)}.{bank}"


def side_out_block(bank: str) -> str:
    return f"side_out.{bank}"


def declared_blocks(shared: nn.Module) -> dict[str, str]:
    """Shared key -> block of a DeMAShared container, in its parameters' order, from its structure:
    `slots[s]` is slot s's block, `proj[bank].slots[s]` the (slot, width) block and
    `proj[bank].out_proj` the side out-projector's. A shared parameter outside all of them is an error."""
    parts = [(f"slots.{s}", slot_block(s), mixture) for s, mixture in enumerate(shared.slots)]
    for name, bank in shared.proj.items():
        parts += [(f"proj.{name}.slots.{s}", bank_block(s, name), p) for s, p in enumerate(bank.slots)]
        if bank.out_proj is not None:
            parts.append((f"proj.{name}.out_proj", side_out_block(name), bank.out_proj))
    block_of = {f"{prefix}.{key}": block for prefix, block, module in parts for key, _ in module.named_parameters()}
    keys = [key for key, _ in shared.named_parameters()]
    outside = [key for key in keys if key not in block_of]
    if outside:
        raise ValueError(f"shared DeMA parameters outside every aggregation block: {outside[:5]}")
    return {key: block_of[key] for key in keys}


def shared_block(key: str) -> str:
    """The block of a shared key from its name alone: for globals published without their blocks."""
    if match := _SLOT_KEY.match(key):
        return slot_block(match.group(1))
    if match := _BANK_SLOT_KEY.match(key):
        return bank_block(match.group(2), bank_name(match.group(1)))
    if match := _BANK_OUT_KEY.match(key):
        return side_out_block(bank_name(match.group(1)))
    raise ValueError(f"{key!r} is not a DeMA shared key (expected 'slots.<s>.…' or 'proj.h<d>.…')")


def is_bank_key(key: str) -> bool:
    """Whether a shared key belongs to a width's projector bank (which only that width's clients hold)."""
    return bool(_BANK_SLOT_KEY.match(key) or _BANK_OUT_KEY.match(key))


def global_blocks(keys: Iterable[str], declared: Mapping[str, str] | None) -> dict[str, str]:
    """Key -> block for the tensors of a global: the blocks its manifest declares, or, for a global
    published without them (`declared` None), the key-name rule. Declared blocks must name exactly
    the global's tensors."""
    keys = list(keys)
    if declared is None:
        return {key: shared_block(key) for key in keys}
    missing = [k for k in keys if k not in declared]
    unexpected = sorted(set(declared) - set(keys))
    if missing or unexpected:
        raise ValueError(f"the global's declared blocks do not match its tensors: no block for {missing[:5]}, "
                         f"blocks for absent tensors {unexpected[:5]}")
    return {key: declared[key] for key in keys}
