"""The report's cell formatters, shared by the classification and LM tables."""

from __future__ import annotations

from ..stats import Interval


def first_split(results: dict, setting: str) -> tuple[str, dict] | None:
    """(seed, split summary) of the setting's lowest seed, which the data lines describe; None if not recorded."""
    splits = results.get("splits", {}).get(setting)
    if not splits:
        return None
    seed = min(splits, key=int)
    return seed, splits[seed]


def mb(stat: tuple) -> str:
    m, _, _ = stat
    return "–" if m is None else ("0" if m == 0 else f"{m / 1e6:.3f}")


def points(x: float, digits: int = 1) -> str:
    """A fraction as signed percentage points (or %), `digits` decimals; float dust below zero reads +0.0,
    not -0.0."""
    return f"{round(x * 100, digits) + 0.0:+.{digits}f}"


def interval(g: Interval | None, digits: int = 1) -> str:
    """A gain in percentage points: "+3.2 [-1.0, +7.5]" (95% interval), "+3.2 [–]" without one. The
    LM task's relative reductions (fractions too) print as % the same way, with 2 digits: they are small."""
    if g is None:
        return "–"
    if g.low is None:
        return f"{points(g.point, digits)} [–]"
    return f"{points(g.point, digits)} [{points(g.low, digits)}, {points(g.high, digits)}]"
