"""Classification by scoring label words: accuracy, macro-F1, balanced accuracy and label NLL.

A prompt -> label-word task (e.g. "Tweet: ...\nSentiment:" -> " positive") is scored by the
log-likelihood the model gives each candidate completion; the prediction is the best one. Label NLL
is the cross-entropy of the softmax over candidates at the true label. At this scale accuracy alone
swings with label bias (predicting a skewed test set's majority label scores well), so macro-F1 and
balanced accuracy, which weigh every class alike, are reported beside it.

The label scorer `completion_logprob_sums` (a candidate completion's summed log-likelihood) lives
here too: label scoring (the clients' and the bench's evaluation) and whole-completion distillation
(fedzero.distill) use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

# torch and the training stack are imported where a model is scored: the metrics are plain numpy, so
# the bench's report and statistics (fedzero.bench.stats) load without them
if TYPE_CHECKING:
    import torch


def confusion_counts(pred: np.ndarray, true: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, predicted, true) counts per class, each [C]."""
    tp = np.bincount(true[pred == true], minlength=n_classes)
    return tp, np.bincount(pred, minlength=n_classes), np.bincount(true, minlength=n_classes)


def metrics_from_counts(tp, predicted, true) -> dict[str, np.ndarray]:
    """accuracy, macro_f1, balanced_accuracy from per-class counts [..., C] (any leading batch axes, so
    the bootstrap in fedzero.bench.bootstrap evaluates thousands of resamples at once with this one
    definition). Macro-F1 averages over the classes in the truth or the predictions (a class absent
    from both has no F1); balanced accuracy (mean recall) over the classes in the truth."""
    tp, predicted, true = (np.asarray(x, dtype=np.float64) for x in (tp, predicted, true))
    in_f1 = (predicted + true) > 0
    in_truth = true > 0
    f1 = np.divide(2 * tp, predicted + true, out=np.zeros_like(tp), where=in_f1)
    recall = np.divide(tp, true, out=np.zeros_like(tp), where=in_truth)
    return {"accuracy": tp.sum(-1) / true.sum(-1),
            "macro_f1": f1.sum(-1) / in_f1.sum(-1),
            "balanced_accuracy": recall.sum(-1) / in_truth.sum(-1)}


def classification_metrics(scores: np.ndarray, true: np.ndarray) -> dict:
    """scores [N, C] (higher = more likely), true [N] class indices -> accuracy, macro_f1,
    balanced_accuracy, label_nll. Ties go to the first class."""
    scores = np.asarray(scores, dtype=np.float64)
    true = np.asarray(true)
    if scores.ndim != 2 or scores.shape[0] != true.shape[0] or scores.shape[0] == 0:
        raise ValueError(f"scores must be [N, C] with N = len(true) > 0, got {scores.shape} and {true.shape}")
    pred = scores.argmax(axis=1)
    counts = metrics_from_counts(*confusion_counts(pred, true, scores.shape[1]))
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return {**{k: float(v) for k, v in counts.items()},
            "label_nll": float(-np.mean(log_probs[np.arange(len(true)), true]))}


def labelled_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, K, V] at the K positions that predict a labelled token in some row, and the targets
    there [B, K] (-100 where a row has none). Only those positions go through the LM head (HF's
    `logits_to_keep` with a tensor of positions): with prompt -> label examples that is a few of
    ~64 positions, and a 49k-word head costs as much as a third of a 10-layer SmolLM2. The training
    loss (fedzero.client.local.token_loss_sums) reads the same positions."""
    targets = batch["labels"][:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().flatten()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return logits, targets[:, keep]


def completion_logprob_sums(model, batch) -> torch.Tensor:
    """[B] float64: each row's summed log-probability of its labelled tokens (a candidate
    completion's log-likelihood: label scoring, whole-completion distillation). Differentiable."""
    import torch

    logits, targets = labelled_logits(model, batch)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return (logp * (targets != -100)).double().sum(dim=1)


def label_scores(model, tokenizer, records, labels, *, max_length: int, batch_size: int = 32) -> np.ndarray:
    """Sum of log-probabilities of each candidate completion f" {label}" (+ eos) after each record's
    prompt: [N, C], exactly what the model gives the examples `build_examples` makes of
    (prompt, " label") pairs. The prompt is run once per record, not once per label: its key/value
    cache is continued with each label's tokens (scoring is most of a benchmark's compute). A prompt
    that `build_examples` would cut differently for different labels (it does not fit max_length
    with the longest completion) is scored the plain way, one sequence per label; so is every prompt
    of a model whose forward takes no KV cache or no position ids (RWKV's recurrent state; Bloom's
    and MPT's ALiBi), where a continued cache or left padding is not known to give the same scores."""
    import torch

    prompts, completions = _tokenized_candidates(tokenizer, records, labels, max_length)
    scores = np.zeros((len(records), len(labels)))
    longest = max(len(c) for c in completions)
    cache_name = _cache_argument(model)
    # An empty prompt (no bos) has no position to predict the first label token from: scored per label.
    shared = [i for i, p in enumerate(prompts) if cache_name is not None and 0 < len(p) <= max_length - longest]
    per_label = sorted(set(range(len(prompts))) - set(shared))
    model.eval()
    with torch.no_grad():
        order = sorted(shared, key=lambda i: len(prompts[i]))          # similar lengths: little padding
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            scores[rows] = _shared_prompt_scores(model, [prompts[i] for i in rows], completions,
                                                 tokenizer.pad_token_id, cache_name).numpy()
        if per_label:
            scores[per_label] = _per_label_scores(model, tokenizer, [records[i] for i in per_label], labels,
                                                  max_length, batch_size)
    return scores


