"""Command-line numbers and names checked as the config's own are: argparse types that refuse a
non-finite, out-of-range or malformed value with a usage error naming the flag (never a traceback,
never a NaN deadline that passes every comparison)."""

from __future__ import annotations

import argparse
import math


def _number(kind, text: str, *, above: float | None = None, at_least: float | None = None):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} is expected, "
                                         f"got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    if above is not None and not value > above:
        raise argparse.ArgumentTypeError(f"must be > {above:g}, got {text}")
    if at_least is not None and not value >= at_least:
        raise argparse.ArgumentTypeError(f"must be >= {at_least:g}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, at_least=1)


def non_negative_int(text: str) -> int:
    return _number(int, text, at_least=0)


def positive_float(text: str) -> float:
    return _number(float, text, above=0)


def non_negative_float(text: str) -> float:
    return _number(float, text, at_least=0)


def client_id(text: str) -> str:
    """A client id as the store accepts it (fedzero.store.layout.validate_client_id)."""
    from fedzero.store.layout import validate_client_id

    try:
        return validate_client_id(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
