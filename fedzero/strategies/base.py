"""What a strategy sees (ClientUpdate), what it decides (coefficients), and the server step.

A strategy's one real hook is `coefficients`: from the K x K Gram of the client updates within one
block it returns β [K], and the block's aggregate update is Σ_k β_k Δ_k. Because it never touches
the tensors, a multi-process aggregator can reduce the Gram, call `coefficients` on one process and
form its own shard of Σ_k β_k Δ_k. `aggregate` is the in-process reference path built on the same hook.
Communication lives outside the strategies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor


@dataclass
class ClientUpdate:
    client_id: str
    delta: dict[str, Tensor]           # shared params after local training minus the global state (θ_k − θ)
    num_samples: int
    group: str                         # backbone fingerprint by default
    slot_use: dict[str, float] | None = None   # block -> how many of the client's layers use it (None: 1 each)


class ServerOptimizer:
    """θ ← θ + lr·m with m ← momentum·m + Δ (momentum = 0: plain θ + lr·Δ).

    The math runs in at least float32 (a bf16 global state is not stepped in bf16) and the result is
    cast back to each parameter's dtype. Keys absent from `delta` are left as they are, buffer included.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.0):
        if lr <= 0:
            raise ValueError(f"server lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
        self.lr, self.momentum = float(lr), float(momentum)
        self._buf: dict[str, Tensor] = {}

    def step(self, global_state: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
        unknown = sorted(set(delta) - set(global_state))
        if unknown:
            raise ValueError(f"server step: delta has keys not in the global state: {unknown}")
        new = {}
        for key, theta in global_state.items():
            if key not in delta:
                new[key] = theta.clone()
                continue
            dtype = torch.promote_types(theta.dtype, torch.float32)
            d = delta[key].to(device=theta.device, dtype=dtype)
            if self.momentum:
                prev = self._buf.get(key)
                d = d.clone() if prev is None else self.momentum * prev.to(dtype) + d
                self._buf[key] = d
            new[key] = (theta.to(dtype) + self.lr * d).to(theta.dtype)
        return new

    def state_dict(self) -> dict[str, Tensor]:
        """The momentum buffers (tensors only, so they save with safetensors); empty without momentum."""
        return {k: v.clone() for k, v in self._buf.items()}

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        self._buf = {k: v.clone() for k, v in sd.items()}


class Strategy(ABC):
    """Aggregation strategy: per block, K client updates -> coefficients β [K] -> server step."""

    name: str = "strategy"

    def __init__(self, *, server_lr: float = 1.0, server_momentum: float = 0.0, seed: int = 0):
        self.seed = int(seed)
        self.server_opt = ServerOptimizer(server_lr, server_momentum)

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

    def aggregate(self, global_state: dict[str, Tensor], updates: list[ClientUpdate], *, round: int,
                  block_of: Callable[[str], str]) -> tuple[dict[str, Tensor], dict]:
        """In-process reference path: per block, Gram -> coefficients -> Σ_k β_k Δ_k; then one server step.

        Returns (new_state: same keys, shapes, dtypes as global_state; metrics =
        {"blocks": {block: {"beta": [K floats], **stats}}, "clients": [ids]}). A block whose total
        weight is 0 is left unchanged (its metrics get "skipped": True).
        """
        blocks: dict[str, list[str]] = {}
        for key in global_state:           # block order = first appearance in the global state
            blocks.setdefault(block_of(key), []).append(key)
        covered = self._validate(global_state, updates, blocks)
        # A client that does not hold a block (e.g. another width's shape-matched projectors) has
        # weight 0 there and contributes nothing.
        weights = self.block_weights(updates, list(blocks)) * covered
        groups = self.group_labels(updates)

        delta, metrics = {}, {"blocks": {}, "clients": [u.client_id for u in updates]}
        for b, (block, keys) in enumerate(blocks.items()):
            # [K, D] in float64: the Gram and the sum are the precision-sensitive parts.
            X = torch.stack([torch.cat([_flat64(u.delta[k]) if covered[i, b] else torch.zeros(global_state[k].numel(), dtype=torch.float64)
                                        for k in keys]) for i, u in enumerate(updates)])
            beta, stats = self.coefficients((X @ X.T).numpy(), weights[:, b], groups, block=block, round=round)
            metrics["blocks"][block] = {"beta": [float(x) for x in beta], **stats}
            if weights[:, b].sum() == 0:
                metrics["blocks"][block]["skipped"] = True
                continue
            flat = torch.from_numpy(np.asarray(beta, dtype=np.float64)) @ X          # [D]
            for key, part in zip(keys, flat.split([global_state[k].numel() for k in keys])):
                delta[key] = part.reshape(global_state[key].shape)
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


def block_coverage(client_id: str, held_keys, blocks: dict[str, list[str]], global_keys: list[str]) -> np.ndarray:
    """Which blocks an update holds: bool [B]. Each block is held whole or not at all (clients of
    different widths hold different shape-matched projector blocks); a key outside the global state,
    a partly held block, or an update holding no block is a ValueError. Shared by the in-process
    strategy and the sharded MPI aggregator so both refuse the same updates with the same words."""
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


def _flat64(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).cpu().to(torch.float64)
