"""`fedzero generate` and `fedzero evaluate`: run a trained client's model (an exported adapter, or a
client straight from a run: fedzero/trained.py) on a prompt or a JSONL file.

    fedzero generate --adapter adapters/airlines --prompt "Tweet: delayed again\nSentiment:"
    fedzero evaluate --run runs/demo --client airlines                 # the run's own evaluation, repeated
    fedzero evaluate --adapter adapters/airlines --input test.jsonl --labels negative,neutral,positive

Evaluation is the federation's own code (fedzero.evaluate: `eval_loss`, the mean token loss over the
labelled tokens of fedzero.data.build_examples' examples; `classify`, label words scored by their
log-likelihood after the prompt), so `fedzero evaluate --run R --client C --round N` with no input
prints exactly the eval loss (and, after the last round, accuracy) the run recorded for C after round N.
docs/after_the_run.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedzero.config.arguments import non_negative_float as _non_negative_float
from fedzero.config.arguments import positive_int as _positive_int
from fedzero.trained import add_source_arguments, trained_from_args

OUT_SUFFIXES = (".json", ".jsonl")


# ------------------------------------------------------------------------------------------ inputs

def _check_out(out: str | None) -> Path | None:
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.suffix not in OUT_SUFFIXES:
        raise ValueError(f"--out {out}: write .jsonl (one line per record) or .json (metrics and records in one "
                         "document)")
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; name a .json or .jsonl file")
    return path


def _given_records(args, *, generating: bool) -> tuple[list[dict] | None, str | None]:
    """The records of --prompt / --input (None: neither given), and where they came from."""
    from fedzero.data import read_jsonl

    if args.prompt is not None:
        if not args.prompt:
            raise ValueError("--prompt is empty")
        completion = getattr(args, "completion", None)
        if completion is not None:
            if not completion:
                raise ValueError("--completion is empty")
            return [{"prompt": args.prompt, "completion": completion}], "--prompt/--completion"
        return [{"prompt": args.prompt} if generating else {"text": args.prompt}], "--prompt"
    if args.input is not None:
        return read_jsonl(args.input), str(args.input)
    return None, None


def _write(path: Path, document: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            json.dump({**document, "records": rows}, f, indent=2, ensure_ascii=False)
            f.write("\n")


def _prompt_of(record: dict) -> str:
    return record["prompt"] if "prompt" in record else record["text"]


# ---------------------------------------------------------------------------------------- generate

def generate_completions(trained, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                         top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Each prompt's completion: greedy when temperature is 0, else sampled (seeded). A prompt is
    tokenized as in training ([bos] + prompt) and cut on the left to the client's max_length."""
    import torch

    from fedzero.data.tokenize import bos_head

    tokenizer, model = trained.tokenizer, trained.model
    head = bos_head(tokenizer)
    keep = max(1, trained.max_length - len(head))
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([head + list(tokenizer.encode(prompt))[-keep:]])
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
                {"do_sample": False}
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, **sampling)
            new = generated[0, ids.shape[1]:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[:new.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(new))
    return out


def add_generate_parser(subparsers):
    p = subparsers.add_parser("generate", help="completions from a trained client's model: an exported adapter "
                                               "(--adapter) or straight from a run (--run --client)")
    add_source_arguments(p)
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="one prompt")
    given.add_argument("--input", help="JSONL of records: {'text': ...} (the text is the prompt) or "
                                       "{'prompt': ..., 'completion': ...} (the completion is kept as the reference)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 (default): greedy; above 0: sampled")
    p.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max-length", type=_positive_int, help="prompt tokens kept, bos included (default: the client's "
                                                           "train.max_length in its run, else 128)")
    p.add_argument("--out", help="also write the completions: .jsonl (one line per prompt) or .json")
    p.set_defaults(func=run_generate)
    return p


