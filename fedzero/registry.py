"""Classes built by name with keyword options: the aggregation strategies (fedzero.strategies) and
the LoRA baselines (fedzero.baselines). A registry is a plain dict of name -> class, so it can be
listed, tested for a name and offered as command-line choices; `build` checks the name and the
options against the constructor's keyword parameters, and `options` tells the config loader which
options a class takes, with their annotated types, so it can type-check them at load."""

from __future__ import annotations

import inspect


class Registry(dict):
    """name -> class. `kind` names the entries in messages ("strategy", "LoRA baseline")."""

    def __init__(self, kind: str, classes: dict[str, type]):
        super().__init__(classes)
        self.kind = kind

    def lookup(self, name: str) -> type:
        """The class registered under `name` (case-insensitive), or a ValueError listing the names."""
        cls = self.get(name.lower()) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {sorted(self)}")
        return cls

    def options(self, name: str) -> dict[str, inspect.Parameter]:
        """The keyword options of `name`'s constructor (not `self`, `*args`, `**kwargs`), with their
        annotations evaluated where the class's module can (else left as strings)."""
        init = self.lookup(name).__init__
        try:
            signature = inspect.signature(init, eval_str=True)
        except (NameError, TypeError, SyntaxError):
            signature = inspect.signature(init)
        return {p.name: p for p in signature.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def build(self, name: str, **options):
        """Build `name` with `options`; an option its constructor does not take is a TypeError."""
        cls = self.lookup(name)
        valid = list(self.options(name))
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"{self.kind} {name!r} got unknown option(s) {unknown}; valid: {valid}")
        return cls(**options)
