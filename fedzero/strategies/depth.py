"""Depth-aware aggregation of projector banks (DeMA `share: depth-aware`; docs/method.md).

A depth-aware client declares with its update (`ClientUpdate.depth`, the manifest's `depth`):

    {"overlap_min": 0.5,
     "blocks": {"slot0.h576_3fa9c0d21b": {"family": "slot0.h576", "ranges": [[0.0, 0.1333]]}, ...}}

for each projector-bank block it holds, the block's *family* (the blocks of every bank of one width
and slot: tensors of equal shapes) and its depth ranges on the federation's common axis [0, 1]
(sorted, disjoint [lo, hi] intervals). Clients with identical ranges hold the same bank (block).

For a declared block a, with ranges R_a, the weight of client b holding block g(b) of a's family:

    c_ab = IoU(R_a, R_b) * num_samples_b * use_b(g(b))   if IoU(R_a, R_b) >= overlap_min, else 0

(IoU = |R_a ∩ R_b| / |R_a ∪ R_b|, 1 for identical ranges), β_ab = c_ab / Σ_b c_ab, and the block's
aggregate update, against its own global value θ_a, is

    D_a = Σ_b β_ab (Δ_b + θ_g(b) − θ_a)        so that with server lr 1:  θ_a ← Σ_b β_ab (θ_g(b) + Δ_b)

the overlap-weighted mean of the clients' trained projectors. With one bank (every client's ranges
identical) the second term vanishes and β is FedAvg's w / Σw: bit for bit today's shape-matched
FedAvg. A bank nobody else overlaps averages over its own clients only (a lone client keeps its own
projector). Depth-aware blocks use this rule under every strategy; CMGA aligns the other blocks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

DECLARATION_KEYS = ("overlap_min", "blocks")
# DeMA's depth-aware bank blocks (fedzero/adapters/dema/blocks.py: `slot{s}.h{d}_{tag}`, `side_out.h{d}_{tag}`)
_TAGGED_BANK = re.compile(r"(^|\.)h\d+_[0-9a-f]+$")


def require_declarations(updates, blocks: list[str], covered: np.ndarray) -> None:
    """Without any depth declaration, a held depth-aware bank block would be averaged over its own
    bank only, silently: refuse it, naming the client and the block."""
    for b, block in enumerate(blocks):
        if _TAGGED_BANK.search(block):
            for k, u in enumerate(updates):
                if covered[k, b]:
                    raise ValueError(f"client {u.client_id!r} holds the depth-aware block {block!r} but its update "
                                     "declares no depth ranges for it (manifest field 'depth'; "
                                     "ClientUpdate.depth = DeMAModel.depth_declaration())")


def check_declaration(client_id: str, depth) -> None:
    """A client's depth declaration, structurally: a ValueError naming the client, key and reason."""
    problem = declaration_problem(depth)
    if problem is not None:
        raise ValueError(f"client {client_id!r}: {problem}")


def declaration_problem(depth, name: str = "depth") -> str | None:
    """What is wrong with a depth declaration (`name`.key: reason), or None."""
    if not isinstance(depth, Mapping):
        return f"{name} must be a mapping {{'overlap_min', 'blocks'}}, got {type(depth).__name__}"
    if sorted(depth) != sorted(DECLARATION_KEYS):
        return f"{name} must have exactly the keys {list(DECLARATION_KEYS)}, got {sorted(depth)}"
    m = depth["overlap_min"]
    if not (isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m <= 1):
        return f"{name}.overlap_min must be a number in (0, 1], got {m!r}"
    blocks = depth["blocks"]
    if not isinstance(blocks, Mapping) or not blocks:
        return f"{name}.blocks must be a non-empty mapping block -> {{'family', 'ranges'}}, got {blocks!r}"
    for block, entry in blocks.items():
        where = f"{name}.blocks[{block!r}]"
        if not isinstance(entry, Mapping) or sorted(entry) != ["family", "ranges"]:
            return f"{where} must be a mapping with exactly the keys ['family', 'ranges'], got {entry!r}"
        if not isinstance(entry["family"], str) or not entry["family"]:
            return f"{where}.family must be a non-empty string, got {entry['family']!r}"
        ranges = entry["ranges"]
        ok = isinstance(ranges, list) and all(
            isinstance(r, (list, tuple)) and len(r) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in r)
            and 0 <= r[0] < r[1] <= 1 for r in ranges)
        if ok and any(prev[1] > nxt[0] for prev, nxt in zip(ranges, ranges[1:])):
            ok = False
        if not ok:
            return (f"{where}.ranges must be a list of [lo, hi] with 0 <= lo < hi <= 1, sorted and disjoint "
                    f"(fractions of the common depth axis), got {ranges!r}")
    return None


