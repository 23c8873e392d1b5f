"""Sharded aggregation of one round: each rank reads, reduces and steps only its slice of the
shared parameter space (docs/aggregator.md, "How it works").

Which rows of which tensor each rank holds is the shard plan (shards.py).

Per rank, for its segments and the clients whose updates hold the segment's block (an update may
hold a subset of the blocks, each whole; a client lacking a block is a zero row there, as in
Strategy.aggregate: nothing is read for it, and its Gram entries and weight there are 0):
  pass 1  read the rows (kept in their file dtype), X = [k, n] float64, gram[block] += X Xᵀ
  --      one Allreduce of the stacked [B, K, K] float64 Grams; rank 0: β per block; Bcast β
  pass 2  Δ_slice = β_block @ X (float64, as in Strategy.aggregate), then the server
          optimizer step on the slice (elementwise, so slicing changes nothing)
  --      each rank sends its new global and momentum slices (raw bytes, any dtype) straight into
          place in rank 0's full tensors; rank 0 commits
Slices are cached between the passes while they fit `cache_bytes`; otherwise pass 2 reads them again.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from fedzero.store import FederationStore, StoreError
from fedzero.store.artifact import check_file, check_keys, check_size
from fedzero.strategies import ClientUpdate, ServerOptimizer, Strategy
from fedzero.strategies.base import block_coverage

from .mpi import (AggregationError, all_ok, allreduce_sum, bcast_array, on_root, rank_of, recv_into,
                  send_to_root, size_of)
from .shards import Segment, TensorInfo, chunks, header, plan_shards, read_rows, segment_numel, segment_view


@contextmanager
def store_refusals():
    """A store refusal (missing file, bad manifest, size or checksum mismatch) as an AggregationError
    with the store's own message."""
    try:
        yield
    except StoreError as err:
        raise AggregationError(str(err)) from err


@dataclass
class Source:
    """One file every rank reads slices of: a client update, the global, or the server state."""
    name: str                      # "client a", "global of round 3", ...
    path: str
    sha256: str
    bytes: int


@dataclass
class RoundPlan:
    """Everything rank 0 decides before the heavy work; small, broadcast to all ranks (pickled)."""
    round: int
    infos: list[TensorInfo]                       # the global's tensors, sorted by key
    blocks: list[str]                             # block names, in order of first appearance
    block_of_key: dict[str, int]                  # key -> index into blocks
    updates: list[ClientUpdate]                   # delta left empty: weights and groups only
    update_files: list[Source]
    covered: np.ndarray                           # [K, B] bool: whether client k's update holds block b
    global_file: Source
    state_file: Source | None                     # server state after round-1 (momentum), if loaded
    state_keys: list[str] = field(default_factory=list)


