"""End to end: a tiny heterogeneous federation in one process, through the real store and strategies."""

import json

import pytest
import torch
import yaml

from fedzero.adapters.dema import shared_block
from fedzero.adapters.dema.io import read_part
from fedzero.cli import main
from fedzero.config import load_run_config, parse_run_config
from fedzero.simulate import simulate
from fedzero.store import FederationStore


def _llama(hidden, layers, heads, seed):
    return {"llama_config": {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                             "num_key_value_heads": heads, "intermediate_size": 2 * hidden, "vocab_size": 259,
                             "max_position_embeddings": 128, "initializer_range": 0.1},
            "init_seed": seed, "tokenizer": "byte"}


def tiny_run(tmp_path, strategy="cmga", rounds=2):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name, words in (("a", ["good", "bad"]), ("b", ["fine", "poor"])):
        for split in ("train", "test"):
            with open(data / f"{name}.{split}.jsonl", "w") as f:
                for i in range(12):
                    f.write(json.dumps({"prompt": f"item {i}:", "completion": f" {words[i % 2]}"}) + "\n")
    cfg = {
        "seed": 0,
        "dema": {"rank": 4, "num_experts": 2, "num_slots": 2, "share": "experts-only"},   # private projectors
        "federation": {"rounds": rounds, "strategy": strategy},
        "train": {"local_steps": 3, "batch_size": 4, "lr": 0.01, "max_length": 32},
        "clients": [
            {"id": "a", "backbone": _llama(16, 2, 2, 1), "data": {"train": "data/a.train.jsonl", "test": "data/a.test.jsonl"}},
            {"id": "b", "backbone": _llama(24, 3, 3, 2), "data": {"train": "data/b.train.jsonl", "test": "data/b.test.jsonl"}},
        ],
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("strategy", ["fedavg", "cmga"])
def test_simulate_writes_summary_store_and_private_state(tmp_path, strategy):
    run = load_run_config(tiny_run(tmp_path, strategy))
    summary = simulate(run, tmp_path / "out", progress=False)

    assert summary["strategy"] == strategy
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    fingerprints = {c["fingerprint"] for c in summary["clients"]}
    assert len(fingerprints) == 2  # different backbones, different groups
    for rnd in summary["rounds"]:
        assert [c["id"] for c in rnd["clients"]] == ["a", "b"]
        assert rnd["uploaded_bytes"] > 0
        assert all({"train_loss", "eval_loss", "fingerprint"} <= set(c) for c in rnd["clients"])
    assert [f["id"] for f in summary["final"]] == ["a", "b"]
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["final"] == summary["final"]
    assert (tmp_path / "out" / "metrics.csv").read_text().count("\n") == 1 + 2 * 2

    store = FederationStore(tmp_path / "out" / "store", create=False)
    assert store.latest_global_round() == 2
    for client in ("a", "b"):
        delta, manifest = store.read_update(1, client)
        assert set(delta) == set(store.read_global(0)[0])   # only shared tensors travel
        assert not any(k.startswith("layers.") for k in delta)
        assert manifest["slot_use"] == {"a": {"slot0": 1, "slot1": 1}, "b": {"slot0": 2, "slot1": 1}}[client]
        tensors, header = read_part(tmp_path / "out" / "clients" / client / "private.safetensors")
        assert header["part"] == "private" and all(k.startswith("layers.") for k in tensors)
    assert store.read_result(0)["strategy"] == strategy
    assert store.read_server_state(1) == {}             # written every round, as the MPI aggregator does
    for rnd in (0, 1, 2):                               # every global declares its blocks, round 0 included
        state, manifest = store.read_global(rnd)
        assert manifest["meta"]["blocks"] == {k: shared_block(k) for k in state}


def test_published_global_is_the_strategy_applied_to_stored_updates(tmp_path):
    from fedzero.strategies import ClientUpdate, make_strategy

    simulate(load_run_config(tiny_run(tmp_path, "cmga")), tmp_path / "out", progress=False)
    store = FederationStore(tmp_path / "out" / "store", create=False)
    g0, _ = store.read_global(0)
    updates = []
    for m in store.list_updates(0):
        delta, _ = store.read_update(0, m["client_id"])
        updates.append(ClientUpdate(m["client_id"], delta, m["num_samples"], m["fingerprint"], m["slot_use"]))
    expected, _ = make_strategy("cmga", seed=0).aggregate(g0, updates, round=0, block_of=shared_block)
    g1, _ = store.read_global(1)
    assert all(torch.equal(expected[k], g1[k]) for k in g1)
    assert any(not torch.equal(g0[k], g1[k]) for k in g1)


def test_eval_loss_falls_for_every_client(tmp_path):
    summary = simulate(load_run_config(tiny_run(tmp_path, "cmga", rounds=3)), tmp_path / "out", progress=False)
    for row in summary["final"]:
        assert row["eval_loss_after"] < row["eval_loss_before"], row


def test_simulate_is_deterministic(tmp_path):
    first = simulate(load_run_config(tiny_run(tmp_path)), tmp_path / "one", progress=False)
    second = simulate(load_run_config(tiny_run(tmp_path)), tmp_path / "two", progress=False)
    assert first["final"] == second["final"]


def test_refuses_non_empty_output_dir(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        simulate(load_run_config(tiny_run(tmp_path)), tmp_path / "out", progress=False)


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c.pop("clients"), "clients"),
    (lambda c: c["clients"][1].update(id="a"), "duplicate client id"),
    (lambda c: c["clients"][0].update(id="../x"), "letters, digits"),
    (lambda c: c["clients"][0]["data"].update(train="nope.jsonl"), "no such file"),
    (lambda c: c["clients"][0]["backbone"].update(path="/no/such/dir"), "exactly one of"),
    (lambda c: c["federation"].update(rounds=0), "rounds"),
    (lambda c: c["train"].update(lr_typo=1), "unknown train setting"),
    (lambda c: c.update(extra=1), "unknown key"),
    (lambda c: c["dema"].update(rank=0), "rank"),
])
def test_config_errors_are_clear(tmp_path, mutate, error):
    cfg = yaml.safe_load(tiny_run(tmp_path).read_text())
    mutate(cfg)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        parse_run_config(cfg, tmp_path)


