"""What a strategy sees (ClientUpdate) and what it decides (coefficients per block).

A strategy's one real hook is `coefficients`: from the K x K Gram of the client updates within one
block it returns β [K], and the block's aggregate update is Σ_k β_k Δ_k. `block_coefficients` runs
it over every block of a round, from the blocks' Grams alone, and is what both aggregation paths
call: the in-process `aggregate` (the reference) and the sharded MPI aggregator, which reduces the
Grams across ranks, calls it on one process and forms its own shard of Σ_k β_k Δ_k. Both then step
with the strategy's `ServerOptimizer` (server.py). Communication lives outside the strategies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import coefficients as _coefficients
from .blocks import BlockOf, block_coverage, group_blocks
from .depth import DepthPlan, block_delta, require_declarations
from .server import ServerOptimizer


@dataclass
class ClientUpdate:
    client_id: str
    delta: dict[str, Tensor]           # shared params after local training minus the global state (θ_k − θ)
    num_samples: int
    group: str                         # backbone fingerprint by default
    slot_use: dict[str, float] | None = None   # block -> how many of the client's layers use it (None: 1 each)
    depth: dict | None = None          # depth-aware projector banks: {"overlap_min", "blocks"} (depth.py)


@dataclass
class BlockCoefficients:
    """A round's coefficients: per block b, the aggregate update is Σ_k beta[b, k] Δ_k."""
    beta: np.ndarray               # [B, K] float64
    skipped: np.ndarray            # [B] bool: total weight 0, the block stays unchanged
    stats: list[dict]              # per block: {"beta": [K floats], **strategy stats, "skipped": True if so}
    depth: DepthPlan | None = None  # the round's depth-aware blocks, if any (depth.py)
    defense: dict | None = None    # clipping and DP report of the round (robust.py); None when off


