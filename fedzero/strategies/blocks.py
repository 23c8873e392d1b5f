"""Blocks from the strategies' side: grouping a global's keys into blocks, and which blocks an update holds.

Both aggregation paths (`Strategy.aggregate` and the sharded MPI aggregator) group and check
through here, so they form the same blocks and refuse the same updates with the same words.
Which block a key belongs to is the adapter's declaration (fedzero/adapters/dema/blocks.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

BlockOf = Callable[[str], str] | Mapping[str, str]


def group_blocks(keys: Iterable[str], block_of: BlockOf) -> dict[str, list[str]]:
    """Block -> its keys, blocks in order of first appearance in `keys`. `block_of` maps a key to
    its block: a function, or a mapping that must hold every key."""
    blocks: dict[str, list[str]] = {}
    for key in keys:
        if isinstance(block_of, Mapping):
            if key not in block_of:
                raise ValueError(f"tensor {key!r} of the global state is in no aggregation block")
            block = block_of[key]
        else:
            block = block_of(key)
        blocks.setdefault(block, []).append(key)
    return blocks


def block_coverage(client_id: str, held_keys, blocks: dict[str, list[str]], global_keys: list[str]) -> np.ndarray:
    """Which blocks an update holds: bool [B]. Each block is held whole or not at all (clients of
    different widths hold different shape-matched projector blocks); a key outside the global state,
    a partly held block, or an update holding no block is a ValueError."""
    held, known = set(held_keys), set(global_keys)
    unexpected = [k for k in held_keys if k not in known]
    if unexpected:
        raise ValueError(f"client {client_id!r}: delta keys not in the global state (unexpected {unexpected})")
    row = np.zeros(len(blocks), dtype=bool)
    for b, (block, keys) in enumerate(blocks.items()):
        present = [k in held for k in keys]
        if any(present) and not all(present):
            missing = [k for k in keys if k not in held]
            raise ValueError(f"client {client_id!r}: delta holds block {block!r} only in part (missing {missing})")
        row[b] = all(present)
    if not row.any():
        raise ValueError(f"client {client_id!r}: delta keys do not match the global state "
                         f"(missing {global_keys[:5]}…, it holds no block)")
    return row
