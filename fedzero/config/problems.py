"""Config errors a user can act on: every problem of a file found in one pass, each naming its key
path (`federation.rounds`, `clients[1].train.lr`), the value and the reason, raised together as one
ConfigError that names the file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

_SHOWN_CHARS = 60         # values are shown cut to this length (a 300-character id stays readable)


class ConfigError(ValueError):
    """One or more problems in a config file; `problems` lists them, `source` names the file."""

    def __init__(self, problems: list[Problem], source: Path | str | None = None, what: str = "config"):
        self.problems, self.source = list(problems), source
        where = str(source) if source is not None else what
        lines = [str(p) for p in self.problems]
        if len(lines) == 1:
            text = f"{where}: {lines[0]}"
        else:
            text = f"{where}: {len(lines)} problems:\n" + "\n".join(f"  - {line}" for line in lines)
        super().__init__(text)


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A ConfigError whose every problem is a file or directory the config names that is not there."""


@dataclass(frozen=True)
class Problem:
    path: str                 # the key path in the file, "" for the whole document
    text: str                 # "must be ...", or a message of its own after ": " (joined=False)
    joined: bool = True       # text reads on from the path: "federation.rounds must be >= 1, got 0"
    missing_file: bool = False

    def __str__(self) -> str:
        if not self.path:
            return self.text
        return f"{self.path} {self.text}" if self.joined else f"{self.path}: {self.text}"


class Problems:
    """Collects the problems of one file; `raise_if_any` raises them together."""

    def __init__(self, source: Path | str | None = None, what: str = "config"):
        self.source, self.what = source, what
        self.items: list[Problem] = []

    def add(self, path: str, text: str, *, missing_file: bool = False) -> None:
        """`text` reads on from the path: problems.add("train.lr", "must be > 0, got 0")."""
        self.items.append(Problem(path, text, True, missing_file))

    def error(self, path: str, error: Exception | str) -> None:
        """A message of its own (e.g. a settings class's refusal), shown after "path: "."""
        self.items.append(Problem(path, str(error), False, isinstance(error, FileNotFoundError)))

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            kind = ConfigFileNotFoundError if all(p.missing_file for p in self.items) else ConfigError
            raise kind(self.items, self.source, self.what)


def show(value) -> str:
    """A value as the YAML spelled it, cut short: true, null, .nan, 'text', 2.5."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 5] + f"…({len(text)} chars)"


def join(path: str, key) -> str:
    """The path of a key inside `path`: join("train", "lr") -> "train.lr", join("clients", 1) -> "clients[1]"."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)
