"""The shard plan: which rows of which shared tensor each aggregator rank holds, and reading them.

Lay the shared tensors end to end in sorted key order as one flat space of T elements; rank r owns
the flat range [r·T/N, (r+1)·T/N). A tensor is only ever cut between rows (its first dimension),
because a safetensors slice `get_slice(key)[a:b]` reads whole rows: row i of a key belongs to the
rank whose range holds the row's first element. So every rank holds, per key, one contiguous row
range (possibly empty), and the ranks' loads differ by less than one row per key boundary. 0-d
tensors are one row; empty tensors belong to no rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .mpi import AggregationError

# safetensors header dtype -> torch dtype (the float types an update or global can hold)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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


def segment_view(full: torch.Tensor, seg: Segment, info: TensorInfo) -> torch.Tensor:
    """The flat elements of `seg` inside the full tensor (a view: writes land in `full`)."""
    return full.view(-1)[seg.start * info.row_numel:seg.stop * info.row_numel]
