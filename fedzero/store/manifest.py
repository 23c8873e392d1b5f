"""The manifests of the store's tensor files: one typed manifest per artifact kind, one parser, one
validator (docs/store.md, "Files").

A manifest describes exactly one tensor file (its round, sha256, size and tensor names) plus what
its kind adds: the global's ``meta``, an update's client and training facts, the predictions'
``quality``. Each field declares its rule once (:func:`_field`); :func:`parse_manifest` applies the
rules of a kind to a JSON object and refuses the first field that breaks one, naming it.
Fields this version does not know are kept in ``extra``, so ``to_dict`` gives back what was read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from .atomic import json_dumps
from .errors import StoreError, StoreIntegrityError, StoreNotFoundError

__all__ = [
    "TensorManifest", "GlobalManifest", "UpdateManifest", "PredictionsManifest", "TeachersManifest",
    "ServerStateManifest", "parse_manifest", "load_manifest", "read_json_object", "check_jsonable",
    "is_valid_quality",
]

_SHA_RE = re.compile(r"[0-9a-f]{64}")


def is_valid_quality(value: Any) -> bool:
    """A client's quality (its held-out loss, sent with its anchor predictions): a real number,
    finite and >= 0 (a bool is not one). The store and the teachers (fedzero.strategies.distill) check it."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def check_jsonable(obj: Any, what: str) -> None:
    """``ValueError`` unless ``obj`` can be written as the store writes JSON."""
    try:
        json_dumps(obj)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON serializable: {e}") from e


# --------------------------------------------------------------------------- field rules

@dataclass(frozen=True)
class _Rule:
    types: tuple[type, ...] | None          # None: `check` alone decides
    required: bool                          # False: may be absent (read as None, not written when None)
    nullable: bool                          # True: always written, JSON null allowed
    check: Callable[[Any], str | None] | None   # what is wrong with a value of the right type, or None


def _field(types: type | tuple[type, ...] | None = None, *, required: bool = True, nullable: bool = False,
           check: Callable[[Any], str | None] | None = None) -> Any:
    if isinstance(types, type):
        types = (types,)
    rule = _Rule(types, required, nullable, check)
    return field(default=None, metadata={"rule": rule}) if not required else field(metadata={"rule": rule})


def _hex_sha(v: str) -> str | None:
    return None if _SHA_RE.fullmatch(v) else "is not a hex sha256"


def _non_negative(v: int) -> str | None:
    return "is negative" if v < 0 else None


def _str_list(v: list) -> str | None:
    return None if all(isinstance(k, str) for k in v) else "must be a list of str"


def _global_meta(v: dict) -> str | None:
    blocks = v.get("blocks")
    if blocks is None:
        return None
    if not isinstance(blocks, dict) or not all(isinstance(k, str) and isinstance(b, str) and b
                                               for k, b in blocks.items()):
        return "has 'blocks' that is not an object of tensor name -> block name"
    return None


def _quality(v: Any) -> str | None:
    return None if is_valid_quality(v) else f"must be a finite number >= 0 (the client's held-out loss), got {v!r}"


def _token_level(v: str) -> str | None:
    # absent: label-level (files written before token-level distillation existed are label-level)
    return None if v == "token" else f"must be 'token' when present (absent: label level), got {v!r}"


def _non_empty(v: str) -> str | None:
    return None if v else "must not be empty"


def _positive(v: int) -> str | None:
    return None if v >= 1 else "must be >= 1"


def _depth(v: dict) -> str | None:
    from fedzero.strategies.depth import declaration_problem    # DeMA's depth-aware sharing declares it

    problem = declaration_problem(v, "")
    return None if problem is None else f"is invalid: {problem.lstrip('.')}"


# --------------------------------------------------------------------------- the kinds

@dataclass(frozen=True, kw_only=True)
class TensorManifest:
    """What every manifest records: the round, and exactly which bytes the tensor file holds."""
    round: int = _field(int)
    sha256: str = _field(str, check=_hex_sha)
    bytes: int = _field(int, check=_non_negative)
    keys: list[str] = _field(list, check=_str_list)          # sorted tensor names
    created: str | None = _field(str, required=False)        # ISO-8601 UTC time the manifest was written
    extra: dict = field(default_factory=dict, compare=False)  # fields this version does not know

    @classmethod
    def rules(cls) -> dict[str, _Rule]:
        """Field name -> rule, in declaration order."""
        return {f.name: f.metadata["rule"] for f in dataclasses.fields(cls) if "rule" in f.metadata}

    def to_dict(self) -> dict:
        """The JSON object this manifest is written as (and was read from)."""
        out = dict(self.extra)
        for name, rule in self.rules().items():
            value = getattr(self, name)
            if value is not None or rule.required or rule.nullable:
                out[name] = value
        return out


@dataclass(frozen=True, kw_only=True)
class GlobalManifest(TensorManifest):
    """``rounds/rNNNNNN/global/manifest.json``: the shared state at the start of the round."""
    meta: dict = _field(dict, check=_global_meta)             # free JSON object from the publisher; "blocks" checked

    @property
    def blocks(self) -> dict[str, str] | None:
        """Tensor name -> aggregation block, as the publisher declared them (``meta["blocks"]``);
        ``None`` for a global published without them."""
        return self.meta.get("blocks")


