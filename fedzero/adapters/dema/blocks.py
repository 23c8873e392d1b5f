"""DeMA's aggregation blocks: which shared tensors a strategy aligns together.

One block per depth slot (`slot{s}`: the slot's gate and experts, CMGA aligns each slot on its own);
with shape-matched sharing also one per (slot, width) for the width-d projector bank
(`slot{s}.h{d}`) and one per width for the side stream's out-projector (`side_out.h{d}`), held
only by that width's clients. With depth-aware sharing a bank is per (width, depth ranges): `h{d}_{tag}`
(`bank_name(d, tag)`, tag a digest of the clients' per-slot depth ranges, fedzero/adapters/dema/depth.py);
the blocks of the banks of one width and slot form one family (`bank_family`), which the aggregator
mixes across banks by depth overlap (fedzero/strategies/depth.py).

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
_BANK = r"h\d+(?:_[0-9a-f]+)?"
_BANK_SLOT_KEY = re.compile(rf"^proj\.({_BANK})\.slots\.(\d+)\.")
_BANK_OUT_KEY = re.compile(rf"^proj\.({_BANK})\.out_proj\.")


def bank_name(width: int | str, tag: str | None = None) -> str:
    """The name of the width-d projector bank inside the shared container (`proj.<name>.…`); with
    depth-aware sharing also its depth tag: `h576_3fa9c0d21b`."""
    return f"h{width}" if tag is None else f"h{width}_{tag}"


def bank_family(block: str) -> str:
    """The family of a projector bank's block: the block without the bank's depth tag
    (`slot3.h576_3fa9c0d21b` -> `slot3.h576`); the blocks of one family hold tensors of equal shapes."""
    head, _, bank = block.rpartition(".")
    return f"{head}.{bank.split('_')[0]}"


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
        return bank_block(match.group(2), match.group(1))
    if match := _BANK_OUT_KEY.match(key):
        return side_out_block(match.group(1))
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
