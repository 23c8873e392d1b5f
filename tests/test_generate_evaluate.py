"""`fedzero generate` and `fedzero evaluate`: a client's model from a run or an exported adapter, scored
with the federation's own evaluation code, gives exactly what the run recorded."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from fedzero.cli import main
from fedzero.config import load_run_config
from fedzero.simulate import simulate
from fedzero.trained import load_trained

BYTE = {"vocab_size": 259, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
        "max_position_embeddings": 128, "initializer_range": 0.1}
LLAMA = {"model_config": {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "num_key_value_heads": 1, "intermediate_size": 32, **BYTE}, "init_seed": 1, "tokenizer": "byte"}
NEOX = {"model_config": {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                         "intermediate_size": 64, **BYTE}, "init_seed": 2, "tokenizer": "byte"}
LABELS = ["good", "bad", "meh"]


def write_run_config(root: Path, strategy: str = "fedavg", rounds: int = 2, dema: dict | None = None) -> Path:
    """A two-client run config (LLaMA and GPT-NeoX, byte tokenizer) on prompt -> label records."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 12), ("test", 9)):
        with open(data / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = LABELS[i % 3]
                f.write(json.dumps({"prompt": f"{split} item {i}:", "completion": f" {label}", "label": label}) + "\n")
    cfg = {"seed": 0, "dema": {"rank": 4, "num_experts": 2, "num_slots": 2, **(dema or {})},
           "federation": {"rounds": rounds, "strategy": strategy},
           "train": {"local_steps": 2, "batch_size": 4, "lr": 0.05, "max_length": 24, "eval_batch_size": 4,
                     "max_eval_examples": 7},
           "clients": [{"id": cid, "backbone": backbone, "data": {"train": str(data / "train.jsonl"),
                                                                   "test": str(data / "test.jsonl")}}
                       for cid, backbone in (("a", LLAMA), ("b", NEOX))]}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    out = root / "out"
    simulate(load_run_config(write_run_config(root)), out, progress=False)
    return out


def recorded(out: Path, client: str, rnd: int) -> dict:
    rows = json.loads((out / "summary.json").read_text())["rounds"][rnd]["clients"]
    return next(r for r in rows if r["id"] == client)


@pytest.mark.parametrize("client", ["a", "b"])
def test_evaluate_from_a_run_repeats_the_runs_own_evaluation_exactly(run, tmp_path, client, capsys):
    for rnd in (0, 1):
        res = tmp_path / f"{client}{rnd}.json"
        assert main(["evaluate", "--run", str(run), "--client", client, "--round", str(rnd), "--out", str(res)]) == 0
        metrics = json.loads(res.read_text())["metrics"]
        assert metrics["eval_loss"] == recorded(run, client, rnd)["eval_loss"]         # the same float, not close
        assert metrics["records"] == 7                                                # train.max_eval_examples
    # after the last round the run also scored the label words: the same accuracy and label NLL
    last = recorded(run, client, 1)
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "label_nll"):
        assert metrics[key] == last[key]
    assert metrics["labels"] == json.loads((run / "summary.json").read_text())["labels"]
    with open(run / "metrics.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["client"] == client and r["round"] == "1")
    assert f"{metrics['eval_loss']:.6f}" == row["eval_loss"]
    printed = capsys.readouterr().out
    assert f"{metrics['eval_loss']:.6f}" in printed and f"client {client} after round 1" in printed


def test_an_exported_adapter_evaluates_and_generates_as_the_run_does(run, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert main(["export", "--run", str(run), "--client", "b", "--out", str(adapter)]) == 0
    test_file = run.parent / "data" / "test.jsonl"
    res = tmp_path / "ev.jsonl"
    # the adapter finds its base model and the client's settings through its provenance (an inline backbone)
    assert main(["evaluate", "--adapter", str(adapter), "--input", str(test_file), "--labels", "good,bad,meh",
                 "--out", str(res)]) == 0
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(9)) and {r["label"] for r in rows} == set(LABELS)
    assert all(r["predicted"] in LABELS and set(r["label_logprobs"]) == set(LABELS) for r in rows)
    assert all(r["predicted"] == max(r["label_logprobs"], key=r["label_logprobs"].get) for r in rows)
    # the first 7 records are what the run evaluated: their loss is the run's
    first7 = tmp_path / "first7.jsonl"
    first7.write_text("".join(test_file.read_text().splitlines(keepends=True)[:7]))
    out = tmp_path / "ev7.json"
    assert main(["evaluate", "--adapter", str(adapter), "--input", str(first7), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["eval_loss"] == recorded(run, "b", 1)["eval_loss"]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "test item 3:", "completion": " good"}) + "\n"
                       + json.dumps({"text": "hello"}) + "\n")
    from_adapter, from_run = tmp_path / "g1.jsonl", tmp_path / "g2.json"
    assert main(["generate", "--adapter", str(adapter), "--input", str(prompts), "--max-new-tokens", "5",
                 "--out", str(from_adapter)]) == 0
    assert main(["generate", "--run", str(run), "--client", "b", "--input", str(prompts), "--max-new-tokens", "5",
                 "--out", str(from_run)]) == 0
    generated = [json.loads(line) for line in from_adapter.read_text().splitlines()]
    assert generated == json.loads(from_run.read_text())["records"]
    assert [g["prompt"] for g in generated] == ["test item 3:", "hello"] and generated[0]["reference"] == " good"
    assert "reference" not in generated[1]
    # greedy decoding: the argmax continuation of [bos] + prompt under the client's model, up to eos or 5 tokens
    trained = load_trained(run=run, client="b")
    tok = trained.tokenizer
    ids = [tok.bos_token_id] + tok.encode("test item 3:")
    new = []
    with torch.no_grad():
        for _ in range(5):
            nxt = int(trained.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    assert generated[0]["generated"] == tok.decode(new)


def test_evaluate_a_prompt_and_completion(run, tmp_path):
    res = tmp_path / "one.json"
    assert main(["evaluate", "--run", str(run), "--client", "a", "--prompt", "test item 0:", "--completion", " good",
                 "--out", str(res)]) == 0
    doc = json.loads(res.read_text())
    assert doc["metrics"]["records"] == 1 and doc["metrics"]["tokens"] == len(" good") + 1      # + eos
    assert "labels" not in doc["metrics"] and doc["input"] == "--prompt/--completion"
    assert doc["records"][0]["eval_loss"] == doc["metrics"]["eval_loss"]


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--run", "RUN"], "--run needs --client ID"),
    (["evaluate", "--run", "RUN", "--client", "zz"], "unknown client 'zz' in simulate run"),
    (["evaluate", "--run", "RUN", "--client", "a", "--round", "5"], "round 5 of simulate run"),
    (["evaluate", "--run", "RUN", "--client", "a", "--out", "x.csv"], "--out x.csv: write .jsonl"),
    (["evaluate", "--run", "RUN", "--client", "a", "--input", "NOFILE"], "NOFILE"),
    (["evaluate", "--run", "RUN", "--client", "a", "--prompt", "hi", "--labels", "good,bad"],
     "--prompt: record 1 has no 'prompt'"),
    (["evaluate", "--run", "RUN", "--client", "a", "--completion", "x"], "--completion goes with --prompt"),
    (["generate", "--adapter", "NOWHERE", "--prompt", "hi"], "is not an adapter directory"),
    (["generate", "--adapter", "NOWHERE", "--client", "a", "--prompt", "hi"], "--client is for --run"),
])
def test_a_users_mistake_is_one_line_naming_what_is_wrong(run, tmp_path, capsys, argv, message):
    argv = [str(run) if a == "RUN" else str(tmp_path / a) if a in ("NOFILE", "NOWHERE") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedzero {argv[0]}: error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_label_lists_are_usage_errors(run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--run", str(run), "--client", "a", "--labels", "good,,bad"])
    assert exit_.value.code == 2 and "none empty" in capsys.readouterr().err
