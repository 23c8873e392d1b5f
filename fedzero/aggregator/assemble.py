"""Assembling the new global and momentum buffers on rank 0 from every rank's slices.

Each other rank sends every slice it holds (global slices, then its momentum-buffer slices, in
plan order) as raw bytes (any dtype, bf16 included) straight into its place in rank 0's full
tensors: no packing or staging copies. A key rank 0 holds whole is used as is.
"""

from __future__ import annotations

import numpy as np
import torch

from .mpi import all_ok, rank_of, recv_into, send_to_root, size_of
from .plan import RoundPlan
from .shards import Segment, segment_view


def buffer_dtypes(plan: RoundPlan, skipped: np.ndarray, momentum: float) -> dict[str, torch.dtype]:
    """The momentum buffers after the step and their dtypes: those loaded plus every key that got a
    delta (none without momentum). The step runs in at least float32 (ServerOptimizer)."""
    if not momentum:
        return {}
    keys = set(plan.state_keys) | {i.key for i in plan.infos if not skipped[plan.block_of_key[i.key]]}
    info_of = {i.key: i for i in plan.infos}
    return {k: torch.promote_types(info_of[k].torch_dtype, torch.float32) for k in sorted(keys)}


def assemble(comm, plan: RoundPlan, shards: list[list[Segment]], new_theta: dict[str, torch.Tensor],
             new_buf: dict[str, torch.Tensor], buf_dtype: dict[str, torch.dtype]
             ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """Collective. Returns (new global, new momentum buffers) on rank 0, (None, None) elsewhere."""
    rank, world = rank_of(comm), size_of(comm)
    info_of = {i.key: i for i in plan.infos}
    mine = shards[rank]
    new_parts = {"state": new_theta, "buffers": new_buf}

    def layout(segs: list[Segment]) -> list[tuple[Segment, str]]:
        return [(s, "state") for s in segs] + [(s, "buffers") for s in segs if s.key in buf_dtype]

    def whole(seg: Segment) -> bool:
        return seg.start == 0 and seg.stop == info_of[seg.key].rows

    def prepare() -> dict[str, dict[str, torch.Tensor]]:
        if rank != 0:
            return {}
        mine_by_key = {s.key: s for s in mine}
        dest: dict[str, dict[str, torch.Tensor]] = {"state": {}, "buffers": {}}
        for which, keys, dtype_of in (("state", [i.key for i in plan.infos], lambda k: info_of[k].torch_dtype),
                                      ("buffers", list(buf_dtype), buf_dtype.get)):
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
        return dest["state"], dest["buffers"]
    send_to_root(comm, [new_parts[which][s.key].contiguous().view(torch.uint8).numpy() for s, which in layout(mine)])
    return None, None
