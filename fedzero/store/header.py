"""Reading a safetensors header without trusting it: the length bounded before anything is allocated,
the entries checked to describe exactly the file's data bytes (fedzero.store.screen screens updates
with it)."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: key -> (dtype name, shape); its length and the file's size."""
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    length: int
    file_bytes: int

    @property
    def data_bytes(self) -> int:
        return self.file_bytes - 8 - self.length


def read_header(path: str | os.PathLike, *, max_header: int | None = None, max_file: int | None = None) -> Header:
    """Parse the safetensors header of ``path`` without trusting it: the 8-byte length is bounded
    (``max_header``) before anything is allocated, the file size too (``max_file``), and the
    entries must describe exactly the data that follows, without gaps or overlaps. ``ValueError``
    with the reason otherwise (a pickle, random bytes, a truncated or lying file)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"file of {size} bytes is too short for a safetensors header")
        if max_file is not None and size > max_file:
            raise ValueError(f"file of {size} bytes exceeds the bound of {max_file} bytes (the global's tensors)")
        (n,) = struct.unpack("<Q", f.read(8))
        if max_header is not None and n > max_header:
            raise ValueError(f"safetensors header of {n} bytes exceeds the bound of {max_header} bytes "
                             "(from the global's header): not a safetensors file of this federation")
        if 8 + n > size:
            raise ValueError(f"safetensors header of {n} bytes runs past the end of the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"safetensors header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    data = size - 8 - n
    tensors, spans = {}, []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ValueError("safetensors header's __metadata__ is not an object of strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"safetensors header entry {key!r} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise ValueError(f"tensor {key!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise ValueError(f"tensor {key!r} has a malformed shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets) \
                or not offsets[0] <= offsets[1] <= data:
            raise ValueError(f"tensor {key!r} has data offsets {offsets!r} outside the file's {data} data bytes")
        if offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[dtype]:
            raise ValueError(f"tensor {key!r}: data offsets {offsets} hold {offsets[1] - offsets[0]} bytes, its "
                             f"shape {shape} of {dtype} needs {math.prod(shape) * _ITEMSIZE[dtype]}")
        tensors[key] = (dtype, tuple(shape))
        spans.append(tuple(offsets))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise ValueError(f"safetensors data offsets leave a gap or overlap at byte {min(begin, end)}")
        end = stop
    if end != data:
        raise ValueError(f"safetensors header describes {end} data bytes, the file holds {data}")
    return Header(tensors, n, size)


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
