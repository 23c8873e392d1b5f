"""Sharded aggregation of one round: each rank reads, reduces and steps only its slice of the
shared parameter space (docs/aggregator.md, "How it works").

The shard plan. Lay the shared tensors end to end in sorted key order as one flat space of T
elements; rank r owns the flat range [r·T/N, (r+1)·T/N). A tensor is only ever cut between rows (its first dimension), because a
safetensors slice `get_slice(key)[a:b]` reads whole rows: row i of a key belongs to the rank whose
range holds the row's first element. So every rank holds, per key, one contiguous row range
(possibly empty), and the ranks' loads differ by less than one row per key boundary. 0-d tensors
are one row; empty tensors belong to no rank.

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

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedzero.store import FederationStore, sha256_file
from fedzero.strategies import ClientUpdate, ServerOptimizer, Strategy
from fedzero.strategies.base import block_coverage

from .mpi import (AggregationError, all_ok, allreduce_sum, bcast_array, on_root, rank_of, recv_into,
                  send_to_root, size_of)

# safetensors header dtype -> torch dtype (the float types an update or global can hold)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
GLOBAL_MANIFEST = "manifest.json"                       # docs/store.md layout
SERVER_STATE_MANIFEST = "server_state.manifest.json"


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: str                                          # safetensors name, e.g. "F32"

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if self.shape else 1

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of one key, held by one rank."""
    key: str
    start: int
    stop: int


def plan_shards(infos: list[TensorInfo], world: int) -> list[list[Segment]]:
    """Segments of each rank (see the module docstring). Deterministic: every rank computes it."""
    total = sum(i.numel for i in infos)
    bounds = [r * total // world for r in range(world + 1)]
    plan: list[list[Segment]] = [[] for _ in range(world)]
    offset = 0
    for info in infos:
        if info.numel == 0:
            continue
        rn = info.row_numel
        # first row of `info` whose first element lies at or after bounds[r]
        first = [min(info.rows, max(0, -(-(b - offset) // rn))) for b in bounds[:-1]] + [info.rows]
        first[0] = 0
        for r in range(world):
            if first[r + 1] > first[r]:
                plan[r].append(Segment(info.key, first[r], first[r + 1]))
        offset += info.numel
    return plan


def segment_numel(seg: Segment, info: TensorInfo) -> int:
    return (seg.stop - seg.start) * info.row_numel


def chunks(seg: Segment, info: TensorInfo, k: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of a segment such that the K clients' rows of a chunk take about chunk_bytes
    (in the file dtype): the unit of reading."""
    rows = max(1, chunk_bytes // max(1, info.torch_dtype.itemsize * k * info.row_numel))
    return [(a, min(a + rows, seg.stop)) for a in range(seg.start, seg.stop, rows)]


def read_rows(handle, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor from an open safetensors file, flattened (file dtype)."""
    if not info.shape:
        return handle.get_tensor(info.key).reshape(1)
    return handle.get_slice(info.key)[start:stop].reshape(-1)


def header(path: Path) -> dict[str, TensorInfo]:
    """Key -> TensorInfo from a safetensors header (no tensor data is read)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            s = f.get_slice(key)
            dtype = s.get_dtype()
            if dtype not in _DTYPES:
                raise AggregationError(f"{path}: tensor {key!r} has dtype {dtype}; only {sorted(_DTYPES)} "
                                       "can be aggregated")
            out[key] = TensorInfo(key, tuple(int(d) for d in s.get_shape()), dtype)
    return out


def read_manifest(path: Path, round: int, what: str) -> dict:
    """A global or server-state manifest (docs/store.md), checked for the fields the aggregator uses."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AggregationError(f"{what} not found: no manifest at {path}") from None
    except ValueError as e:
        raise AggregationError(f"corrupt manifest {path} of {what}: {e}") from e
    for name, kind in (("round", int), ("sha256", str), ("bytes", int), ("keys", list)):
        if not isinstance(manifest.get(name), kind):
            raise AggregationError(f"{what} ({path}): manifest field {name!r} missing or not {kind.__name__}")
    if manifest["round"] != round:
        raise AggregationError(f"round mismatch for {what}: manifest {path} says round {manifest['round']}")
    return manifest


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
    gman = read_manifest(gpath.parent / GLOBAL_MANIFEST, round, f"global of round {round}")
    ginfo = header(gpath)
    if sorted(ginfo) != sorted(gman["keys"]):
        raise AggregationError(f"global of round {round}: {gpath} holds {sorted(ginfo)}, "
                               f"its manifest lists {sorted(gman['keys'])}")
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
        smpath = spath.with_name(SERVER_STATE_MANIFEST)
        if not smpath.is_file():
            raise AggregationError(
                f"server momentum is {momentum} but round {round - 1} left no server state ({smpath}); "
                "a restart would not continue exactly. Pass reset_server_state=True (--reset-server-state) "
                "to start the momentum afresh.")
        sman = read_manifest(smpath, round - 1, f"server state of round {round - 1}")
        sinfo = header(spath)
        for key, info in sinfo.items():
            if key not in ginfo or info.shape != ginfo[key].shape:
                raise AggregationError(f"server state of round {round - 1}: tensor {key!r} "
                                       f"{list(info.shape)} does not match the global state")
        state_file = Source(f"server state of round {round - 1}", str(spath), sman["sha256"], sman["bytes"])
        state_keys = sorted(sinfo)
    return RoundPlan(round, infos, blocks, block_of_key, updates, files, covered,
                     Source(f"global of round {round}", str(gpath), gman["sha256"], gman["bytes"]),
                     state_file, state_keys)


def verify_files(comm, plan: RoundPlan, mode: str) -> int:
    """sha256 of every file against its manifest, files dealt round-robin to the ranks (each file is
    hashed by exactly one rank). mode "size": sizes only. Returns bytes hashed on this rank."""
    files = plan.update_files + [plan.global_file] + ([plan.state_file] if plan.state_file else [])
    rank, world = rank_of(comm), size_of(comm)

    def check() -> int:
        hashed = 0
        for i, src in enumerate(files):
            size = Path(src.path).stat().st_size
            if size != src.bytes:
                raise AggregationError(f"size mismatch for {src.name}: manifest says {src.bytes} bytes, "
                                       f"file {src.path} has {size}")
            if mode == "sha256" and i % world == rank:
                digest = sha256_file(src.path)
                hashed += size
                if digest != src.sha256:
                    raise AggregationError(f"checksum mismatch for {src.name}: manifest says sha256 "
                                           f"{src.sha256}, file {src.path} has {digest}")
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


def segment_view(full: torch.Tensor, seg: Segment, info: TensorInfo) -> torch.Tensor:
    """The flat elements of `seg` inside the full tensor (a view: writes land in `full`)."""
    return full.view(-1)[seg.start * info.row_numel:seg.stop * info.row_numel]


def _lap(seconds: dict, name: str, since: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(now - since, 3)
    return now
