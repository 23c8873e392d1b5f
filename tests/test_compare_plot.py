"""--strategy local (nothing aggregated, each client keeps its own adapter), `fedzero compare` of a
federated run against it, and `fedzero plot`."""

import json
import sys
from pathlib import Path

import pytest
import torch

from fedzero.cli import main
from fedzero.config import load_run_config
from fedzero.simulate import simulate
from fedzero.store import FederationStore
from test_generate_evaluate import write_run_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cmp")
    config = write_run_config(root)
    fed, local = root / "fed", root / "local"
    simulate(load_run_config(config), fed, progress=False)
    assert main(["-q", "simulate", "--config", str(config), "--out", str(local), "--strategy", "local"]) == 0
    return fed, local


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_local_aggregates_nothing_and_each_client_goes_on_from_its_own_adapter(runs, tmp_path):
    fed, local = runs
    store = FederationStore(local / "store", create=False)
    g0, _ = store.read_global(0)
    for rnd in (1, 2):
        g, manifest = store.read_global(rnd)
        assert manifest["meta"]["strategy"] == "local"
        assert g.keys() == g0.keys() and all(torch.equal(g[k], g0[k]) for k in g0)
    assert [m["client_id"] for m in store.list_updates(1)] == ["a", "b"]        # the rounds are still recorded
    assert all(r["uploaded_bytes"] == 0 for r in summary(local)["rounds"])
    assert summary(local)["strategy"] == "local" and summary(fed)["strategy"] == "fedavg"
    for cid in ("a", "b"):
        own = local / "clients" / cid / "shared.safetensors"
        assert own.is_file() and not (fed / "clients" / cid / "shared.safetensors").exists()
        # the client's own model (its shared file, not the unchanged global) is what the run evaluated
        res = tmp_path / f"{cid}.json"
        assert main(["evaluate", "--run", str(local), "--client", cid, "--out", str(res)]) == 0
        recorded = next(r for r in summary(local)["rounds"][1]["clients"] if r["id"] == cid)
        assert json.loads(res.read_text())["metrics"]["eval_loss"] == recorded["eval_loss"]
        # round 0: both runs trained the same client from the same start, so they agree until aggregation
        first = [next(r for r in summary(run)["rounds"][0]["clients"] if r["id"] == cid) for run in runs]
        assert first[0]["train_loss"] == first[1]["train_loss"]
    adapter = tmp_path / "adapter"
    assert main(["export", "--run", str(local), "--client", "a", "--out", str(adapter)]) == 0
    provenance = json.loads((adapter / "adapter_config.json").read_text())["provenance"]
    assert provenance["strategy"] == "local" and provenance["shared_file"].endswith("clients/a/shared.safetensors")


def test_a_local_run_keeps_only_the_latest_own_shared_part(runs, capsys):
    _, local = runs
    assert main(["export", "--run", str(local), "--client", "a", "--round", "0", "--out", "/nonexistent/x"]) == 2
    assert "strategy local: simulate keeps only each client's latest own shared part" in capsys.readouterr().err


def test_federate_refuses_local_before_writing_anything(runs, tmp_path):
    from fedzero.federate import REPO_ROOT, prepare

    config = write_run_config(tmp_path / "cfg", strategy="local")
    with pytest.raises(ValueError, match="federation.strategy 'local' runs in `fedzero simulate` only"):
        prepare(config, tmp_path / "run", REPO_ROOT / "ds_configs" / "zero3.json")
    assert not (tmp_path / "run").exists()


def test_compare_prints_each_clients_final_numbers_and_the_gain(runs, tmp_path, capsys):
    fed, local = runs
    out = tmp_path / "cmp.json"
    assert main(["compare", str(fed), str(local), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    final = {run: {r["id"]: r for r in summary(run)["rounds"][-1]["clients"]} for run in runs}
    assert [r["client"] for r in result["clients"]] == ["a", "b"]
    for row in result["clients"]:
        a, b = final[fed][row["client"]], final[local][row["client"]]
        assert row["eval_loss_a"] == a["eval_loss"] and row["eval_loss_b"] == b["eval_loss"]
        assert row["loss_gain"] == b["eval_loss"] - a["eval_loss"]
        assert row["accuracy_a"] == a["accuracy"] and row["accuracy_gain"] == a["accuracy"] - b["accuracy"]
        assert f"{row['client']:<16}{a['eval_loss']:>13.4f}{b['eval_loss']:>10.4f}{row['loss_gain']:>+10.4f}" in printed
    assert result["mean_loss_gain"] == pytest.approx(sum(r["loss_gain"] for r in result["clients"]) / 2)
    assert result["a"].endswith("(strategy fedavg, 2 rounds)") and result["notes"] == []


def test_compare_refuses_what_it_cannot_compare(runs, tmp_path, capsys):
    fed, _ = runs
    assert main(["compare", str(fed), str(tmp_path)]) == 2
    assert f"{tmp_path} has no summary.json" in capsys.readouterr().err
    federate_like = tmp_path / "federate"
    federate_like.mkdir()
    (federate_like / "summary.json").write_text(json.dumps(
        {"strategy": "cmga", "rounds": [{"round": 0, "clients": [{"id": "a", "train_loss": 1.0}]}]}))
    assert main(["compare", str(fed), str(federate_like)]) == 2
    assert "records no eval loss per client" in capsys.readouterr().err


def test_plot_draws_every_clients_rounds(runs, tmp_path, capsys):
    fed, _ = runs
    from fedzero.plot import plot_run

    drawn = plot_run(fed, tmp_path / "plots")
    assert sorted(Path(p).name for p in drawn) == ["accuracy.png", "loss.png"]
    for path in drawn:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = summary(fed)
    loss = drawn[str(tmp_path / "plots" / "loss.png")]
    for cid in ("a", "b"):
        before = next(r for r in s["final"] if r["id"] == cid)
        rows = [next(r for r in rnd["clients"] if r["id"] == cid) for rnd in s["rounds"]]
        assert loss[f"{cid} eval"] == ([-1.0, 0.0, 1.0], [before["eval_loss_before"], *(r["eval_loss"] for r in rows)])
        assert loss[f"{cid} train"] == ([0.0, 1.0], [r["train_loss"] for r in rows])
        acc = drawn[str(tmp_path / "plots" / "accuracy.png")][cid]
        assert acc == ([-1.0, 1.0], [before["accuracy_before"], rows[1]["accuracy"]])   # scored before and at the end
    assert main(["plot", str(fed)]) == 0
    assert (fed / "plots" / "loss.png").is_file() and f"wrote {fed}/plots/loss.png" in capsys.readouterr().out


def test_plot_without_matplotlib_says_how_to_install_it(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib raises ImportError
    assert main(["plot", str(runs[0])]) == 2
    assert "pip install 'fedzero[plots]'" in capsys.readouterr().err
