"""The canonical projector's round-0 exchange in the store (docs/store.md, "Canonical exchange").

    rounds/r000000/canonical/bases/<client_id>/bases.safetensors    one Q_l [N, m] float64 per decoder layer
    rounds/r000000/canonical/bases/<client_id>/manifest.json        written last; CanonicalBasesManifest
    rounds/r000000/canonical/targets.safetensors                    one G_s [N, r] float64 per slot
    rounds/r000000/canonical/targets.manifest.json                  written last; CanonicalTargetsManifest

Before any training each client sends the orthonormal bases of its anchor states (never the states,
their mean or its map), the aggregator publishes one target per slot (write-once, like a global),
and each client fits its private map onto its slots' targets (fedzero/adapters/dema/canonical.py,
the protocol; fedzero/client/canonical.py and fedzero/aggregator/canonical.py, its two sides).

The paths are built here from the store's layout (round 0's directory), the manifests are the
store's typed manifests (fedzero.store.manifest), and reads are verified like every other artifact
(size, sha256, tensor names: fedzero.store.artifact).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from .artifact import check_size, prepare_tensors, publish_artifact, read_artifact, write_artifact
from .errors import StoreError, StoreIntegrityError, StoreNotFoundError
from .layout import MANIFEST, ArtifactFiles, validate_client_id
from .manifest import TensorManifest, _field, _hex_sha, _non_empty, _positive, _str_list, load_manifest
from .wait import ArtifactWait

if TYPE_CHECKING:
    from .store import FederationStore

__all__ = ["CANONICAL_DIR", "CanonicalBasesManifest", "CanonicalTargetsManifest", "bases_files", "targets_files",
           "write_bases", "list_bases", "read_bases", "publish_targets", "has_targets", "read_targets",
           "TargetsWait", "layer_key", "slot_key"]

log = logging.getLogger(__name__)

CANONICAL_DIR = "canonical"                  # rounds/r000000/canonical/
BASES_DIR = "bases"
BASES_TENSORS = "bases.safetensors"
TARGETS_TENSORS = "targets.safetensors"
TARGETS_MANIFEST = "targets.manifest.json"
EXCHANGE_ROUND = 0                           # the exchange happens before round 0's training


def layer_key(layer: int) -> str:
    return f"layers.{layer}"


def slot_key(slot: int) -> str:
    return f"slots.{slot}"


# --------------------------------------------------------------------------- manifests

def _int_list(v: list) -> str | None:
    ok = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v)
    return None if ok and v else "must be a non-empty list of slot numbers (int >= 0), one per decoder layer"


def _shared(v: dict) -> str | None:
    ok = all(isinstance(k, str) and isinstance(x, list) and all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                                                 for e in x) for k, x in v.items())
    return None if ok else "must be an object of slot -> list of eigenvalues"


@dataclass(frozen=True, kw_only=True)
class CanonicalBasesManifest(TensorManifest):
    """``rounds/r000000/canonical/bases/<client_id>/manifest.json``: a client's anchor bases, one
    tensor ``layers.{l}`` [N, m] per decoder layer."""
    client_id: str = _field(str)                               # must equal the directory name
    fingerprint: str = _field(str, check=_non_empty)           # the client's backbone
    anchors: str = _field(str, check=_hex_sha)                 # sha256 of the anchor texts (fedzero.adapters.dema.canonical_exchange)
    anchor_source: str = _field(str, check=_non_empty)         # where they came from: dema.anchor_file, or the bundled set
    num_anchors: int = _field(int, check=_positive)            # N
    components: int = _field(int, check=_positive)             # m
    rank: int = _field(int, check=_positive)                   # r, the codes the client will fit
    slots: list = _field(list, check=_int_list)                # slot of each decoder layer
    created: str = _field(str)


@dataclass(frozen=True, kw_only=True)
class CanonicalTargetsManifest(TensorManifest):
    """``rounds/r000000/canonical/targets.manifest.json``: the canonical targets, one tensor
    ``slots.{s}`` [N, r] per slot, and what they were computed from."""
    anchors: str = _field(str, check=_hex_sha)
    anchor_source: str = _field(str, check=_non_empty)
    num_anchors: int = _field(int, check=_positive)
    components: int = _field(int, check=_positive)
    rank: int = _field(int, check=_positive)
    clients: list = _field(list, check=_str_list)              # whose bases went in, sorted
    shared: dict = _field(dict, check=_shared)                 # slot -> its codes' eigenvalues (in [0, 1])
    created: str = _field(str)


# --------------------------------------------------------------------------- paths

def _canonical_dir(store: FederationStore) -> Path:
    return store.layout.round_dir(EXCHANGE_ROUND) / CANONICAL_DIR


def bases_files(store: FederationStore, client_id: str) -> ArtifactFiles:
    folder = _canonical_dir(store) / BASES_DIR / validate_client_id(client_id)
    return ArtifactFiles(folder / BASES_TENSORS, folder / MANIFEST)


def targets_files(store: FederationStore) -> ArtifactFiles:
    folder = _canonical_dir(store)
    return ArtifactFiles(folder / TARGETS_TENSORS, folder / TARGETS_MANIFEST)


def _what_bases(client_id: str) -> str:
    return f"canonical bases of client {client_id}"


WHAT_TARGETS = "canonical targets"


# --------------------------------------------------------------------------- the clients' bases

def write_bases(store: FederationStore, client_id: str, bases: list[torch.Tensor], *, fingerprint: str, anchors: str,
                anchor_source: str, num_anchors: int, components: int, rank: int, slots: list[int]) -> Path:
    """Write a client's bases (one [N, m] per decoder layer; manifest last). A client retrying
    replaces its own; once the targets are published they are refused (the targets were computed
    from what is there)."""
    validate_client_id(client_id)
    if has_targets(store):
        raise StoreError(f"refusing to write the {_what_bases(client_id)}: the canonical targets are already "
                         f"published ({targets_files(store).manifest}); fit onto them instead")
    if len(bases) != len(slots):
        raise ValueError(f"{_what_bases(client_id)}: {len(bases)} bases for {len(slots)} layers' slots")
    for layer, q in enumerate(bases):
        if q.ndim != 2 or tuple(q.shape) != (num_anchors, components):
            raise ValueError(f"{_what_bases(client_id)}, layer {layer}: shape {tuple(q.shape)}, expected "
                             f"[{num_anchors}, {components}] (dema.num_anchors, dema.canonical_components)")
        if not bool(torch.isfinite(q).all()):
            raise ValueError(f"{_what_bases(client_id)}, layer {layer}: non-finite values")
    tensors = prepare_tensors({layer_key(l): q for l, q in enumerate(bases)}, _what_bases(client_id))
    return write_artifact(bases_files(store, client_id), tensors, CanonicalBasesManifest, round=EXCHANGE_ROUND,
                          client_id=client_id, fingerprint=fingerprint, anchors=anchors, anchor_source=anchor_source,
                          num_anchors=int(num_anchors), components=int(components), rank=int(rank),
                          slots=[int(s) for s in slots])


def list_bases(store: FederationStore) -> list[dict]:
    """Manifests of the complete bases (manifest present and well formed, tensor file of its size),
    sorted by client id; inconsistent ones are skipped with a logged warning (as list_updates)."""
    folder = _canonical_dir(store) / BASES_DIR
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            files = bases_files(store, name)
        except ValueError:
            continue
        if not files.manifest.is_file():
            continue
        what = _what_bases(name)
        try:
            manifest = load_manifest(CanonicalBasesManifest, files.manifest, round=EXCHANGE_ROUND, client_id=name,
                                     what=what)
            check_size(files.tensors, manifest.bytes, what)
        except StoreNotFoundError:
            continue
        except StoreError as e:
            log.warning("skipping inconsistent canonical bases: %s", e)
            continue
        out.append(manifest.to_dict())
    return out


def read_bases(store: FederationStore, client_id: str) -> tuple[list[torch.Tensor], CanonicalBasesManifest]:
    """A client's verified bases, in layer order, and their manifest."""
    what = _what_bases(client_id)
    files = bases_files(store, client_id)
    tensors, manifest = read_artifact(files, CanonicalBasesManifest, round=EXCHANGE_ROUND, client_id=client_id,
                                      what=what)
    expected = sorted(layer_key(l) for l in range(len(manifest.slots)))
    if sorted(tensors) != expected:
        raise StoreIntegrityError(f"{what} ({files.manifest}): {len(manifest.slots)} layers' slots but tensors "
                                  f"{sorted(tensors)}")
    bases = [tensors[layer_key(l)] for l in range(len(manifest.slots))]
    for layer, q in enumerate(bases):
        if tuple(q.shape) != (manifest.num_anchors, manifest.components):
            raise StoreIntegrityError(f"{what} ({files.tensors}), layer {layer}: shape {tuple(q.shape)}, manifest says "
                                      f"[{manifest.num_anchors}, {manifest.components}]")
    return bases, manifest


