"""Saving and loading the two parts of a DeMA adapter.

One safetensors file per part; the small JSON header (config, backbone fingerprint, fedzero
version) rides in the file's own safetensors metadata under the key "fedzero", so a file can never
be separated from its description.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

import fedzero
from fedzero.store.atomic import atomic_save_safetensors, ensure_dir

from .config import DeMAConfig
from .model import DeMAModel

PARTS = ("shared", "private")


def save_part(handle: DeMAModel, path: str | Path, part: str, *, fingerprint: str,
              tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Save one part of `handle`. `tensors` replaces the handle's own state dict where the handle's
    parameters do not hold the values (under ZeRO-3 they are shards: the caller gathers them); the
    header still describes the handle."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if tensors is None:
        tensors = handle.shared_state_dict() if part == "shared" else handle.private_state_dict()
    header = {
        "format": "fedzero-dema",
        "part": part,
        "fedzero_version": fedzero.__version__,
        "config": handle.config.to_dict(),
        "fingerprint": fingerprint,
        "hidden_size": handle.hidden_size,
        "num_layers": handle.num_layers,
    }
    path = Path(path)
    ensure_dir(path.parent)
    # Durable and atomic: a crash never leaves a half-written adapter behind.
    atomic_save_safetensors(path, {k: v.contiguous() for k, v in tensors.items()},
                            metadata={"fedzero": json.dumps(header)})
    return path


def read_part(path: str | Path) -> tuple[dict, dict]:
    """Returns (tensors, header) of a saved part, refusing files fedzero did not write."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no DeMA adapter file at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "fedzero" not in meta:
            raise ValueError(f"{path} has no fedzero header: not a DeMA adapter file")
        header = json.loads(meta["fedzero"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if header.get("format") != "fedzero-dema" or header.get("part") not in PARTS:
        raise ValueError(f"{path}: unexpected header {header}")
    return tensors, header


def check_part(handle: DeMAModel, header: dict, part: str, *, fingerprint: str, path: str | Path) -> None:
    """Refuse a saved part (its header, read from `path`) that does not belong in `handle`'s model."""
    if header["part"] != part:
        raise ValueError(f"{path} holds the {header['part']} part, not the {part} part")
    saved = DeMAConfig.from_dict(header["config"])
    if saved.shared_signature() != handle.config.shared_signature():
        raise ValueError(f"{path}: shared space {saved.shared_signature()} differs from this model's "
                         f"{handle.config.shared_signature()}")
    if part == "private" and header["fingerprint"] != fingerprint:
        # Private projectors are tied to one backbone; loading them elsewhere would be silent garbage.
        raise ValueError(f"{path}: private adapter was saved for backbone {header['fingerprint']}, "
                         f"this model is {fingerprint}")


def read_checked_part(handle: DeMAModel, path: str | Path, part: str, *, fingerprint: str) -> tuple[dict, dict]:
    """(tensors, header) of a saved part after check_part, without loading it (for a caller that
    loads the tensors itself, e.g. into a ZeRO engine)."""
    tensors, header = read_part(path)
    check_part(handle, header, part, fingerprint=fingerprint, path=path)
    return tensors, header


def load_part(handle: DeMAModel, path: str | Path, part: str, *, fingerprint: str) -> dict:
    """Load a saved part into the model after checking it belongs there. Returns the header."""
    tensors, header = read_checked_part(handle, path, part, fingerprint=fingerprint)
    if part == "shared":
        handle.load_shared_state_dict(tensors)
    else:
        handle.load_private_state_dict(tensors)
    return header