def test_cli_simulate_and_error_exit(tmp_path, capsys):
    assert main(["simulate", "--config", str(tiny_run(tmp_path)), "--out", str(tmp_path / "o"), "--quiet",
                 "--strategy", "fedavg", "--rounds", "1"]) == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["strategy"] == "fedavg"
    assert main(["simulate", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "p")]) == 2
    assert "no config file" in capsys.readouterr().err


def test_demo_config_parses_with_heterogeneous_backbones():
    from pathlib import Path

    run = load_run_config(Path(__file__).parents[1] / "configs" / "demo.yaml")
    shapes = {(c.backbone.llama_config["hidden_size"], c.backbone.llama_config["num_hidden_layers"]) for c in run.clients}
    assert len(run.clients) >= 3 and len({h for h, _ in shapes}) >= 3 and len({l for _, l in shapes}) >= 3


def test_cli_split_by_field_writes_disjoint_client_files(tmp_path):
    src = tmp_path / "all.jsonl"
    with open(src, "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"t{i}", "topic": ["x", "y", "z"][i % 3]}) + "\n")
    assert main(["split", "--input", str(src), "--out", str(tmp_path / "parts"), "--clients", "3", "--by", "topic"]) == 0
    texts, topics = [], []
    for i in range(3):
        rows = [json.loads(l) for n in ("train", "test") for l in (tmp_path / "parts" / f"client{i}.{n}.jsonl").read_text().splitlines()]
        texts += [r["text"] for r in rows]
        topics.append({r["topic"] for r in rows})
    assert sorted(texts) == sorted(f"t{i}" for i in range(30))   # a partition: nothing lost or duplicated
    assert all(len(t) == 1 for t in topics) and len(set.union(*topics)) == 3


@pytest.mark.parametrize("dema", [{"share": "shape-matched"}, {"projector": "anchor", "anchor_out": True, "num_anchors": 8},
                                  {"projector": "anchor+learned", "placement": "side", "num_anchors": 8}])
def test_simulate_runs_every_sharing_and_projector_option(tmp_path, dema):
    cfg = yaml.safe_load(tiny_run(tmp_path, rounds=1).read_text())
    cfg["dema"].update(dema)
    summary = simulate(parse_run_config(cfg, tmp_path), tmp_path / "out", progress=False)
    store = FederationStore(tmp_path / "out" / "store", create=False)
    g1, _ = store.read_global(1)
    if dema.get("share") == "shape-matched":
        # the global state holds both widths' projector banks; each client uploaded only its own
        assert any(k.startswith("proj.h16.") for k in g1) and any(k.startswith("proj.h24.") for k in g1)
        assert not any(k.startswith("proj.h24.") for k in store.read_update(0, "a")[0])
    diag = summary["rounds"][0]["diagnostics"]["updates"]
    assert set(diag["slot0"]["cosines"]) == {"a|b"}
    assert all(set(c["gate_entropy"]) for c in summary["rounds"][0]["clients"])


def test_unknown_strategy_or_option_is_refused_at_load(tmp_path):
    cfg = yaml.safe_load(tiny_run(tmp_path).read_text())
    cfg["federation"]["strategy_options"] = {"harmonise": True}
    with pytest.raises(ValueError, match="unknown option"):
        parse_run_config(cfg, tmp_path)
    cfg["federation"] = {"strategy": "fedprox"}
    with pytest.raises(ValueError, match="fedprox"):
        parse_run_config(cfg, tmp_path)


def test_cli_strategy_override_drops_the_other_strategys_options(tmp_path, capsys):
    cfg = yaml.safe_load(tiny_run(tmp_path).read_text())
    cfg["federation"]["strategy_options"] = {"harmonize_norms": True}
    path = tmp_path / "run2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["simulate", "--config", str(path), "--out", str(tmp_path / "o"), "--quiet", "--strategy", "fedavg", "--rounds", "1"]) == 0
    assert "drops the config's options" in capsys.readouterr().err


def test_token_loss_sums_through_kept_positions_equals_full_logits():
    """Only label-predicting positions go through the LM head; the loss must not change (also via PEFT)."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedzero.client.local import token_loss_sums

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 5], labels[1, 8], labels[2, 3:5] = ids[0, 5], ids[1, 8], ids[2, 3:5]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    logits = model(input_ids=ids, attention_mask=mask).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    loss, count = token_loss_sums(model, batch)
    assert count == 4 and torch.allclose(loss, expected, rtol=1e-6, atol=1e-6)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert torch.allclose(token_loss_sums(peft_model, batch)[0], expected, rtol=1e-6, atol=1e-6)
    nothing = {**batch, "labels": torch.full_like(ids, -100)}
    loss, count = token_loss_sums(model, nothing)
    assert count == 0 and float(loss) == 0.0


def test_output_distillation_through_the_store(tmp_path):
    """`distill:` on: each client sends its anchor predictions with its update; round r+1's teachers
    are the leave-one-out means of round r's predictions; round 0 (no teacher yet) trains exactly
    as without distillation, round 1 does not."""
    cfg = yaml.safe_load(tiny_run(tmp_path, strategy="fedavg").read_text())
    plain = simulate(parse_run_config(cfg, tmp_path), tmp_path / "plain", progress=False)
    cfg["distill"] = {"labels": ["good", "bad"], "template": "item {text}:", "anchors": 6, "batch_size": 2,
                      "weight": 2.0, "max_chars": 40}
    summary = simulate(parse_run_config(cfg, tmp_path), tmp_path / "distill", progress=False)
    assert summary["distill"]["labels"] == ["good", "bad"]
    s_plain = FederationStore(tmp_path / "plain" / "store", create=False)
    store = FederationStore(tmp_path / "distill" / "store", create=False)
    for cid in ("a", "b"):
        assert s_plain.read_anchor_predictions(0, cid) is None
        for rnd in (0, 1):
            p = store.read_anchor_predictions(rnd, cid)
            assert p.shape == (6, 2) and torch.allclose(p.sum(dim=1), torch.ones(6, dtype=p.dtype))
        d0, d0_plain = store.read_update(0, cid)[0], s_plain.read_update(0, cid)[0]
        assert all(torch.equal(d0[k], d0_plain[k]) for k in d0)
        d1, d1_plain = store.read_update(1, cid)[0], s_plain.read_update(1, cid)[0]
        assert any(not torch.allclose(d1[k], d1_plain[k]) for k in d1)
    assert store.read_teacher(0, "a") is None
    # both clients hold 12 examples: each one's teacher is the other's predictions
    torch.testing.assert_close(store.read_teacher(1, "a"), store.read_anchor_predictions(0, "b").float())
    torch.testing.assert_close(store.read_teacher(2, "b"), store.read_anchor_predictions(1, "a").float())
    extra = [d["uploaded_bytes"] - p["uploaded_bytes"] for d, p in zip(summary["rounds"], plain["rounds"])]
    assert all(0 < e < 1000 for e in extra)             # two 6 x 2 predictions files, not weights


def test_quality_teachers_only_from_stronger_clients_through_the_store(tmp_path):
    """`distill.teacher: quality` with `only_stronger`: each client sends its held-out loss with its
    predictions; of the two clients, the one with the lower loss gets no teacher, the other distils from
    its predictions. Measuring the loss changes nothing else: round 0 is the mean teacher's run's."""
    from fedzero.distill.teachers import TeacherRule, round_teachers

    cfg = yaml.safe_load(tiny_run(tmp_path, strategy="fedavg").read_text())
    cfg["distill"] = {"labels": ["good", "bad"], "template": "item {text}:", "anchors": 6, "batch_size": 2,
                      "weight": 2.0, "max_chars": 40}
    simulate(parse_run_config(cfg, tmp_path), tmp_path / "mean", progress=False)
    cfg["distill"].update(teacher="quality", only_stronger=True)
    summary = simulate(parse_run_config(cfg, tmp_path), tmp_path / "quality", progress=False)
    assert summary["distill"]["teacher"] == "quality" and summary["distill"]["only_stronger"] is True
    mean = FederationStore(tmp_path / "mean" / "store", create=False)
    store = FederationStore(tmp_path / "quality" / "store", create=False)
    for cid in ("a", "b"):
        assert mean.read_anchor_predictions_with_quality(0, cid)[1] is None      # the mean rule sends none
        d0, d0_mean = store.read_update(0, cid)[0], mean.read_update(0, cid)[0]
        assert all(torch.equal(d0[k], d0_mean[k]) for k in d0)
        assert torch.equal(store.read_anchor_predictions(0, cid), mean.read_anchor_predictions(0, cid))
    for rnd in (0, 1):
        sent = {c: store.read_anchor_predictions_with_quality(rnd, c) for c in ("a", "b")}
        quality = {c: q for c, (_, q) in sent.items()}
        assert all(0 < q < 10 for q in quality.values()) and quality["a"] != quality["b"]
        result = store.read_result(rnd)["distill"]
        strong, weak = sorted(quality, key=quality.get)
        assert result["quality"] == quality and result["without_teacher"] == [strong] and result["dropped"] == {}
        assert store.read_teacher(rnd + 1, strong) is None
        torch.testing.assert_close(store.read_teacher(rnd + 1, weak), sent[strong][0])
        expected = round_teachers({c: p.numpy() for c, (p, _) in sent.items()}, {"a": 12, "b": 12},
                                  TeacherRule("quality", True), quality)
        assert sorted(expected) == [weak] and torch.equal(store.read_teacher(rnd + 1, weak), expected[weak])


def test_server_momentum_state_is_in_the_store_as_an_aggregator_writes_it(tmp_path):
    cfg = yaml.safe_load(tiny_run(tmp_path, strategy="fedavg", rounds=1).read_text())
    cfg["federation"].update(server_lr=0.5, server_momentum=0.9)
    simulate(parse_run_config(cfg, tmp_path), tmp_path / "out", progress=False)
    store = FederationStore(tmp_path / "out" / "store", create=False)
    (g0, _), (g1, _) = store.read_global(0), store.read_global(1)
    m0 = store.read_server_state(0)               # round 0: the buffer is the aggregated delta itself
    assert sorted(m0) == sorted(g0)
    for k in g0:
        torch.testing.assert_close(g0[k] + 0.5 * m0[k], g1[k])
