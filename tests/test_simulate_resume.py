"""fedzero simulate resumes from its store into the same --out with the results of an uninterrupted run;
a different config is refused naming what differs; Ctrl-C leaves a partial summary and exits 130;
nothing is created before the config, data and backbones are checked; OUT/config.yaml is reusable from
any directory."""

import json
import os

import pytest
import torch
import yaml

from fedzero.adapters.dema.io import read_part
from fedzero.cli import main
from fedzero.client.local import LocalClient
from fedzero.config import load_run_config
from fedzero.simulate import Interrupted, simulate
from fedzero.store import FederationStore
from test_simulate import tiny_run


def _config(tmp_path, rounds=3, **federation):
    path = tiny_run(tmp_path, rounds=rounds)
    if federation:
        cfg = yaml.safe_load(path.read_text())
        cfg["federation"].update(federation)
        path.write_text(yaml.safe_dump(cfg))
    return path


def _without_clock(summary):
    return {k: v for k, v in summary.items() if k != "wall_seconds"}


def _assert_same_run(a, b, rounds):
    """Two --out directories hold the same run: summaries (but the clock), metrics.csv, every global,
    update and server state, and each client's latest parts, bit for bit."""
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert _without_clock(sa) == _without_clock(sb)
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()
    store_a, store_b = (FederationStore(d / "store", create=False) for d in (a, b))
    assert store_a.latest_global_round() == store_b.latest_global_round() == rounds
    for rnd in range(rounds + 1):
        ga, gb = store_a.read_global(rnd)[0], store_b.read_global(rnd)[0]
        assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga), rnd
    for rnd in range(rounds):
        for cid in ("a", "b"):
            da, db = store_a.read_update(rnd, cid)[0], store_b.read_update(rnd, cid)[0]
            assert all(torch.equal(da[k], db[k]) for k in da), (rnd, cid)
        sa_, sb_ = store_a.read_server_state(rnd), store_b.read_server_state(rnd)
        assert sa_.keys() == sb_.keys() and all(torch.equal(sa_[k], sb_[k]) for k in sa_)
    for cid in ("a", "b"):
        pa, pb = (read_part(d / "clients" / cid / "private.safetensors")[0] for d in (a, b))
        assert pa.keys() == pb.keys() and pa and all(torch.equal(pa[k], pb[k]) for k in pa)


def _interrupt_after_publishing(monkeypatch, round_published):
    """Ctrl-C right after the global of `round_published` is published (the previous round committed)."""
    original = FederationStore.publish_global

    def publish(self, rnd, state, meta=None):
        path = original(self, rnd, state, meta)
        if rnd == round_published:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(FederationStore, "publish_global", publish)


def _interrupt_at_training_call(monkeypatch, call):
    """Ctrl-C as the `call`-th client training of the run starts (a round cut short mid-way)."""
    original, calls = LocalClient.train_round, []

    def train_round(self, state):
        calls.append(self.client_id)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(self, state)

    monkeypatch.setattr(LocalClient, "train_round", train_round)


@pytest.mark.parametrize("federation", [{}, {"strategy": "fedavg", "server_momentum": 0.5}])
def test_resume_after_round_1_equals_an_uninterrupted_run(tmp_path, monkeypatch, federation):
    config = _config(tmp_path, **federation)
    simulate(load_run_config(config), tmp_path / "whole", progress=False, report_to="none")
    with monkeypatch.context() as m:
        _interrupt_after_publishing(m, 2)           # rounds 0 and 1 complete, round 2 not started
        with pytest.raises(Interrupted, match="2 of 3 rounds complete.*resume from round 2"):
            simulate(load_run_config(config), tmp_path / "cut", progress=False, report_to="none")
    partial = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert partial["status"] == "interrupted" and partial["rounds_complete"] == 2
    assert [r["round"] for r in partial["rounds"]] == [0, 1] and "final" not in partial
    # the momentum buffers the resumed aggregation continues from are the ones the run left
    assert bool(FederationStore(tmp_path / "cut" / "store", create=False).read_server_state(1)) \
        == bool(federation.get("server_momentum"))
    summary = simulate(load_run_config(config), tmp_path / "cut", progress=False, report_to="none")
    assert summary["status"] == "complete"
    _assert_same_run(tmp_path / "whole", tmp_path / "cut", 3)


def test_resume_of_a_round_cut_short_mid_way(tmp_path, monkeypatch):
    """Interrupted after client a trained round 1 and wrote its update, before b trained: the resumed run
    trains round 1 again from the resume point of round 0 and ends as an uninterrupted one."""
    config = _config(tmp_path)
    simulate(load_run_config(config), tmp_path / "whole", progress=False, report_to="none")
    with monkeypatch.context() as m:
        _interrupt_at_training_call(m, 4)           # a, b in round 0; a in round 1; b in round 1: Ctrl-C
        with pytest.raises(Interrupted, match="1 of 3 rounds complete"):
            simulate(load_run_config(config), tmp_path / "cut", progress=False, report_to="none")
    store = FederationStore(tmp_path / "cut" / "store", create=False)
    assert store.has_update(1, "a") and not store.has_update(1, "b") and store.latest_global_round() == 1
    simulate(load_run_config(config), tmp_path / "cut", progress=False, report_to="none")
    _assert_same_run(tmp_path / "whole", tmp_path / "cut", 3)


