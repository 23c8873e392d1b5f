"""Building a settings dataclass from a config mapping, refusing keys it does not know."""

from __future__ import annotations

from dataclasses import fields


def from_known_fields(cls, data: dict, what: str):
    """cls(**data), or a ValueError naming the unknown keys (`what`: e.g. "train setting")."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {sorted(known)}")
    return cls(**data)
