"""The two passes over one rank's slices of the updates, and the coefficients between them.

Per rank, for its segments and the clients whose updates hold the segment's block (an update may
hold a subset of the blocks, each whole; a client lacking a block is a zero row there, as in
Strategy.aggregate: nothing is read for it, and its Gram entries and weight there are 0):
  pass 1  read the rows (kept in their file dtype), X = [k, n] float64, gram[block] += X Xᵀ
  --      the Grams are summed over ranks; rank 0: Strategy.block_coefficients; β broadcast
  pass 2  Δ_slice = β_block @ X (float64, as in Strategy.aggregate), then the strategy's server
          step (ServerOptimizer.apply) on the slice: elementwise, so slicing changes nothing
Slices are cached between the passes while they fit `cache_bytes`; otherwise pass 2 reads them again.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from fedzero.strategies import BlockCoefficients, Strategy

from .mpi import bcast_array, on_root
from .plan import RoundPlan
from .shards import Segment, TensorInfo, chunks, read_rows, segment_numel

Chunk = tuple[Segment, int, int]                 # rows [a, z) of a segment: the unit of reading


@dataclass
class RankSlices:
    """What one rank reads: its segments and the read chunks of the clients holding each one's block."""
    segments: list[Segment]
    info_of: dict[str, TensorInfo]
    holders_of: dict[str, np.ndarray]            # key -> the clients whose updates hold its block
    chunks: list[Chunk]
    keep: bool                                   # the slices fit cache_bytes: kept between the passes


def rank_slices(plan: RoundPlan, segments: list[Segment], *, cache_bytes: int, chunk_bytes: int) -> RankSlices:
    info_of = {i.key: i for i in plan.infos}
    holders = [np.flatnonzero(plan.covered[:, b]) for b in range(len(plan.blocks))]
    holders_of = {k: holders[plan.block_of_key[k]] for k in info_of}
    size = sum(segment_numel(s, info_of[s.key]) * info_of[s.key].torch_dtype.itemsize * len(holders_of[s.key])
               for s in segments)
    my_chunks = [(seg, a, z) for seg in segments if len(holders_of[seg.key])
                 for a, z in chunks(seg, info_of[seg.key], len(holders_of[seg.key]), chunk_bytes)]
    return RankSlices(segments, info_of, holders_of, my_chunks, size <= cache_bytes)