def run_generate(args) -> int:
    out = _check_out(args.out)
    records, source = _given_records(args, generating=True)
    trained = trained_from_args(args)
    if args.max_length is not None:
        trained.max_length = args.max_length
    prompts = [_prompt_of(r) for r in records]
    completions = generate_completions(trained, prompts, max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    rows = []
    for i, (record, completion) in enumerate(zip(records, completions)):
        row = {"index": i, "prompt": prompts[i], "generated": completion}
        if "completion" in record:
            row["reference"] = record["completion"]
        rows.append(row)
    print(f"{trained.description}; input: {source}")
    for row in rows:
        print(f"\n[{row['index']}] {row['prompt']!r}\n  -> {row['generated']!r}"
              + (f"\n     reference {row['reference']!r}" if "reference" in row else ""))
    if out is not None:
        _write(out, {"model": trained.description, "provenance": trained.provenance, "input": source,
                     "settings": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                  "top_p": args.top_p, "seed": args.seed, "max_length": trained.max_length}}, rows)
        print(f"\nwrote {out}")
    return 0


# ---------------------------------------------------------------------------------------- evaluate

def parse_labels(text: str) -> list[str]:
    """--labels a,b,c (an argparse type: a bad list is a usage error naming the flag)."""
    import argparse

    labels = [w.strip() for w in text.split(",")]
    if any(not w for w in labels):
        raise argparse.ArgumentTypeError(f"give label words separated by commas, none empty (e.g. a,b,c), got {text!r}")
    duplicates = sorted({w for w in labels if labels.count(w) > 1})
    if duplicates:
        raise argparse.ArgumentTypeError(f"{duplicates} given twice in {text!r}")
    return labels


def labels_for(records: list[dict], given: list[str] | None, run_labels: list[str] | None,
               source: str) -> list[str] | None:
    """The label words to score: --labels; else, if every record has a prompt and a label, the run's
    label words when they cover the records' (as the run scored them), else the records' own, sorted."""
    if given is not None:
        bad = [i for i, r in enumerate(records) if "prompt" not in r or r.get("label") not in given]
        if bad:
            first = records[bad[0]]
            why = "has no 'prompt'" if "prompt" not in first else f"has label {first.get('label')!r}"
            raise ValueError(f"{source}: record {bad[0] + 1} {why}; --labels scores {given} after each record's "
                             f"prompt, so every record needs a prompt and one of those labels "
                             f"({len(bad)} record(s) do not)")
        return given
    if not records or any("label" not in r or "prompt" not in r for r in records):
        return None
    own = sorted({str(r["label"]) for r in records})
    if run_labels and set(own) <= set(run_labels):
        return list(run_labels)
    return own


def evaluate_trained(trained, records: list[dict], labels: list[str] | None, *, per_record: bool) -> tuple[dict, list]:
    """(metrics, rows): eval loss over the records' labelled tokens, and with label words the
    classification metrics; rows: each record's loss, tokens and (with labels) prediction."""
    from fedzero.data import build_examples
    from fedzero.evaluate import classify, eval_loss

    tok, model = trained.tokenizer, trained.model
    examples = build_examples(records, tok, trained.max_length)
    metrics = {"records": len(records), "tokens": sum(int((e["labels"][1:] != -100).sum()) for e in examples),
               "eval_loss": eval_loss(model, examples, batch_size=trained.batch_size, pad_id=tok.pad_token_id)}
    rows = [{"index": i} for i in range(len(records))]
    if per_record:
        for row, example in zip(rows, examples):
            row.update(eval_loss=eval_loss(model, [example], batch_size=1, pad_id=tok.pad_token_id),
                       tokens=int((example["labels"][1:] != -100).sum()))
    if labels:
        scored, scores = classify(model, tok, records, labels, max_length=trained.max_length,
                                  batch_size=trained.label_batch_size)
        metrics.update(scored, labels=list(labels))
        for row, record, score in zip(rows, records, scores):
            row.update(label=record["label"], predicted=labels[int(score.argmax())],
                       label_logprobs={label: float(s) for label, s in zip(labels, score)})
    return metrics, rows