def test_resume_strategy_local_and_a_complete_run_is_left_as_it_is(tmp_path, monkeypatch, capsys):
    config = _config(tmp_path, strategy="local")
    simulate(load_run_config(config), tmp_path / "whole", progress=False, report_to="none")
    with monkeypatch.context() as m:
        _interrupt_after_publishing(m, 1)
        with pytest.raises(Interrupted):
            simulate(load_run_config(config), tmp_path / "cut", progress=False, report_to="none")
    simulate(load_run_config(config), tmp_path / "cut", progress=False, report_to="none")
    _assert_same_run(tmp_path / "whole", tmp_path / "cut", 3)
    for cid in ("a", "b"):                          # each client's own shared part, kept outside the store
        own = [read_part(d / "clients" / cid / "shared.safetensors")[0] for d in (tmp_path / "whole", tmp_path / "cut")]
        assert all(torch.equal(own[0][k], own[1][k]) for k in own[0])
    before = (tmp_path / "cut" / "summary.json").read_text()
    capsys.readouterr()
    again = simulate(load_run_config(config), tmp_path / "cut", progress=False, report_to="none")
    assert "all 3 rounds are complete already" in capsys.readouterr().out
    assert (tmp_path / "cut" / "summary.json").read_text() == before and again == json.loads(before)


def test_ctrl_c_exits_130_with_a_partial_summary_and_no_traceback(tmp_path, monkeypatch, capsys):
    config = _config(tmp_path)
    _interrupt_after_publishing(monkeypatch, 2)
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet",
                 "--report-to", "none"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "interrupted: 2 of 3 rounds complete" in err and "rerun the same command to resume from round 2" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and len(summary["rounds"]) == 2
    assert (tmp_path / "out" / "metrics.csv").read_text().count("\n") == 1 + 2 * 2


def test_a_different_config_into_an_existing_out_is_refused_naming_what_differs(tmp_path, monkeypatch, capsys):
    config = _config(tmp_path)
    _interrupt_after_publishing(monkeypatch, 1)
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(config), "--out", str(out), "--quiet", "--report-to", "none"]) == 130
    monkeypatch.undo()
    kept = (out / "summary.json").read_text()
    cfg = yaml.safe_load(config.read_text())
    cfg["clients"][1]["train"] = {"lr": 0.02}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["simulate", "--config", str(changed), "--out", str(out), "--quiet", "--report-to", "none"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another config" in err and "clients[b].train.lr: 0.01 in the run, 0.02 now" in err
    assert "clients[a]" not in err and "Traceback" not in err
    assert main(["simulate", "--config", str(config), "--out", str(out), "--rounds", "4", "--quiet",
                 "--report-to", "none"]) == 2
    assert "federation.rounds: 3 in the run, 4 now" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == kept            # nothing written by a refusal
    # the same config, but a data file edited since: refused naming the client
    with open(tmp_path / "data" / "b.train.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "item 99:", "completion": " fine"}) + "\n")
    assert main(["simulate", "--config", str(config), "--out", str(out), "--quiet", "--report-to", "none"]) == 2
    assert "client 'b': its data.train file changed since the run started" in capsys.readouterr().err


@pytest.mark.parametrize("breakage, message", [
    ("unknown key", "unknown key"),
    ("bad jsonl", "b.train.jsonl"),
    ("empty model dir", "model"),
])
def test_nothing_is_created_before_config_data_and_models_are_checked(tmp_path, capsys, breakage, message):
    config = _config(tmp_path, rounds=1)
    cfg = yaml.safe_load(config.read_text())
    if breakage == "unknown key":
        cfg["federation"]["roudns"] = 2
    elif breakage == "bad jsonl":
        (tmp_path / "data" / "b.train.jsonl").write_text('{"prompt": "x", "completion": " y"}\n{not json\n')
    else:
        (tmp_path / "model").mkdir()
        cfg["clients"][1]["backbone"] = {"path": "model"}
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "deep" / "out"
    assert main(["simulate", "--config", str(config), "--out", str(out), "--quiet", "--report-to", "none"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and not out.parent.exists()


def test_saved_config_is_absolute_and_reusable_from_another_directory(tmp_path, monkeypatch):
    config = _config(tmp_path, rounds=2)            # data paths relative to the config file
    monkeypatch.chdir(tmp_path)
    first = simulate(load_run_config(config.name), "runs/first", progress=False, report_to="none")
    saved = yaml.safe_load((tmp_path / "runs" / "first" / "config.yaml").read_text())
    assert saved["clients"][0]["data"]["train"] == str(tmp_path / "data" / "a.train.jsonl")
    assert saved["clients"][1]["train"]["lr"] == 0.01 and saved["federation"]["rounds"] == 2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["simulate", "--config", str(tmp_path / "runs" / "first" / "config.yaml"), "--out", "again",
                 "--quiet", "--report-to", "none"]) == 0
    again = json.loads((elsewhere / "again" / "summary.json").read_text())
    assert _without_clock(again) == _without_clock(first)
    # the overrides of the command line are what the saved config records
    assert main(["simulate", "--config", str(tmp_path / "runs" / "first" / "config.yaml"), "--out", "local",
                 "--strategy", "local", "--rounds", "1", "--quiet", "--report-to", "none"]) == 0
    saved = yaml.safe_load((elsewhere / "local" / "config.yaml").read_text())
    assert saved["federation"]["strategy"] == "local" and saved["federation"]["rounds"] == 1
    assert os.path.isabs(saved["clients"][1]["data"]["test"])