# --------------------------------------------------------------------------- the aggregator's targets

def publish_targets(store: FederationStore, targets: Mapping[int, torch.Tensor], *, anchors: str, anchor_source: str,
                    num_anchors: int, components: int, rank: int, clients: list[str],
                    shared: Mapping[int, torch.Tensor]) -> Path:
    """Publish the targets, one [N, r] per slot: write-once like a global (identical tensors again:
    a no-op; different ones: StoreConflictError)."""
    for slot, g in targets.items():
        if tuple(g.shape) != (num_anchors, rank) or not bool(torch.isfinite(g).all()):
            raise ValueError(f"{WHAT_TARGETS}, slot {slot}: shape {tuple(g.shape)} (expected [{num_anchors}, {rank}]) "
                             "or non-finite values")
    tensors = prepare_tensors({slot_key(s): g for s, g in sorted(targets.items())}, WHAT_TARGETS)
    return publish_artifact(targets_files(store), tensors, CanonicalTargetsManifest, what=WHAT_TARGETS,
                            round=EXCHANGE_ROUND, anchors=anchors, anchor_source=anchor_source,
                            num_anchors=int(num_anchors), components=int(components), rank=int(rank),
                            clients=sorted(clients),
                            shared={str(s): [float(x) for x in v] for s, v in sorted(shared.items())})