class UpdateReader:
    """The update files, open for slice reads, and float64 views of what was read.

    The float64 arithmetic runs over sub-chunks of `width` elements per client through one reused
    [K, width] buffer of about 2 MB: it stays in cache between the conversion from the file dtype
    and the BLAS call, so the float64 copy costs little memory traffic (docs/aggregator.md).
    """

    def __init__(self, plan: RoundPlan, slices: RankSlices, stack: ExitStack):
        from safetensors import safe_open

        self.slices = slices
        self.handles = [stack.enter_context(safe_open(f.path, framework="pt")) for f in plan.update_files]
        K = len(plan.updates)
        self.width = max(1024, (2 << 20) // (8 * max(K, 1)))
        self.work = np.empty((K, self.width), dtype=np.float64)
        self.bytes_read = 0

    def read(self, seg: Segment, a: int, z: int) -> list[torch.Tensor]:
        """The holders' rows [a, z) of a segment: k x [n], file dtype."""
        info = self.slices.info_of[seg.key]
        parts = [read_rows(self.handles[i], info, a, z) for i in self.slices.holders_of[seg.key]]
        self.bytes_read += sum(p.numel() * p.element_size() for p in parts)
        return parts

    def subchunks(self, parts: list[torch.Tensor]):
        """Yield (offset, [k, m] float64 view) over the flat parts (k holders, each [n], file dtype)."""
        arrays = [p.numpy() if p.dtype in (torch.float32, torch.float64) else None for p in parts]
        n = parts[0].numel()
        for o in range(0, n, self.width):
            m = min(self.width, n - o)
            X = self.work[:len(parts), :m]
            for k, part in enumerate(parts):
                if arrays[k] is not None:
                    np.copyto(X[k], arrays[k][o:o + m])
                else:                                                 # bf16/fp16: numpy has no bf16
                    torch.from_numpy(X[k]).copy_(part[o:o + m])
            yield o, X


def partial_grams(plan: RoundPlan, slices: RankSlices, reader: UpdateReader, grams: np.ndarray,
                  cache: dict[tuple[str, int], list[torch.Tensor]]) -> None:
    """Pass 1: add this rank's part of every block's Gram into grams [B, K, K]; with `slices.keep`,
    keep what was read in `cache` for pass 2."""
    K = len(plan.updates)
    for seg, a, z in slices.chunks:
        parts = reader.read(seg, a, z)
        b, idx = plan.block_of_key[seg.key], slices.holders_of[seg.key]
        full = len(idx) == K
        g = grams[b] if full else np.zeros((len(idx), len(idx)))
        for _, X in reader.subchunks(parts):
            g += X @ X.T
        if not full:
            grams[b][np.ix_(idx, idx)] += g
        if slices.keep:
            cache[(seg.key, a)] = parts


def exchange_coefficients(comm, plan: RoundPlan, strategy: Strategy, grams: np.ndarray) -> BlockCoefficients:
    """Rank 0 computes the coefficients from the reduced Grams; every rank gets β and the skip flags
    (one [B, K+1] float64 buffer) and the per-block stats (small dicts)."""
    K, B = len(plan.updates), len(plan.blocks)
    found: dict[str, BlockCoefficients] = {}

    def compute() -> list[dict]:
        found["root"] = strategy.block_coefficients(grams, plan.updates, plan.blocks, plan.covered, round=plan.round)
        return found["root"].stats

    stats = on_root(comm, compute, "computing the coefficients")
    root = found.get("root") or BlockCoefficients(np.zeros((B, K)), np.zeros(B, dtype=bool), stats)
    coef = np.ascontiguousarray(np.concatenate([root.beta, root.skipped[:, None].astype(np.float64)], axis=1))
    bcast_array(comm, coef)
    return BlockCoefficients(coef[:, :K].copy(), coef[:, K] > 0, stats,
                             defense=found["root"].defense if "root" in found else None)


def combine(plan: RoundPlan, slices: RankSlices, reader: UpdateReader, coef: BlockCoefficients,
            cache: dict[tuple[str, int], list[torch.Tensor]], robust=None) -> dict[str, torch.Tensor]:
    """Pass 2: this rank's slice of Σ_k β_k Δ_k per key (flat float64), skipped blocks left out.
    With a coordinate-wise `robust.aggregate` (trimmed mean, median), the statistic over the holders'
    clipped values instead (β then holds the clip factors; fedzero/strategies/robust.py)."""
    if robust is not None and robust.coordinatewise:
        from fedzero.strategies.robust import coordinate_stat
    else:
        robust = None
    delta: dict[str, torch.Tensor] = {}
    for seg, a, z in slices.chunks:
        b = plan.block_of_key[seg.key]
        if coef.skipped[b]:
            cache.pop((seg.key, a), None)
            continue
        info = slices.info_of[seg.key]
        if seg.key not in delta:
            delta[seg.key] = torch.empty(segment_numel(seg, info), dtype=torch.float64)
        parts = cache.pop((seg.key, a)) if slices.keep else reader.read(seg, a, z)
        target = delta[seg.key].numpy()[(a - seg.start) * info.row_numel:(z - seg.start) * info.row_numel]
        beta = coef.beta[b][slices.holders_of[seg.key]]                 # the others' rows are 0
        for o, X in reader.subchunks(parts):
            if robust is not None:
                coordinate_stat(beta[:, None] * X, robust, out=target[o:o + X.shape[1]])
            else:
                np.dot(beta, X, out=target[o:o + X.shape[1]])            # [m] float64
    return delta


def step_slices(plan: RoundPlan, slices: RankSlices, strategy: Strategy, delta: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """The server step on this rank's slices: reads the global's and the loaded server state's
    slices; returns (new global slices, new momentum slices, bytes read)."""
    from safetensors import safe_open

    theta, buf, read = {}, {}, 0
    with safe_open(plan.global_file.path, framework="pt") as g:
        for seg in slices.segments:
            theta[seg.key] = read_rows(g, slices.info_of[seg.key], seg.start, seg.stop)
            read += theta[seg.key].numel() * theta[seg.key].element_size()
    if plan.state_file is not None:
        with safe_open(plan.state_file.path, framework="pt") as s:
            for seg in slices.segments:
                if seg.key in plan.state_keys:
                    buf[seg.key] = read_rows(s, slices.info_of[seg.key], seg.start, seg.stop)
                    read += buf[seg.key].numel() * buf[seg.key].element_size()
    new_theta, new_buf = strategy.server_opt.apply(theta, delta, buf)
    return new_theta, new_buf, read
