"""Typed reading of config mappings: a value checked against a type annotation (`int`, `float`,
`bool`, `str`, `dict`, `list[str]`, `X | None`) and a range rule, a mapping checked against a
settings dataclass's fields, and the dataclass built only from a clean mapping.

Strict on purpose: YAML already gives numbers and booleans their types, so a string where a
number belongs (`lr: "x"`, `local_steps: "3"`) is a mistake to report, not to convert; an integer
field refuses 2.5 and true; a number must be finite (a NaN learning rate would publish a NaN global).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from .problems import Problems, join, show

MISSING = object()
_EXPONENT_TEXT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


@dataclass(frozen=True)
class Rule:
    """The range of one setting. Bounds are inclusive (`min`, `max`) or strict (`above`, `below`)."""

    min: float | None = None
    above: float | None = None
    max: float | None = None
    below: float | None = None
    choices: tuple | None = None
    nullable: bool = False        # null is allowed even where the annotation does not say so

    def check(self, value) -> str | None:
        if self.choices is not None and value not in self.choices:
            return f"must be one of {list(self.choices)}, got {show(value)}"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        for bound, ok, word in ((self.min, lambda b: value >= b, ">="), (self.above, lambda b: value > b, ">"),
                                (self.max, lambda b: value <= b, "<="), (self.below, lambda b: value < b, "<")):
            if bound is not None and not ok(bound):
                return f"must be {word} {bound:g}, got {show(value)}"
        return None


def at_least(n: float) -> Rule:
    return Rule(min=n)


def above(n: float) -> Rule:
    return Rule(above=n)


def one_of(*choices) -> Rule:
    return Rule(choices=tuple(choices))


SEED = Rule(min=0, max=2**32 - 1)       # every seed must also suit numpy's legacy generators


def type_problem(value, annotation) -> str | None:
    """Why `value` does not have the annotated type (None if it does)."""
    if annotation is Any:
        return None
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        found = [type_problem(value, a) for a in rest]
        if any(f is None for f in found):
            return None
        return found[0] if len(rest) == 1 else f"must be {_names(rest)}, got {show(value)}"
    if annotation is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {show(value)}"
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        return f"must be an integer, got {show(value)}{_quoted_hint(value)}"
    if annotation is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"must be a number, got {show(value)}{_quoted_hint(value)}"
        return None if math.isfinite(value) else f"must be a finite number, got {show(value)}"
    if annotation is str:
        return None if isinstance(value, str) else f"must be a string, got {show(value)}"
    origin = typing.get_origin(annotation) or annotation
    if origin is dict:
        return None if isinstance(value, dict) else f"must be a mapping, got {show(value)}"
    if origin is list:
        if not isinstance(value, list):
            return f"must be a list, got {show(value)}"
        item = args[0] if args else Any
        bad = [(i, type_problem(v, item)) for i, v in enumerate(value)]
        bad = [(i, why) for i, why in bad if why is not None]
        return None if not bad else f"must be a list whose every item is {_names([item])}: item {bad[0][0]} {bad[0][1]}"
    return None            # a type this reader does not know: the settings class checks it


def _names(annotations) -> str:
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return " or ".join(words.get(typing.get_origin(a) or a, getattr(a, "__name__", str(a))) for a in annotations)


def _quoted_hint(value) -> str:
    if not isinstance(value, str):
        return ""
    if _EXPONENT_TEXT.fullmatch(value.strip()):
        mantissa, exponent = re.split(r"[eE]", value.strip())
        mantissa = mantissa if "." in mantissa else mantissa + ".0"
        return (f" (YAML reads a number with an exponent but no '.' as text: write {mantissa}e{exponent})")
    try:
        float(value)
    except ValueError:
        return ""
    return " (a quoted number is text: write it without quotes)"


def check_value(value, annotation, rule: Rule | None) -> str | None:
    """Why `value` is not a valid setting of this type and range (None if it is)."""
    if value is None and rule is not None and rule.nullable:
        return None
    return type_problem(value, annotation) or (rule.check(value) if rule is not None and value is not None else None)


def field_types(cls) -> dict[str, Any]:
    """A settings dataclass's fields and their annotated types."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def required_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def mapping(data, path: str, problems: Problems, *, optional: bool = True) -> dict | None:
    """A section's mapping: an absent or empty (null) section is {}; anything else but a mapping is
    a problem (None returned)."""
    if data is None and optional:
        return {}
    if isinstance(data, dict):
        return data
    problems.add(path, f"must be a mapping of settings, got {show(data)}")
    return None


def refuse_unknown(data: dict, known, path: str, problems: Problems, what: str = "key") -> bool:
    """Record the keys of `data` outside `known` as one problem; True if there were none."""
    unknown = [k for k in data if k not in known]
    if not unknown:
        return True
    hints = [m for k in unknown if isinstance(k, str) for m in difflib.get_close_matches(k, list(known), 1)]
    hint = f" (did you mean {', '.join(repr(h) for h in hints)}?)" if hints else ""
    problems.error(path or "config", f"unknown {what}(s) {[show(k) if not isinstance(k, str) else k for k in unknown]}"
                                     f"{hint}; known: {sorted(known)}")
    return False


def check_fields(cls, data: dict, path: str, problems: Problems, rules: dict[str, Rule] | None = None, *,
                 what: str = "key", types: dict[str, Any] | None = None, hidden: tuple = (),
                 required: tuple | None = None) -> bool:
    """Check a section's mapping against dataclass `cls`: unknown keys, required keys, each value's
    type (the field's annotation, or `types[name]`) and range (`rules[name]`). Fields in `hidden`
    are not settings. True if the mapping is clean."""
    annotations = {k: v for k, v in field_types(cls).items() if k not in hidden}
    annotations.update(types or {})
    rules = rules or {}
    clean = refuse_unknown(data, annotations, path, problems, what)
    for name in (required_fields(cls) if required is None else required):
        if name not in data:
            problems.add(join(path, name), "is required")
            clean = False
    for name, value in data.items():
        if name in annotations:
            why = check_value(value, annotations[name], rules.get(name))
            if why is not None:
                problems.add(join(path, name), why)
                clean = False
    return clean


def build(factory: Callable, data, path: str, problems: Problems):
    """factory(data), with a refusal (ValueError, TypeError, FileNotFoundError) recorded at `path`
    instead of raised; None then."""
    try:
        return factory(data)
    except (ValueError, TypeError, FileNotFoundError) as err:
        if hasattr(err, "problems"):            # a ConfigError: its problems keep their own paths
            problems.items.extend(err.problems)
        else:
            problems.error(path, err)
        return None


def checked(data: dict, key: str, annotation, path: str, problems: Problems, rule: Rule | None = None,
            default=MISSING):
    """One setting of `data` checked (missing and no default: a problem); MISSING if it is bad."""
    if key not in data:
        if default is MISSING:
            problems.add(join(path, key), "is required")
        return default
    why = check_value(data[key], annotation, rule)
    if why is not None:
        problems.add(join(path, key), why)
        return MISSING
    return data[key]