def has_targets(store: FederationStore) -> bool:
    return targets_files(store).manifest.is_file()


def read_targets(store: FederationStore) -> tuple[dict[int, torch.Tensor], CanonicalTargetsManifest]:
    """The verified targets ({slot: G [N, r]}) and their manifest; StoreNotFoundError if unpublished."""
    files = targets_files(store)
    tensors, manifest = read_artifact(files, CanonicalTargetsManifest, round=EXCHANGE_ROUND, what=WHAT_TARGETS)
    out = {}
    for key, g in tensors.items():
        slot = key[len("slots."):] if key.startswith("slots.") else ""
        if not slot.isdigit() or tuple(g.shape) != (manifest.num_anchors, manifest.rank):
            raise StoreIntegrityError(f"{WHAT_TARGETS} ({files.tensors}): tensor {key!r} of shape {tuple(g.shape)}; "
                                      f"expected slots.<s> of [{manifest.num_anchors}, {manifest.rank}]")
        out[int(slot)] = g
    return out, manifest


class TargetsWait(ArtifactWait):
    """The wait for the targets, by the rules of the wait for a global (fedzero.store.wait.ArtifactWait)."""

    def __init__(self, store: FederationStore, timeout: float | None, *, client_id: str | None = None):
        super().__init__(timeout)
        self.store, self.client_id = store, client_id

    def present(self) -> bool:
        return has_targets(self.store)

    def read(self) -> tuple[dict[int, torch.Tensor], CanonicalTargetsManifest]:
        return read_targets(self.store)

    def timeout_message(self) -> str:
        who = f"client {self.client_id}: " if self.client_id else ""
        return (f"{who}timed out after {self.timeout}s waiting for the {WHAT_TARGETS} (no complete manifest at "
                f"{targets_files(self.store).manifest}): has the canonical aggregation run (launch/aggregate.py "
                "--canonical), and have the other clients sent their bases?")