def overlap(a, b) -> float:
    """IoU of two depth-range sets (each sorted, disjoint [lo, hi] intervals): |a ∩ b| / |a ∪ b|;
    1.0 for identical sets (empty ones included), 0.0 if they do not meet."""
    a = [tuple(map(float, r)) for r in a]
    b = [tuple(map(float, r)) for r in b]
    if a == b:
        return 1.0
    inter = sum(max(0.0, min(x1, y1) - max(x0, y0)) for x0, x1 in a for y0, y1 in b)
    union = sum(x1 - x0 for x0, x1 in a) + sum(y1 - y0 for y0, y1 in b) - inter
    return inter / union if union > 0 else 0.0


class DepthPlan:
    """The depth-aware blocks of a round and, per block, the overlaps and weights of the clients.

    blocks: the round's block names; covered [K, B] whether client k holds block b; W [K, B] the
    strategy's plain weights (num_samples × use). Raises ValueError naming the client on a bad or
    inconsistent declaration."""

    def __init__(self, updates, blocks: list[str], covered: np.ndarray, W: np.ndarray):
        index = {b: i for i, b in enumerate(blocks)}
        self.family: dict[int, str] = {}            # block index -> family
        self.ranges: dict[int, list] = {}           # block index -> its ranges
        self.overlap_min: float | None = None
        first_min = None
        for k, u in enumerate(updates):
            if u.depth is None:
                continue
            check_declaration(u.client_id, u.depth)
            m = float(u.depth["overlap_min"])
            if self.overlap_min is None:
                self.overlap_min, first_min = m, u.client_id
            elif m != self.overlap_min:
                raise ValueError(f"client {u.client_id!r}: depth.overlap_min {m} differs from client "
                                 f"{first_min!r}'s {self.overlap_min}; every client must use the same")
            for block, entry in u.depth["blocks"].items():
                if block not in index:
                    raise ValueError(f"client {u.client_id!r}: depth.blocks names {block!r}, which is no block "
                                     "of the global state")
                b = index[block]
                if not covered[k, b]:
                    raise ValueError(f"client {u.client_id!r}: depth.blocks names {block!r}, which its update "
                                     "does not hold")
                ranges = [[float(lo), float(hi)] for lo, hi in entry["ranges"]]
                if b in self.family and (self.family[b], self.ranges[b]) != (entry["family"], ranges):
                    raise ValueError(f"client {u.client_id!r}: depth.blocks[{block!r}] declares family "
                                     f"{entry['family']!r}, ranges {ranges}; another client holding it declared "
                                     f"{self.family[b]!r}, {self.ranges[b]}")
                self.family[b], self.ranges[b] = entry["family"], ranges
        for k, u in enumerate(updates):             # a holder of a depth-aware block must declare it
            for b in self.family:
                if covered[k, b] and (u.depth is None or blocks[b] not in u.depth["blocks"]):
                    raise ValueError(f"client {u.client_id!r} holds the depth-aware block {blocks[b]!r} but its "
                                     "update declares no depth ranges for it (manifest field 'depth')")
        self.members: dict[str, list[int]] = {}     # family -> its blocks
        for b, fam in sorted(self.family.items()):
            self.members.setdefault(fam, []).append(b)
        self.holds = {}                             # block -> [K] index of the family block client k holds, or -1
        self.weights: dict[int, np.ndarray] = {}    # block -> c [K]
        self.overlaps: dict[int, list] = {}         # block -> [K] IoU (None: client outside the family)
        for b, fam in self.family.items():
            held = np.full(len(updates), -1)
            for g in self.members[fam]:
                twice = np.flatnonzero(covered[:, g] & (held >= 0))
                if len(twice):
                    raise ValueError(f"client {updates[twice[0]].client_id!r} holds two depth-aware blocks of family "
                                     f"{fam!r}: {blocks[held[twice[0]]]!r} and {blocks[g]!r}")
                held[covered[:, g]] = g
            c, ious = np.zeros(len(updates)), []
            for k in range(len(updates)):
                g = held[k]
                if g < 0:
                    ious.append(None)
                    continue
                iou = overlap(self.ranges[b], self.ranges[g])
                ious.append(iou)
                if iou >= self.overlap_min:
                    c[k] = iou * W[k, g]
            self.holds[b], self.weights[b], self.overlaps[b] = held, c, ious

    def __contains__(self, b: int) -> bool:
        return b in self.family

    def foreign(self, b: int, beta: np.ndarray) -> dict[int, float]:
        """γ_ag = Σ_{k holding g} β_ak for the other blocks g of block a's family with a nonzero share."""
        out: dict[int, float] = {}
        for k, g in enumerate(self.holds[b]):
            if g >= 0 and g != b and beta[k] != 0:
                out[int(g)] = out.get(int(g), 0.0) + float(beta[k])
        return out


