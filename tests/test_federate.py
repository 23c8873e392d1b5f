"""`fedzero federate` end to end through the real deepspeed and mpirun launchers (CPU, gloo)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from fedzero.adapters.dema import shared_block
from fedzero.cli import main
from fedzero.store import FederationStore
from fedzero.strategies import ClientUpdate, make_strategy

pytestmark = pytest.mark.slow


def _client(cid, hidden, layers, seed, topic):
    return {"id": cid,
            "backbone": {"llama_config": {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
                                          "num_key_value_heads": 2, "intermediate_size": 2 * hidden, "vocab_size": 259,
                                          "max_position_embeddings": 256, "initializer_range": 0.1},
                         "init_seed": seed, "tokenizer": "byte"},
            "data": {"train": f"fedzero:demo/{topic}.train.jsonl", "test": f"fedzero:demo/{topic}.test.jsonl"}}


@pytest.mark.skipif(shutil.which("mpirun") is None and not (Path(__import__("sys").executable).parent / "mpirun").exists(),
                    reason="mpirun not installed (pip install mpich)")
def test_federate_runs_rounds_through_the_launchers_and_matches_the_strategy(tmp_path, capsys):
    run = {"seed": 0, "dema": {"rank": 4, "num_experts": 2, "num_slots": 2},
           "federation": {"rounds": 2, "strategy": "cmga"},
           "train": {"local_steps": 2, "batch_size": 4, "lr": 0.01, "max_length": 64},
           "clients": [_client("a", 16, 2, 1, "airlines"), _client("b", 24, 1, 2, "apple")],
           "distill": {"labels": ["negative", "neutral", "positive"], "template": "Tweet: {text}\nSentiment:",
                       "anchors": 6, "batch_size": 2}}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run))
    assert main(["federate", "--config", str(cfg), "--out", str(tmp_path / "out"), "--aggregator-ranks", "2"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert [c["id"] for c in summary["rounds"][1]["clients"]] == ["a", "b"]
    assert all(c["zero_stage"] == 3 for r in summary["rounds"] for c in r["clients"])

    # The published global of round 2 is CMGA applied to the stored updates of round 1.
    store = FederationStore(tmp_path / "out" / "store", create=False)
    g1, _ = store.read_global(1)
    updates = [ClientUpdate(m["client_id"], store.read_update(1, m["client_id"])[0], m["num_samples"],
                            m["fingerprint"], m["slot_use"]) for m in store.list_updates(1)]
    expected, _ = make_strategy("cmga", seed=0).aggregate(g1, updates, round=1, block_of=shared_block)
    g2, _ = store.read_global(2)
    assert all(torch.allclose(expected[k], g2[k], rtol=1e-6, atol=1e-6) for k in g2)

    # Output distillation: the DeepSpeed clients sent anchor predictions, the MPI aggregator turned
    # them into the next round's teachers (two clients: each one's teacher is the other's predictions).
    assert store.read_teacher(0, "a") is None
    for rnd in (0, 1):
        assert store.read_result(rnd)["distill"] == {"used": ["a", "b"], "dropped": {}}
        for me, other in (("a", "b"), ("b", "a")):
            assert store.read_anchor_predictions(rnd, me).shape == (6, 3)
            torch.testing.assert_close(store.read_teacher(rnd + 1, me), store.read_anchor_predictions(rnd, other))

    # Rerunning into the same directory resumes: everything is done, nothing is retrained.
    assert main(["federate", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.count("already complete") == 2


@pytest.mark.skipif(shutil.which("mpirun") is None and not (Path(__import__("sys").executable).parent / "mpirun").exists(),
                    reason="mpirun not installed (pip install mpich)")
def test_federate_quality_teachers_only_from_stronger_clients(tmp_path):
    """`distill.teacher: quality` with `only_stronger` through the launchers: each DeepSpeed client sends
    its held-out loss with its predictions, and the MPI aggregator, reading the rule from the run
    config, gives the client with the higher loss the other's predictions and the stronger one none."""
    run = {"seed": 0, "dema": {"rank": 4, "num_experts": 2, "num_slots": 2},
           "federation": {"rounds": 1, "strategy": "fedavg"},
           "train": {"local_steps": 2, "batch_size": 4, "lr": 0.01, "max_length": 64, "max_eval_examples": 8},
           "clients": [_client("a", 16, 2, 1, "airlines"), _client("b", 24, 1, 2, "apple")],
           "distill": {"labels": ["negative", "neutral", "positive"], "template": "Tweet: {text}\nSentiment:",
                       "anchors": 6, "batch_size": 2, "teacher": "quality", "only_stronger": True}}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run))
    assert main(["federate", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    store = FederationStore(tmp_path / "out" / "store", create=False)
    sent = {c: store.read_anchor_predictions_with_quality(0, c) for c in ("a", "b")}
    quality = {c: q for c, (_, q) in sent.items()}
    assert all(q is not None and 0 < q < 20 for q in quality.values()) and quality["a"] != quality["b"]
    strong, weak = sorted(quality, key=quality.get)
    result = store.read_result(0)["distill"]
    assert result["quality"] == quality and result["without_teacher"] == [strong] and result["dropped"] == {}
    assert store.read_teacher(1, strong) is None
    torch.testing.assert_close(store.read_teacher(1, weak), sent[strong][0])
