"""Sharded aggregation of one round: each rank reads, reduces and steps only its slice of the
shared parameter space (docs/aggregator.md, "How it works").

    plan (plan.py, rank 0) -> shard plan (shards.py, every rank) -> pass 1 (partial Grams) ->
    Allreduce -> coefficients (Strategy.block_coefficients on rank 0, broadcast) -> pass 2
    (combination and server step; passes.py) -> assembly on rank 0 (assemble.py)
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch

from fedzero.strategies import Strategy

from .assemble import assemble, buffer_dtypes
from .depth import DepthBanks, depth_keys, depth_plan
from .mpi import all_ok, allreduce_sum, on_root, rank_of, size_of
from .passes import UpdateReader, combine, exchange_coefficients, partial_grams, rank_slices, step_slices
from .plan import RoundPlan
from .shards import plan_shards


@dataclass
class ShardResult:
    """What one rank computed; only rank 0's `state`/`buffers` are filled after assembly."""
    gram: np.ndarray                   # [B, K, K] float64, full after the Allreduce
    beta: np.ndarray                   # [B, K] float64
    skipped: np.ndarray                # [B] bool
    stats: list[dict]                  # per-block strategy stats (every rank)
    update_bytes: int = 0              # bytes of update data read by this rank (both passes)
    other_bytes: int = 0               # global + server-state slices read by this rank
    passes: int = 1                    # 1: slices cached between the passes; 2: read again
    seconds: dict[str, float] = field(default_factory=dict)   # this rank's time per stage
    state: dict[str, torch.Tensor] | None = None      # rank 0: the new global
    nonfinite: dict[str, str] = field(default_factory=dict)   # client -> reason: stopped after pass 1
    buffers: dict[str, torch.Tensor] | None = None    # rank 0: the new server optimizer state
    defense: dict | None = None                       # rank 0: clipping / DP report (strategies/robust.py)


def aggregate_sharded(comm, plan: RoundPlan, strategy: Strategy, *, cache_bytes: int,
                      chunk_bytes: int) -> ShardResult:
    """Both passes, the reductions and the assembly (collective: every rank calls it)."""
    # depth-aware projector banks mix across keys: rank 0 handles them whole (depth.py)
    depth = depth_plan(plan, strategy)
    whole = depth_keys(plan, depth)
    shards = plan_shards([i for i in plan.infos if i.key not in whole], size_of(comm))
    slices = rank_slices(plan, shards[rank_of(comm)], cache_bytes=cache_bytes, chunk_bytes=chunk_bytes)
    K, B = len(plan.updates), len(plan.blocks)
    grams = np.zeros((B, K, K))
    banks: dict[str, DepthBanks] = {}
    cache: dict[tuple[str, int], list[torch.Tensor]] = {}
    seconds: dict[str, float] = {}

    with ExitStack() as stack:
        reader = UpdateReader(plan, slices, stack)
        tick = time.perf_counter()
        all_ok(comm, lambda: partial_grams(plan, slices, reader, grams, cache), "reading updates (pass 1)")
        tick = _lap(seconds, "pass1_s", tick)
        allreduce_sum(comm, grams)
        if depth is not None:
            def read_banks() -> None:
                banks["root"] = DepthBanks(plan, depth)
                banks["root"].grams(grams)          # rank 0's grams are the ones the coefficients use
            on_root(comm, read_banks, "reading the depth-aware projector banks")
        # a client's squared norm in a block (the Gram's diagonal) is finite iff its values there are:
        # floats of at most 64 bits squared and summed in float64 cannot overflow (|x| <= 3.4e38)
        nonfinite = on_root(comm, lambda: nonfinite_clients(plan, grams), "checking the updates' values")
        if nonfinite:
            return ShardResult(grams, np.zeros((B, K)), np.zeros(B, dtype=bool), [], nonfinite=nonfinite,
                               update_bytes=reader.bytes_read, seconds=seconds)
        coef = exchange_coefficients(comm, plan, strategy, grams)
        tick = _lap(seconds, "coefficients_s", tick)

        def pass2():
            delta = combine(plan, slices, reader, coef, cache, strategy.robust)
            if strategy.dp is not None:           # Gaussian noise on the mean, each rank on its own slice
                from fedzero.strategies.robust import add_noise, noise_generator

                gen = noise_generator(strategy.dp, plan.round, rank_of(comm))
                for key in sorted(delta):
                    sigma = coef.stats[plan.block_of_key[key]].get("dp_sigma")
                    if sigma is not None:
                        delta[key] = add_noise(delta[key], sigma, gen)
            return step_slices(plan, slices, strategy, delta)

        new_theta, new_buf, other_bytes = all_ok(comm, pass2, "combining updates (pass 2)")
        tick = _lap(seconds, "pass2_s", tick)

    buf_dtype = buffer_dtypes(plan, coef.skipped, strategy.server_opt.momentum)
    state, buffers = assemble(comm, plan, shards, new_theta, new_buf, buf_dtype)
    update_bytes = reader.bytes_read
    if depth is not None:
        def step_banks() -> tuple[int, int]:
            read = banks["root"].step(strategy, coef.beta, coef.skipped, state, buffers)
            return banks["root"].bytes_read, read
        extra = on_root(comm, step_banks, "stepping the depth-aware projector banks")
        if rank_of(comm) == 0:              # every rank reports its own reads; rank 0 read the banks
            update_bytes, other_bytes = update_bytes + extra[0], other_bytes + extra[1]
    _lap(seconds, "assemble_s", tick)
    return ShardResult(grams, coef.beta, coef.skipped, coef.stats, update_bytes=update_bytes,
                       other_bytes=other_bytes, passes=1 if slices.keep else 2, seconds=seconds,
                       state=state, buffers=buffers, defense=coef.defense)


def nonfinite_clients(plan: RoundPlan, grams: np.ndarray) -> dict[str, str]:
    """Rank 0, from the reduced Grams: client -> the reason its update is left out (the first
    tensor holding a NaN or Inf, named as the in-process path names it: fedzero.store.screen)."""
    from safetensors import safe_open

    from fedzero.store.screen import nonfinite_reason

    diag = np.diagonal(grams, axis1=1, axis2=2)                # [B, K]
    out = {}
    for k in np.flatnonzero(~np.isfinite(diag).all(axis=0)):
        blocks = set(np.flatnonzero(~np.isfinite(diag[:, k])).tolist())
        keys = sorted(i.key for i in plan.infos if plan.block_of_key[i.key] in blocks)
        why = None
        with safe_open(plan.update_files[k].path, framework="pt") as f:
            for key in keys:
                why = nonfinite_reason(key, f.get_tensor(key))
                if why:
                    break
        out[plan.updates[k].client_id] = why or f"non-finite values in block(s) {sorted(plan.blocks[b] for b in blocks)}"
    return out


def _lap(seconds: dict, name: str, since: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(now - since, 3)
    return now