@dataclass(frozen=True, kw_only=True)
class UpdateManifest(TensorManifest):
    """``rounds/rNNNNNN/updates/<client_id>/manifest.json``: a client's delta."""
    client_id: str = _field(str)                              # must equal the directory name
    fingerprint: str = _field(str)
    num_samples: int = _field(int, check=_non_negative)       # the aggregation weight
    metrics: dict = _field(dict)
    slot_use: dict | None = _field(dict, nullable=True)
    depth: dict | None = _field(dict, required=False, check=_depth)  # DeMA share 'depth-aware' (absent otherwise)
    created: str = _field(str)
    # the sha256 of the global the client trained from (the aggregator refuses another round's or
    # global's update); absent only in updates written before the field existed (refused, too)
    global_sha256: str | None = _field(str, required=False, check=_hex_sha)
    hmac: str | None = _field(str, required=False, check=_hex_sha)   # HMAC-SHA256 by the client's key (auth.py)


@dataclass(frozen=True, kw_only=True)
class PredictionsManifest(TensorManifest):
    """``.../updates/<client_id>/anchor_predictions.manifest.json``: output distillation. Label level
    (no ``level``): one tensor ``probs`` [N, C]. Token level (``level: "token"``): ``ids`` [P, top_k]
    int32 and ``probs`` [P, top_k] float32, with the client's ``tokenizer`` fingerprint and the
    ``anchors`` digest of the positions it scored (fedzero.distill.tokens)."""
    quality: float | None = _field(required=False, check=_quality)   # the client's held-out loss
    level: str | None = _field(str, required=False, check=_token_level)
    tokenizer: str | None = _field(str, required=False, check=_non_empty)
    anchors: str | None = _field(str, required=False, check=_hex_sha)
    top_k: int | None = _field(int, required=False, check=_positive)


@dataclass(frozen=True, kw_only=True)
class TeachersManifest(TensorManifest):
    """``rounds/rNNNNNN/global/teachers.manifest.json``: the anchor teachers of the round (token
    level, ``level: "token"``: tensors ``<client>/ids`` and ``<client>/probs``)."""
    level: str | None = _field(str, required=False, check=_token_level)


@dataclass(frozen=True, kw_only=True)
class ServerStateManifest(TensorManifest):
    """``rounds/rNNNNNN/aggregate/server_state.manifest.json``: server optimizer state."""


M = TypeVar("M", bound=TensorManifest)


# --------------------------------------------------------------------------- parsing

def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``: ``StoreNotFoundError`` if there is no file,
    ``StoreIntegrityError`` if it is not a JSON object."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StoreNotFoundError(f"{what} not found: no manifest at {path}") from None
    except OSError as e:
        raise StoreError(f"cannot read manifest {path} of {what}: {e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise StoreIntegrityError(f"corrupt manifest {path} of {what}: {e}") from e
    if not isinstance(data, dict):
        raise StoreIntegrityError(f"corrupt manifest {path} of {what}: not a JSON object")
    return data


def _value(data: dict, name: str, rule: _Rule, where: str) -> Any:
    if name not in data:
        if rule.required:
            raise StoreIntegrityError(f"{where}: manifest lacks field {name!r}")
        return None
    v = data[name]
    if v is None and (rule.nullable or not rule.required):
        return None
    if rule.types is not None:
        if isinstance(v, bool) and bool not in rule.types:
            raise StoreIntegrityError(f"{where}: manifest field {name!r} has bad type bool")
        if not isinstance(v, rule.types):
            raise StoreIntegrityError(f"{where}: manifest field {name!r} has bad type {type(v).__name__}")
    wrong = rule.check(v) if rule.check is not None else None
    if wrong:
        raise StoreIntegrityError(f"{where}: manifest field {name!r} {wrong}")
    return v


def parse_manifest(kind: type[M], data: Any, *, round: int, client_id: str | None = None,
                   what: str, path: Path) -> M:
    """Validate ``data`` as a manifest of ``kind`` found at ``path`` for ``round`` (and, for an
    update, ``client_id``); return it typed. Refusals are ``StoreIntegrityError`` naming the
    thing (``what``), the manifest path and the field."""
    if not isinstance(data, dict):
        raise StoreIntegrityError(f"corrupt manifest {path} of {what}: not a JSON object")
    where = f"{what} ({path})"
    rules = kind.rules()
    values: dict[str, Any] = {}
    # Where a manifest lies says whose and which round's it must be: a misplaced manifest is
    # reported as such before anything else about it.
    if "client_id" in rules:
        values["client_id"] = _value(data, "client_id", rules["client_id"], where)
        if values["client_id"] != client_id:
            raise StoreIntegrityError(
                f"client id mismatch for {what}: manifest {path} says client "
                f"{values['client_id']!r} but lies in the directory of client {client_id!r}"
            )
    values["round"] = _value(data, "round", rules["round"], where)
    if values["round"] != round:
        raise StoreIntegrityError(f"round mismatch for {what}: manifest {path} says round {values['round']}")
    for name, rule in rules.items():
        if name not in values:
            values[name] = _value(data, name, rule, where)
    return kind(**values, extra={k: v for k, v in data.items() if k not in rules})


def load_manifest(kind: type[M], path: Path, *, round: int, client_id: str | None = None, what: str) -> M:
    """Read and :func:`parse_manifest` the manifest at ``path``."""
    return parse_manifest(kind, read_json_object(path, what), round=round, client_id=client_id,
                          what=what, path=path)
