"""Classification by scoring label words: accuracy, macro-F1 and label NLL.

A prompt -> label-word task (e.g. "Tweet: ...\nSentiment:" -> " positive") is scored by the
log-likelihood the model gives each candidate completion; the prediction is the best one. Label NLL
is the cross-entropy of the softmax over candidates at the true label; at this scale accuracy alone
swings with label bias, so all three are reported.
"""

from __future__ import annotations

import numpy as np
import torch

from fedzero.client.local import completion_logprob_sums
from fedzero.data import build_examples, collate


def classification_metrics(scores: np.ndarray, true: np.ndarray) -> dict:
    """scores [N, C] (higher = more likely), true [N] class indices -> accuracy, macro_f1, label_nll."""
    scores = np.asarray(scores, dtype=np.float64)
    true = np.asarray(true)
    if scores.ndim != 2 or scores.shape[0] != true.shape[0] or scores.shape[0] == 0:
        raise ValueError(f"scores must be [N, C] with N = len(true) > 0, got {scores.shape} and {true.shape}")
    pred = scores.argmax(axis=1)
    f1s = []
    for c in range(scores.shape[1]):
        tp = np.sum((pred == c) & (true == c))
        fp = np.sum((pred == c) & (true != c))
        fn = np.sum((pred != c) & (true == c))
        if tp + fp + fn == 0:
            continue  # class absent from both truth and predictions: not part of the macro average
        f1s.append(2 * tp / (2 * tp + fp + fn))
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return {
        "accuracy": float(np.mean(pred == true)),
        "macro_f1": float(np.mean(f1s)),
        "label_nll": float(-np.mean(log_probs[np.arange(len(true)), true])),
    }


@torch.no_grad()
def label_scores(model, tokenizer, records, labels, *, max_length: int, batch_size: int = 32) -> np.ndarray:
    """Sum of log-probabilities of each candidate completion f" {label}" (+ eos): [N, C]. The LM
    head runs only where a completion token is scored (a large share of a small model's compute)."""
    candidates = [{"prompt": r["prompt"], "completion": f" {label}"} for r in records for label in labels]
    examples = build_examples(candidates, tokenizer, max_length)
    model.eval()
    out = [completion_logprob_sums(model, collate(examples[i:i + batch_size], tokenizer.pad_token_id))
           for i in range(0, len(examples), batch_size)]
    return torch.cat(out).view(len(records), len(labels)).numpy()


def evaluate_classification(model, tokenizer, records, labels, *, max_length: int, batch_size: int = 32) -> dict:
    missing = [i for i, r in enumerate(records) if r.get("label") not in labels]
    if missing:
        raise ValueError(f"records {missing[:5]} have no label in {list(labels)}")
    scores = label_scores(model, tokenizer, records, labels, max_length=max_length, batch_size=batch_size)
    return classification_metrics(scores, np.array([labels.index(r["label"]) for r in records]))