def family_keys(keys_a: list[str], keys_g: list[str], shape_of) -> dict[str, str]:
    """Key of block a -> the corresponding key of block g of its family (by sorted position;
    equal shapes required)."""
    sa, sg = sorted(keys_a), sorted(keys_g)
    if len(sa) != len(sg) or any(tuple(shape_of(x)) != tuple(shape_of(y)) for x, y in zip(sa, sg)):
        raise ValueError(f"depth-aware blocks of one family hold different tensors: {sa[:3]}… and {sg[:3]}…")
    return dict(zip(sa, sg))


def block_delta(plan: DepthPlan, b: int, beta: np.ndarray, block_keys: Mapping[int, list[str]], shape_of,
                deltas: list[Mapping], theta: Mapping) -> dict[str, Tensor]:
    """D_a of depth-aware block b (module docstring), per key of the block, flat float64 torch tensors.

    block_keys: block index -> its keys (every block of b's family); deltas: per client, key -> its
    delta (only the family's keys are read, and only from clients with a nonzero β); theta: key ->
    the global's value (only read for the other banks with a nonzero share)."""
    keys = block_keys[b]
    sizes = [int(np.prod(shape_of(k), dtype=np.int64)) for k in keys]
    maps = {g: family_keys(keys, block_keys[g], shape_of) for g in set(int(g) for g in plan.holds[b] if g >= 0)}

    def row(k: int):
        g = int(plan.holds[b][k])
        if g < 0:
            return torch.zeros(sum(sizes), dtype=torch.float64)
        return torch.cat([_flat64(deltas[k][maps[g][key]]) for key in keys])

    X = torch.stack([row(k) for k in range(len(beta))])
    flat = torch.from_numpy(np.asarray(beta, dtype=np.float64)) @ X
    foreign = plan.foreign(b, beta)
    if foreign:
        own = torch.cat([_flat64(theta[key]) for key in keys])
        for g, gamma in sorted(foreign.items()):
            flat += gamma * (torch.cat([_flat64(theta[maps[g][key]]) for key in keys]) - own)
    return {key: part for key, part in zip(keys, flat.split(sizes))}


def _flat64(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).cpu().to(torch.float64)
