"""`fedzero federate` from another directory with a relative --out and a relative --config (the launched
processes run in the repository root, so they must get absolute paths), and its summary records each
client's eval loss per round and label metrics after the last, so `fedzero compare` and `fedzero plot`
read federate runs as they read simulate's."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from fedzero.cli import main
from fedzero.compare import compare_runs, read_run
from fedzero.config import RESOURCES
from fedzero.data import read_jsonl
from fedzero.generate import evaluate_trained
from fedzero.trained import load_trained

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("mpirun") is None and not (Path(sys.executable).parent / "mpirun").exists(),
                                 reason="mpirun not installed (pip install mpich)")]


def _client(cid, hidden, layers, seed, topic):
    return {"id": cid,
            "backbone": {"llama_config": {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
                                          "num_key_value_heads": 2, "intermediate_size": 2 * hidden, "vocab_size": 259,
                                          "max_position_embeddings": 256, "initializer_range": 0.1},
                         "init_seed": seed, "tokenizer": "byte"},
            "data": {"train": f"data/{topic}.train.jsonl", "test": f"data/{topic}.test.jsonl"}}


def test_federate_relative_out_from_another_directory_records_eval_per_round(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for topic in ("airlines", "apple"):
        for split in ("train", "test"):
            shutil.copy(RESOURCES / "demo" / f"{topic}.{split}.jsonl", project / "data")
    run = {"seed": 0, "dema": {"rank": 4, "num_experts": 2, "num_slots": 2},
           "federation": {"rounds": 2, "strategy": "fedavg"},
           "train": {"local_steps": 2, "batch_size": 4, "lr": 0.01, "max_length": 64, "max_eval_examples": 12},
           "clients": [_client("a", 16, 2, 1, "airlines"), _client("b", 24, 1, 2, "apple")]}
    (project / "run.yaml").write_text(yaml.safe_dump(run))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["federate", "--config", "../project/run.yaml", "--out", "runs/fed"]) == 0
    out = work / "runs" / "fed"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["clients"][0]["data"]["test"] == str(project / "data" / "airlines.test.jsonl")
    client_yaml = yaml.safe_load((out / "clients" / "a" / "client.yaml").read_text())
    assert client_yaml["state_dir"] == str(out / "clients" / "a")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == ["negative", "neutral", "positive"]
    for rnd in summary["rounds"]:
        for row in rnd["clients"]:
            assert 0 < row["eval_loss"] < 20, row
            assert ("accuracy" in row) == (rnd["round"] == 1)       # labels scored after the last round, as simulate
    # what was recorded for round 0 is the model after round 0 (the global of round 1 with its private part)
    trained = load_trained(run=out, client="b", round=0)
    expected, _ = evaluate_trained(trained, read_jsonl(project / "data" / "apple.test.jsonl")[:12], None, per_record=False)
    assert summary["rounds"][0]["clients"][1]["eval_loss"] == expected["eval_loss"]
    assert summary["rounds"][0]["clients"][1]["eval_loss"] != summary["rounds"][1]["clients"][1]["eval_loss"]

    history = read_run(out)
    assert history.clients["a"].eval_loss == [r["clients"][0]["eval_loss"] for r in summary["rounds"]]
    compared = compare_runs(history, history)
    assert [row["loss_gain"] for row in compared["clients"]] == [0.0, 0.0]

    # rerun into the same relative --out: every round is complete, nothing is launched or scored again
    capsys.readouterr()
    assert main(["federate", "--config", "../project/run.yaml", "--out", "runs/fed"]) == 0
    printed = capsys.readouterr().out
    assert "round 1: already complete, skipping" in printed and "eval" not in printed.split("summary:")[0].replace(
        "(train loss)", "")
    assert json.loads((out / "summary.json").read_text()) == summary