def add_evaluate_parser(subparsers):
    p = subparsers.add_parser("evaluate", help="eval loss and label accuracy of a trained client's model, with the "
                                               "federation's own scoring: an exported adapter (--adapter) or "
                                               "straight from a run (--run --client)")
    add_source_arguments(p)
    given = p.add_mutually_exclusive_group()
    given.add_argument("--prompt", help="one text (loss on every token), or a prompt with --completion")
    given.add_argument("--input", help="JSONL of {'text': ...} or {'prompt': ..., 'completion': ...} records, "
                                       "optionally with 'label' (default with --run: the client's held-out data "
                                       "in its run, its first train.max_eval_examples, as the run evaluated it)")
    p.add_argument("--completion", help="with --prompt: the completion whose tokens are scored")
    p.add_argument("--labels", type=parse_labels, help="label words a,b,c to score after each record's prompt "
                                                       "(accuracy, macro-F1, balanced accuracy, label NLL); default: "
                                                       "when every record has a prompt and a 'label', the run's "
                                                       "label words, else the records' own")
    p.add_argument("--max-length", type=_positive_int, help="tokens per example (default: the client's "
                                                           "train.max_length in its run, else 128)")
    p.add_argument("--batch-size", type=_positive_int, help="examples per forward pass (default: as the run "
                                                           "evaluated: the client's train.eval_batch_size for the "
                                                           "loss, 32 for label scoring; else 32). Padding differs "
                                                           "with it, so results can differ in the last digits")
    p.add_argument("--out", help="also write the results: .jsonl (one line per record: loss, tokens, prediction) or "
                                 ".json (the metrics and those records)")
    p.set_defaults(func=run_evaluate)
    return p


def run_evaluate(args) -> int:
    if args.completion is not None and args.prompt is None:
        raise ValueError("--completion goes with --prompt")
    out = _check_out(args.out)
    records, source = _given_records(args, generating=False)
    trained = trained_from_args(args)
    if records is None:
        records, source = _held_out(trained)
    if args.max_length is not None:
        trained.max_length = args.max_length
    if args.batch_size is not None:
        trained.batch_size = trained.label_batch_size = args.batch_size
    labels = labels_for(records, args.labels, trained.run_labels, source)
    metrics, rows = evaluate_trained(trained, records, labels, per_record=out is not None)
    print(f"{trained.description}\ninput: {source}\n")
    print(format_metrics(metrics))
    if out is not None:
        _write(out, {"model": trained.description, "provenance": trained.provenance, "input": source,
                     "settings": {"max_length": trained.max_length, "batch_size": trained.batch_size,
                                  "label_batch_size": trained.label_batch_size},
                     "metrics": metrics}, rows)
        print(f"\nwrote {out}")
    return 0


def _held_out(trained) -> tuple[list[dict], str]:
    from fedzero.data import read_jsonl

    if trained.test_data is None:
        raise ValueError(f"{trained.description}: no input and no held-out data known for it: give --prompt or "
                         "--input")
    if not Path(trained.test_data).is_file():
        raise FileNotFoundError(f"client {trained.client_id!r}'s held-out data {trained.test_data} (its data.test "
                                "in the run) is not there: give --input")
    records = read_jsonl(trained.test_data)[: trained.max_eval_examples]
    n = trained.max_eval_examples
    return records, f"{trained.test_data} (the held-out data of client {trained.client_id!r}" + \
        (f", its first {n} as the run evaluated" if n is not None else "") + ")"


def format_metrics(metrics: dict) -> str:
    lines = [f"{'records':<20}{metrics['records']:>12}", f"{'scored tokens':<20}{metrics['tokens']:>12}",
             f"{'eval loss':<20}{metrics['eval_loss']:>12.6f}"]
    if "labels" in metrics:
        lines.append(f"{'labels':<20}{','.join(metrics['labels']):>12}")
        for key in ("accuracy", "macro_f1", "balanced_accuracy", "label_nll"):
            lines.append(f"{key.replace('_', ' '):<20}{metrics[key]:>12.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- arguments

def _probability(text: str) -> float:
    import argparse

    value = _non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value
