"""Reading and validating JSONL training records.

Two record shapes are accepted, one JSON object per line:

* ``{"text": str}`` -- plain language-modelling text (loss on every token);
* ``{"prompt": str, "completion": str}`` -- supervised pairs (loss on the completion only).

Extra fields (``"label"``, ``"topic"``, ...) are allowed and kept untouched.  Blank lines are
skipped.  Every problem is reported as a :class:`ValueError` whose message starts with
``<file>:<line>:`` so that it can be located at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl", "validate_record", "write_jsonl", "record_kind"]


def record_kind(record: dict[str, Any]) -> str:
    """Return ``"pair"`` for prompt/completion records and ``"text"`` for plain text records."""
    return "pair" if "prompt" in record or "completion" in record else "text"


def validate_record(record: Any) -> str | None:
    """Return ``None`` if ``record`` is a valid record, otherwise a short reason."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    has_text = "text" in record
    has_pair = "prompt" in record or "completion" in record
    if has_pair:
        for key in ("prompt", "completion"):
            if key not in record:
                return f'prompt/completion record is missing the "{key}" field'
            if not isinstance(record[key], str):
                return f'field "{key}" must be a string, got {type(record[key]).__name__}'
        if not record["completion"]:
            return 'field "completion" must not be empty'
        if has_text:
            return 'a record has either "text" or "prompt"/"completion", not both'
        return None
    if not has_text:
        return 'missing field: need "text" or "prompt" and "completion"'
    if not isinstance(record["text"], str):
        return f'field "text" must be a string, got {type(record["text"]).__name__}'
    if not record["text"]:
        return 'field "text" must not be empty'
    return None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read and validate a JSONL file of records.

    Raises ``ValueError("<path>:<line>: ...")`` on malformed JSON, a missing or invalid field,
    or a file without any record; ``FileNotFoundError`` if the file does not exist.
    """
    path = Path(path)
    records: list[dict] = []
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            reason = validate_record(obj)
            if reason is not None:
                raise ValueError(f"{path}:{lineno}: {reason}")
            records.append(obj)
    if not records:
        raise ValueError(f"{path}:1: empty file (no records)")
    return records


def write_jsonl(path: str | os.PathLike, records) -> None:
    """Write records as UTF-8 JSONL (one compact object per line, ``\\n`` line ends)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=False) + "\n")
