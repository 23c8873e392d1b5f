"""Label scoring: each prompt run once with its KV cache continued per label (fedzero.evaluate.label_scores)
against one sequence per (prompt, label) (the plain path), on the same tweets and model.

    python benchmarks/label_scoring_speed.py --model ~/.cache/fedzero/bench/smol10-<key> --tweets 120

--model: a local HF directory (e.g. a bench backbone built by `fedzero bench`). Prints seconds for
each path, the ratio, and the largest absolute difference between their scores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local HF model directory")
    parser.add_argument("--tweets", type=int, default=120, help="test tweets of the airlines topic to score")
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from fedzero.backbones import BackboneSpec, load_backbone
    from fedzero.bench.data import DataSettings, load_records, split_tweets
    from fedzero.data import LABELS, load_tokenizer
    from fedzero.evaluate import _per_label_scores, label_scores

    path = str(Path(args.model).expanduser())
    model, _ = load_backbone(BackboneSpec(path=path))
    tokenizer = load_tokenizer(None, path)
    settings = DataSettings(test_per_topic=args.tweets, val_per_topic=0, round_eval_per_topic=0, max_chars=120)
    records = split_tweets(load_records(settings), [{"id": "a", "topics": ["airlines"]}], settings, 0).test["airlines"]

    t = time.perf_counter()
    shared = label_scores(model, tokenizer, records, list(LABELS), max_length=64, batch_size=args.batch_size)
    shared_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        plain = _per_label_scores(model, tokenizer, records, list(LABELS), 64, args.batch_size)
    plain_s = time.perf_counter() - t
    print(f"{len(records)} tweets x {len(LABELS)} labels, {args.threads} thread(s): shared prompt {shared_s:.1f} s, "
          f"one sequence per label {plain_s:.1f} s, ratio {plain_s / shared_s:.2f}; "
          f"max |difference| {float(np.abs(shared - plain).max()):.2e}")


if __name__ == "__main__":
    main()