class Strategy(ABC):
    """Aggregation strategy: per block, K client updates -> coefficients β [K] -> server step."""

    name: str = "strategy"

    def __init__(self, *, server_lr: float = 1.0, server_momentum: float = 0.0, seed: int = 0):
        self.seed = int(seed)
        self.server_opt = ServerOptimizer(server_lr, server_momentum)
        self.robust = None      # federation.robust (robust.RobustSettings): clipping, trimmed mean / median
        self.dp = None          # federation.dp (robust.DPSettings): clipping and Gaussian noise

    def set_defenses(self, robust=None, dp=None) -> "Strategy":
        """Turn on robust aggregation and/or differential privacy (fedzero/strategies/robust.py);
        ValueError if they do not compose with this strategy."""
        from .robust import check_composition

        why = check_composition(self.name, robust, dp)
        if why:
            raise ValueError(why)
        self.robust = robust if robust is not None and robust.active else None
        self.dp = dp
        return self

    def group_labels(self, updates: list[ClientUpdate]) -> list[str]:
        """The group label of each update, as passed to `coefficients` (default: its fingerprint)."""
        return [u.group for u in updates]

    def block_weights(self, updates: list[ClientUpdate], blocks: list[str]) -> np.ndarray:
        """[K, B] weights: w_kb = num_samples_k × (layers of client k using block b; 1 if slot_use is not given)."""
        W = np.zeros((len(updates), len(blocks)))
        for k, u in enumerate(updates):
            for b, block in enumerate(blocks):
                use = u.slot_use.get(block, 0) if u.slot_use else 1
                W[k, b] = float(u.num_samples) * float(use)
                if not (W[k, b] >= 0 and np.isfinite(W[k, b])):
                    raise ValueError(f"client {u.client_id!r}: weight for block {block!r} must be finite and "
                                     f">= 0 (num_samples={u.num_samples}, slot_use={use})")
        return W

    @abstractmethod
    def coefficients(self, gram: np.ndarray, weights: np.ndarray, groups: list[str], *,
                     block: str, round: int) -> tuple[np.ndarray, dict]:
        """gram [K, K] float64 Gram of the client deltas within one block; weights [K]; groups: K labels.

        Returns β [K] (the block's aggregate delta is Σ_k β_k Δ_k) and a stats dict (JSON-friendly).
        """

    def block_coefficients(self, grams: np.ndarray, updates: list[ClientUpdate], blocks: list[str],
                           covered: np.ndarray, *, round: int) -> BlockCoefficients:
        """Coefficients of every block from its Gram: grams [B, K, K] float64 (block b's Gram of the
        client deltas, zero rows and columns where a client lacks the block), covered [K, B] whether
        client k holds block b. A client that does not hold a block (e.g. another width's
        shape-matched projectors) has weight 0 there and contributes nothing; a block whose total
        weight is 0 is skipped. A depth-aware projector block (declared by the updates' `depth`) is
        the overlap-weighted mean over its family (depth.py), whatever the strategy: β_ak = c_ak / Σc_a."""
        plain = self.block_weights(updates, blocks)
        weights = plain * covered       # [K, B]
        groups = self.group_labels(updates)
        depth = DepthPlan(updates, blocks, covered, plain) if any(u.depth is not None for u in updates) else None
        if depth is None:
            require_declarations(updates, blocks, covered)
        out = BlockCoefficients(np.zeros((len(blocks), len(updates))), np.zeros(len(blocks), dtype=bool), [],
                                depth if depth is not None and depth.family else None)
        scales = None
        if self.robust is not None or self.dp is not None:
            scales, grams, weights = self._defend(grams, weights, covered, updates, depth, out, round)
        for b, block in enumerate(blocks):
            if depth is not None and b in depth:
                weights[:, b] = depth.weights[b]
                beta, stats = _coefficients.fedavg_coefficients(grams[b], weights[:, b], groups)
                stats["depth"] = {"family": depth.family[b], "ranges": depth.ranges[b],
                                  "overlap_min": depth.overlap_min, "overlap": depth.overlaps[b]}
            else:
                beta, stats = self.coefficients(grams[b], weights[:, b], groups, block=block, round=round)
            if scales is not None:
                if self.robust is not None and self.robust.coordinatewise:
                    beta = scales * covered[:, b]          # the clip factors: the statistic is taken per coordinate
                    stats["aggregate"] = self.robust.aggregate
                else:
                    beta = beta * scales                   # Σ β_k (s_k Δ_k) = Σ (β_k s_k) Δ_k
                if self.dp is not None and covered[:, b].sum() > 0:
                    stats["dp_sigma"] = self.dp.noise_multiplier * self.dp.clip / float(covered[:, b].sum())
            out.beta[b] = beta
            stats = {"beta": [float(x) for x in beta], **stats}
            if weights[:, b].sum() == 0:
                out.skipped[b] = True
                stats["skipped"] = True
            out.stats.append(stats)
        return out

    def _defend(self, grams: np.ndarray, weights: np.ndarray, covered: np.ndarray, updates: list[ClientUpdate],
                depth, out: BlockCoefficients, round: int):
        """Clipping (and DP's uniform weights): (scales [K], the clipped Grams, the weights)."""
        from .robust import clip_scales, dp_epsilon

        if depth is not None and depth.family:
            raise ValueError("federation.robust and federation.dp do not apply to DeMA share: depth-aware (its "
                             "projector banks mix across blocks by overlap); turn them off or use another sharing")
        norms = np.sqrt(np.clip(np.einsum("bkk->k", grams), 0.0, None))
        scales, report = clip_scales(norms, self.robust, self.dp)
        report["clients"] = [u.client_id for u in updates]
        grams = grams * scales[None, :, None] * scales[None, None, :]
        if self.robust is not None:
            report["robust"] = {"clip_to_median": self.robust.clip_to_median, "aggregate": self.robust.aggregate,
                                **({"trim": self.robust.trim} if self.robust.aggregate == "trimmed_mean" else {})}
        if self.dp is not None:
            weights = covered.astype(np.float64)       # the unweighted mean: sensitivity C / K per block
            report["dp"] = {"clip": self.dp.clip, "noise_multiplier": self.dp.noise_multiplier,
                            "delta": self.dp.delta, "rounds_accounted": round + 1,
                            "epsilon": dp_epsilon(self.dp.noise_multiplier, round + 1, self.dp.delta),
                            "accountant": "dp-accounting RdpAccountant (Gaussian, no subsampling), rounds 0..R"}
        out.defense = report
        return scales, grams, weights

    def aggregate(self, global_state: dict[str, Tensor], updates: list[ClientUpdate], *, round: int,
                  block_of: BlockOf) -> tuple[dict[str, Tensor], dict]:
        """In-process reference path: the blocks' Grams, `block_coefficients`, Σ_k β_k Δ_k per block,
        then one server step. `block_of`: key -> block, a function or a mapping (e.g. the blocks a
        global's manifest declares).

        Returns (new_state: same keys, shapes, dtypes as global_state; metrics =
        {"blocks": {block: {"beta": [K floats], **stats}}, "clients": [ids]}). A block whose total
        weight is 0 is left unchanged (its metrics get "skipped": True).
        """
        blocks = group_blocks(global_state, block_of)    # block order = first appearance in the global state
        covered = self._validate(global_state, updates, blocks)
        grams = np.zeros((len(blocks), len(updates), len(updates)))
        for b, keys in enumerate(blocks.values()):
            X = _block_matrix(global_state, updates, keys, covered[:, b])
            grams[b] = (X @ X.T).numpy()
        coef = self.block_coefficients(grams, updates, list(blocks), covered, round=round)

        delta = {}
        block_keys = dict(enumerate(blocks.values()))
        for b, keys in enumerate(blocks.values()):
            if coef.skipped[b]:
                continue
            if coef.depth is not None and b in coef.depth:
                delta.update(block_delta(coef.depth, b, coef.beta[b], block_keys, lambda k: global_state[k].shape,
                                         [u.delta for u in updates], global_state))
                for key in keys:
                    delta[key] = delta[key].reshape(global_state[key].shape)
                continue
            X = _block_matrix(global_state, updates, keys, covered[:, b])
            if self.robust is not None and self.robust.coordinatewise:
                from .robust import coordinate_stat

                holders = np.flatnonzero(covered[:, b])
                flat = torch.from_numpy(coordinate_stat(coef.beta[b][holders, None] * X.numpy()[holders], self.robust))
            else:
                flat = torch.from_numpy(coef.beta[b]) @ X          # [D]
            if "dp_sigma" in coef.stats[b]:
                from .robust import add_noise, noise_generator

                flat = add_noise(flat, coef.stats[b]["dp_sigma"], noise_generator(self.dp, round, b))
            for key, part in zip(keys, flat.split([global_state[k].numel() for k in keys])):
                delta[key] = part.reshape(global_state[key].shape)
        metrics = {"blocks": dict(zip(blocks, coef.stats)), "clients": [u.client_id for u in updates]}
        if coef.defense is not None:
            metrics["defense"] = coef.defense
        return self.server_opt.step(global_state, delta), metrics

    @staticmethod
    def _validate(global_state: dict[str, Tensor], updates: list[ClientUpdate],
                  blocks: dict[str, list[str]]) -> np.ndarray:
        """Checks the updates; returns covered [K, B]: whether client k holds block b.

        An update holds each block whole or not at all (clients of different widths hold different
        shape-matched projector blocks); a partly held block is an error.
        """
        if not updates:
            raise ValueError("aggregate: no client updates")
        ids = [u.client_id for u in updates]
        if len(set(ids)) != len(ids):
            raise ValueError(f"aggregate: duplicate client ids in {ids}")
        covered = np.zeros((len(updates), len(blocks)), dtype=bool)
        for i, u in enumerate(updates):
            covered[i] = block_coverage(u.client_id, u.delta, blocks, list(global_state))
            for key in u.delta:
                if u.delta[key].shape != global_state[key].shape:
                    raise ValueError(f"client {u.client_id!r}, key {key!r}: delta shape "
                                     f"{tuple(u.delta[key].shape)} != global shape {tuple(global_state[key].shape)}")
        for u in updates:
            if u.num_samples < 0:
                raise ValueError(f"client {u.client_id!r}: num_samples must be >= 0, got {u.num_samples}")
        return covered


def _block_matrix(global_state: dict[str, Tensor], updates: list[ClientUpdate], keys: list[str],
                  holds: np.ndarray) -> Tensor:
    """[K, D] float64: each client's delta over the block's keys, zeros for a client that lacks the
    block. Float64 because the Gram and the sum are the precision-sensitive parts."""
    def row(i: int, u: ClientUpdate) -> Tensor:
        if not holds[i]:
            return torch.zeros(sum(global_state[k].numel() for k in keys), dtype=torch.float64)
        return torch.cat([_flat64(u.delta[k]) for k in keys])

    return torch.stack([row(i, u) for i, u in enumerate(updates)])


def _flat64(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).cpu().to(torch.float64)
