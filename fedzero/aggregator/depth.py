"""Depth-aware projector banks in the sharded aggregator (DeMA `share: depth-aware`).

A depth-aware bank's new value mixes the *other* banks of its family (other tensors: their deltas
and global values), which the row sharding of one key per rank cannot see. Those banks are small
(per slot r x d in- and out-projectors of one width), so rank 0 handles them whole with the same
function as the in-process path (fedzero.strategies.depth.block_delta), and the ranks shard the
rest: their keys are left out of the shard plan, their Grams are computed on rank 0 before the
coefficients, and their new values and momentum buffers are set into rank 0's assembled result.
"""

from __future__ import annotations

import numpy as np
import torch

from fedzero.strategies import Strategy
from fedzero.strategies.depth import DepthPlan, block_delta

from .plan import RoundPlan


def depth_plan(plan: RoundPlan, strategy: Strategy) -> DepthPlan | None:
    """The round's depth-aware blocks (None if no update declares any)."""
    if not any(u.depth is not None for u in plan.updates):
        return None
    depth = DepthPlan(plan.updates, plan.blocks, plan.covered, strategy.block_weights(plan.updates, plan.blocks))
    return depth if depth.family else None


def depth_keys(plan: RoundPlan, depth: DepthPlan | None) -> set[str]:
    if depth is None:
        return set()
    return {i.key for i in plan.infos if plan.block_of_key[i.key] in depth}


class DepthBanks:
    """Rank 0: the depth-aware keys' deltas (whole tensors, of the clients holding them)."""

    def __init__(self, plan: RoundPlan, depth: DepthPlan):
        from safetensors import safe_open

        self.plan, self.depth = plan, depth
        self.keys = sorted(depth_keys(plan, depth))
        self.block_keys: dict[int, list[str]] = {}
        for info in plan.infos:                      # sorted by key, as group_blocks in the single process
            b = plan.block_of_key[info.key]
            if b in depth:
                self.block_keys.setdefault(b, []).append(info.key)
        self.deltas: list[dict[str, torch.Tensor]] = []
        self.bytes_read = 0
        for k, src in enumerate(plan.update_files):
            held = [key for key in self.keys if plan.covered[k, plan.block_of_key[key]]]
            with safe_open(src.path, framework="pt") as f:
                part = {key: f.get_tensor(key) for key in held}
            self.bytes_read += sum(t.numel() * t.element_size() for t in part.values())
            self.deltas.append(part)

    def grams(self, grams: np.ndarray) -> None:
        """grams[b] of each depth-aware block, as Strategy.aggregate forms it (its holders' deltas)."""
        for b, keys in self.block_keys.items():
            X = torch.stack([torch.cat([d[k].reshape(-1).to(torch.float64) for k in keys]) if self.plan.covered[i, b]
                             else torch.zeros(sum(_numel(self.plan, k) for k in keys), dtype=torch.float64)
                             for i, d in enumerate(self.deltas)])
            grams[b] = (X @ X.T).numpy()

    def step(self, strategy: Strategy, beta: np.ndarray, skipped: np.ndarray,
             state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> int:
        """Set the depth-aware keys' new values (and momentum buffers) into rank 0's assembled
        `state` and `buffers`; returns the bytes of global and server state read."""
        from safetensors import safe_open

        shape = {i.key: i.shape for i in self.plan.infos}
        family = sorted({k for b in self.block_keys for g in self.depth.members[self.depth.family[b]]
                         for k in self.block_keys.get(g, [])})
        with safe_open(self.plan.global_file.path, framework="pt") as g:
            theta = {k: g.get_tensor(k) for k in family}
        buf = {}
        if self.plan.state_file is not None:
            with safe_open(self.plan.state_file.path, framework="pt") as s:
                buf = {k: s.get_tensor(k) for k in self.keys if k in self.plan.state_keys}
        read = sum(t.numel() * t.element_size() for t in (*theta.values(), *buf.values()))
        delta = {}
        for b in sorted(self.block_keys):
            if skipped[b]:
                continue
            for key, flat in block_delta(self.depth, b, beta[b], self.block_keys, shape.__getitem__,
                                         self.deltas, theta).items():
                delta[key] = flat.reshape(shape[key])
        new_theta, new_buf = strategy.server_opt.apply({k: theta[k] for k in self.keys}, delta, buf)
        state.update(new_theta)
        buffers.update({k: v for k, v in new_buf.items()})
        return read


def _numel(plan: RoundPlan, key: str) -> int:
    return next(i.numel for i in plan.infos if i.key == key)
