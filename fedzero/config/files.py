"""Reading a config file, and the paths written inside one.

A config is plain YAML: a tag (`!!python/object/...`) is refused with the file and line, never
run. Paths inside a file are relative to the file itself; `fedzero:<path>` names a file bundled in
the package (fedzero/resources/<path>; `fedzero:configs/...`, `fedzero:ds_configs/...` name the
example configs shipped with it, fedzero.bundled).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .problems import ConfigError, Problem

RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def resolve_path(value: str, base: Path) -> Path:
    if value.startswith("fedzero:"):
        relative = value[len("fedzero:"):]
        from fedzero.bundled import BUNDLED_DIRS, bundled_path

        if Path(relative).parts[:1] and Path(relative).parts[0] in BUNDLED_DIRS:   # fedzero:configs/demo.yaml
            try:
                return bundled_path(relative)
            except FileNotFoundError:
                pass
        return RESOURCES / relative
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def read_yaml(path: str | Path, what: str = "config file") -> tuple[object, Path]:
    """(parsed YAML, path); a missing file is a FileNotFoundError, a file that is not plain YAML a
    ConfigError naming the line. `fedzero:configs/demo.yaml` names a config bundled with fedzero."""
    path = resolve_path(path, Path.cwd()) if isinstance(path, str) and path.startswith("fedzero:") else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f), path
    except UnicodeDecodeError as err:
        raise ConfigError([Problem("", f"is not UTF-8 text ({err.reason} at byte {err.start})")], path) from None
    except yaml.YAMLError as err:
        raise ConfigError([Problem("", _yaml_reason(err))], path) from None


def _yaml_reason(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:
        problem += " (a config is plain YAML: tags are not read)"
    context = getattr(err, "context", None)
    return f"is not valid YAML: {where}{problem}" + (f" ({context})" if context and context not in problem else "")