def make_plan(store: FederationStore, round: int, manifests: list[dict], strategy: Strategy,
              block_of: Callable[[str], str], *, reset_server_state: bool) -> RoundPlan:
    """Rank 0: read headers and manifests, check every update against the global, build the plan."""
    gpath = store.global_path(round)
    with store_refusals():
        gman = store.global_manifest(round)
        ginfo = header(gpath)
        check_keys(list(ginfo), gman, gpath, f"global of round {round}")
    infos = [ginfo[k] for k in sorted(ginfo)]
    blocks: list[str] = []
    block_of_key = {}
    for info in infos:
        name = block_of(info.key)
        if name not in blocks:
            blocks.append(name)
        block_of_key[info.key] = blocks.index(name)

    keys_of = [[i.key for i in infos if block_of_key[i.key] == b] for b in range(len(blocks))]

    # As Strategy._validate, in the same order and with the same messages: an update holds each
    # block whole or not at all (DeMA's shape-matched clients hold only their own width's projector
    # blocks); a partly held block, a key the global lacks, or no block at all is an error.
    updates, files = [], []
    covered = np.zeros((len(manifests), len(blocks)), dtype=bool)
    for i, m in enumerate(manifests):
        cid = m["client_id"]
        path = store.update_path(round, cid)
        uinfo = header(path)
        try:
            covered[i] = block_coverage(cid, sorted(uinfo), dict(zip(blocks, keys_of)), [x.key for x in infos])
        except ValueError as err:
            raise AggregationError(str(err)) from None
        for key in sorted(uinfo):
            if uinfo[key].shape != ginfo[key].shape:
                raise AggregationError(f"client {cid!r}, key {key!r}: update shape {list(uinfo[key].shape)} "
                                       f"!= global shape {list(ginfo[key].shape)}")
        updates.append(ClientUpdate(cid, {}, m["num_samples"], m["fingerprint"], m.get("slot_use")))
        files.append(Source(f"update of client {cid}", str(path), m["sha256"], m["bytes"]))

    state_file, state_keys = None, []
    momentum = strategy.server_opt.momentum
    if momentum and round > 0 and not reset_server_state:
        spath = store.server_state_path(round - 1)
        with store_refusals():
            sman = store.server_state_manifest(round - 1)
        if sman is None:
            raise AggregationError(
                f"server momentum is {momentum} but round {round - 1} left no server state "
                f"({store.layout.server_state_files(round - 1).manifest}); a restart would not continue exactly. "
                "Pass reset_server_state=True (--reset-server-state) to start the momentum afresh.")
        sinfo = header(spath)
        for key, info in sinfo.items():
            if key not in ginfo or info.shape != ginfo[key].shape:
                raise AggregationError(f"server state of round {round - 1}: tensor {key!r} "
                                       f"{list(info.shape)} does not match the global state")
        state_file = Source(f"server state of round {round - 1}", str(spath), sman.sha256, sman.bytes)
        state_keys = sorted(sinfo)
    return RoundPlan(round, infos, blocks, block_of_key, updates, files, covered,
                     Source(f"global of round {round}", str(gpath), gman.sha256, gman.bytes),
                     state_file, state_keys)


def verify_files(comm, plan: RoundPlan, mode: str) -> int:
    """sha256 of every file against its manifest, files dealt round-robin to the ranks (each file is
    hashed by exactly one rank). mode "size": sizes only. Returns bytes hashed on this rank."""
    files = plan.update_files + [plan.global_file] + ([plan.state_file] if plan.state_file else [])
    rank, world = rank_of(comm), size_of(comm)

    def check() -> int:
        hashed = 0
        with store_refusals():
            for i, src in enumerate(files):
                if mode == "sha256" and i % world == rank:
                    check_file(src.path, src.bytes, src.sha256, src.name)
                    hashed += src.bytes
                else:
                    check_size(src.path, src.bytes, src.name)
        return hashed

    return all_ok(comm, check, "verification")


@dataclass
class ShardResult:
    """What one rank computed; only rank 0's `state`/`buffers` are filled after assembly."""
    gram: np.ndarray                   # [B, K, K] float64, full after the Allreduce
    beta: np.ndarray                   # [B, K] float64
    skipped: np.ndarray                # [B] bool
    stats: list[dict]                  # rank 0 only: per-block strategy stats
    update_bytes: int = 0              # bytes of update data read by this rank (both passes)
    other_bytes: int = 0               # global + server-state slices read by this rank
    passes: int = 1                    # 1: slices cached between the passes; 2: read again
    seconds: dict[str, float] = field(default_factory=dict)   # this rank's time per stage
    state: dict[str, torch.Tensor] | None = None      # rank 0: the new global
    buffers: dict[str, torch.Tensor] | None = None    # rank 0: the new server optimizer state


