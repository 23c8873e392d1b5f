"""What a simulate run records about itself, so it can be resumed and reused.

`config_document(run)` is the run config as the run used it: command-line overrides applied, every
client's train settings spelled out, every path absolute (a bundled file stays `fedzero:<path>`), so
`OUT/config.yaml` means the same from any directory and on any later reading. A rerun into the same
`--out` builds the same document and refuses to continue if the two differ (`differences` names the
keys), or if a client's data files or backbone changed since (`input_digests`, recorded in
summary.json).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import yaml

from fedzero.config import RESOURCES, RunConfig

HEADER = ("# The run config as `fedzero simulate` used it: command-line overrides applied, each client's train\n"
          "# settings in full, paths absolute. Reusable from any directory: fedzero simulate --config THIS --out DIR\n")


def _path_text(path) -> str:
    """An absolute path, or `fedzero:<path>` for a file bundled in the package."""
    path = Path(os.path.abspath(Path(path).expanduser()))     # absolute, without '..'
    try:
        return "fedzero:" + path.relative_to(RESOURCES).as_posix()
    except ValueError:
        return str(path)


def _backbone(spec) -> dict:
    doc = {k: v for k, v in dataclasses.asdict(spec).items() if k != "extra" and v is not None}
    if spec.path is not None:
        doc["path"] = _path_text(spec.path)
    # a tokenizer directory is read relative to the working directory (fedzero.data.load_tokenizer)
    if spec.tokenizer and str(spec.tokenizer).lower() != "byte" and os.path.isdir(str(spec.tokenizer)):
        doc["tokenizer"] = _path_text(spec.tokenizer)
    return doc


def config_document(run: RunConfig) -> dict:
    """The run config `run` as a plain mapping that parse_run_config reads back to the same run."""
    dema = run.dema.to_dict()
    if dema.get("anchor_file"):
        dema["anchor_file"] = _path_text(dema["anchor_file"])
    doc = {
        "seed": run.seed,
        "dema": dema,
        "federation": dataclasses.asdict(run.federation),
        "clients": [{"id": c.id, "backbone": _backbone(c.backbone),
                     "data": {"train": _path_text(c.train_data), "test": _path_text(c.test_data)},
                     "train": dataclasses.asdict(c.train)} for c in run.clients],
    }
    if run.distill is not None:
        distill = dataclasses.asdict(run.distill)
        if distill.get("anchor_file"):
            distill["anchor_file"] = _path_text(distill["anchor_file"])
        doc["distill"] = distill
    return json.loads(json.dumps(doc))          # tuples as lists: plain YAML


def write_config(doc: dict, path: Path) -> Path:
    path.write_text(HEADER + yaml.safe_dump(doc, sort_keys=False))
    return path


def read_config_document(path: Path) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    if isinstance(value, list) and value and all(isinstance(v, dict) and "id" in v for v in value):
        # clients: matched by id, not by position
        out = {}
        for item in value:
            out.update(_flatten({k: v for k, v in item.items() if k != "id"}, f"{prefix}[{item['id']}]"))
        return out
    return {prefix: value}


def differences(recorded: dict, now: dict) -> list[str]:
    """Each key whose value differs between two config documents, as `key: recorded -> now`."""
    a, b = _flatten(recorded), _flatten(now)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            lines.append(f"{key}: {'(absent)' if va is missing else json.dumps(va)} in the run, "
                         f"{'(absent)' if vb is missing else json.dumps(vb)} now")
    return lines


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_digests(run: RunConfig) -> dict[str, dict[str, str]]:
    """Per client: the sha256 of its train and test files."""
    return {c.id: {"train_sha256": file_digest(c.train_data), "test_sha256": file_digest(c.test_data)}
            for c in run.clients}