def _tokenized_candidates(tokenizer, records, labels, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Each record's [bos] + prompt ids and each label's completion ids + eos, tokenized exactly as
    fedzero.data.build_examples tokenizes a (prompt, " label") pair."""
    from fedzero.data.tokenize import bos_head, completion_ids

    head = bos_head(tokenizer)
    completions = [completion_ids(tokenizer, f" {label}") for label in labels]
    too_long = [label for label, c in zip(labels, completions) if len(head) + len(c) > max_length]
    if too_long:
        raise ValueError(f"label(s) {too_long} do not fit max_length={max_length} with bos and eos; raise max_length")
    return [head + list(tokenizer.encode(r["prompt"])) for r in records], completions


def _shared_prompt_scores(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                          name: str):
    """[B, C] float64 log-likelihoods of every completion after every prompt, the prompts run once.
    Prompts are left-padded so that all end in the last column and each label continues the cache at
    the same step; position ids follow each row's real tokens, so padding changes nothing."""
    import copy

    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    prompt_cache = out[name]
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)             # [B, V]
    lengths = mask.sum(-1, keepdim=True)
    columns = []
    for completion in completions:
        score = first[:, completion[0]].double()
        rest = len(completion) - 1
        if rest:
            tokens = torch.tensor(completion, dtype=torch.long).expand(len(prompts), -1)
            cache = copy.deepcopy(prompt_cache)       # each label continues the prompt's own cache
            logits = model(input_ids=tokens[:, :-1], attention_mask=torch.cat([mask, torch.ones_like(tokens[:, 1:])], 1),
                           position_ids=lengths + torch.arange(rest), use_cache=True, **{name: cache}).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(2, tokens[:, 1:, None])[..., 0]
            score = score + logp.double().sum(1)
        columns.append(score)
    return torch.stack(columns, dim=1)


def _cache_argument(model) -> str | None:
    """The name under which this model's forward takes and returns its KV cache: "cache" from
    transformers 5.2x on ("past_key_values" is deprecated there and goes in 5.40), "past_key_values"
    before; None if its forward takes neither, or no position_ids. Read from the wrapped model's
    signature (a PEFT model forwards **kwargs)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    if "position_ids" not in parameters:
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _per_label_scores(model, tokenizer, records, labels, max_length: int, batch_size: int) -> np.ndarray:
    """The plain way: one (prompt, " label") sequence per record and label."""
    import torch

    from fedzero.data import build_examples, collate

    candidates = [{"prompt": r["prompt"], "completion": f" {label}"} for r in records for label in labels]
    examples = build_examples(candidates, tokenizer, max_length)
    out = [completion_logprob_sums(model, collate(examples[i:i + batch_size], tokenizer.pad_token_id))
           for i in range(0, len(examples), batch_size)]
    return torch.cat(out).view(len(records), len(labels)).numpy()


def evaluate_classification(model, tokenizer, records, labels, *, max_length: int, batch_size: int = 32) -> dict:
    return classify(model, tokenizer, records, labels, max_length=max_length, batch_size=batch_size)[0]


def classify(model, tokenizer, records, labels, *, max_length: int, batch_size: int = 32) -> tuple[dict, np.ndarray]:
    """evaluate_classification's metrics and the label scores [N, C] they come from (each record's
    prediction is its row's argmax): the federation's evaluation and `fedzero evaluate` alike."""
    missing = [i for i, r in enumerate(records) if r.get("label") not in labels]
    if missing:
        raise ValueError(f"records {missing[:5]} have no label in {list(labels)}")
    scores = label_scores(model, tokenizer, records, labels, max_length=max_length, batch_size=batch_size)
    return classification_metrics(scores, np.array([labels.index(r["label"]) for r in records])), scores


def eval_loss(model, examples, *, batch_size: int, pad_id: int) -> float:
    """Mean token loss over the labelled tokens of `examples` (fedzero.data.build_examples): a
    client's eval loss in the federation (LocalClient.evaluate) and in `fedzero evaluate`, one code
    path (fedzero.client.local.mean_token_loss)."""
    from fedzero.client.local import mean_token_loss

    model.eval()
    return mean_token_loss(model, examples, batch_size=batch_size, pad_id=pad_id)