def aggregate_sharded(comm, plan: RoundPlan, strategy: Strategy, *, cache_bytes: int,
                      chunk_bytes: int) -> ShardResult:
    """Both passes, the reductions and the assembly (collective: every rank calls it)."""
    from safetensors import safe_open

    rank, world = rank_of(comm), size_of(comm)
    shards = plan_shards(plan.infos, world)
    mine = shards[rank]
    info_of = {i.key: i for i in plan.infos}
    K, B = len(plan.updates), len(plan.blocks)
    # The clients whose updates hold each block (the others contribute a zero row: nothing is read
    # for them, their Gram rows and columns stay 0, and their weight there is 0).
    holders = [np.flatnonzero(plan.covered[:, b]) for b in range(B)]
    holders_of = {k: holders[plan.block_of_key[k]] for k in info_of}
    item = {k: i.torch_dtype.itemsize for k, i in info_of.items()}
    my_bytes = sum(segment_numel(s, info_of[s.key]) * item[s.key] * len(holders_of[s.key]) for s in mine)
    keep = my_bytes <= cache_bytes
    out = ShardResult(np.zeros((B, K, K)), np.zeros((B, K)), np.zeros(B, dtype=bool), [], passes=1 if keep else 2)

    my_chunks = [(seg, a, z) for seg in mine if len(holders_of[seg.key])
                 for a, z in chunks(seg, info_of[seg.key], len(holders_of[seg.key]), chunk_bytes)]
    # The float64 arithmetic runs over sub-chunks of `width` elements per client through one reused
    # [K, width] buffer of about 2 MB: it stays in cache between the conversion from the file dtype
    # and the BLAS call, so the float64 copy costs little memory traffic (docs/aggregator.md).
    width = max(1024, (2 << 20) // (8 * max(K, 1)))
    work = np.empty((K, width), dtype=np.float64)

    def subchunks(parts: list[torch.Tensor]):
        """Yield (offset, [k, m] float64 view) over the flat parts (k holders, each [n], file dtype)."""
        arrays = [p.numpy() if p.dtype in (torch.float32, torch.float64) else None for p in parts]
        n = parts[0].numel()
        for o in range(0, n, width):
            m = min(width, n - o)
            X = work[:len(parts), :m]
            for k, part in enumerate(parts):
                if arrays[k] is not None:
                    np.copyto(X[k], arrays[k][o:o + m])
                else:                                                 # bf16/fp16: numpy has no bf16
                    torch.from_numpy(X[k]).copy_(part[o:o + m])
            yield o, X

    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f.path, framework="pt")) for f in plan.update_files]

        def read_chunk(seg: Segment, a: int, b: int) -> list[torch.Tensor]:
            # the holders' rows only: k x [n], file dtype
            parts = [read_rows(handles[i], info_of[seg.key], a, b) for i in holders_of[seg.key]]
            out.update_bytes += sum(p.numel() * p.element_size() for p in parts)
            return parts

        # ---- pass 1: partial Grams over this rank's slice
        cache: dict[tuple[str, int], list[torch.Tensor]] = {}

        def pass1() -> None:
            for seg, a, z in my_chunks:
                parts = read_chunk(seg, a, z)
                b, idx = plan.block_of_key[seg.key], holders_of[seg.key]
                full = len(idx) == K
                g = out.gram[b] if full else np.zeros((len(idx), len(idx)))
                for _, X in subchunks(parts):
                    g += X @ X.T
                if not full:
                    out.gram[b][np.ix_(idx, idx)] += g
                if keep:
                    cache[(seg.key, a)] = parts

        tick = time.perf_counter()
        all_ok(comm, pass1, "reading updates (pass 1)")
        tick = _lap(out.seconds, "pass1_s", tick)
        allreduce_sum(comm, out.gram)

        # ---- rank 0: coefficients per block; broadcast β and the skip flags as one float64 buffer
        def coefficients() -> list[dict]:
            # [K, B]; as Strategy.aggregate, weight 0 where a client does not hold the block
            weights = strategy.block_weights(plan.updates, plan.blocks) * plan.covered
            groups = strategy.group_labels(plan.updates)
            stats = []
            for b, block in enumerate(plan.blocks):
                beta, st = strategy.coefficients(out.gram[b], weights[:, b], groups, block=block, round=plan.round)
                out.beta[b] = beta
                st = {"beta": [float(x) for x in beta], **st}
                if weights[:, b].sum() == 0:           # as Strategy.aggregate: the block stays unchanged
                    out.skipped[b] = True
                    st["skipped"] = True
                stats.append(st)
            return stats

        out.stats = on_root(comm, coefficients, "computing the coefficients")     # small dicts, every rank
        coef = np.ascontiguousarray(np.concatenate([out.beta, out.skipped[:, None].astype(np.float64)], axis=1))
        bcast_array(comm, coef)                                              # [B, K+1] float64
        out.beta, out.skipped = coef[:, :K].copy(), coef[:, K] > 0
        tick = _lap(out.seconds, "coefficients_s", tick)

        # ---- pass 2: this rank's slice of Σ_k β_k Δ_k, then the server step on the slice
        def pass2() -> tuple[dict, dict]:
            delta: dict[str, torch.Tensor] = {}
            for seg, a, z in my_chunks:
                if out.skipped[plan.block_of_key[seg.key]]:
                    cache.pop((seg.key, a), None)
                    continue
                rn = info_of[seg.key].row_numel
                if seg.key not in delta:
                    delta[seg.key] = torch.empty(segment_numel(seg, info_of[seg.key]), dtype=torch.float64)
                parts = cache.pop((seg.key, a)) if keep else read_chunk(seg, a, z)
                target = delta[seg.key].numpy()[(a - seg.start) * rn:(z - seg.start) * rn]
                beta = out.beta[plan.block_of_key[seg.key]][holders_of[seg.key]]   # the others' rows are 0
                for o, X in subchunks(parts):
                    np.dot(beta, X, out=target[o:o + X.shape[1]])             # [m] float64
            theta, buf = {}, {}
            with safe_open(plan.global_file.path, framework="pt") as g:
                for seg in mine:
                    theta[seg.key] = read_rows(g, info_of[seg.key], seg.start, seg.stop)
                    out.other_bytes += theta[seg.key].numel() * theta[seg.key].element_size()
            if plan.state_file is not None:
                with safe_open(plan.state_file.path, framework="pt") as s:
                    for seg in mine:
                        if seg.key in plan.state_keys:
                            buf[seg.key] = read_rows(s, info_of[seg.key], seg.start, seg.stop)
                            out.other_bytes += buf[seg.key].numel() * buf[seg.key].element_size()
            opt = ServerOptimizer(strategy.server_opt.lr, strategy.server_opt.momentum)
            opt.load_state_dict(buf)
            return opt.step(theta, delta), opt.state_dict()

        new_theta, new_buf = all_ok(comm, pass2, "combining updates (pass 2)")
        tick = _lap(out.seconds, "pass2_s", tick)

    # ---- assembly on rank 0. Each other rank sends every slice it holds (global slices, then its
    # momentum-buffer slices, in plan order) as raw bytes straight into its place in rank 0's full
    # tensors: no packing or staging copies. A key rank 0 holds whole is used as is.
    # The momentum buffers after the step: those loaded plus every key that got a delta (none without momentum).
    buf_keys = sorted(set(plan.state_keys) | {i.key for i in plan.infos if not out.skipped[plan.block_of_key[i.key]]}
                      ) if strategy.server_opt.momentum else []
    buf_dtype = {k: torch.promote_types(info_of[k].torch_dtype, torch.float32) for k in buf_keys}

    def layout(segs: list[Segment]) -> list[tuple[Segment, str]]:
        return [(s, "state") for s in segs] + [(s, "buffers") for s in segs if s.key in buf_dtype]

    def whole(seg: Segment) -> bool:
        return seg.start == 0 and seg.stop == info_of[seg.key].rows

    mine_by_key = {s.key: s for s in mine}
    new_parts = {"state": new_theta, "buffers": new_buf}

    def prepare() -> dict[str, dict[str, torch.Tensor]]:
        if rank != 0:
            return {}
        dest: dict[str, dict[str, torch.Tensor]] = {"state": {}, "buffers": {}}
        for which, keys, dtype_of in (("state", [i.key for i in plan.infos], lambda k: info_of[k].torch_dtype),
                                      ("buffers", buf_keys, buf_dtype.get)):
            for key in keys:
                seg = mine_by_key.get(key)
                dest[which][key] = (new_parts[which][key].reshape(info_of[key].shape) if seg and whole(seg)
                                    else torch.empty(info_of[key].shape, dtype=dtype_of(key)))
        for s, which in layout(mine):
            if not whole(s):
                segment_view(dest[which][s.key], s, info_of[s.key]).copy_(new_parts[which][s.key])
        return dest

    dest = all_ok(comm, prepare, "assembling the result")
    if rank == 0:
        recv_into(comm, [(r, segment_view(dest[which][s.key], s, info_of[s.key]).view(torch.uint8).numpy())
                         for r in range(1, world) for s, which in layout(shards[r])])
        out.state, out.buffers = dest["state"], dest["buffers"]
    else:
        send_to_root(comm, [new_parts[which][s.key].contiguous().view(torch.uint8).numpy() for s, which in layout(mine)])
    _lap(out.seconds, "assemble_s", tick)
    return out


def _lap(seconds: dict, name: str, since: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(now - since, 3)
    return now
