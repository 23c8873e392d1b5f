"""--report-to: TensorBoard event files (read back with tensorboard's own EventAccumulator) and the CSV
sink hold the summary's per-round scalars; a resumed run shows every round once; without the
tensorboard package the default is csv with a one-line note."""

import csv
import json

import pytest

from fedzero import reporting
from fedzero.cli import main
from fedzero.config import load_run_config
from fedzero.simulate import Interrupted, simulate
from fedzero.store import FederationStore
from test_simulate import tiny_run

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _labelled_run(tmp_path, rounds=2):
    """tiny_run with a label on every test record, so accuracy is scored after the last round."""
    path = tiny_run(tmp_path, rounds=rounds)
    for name in ("a", "b"):
        test = tmp_path / "data" / f"{name}.test.jsonl"
        rows = [json.loads(line) for line in test.read_text().splitlines()]
        test.write_text("".join(json.dumps({**r, "label": r["completion"].strip()}) + "\n" for r in rows))
    return path


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_the_summarys_scalars(tmp_path):
    summary = simulate(load_run_config(_labelled_run(tmp_path)), tmp_path / "out", progress=False,
                       report_to="tensorboard")
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))
    got = _scalars(tmp_path / "out" / "tensorboard")
    for cid_index, cid in enumerate(("a", "b")):
        for key in ("train_loss", "eval_loss", "gate_entropy/slot1"):
            metric, _, slot = key.partition("/")
            expected = [r["clients"][cid_index][metric] for r in summary["rounds"]]
            expected = [e[slot] for e in expected] if slot else expected
            tag = f"{metric}/{cid}" + (f"/{slot}" if slot else "")
            assert [s for s, _ in got[tag]] == [0, 1]
            assert [v for _, v in got[tag]] == pytest.approx(expected, rel=1e-6)
        # accuracy: scored after the last round only, as in summary.json
        assert got[f"accuracy/{cid}"] == [(1, pytest.approx(summary["rounds"][1]["clients"][cid_index]["accuracy"]))]
        assert [v for _, v in got[f"uploaded_bytes/{cid}"]] == [r["uploaded_bytes"] // 2 for r in summary["rounds"]]
    assert [v for _, v in got["uploaded_bytes/total"]] == [r["uploaded_bytes"] for r in summary["rounds"]]
    store = FederationStore(tmp_path / "out" / "store", create=False)
    blocks = store.read_result(1)["blocks"]
    assert blocks
    for block, stats in blocks.items():                  # CMGA's conflict statistics from the aggregation report
        assert got[f"cmga/conflicts/{block}"][-1] == (1, stats["n_conflicts"])
        assert got[f"cmga/mean_cos_after/{block}"][-1] == (1, pytest.approx(stats["mean_cos_after"], rel=1e-6))
    for block, stats in summary["rounds"][1]["diagnostics"]["updates"].items():
        assert got[f"update_cosine/{block}"][-1] == (1, pytest.approx(stats["mean_cosine"], rel=1e-6))


def test_csv_sink_has_the_same_scalars_and_none_writes_neither(tmp_path):
    config = load_run_config(_labelled_run(tmp_path))
    summary = simulate(config, tmp_path / "csv", progress=False, report_to="csv")
    with open(tmp_path / "csv" / "scalars.csv", newline="") as f:
        rows = [(int(r["round"]), r["tag"], float(r["value"])) for r in csv.DictReader(f)]
    expected = [(r["round"], tag, value) for r in summary["rounds"] for tag, value in reporting.round_scalars(r)]
    assert rows == expected and any(tag == "accuracy/b" for _, tag, _ in rows)
    assert not (tmp_path / "csv" / "tensorboard").exists()
    simulate(load_run_config(_labelled_run(tmp_path)), tmp_path / "none", progress=False, report_to="none")
    assert not (tmp_path / "none" / "tensorboard").exists() and not (tmp_path / "none" / "scalars.csv").exists()


@pytest.mark.parametrize("kind", ["tensorboard", "csv"])
def test_a_round_cut_short_after_it_was_reported_shows_once_after_resuming(tmp_path, monkeypatch, kind):
    """Ctrl-C after round 1 was reported but before it committed: the resumed run reports round 1 again,
    and the sink holds each round once, with the uninterrupted run's values."""
    config = _labelled_run(tmp_path, rounds=3)
    whole = simulate(load_run_config(config), tmp_path / "whole", progress=False, report_to=kind)
    original = FederationStore.publish_global

    def publish(self, rnd, state, meta=None):
        if rnd == 2:
            raise KeyboardInterrupt
        return original(self, rnd, state, meta)

    with monkeypatch.context() as m:
        m.setattr(FederationStore, "publish_global", publish)
        with pytest.raises(Interrupted, match="1 of 3 rounds complete"):
            simulate(load_run_config(config), tmp_path / "cut", progress=False, report_to=kind)
    simulate(load_run_config(config), tmp_path / "cut", progress=False, report_to=kind)
    if kind == "tensorboard":
        got, want = _scalars(tmp_path / "cut" / "tensorboard"), _scalars(tmp_path / "whole" / "tensorboard")
        assert len(list((tmp_path / "cut" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    else:
        got, want = ((tmp_path / d / "scalars.csv").read_text() for d in ("cut", "whole"))
    assert got == want
    if kind == "tensorboard":
        assert [step for step, _ in got["train_loss/a"]] == [0, 1, 2]
        assert [v for _, v in got["train_loss/a"]] == pytest.approx([r["clients"][0]["train_loss"] for r in whole["rounds"]])


def test_default_is_tensorboard_when_installed_else_csv_with_a_note(tmp_path, monkeypatch, capsys):
    config = tiny_run(tmp_path, rounds=1)
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "tb"), "--quiet"]) == 0
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert f"tensorboard --logdir {tmp_path / 'tb' / 'tensorboard'}" in capsys.readouterr().out
    monkeypatch.setattr(reporting, "tensorboard_available", lambda: False)
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("note: the tensorboard package is not installed") == 1 and "scalars.csv" in out
    assert (tmp_path / "plain" / "scalars.csv").is_file() and not (tmp_path / "plain" / "tensorboard").exists()
    # asked for explicitly without the package: refused before anything is created
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "asked"), "--quiet",
                 "--report-to", "tensorboard"]) == 2
    assert "needs the tensorboard package" in capsys.readouterr().err and not (tmp_path / "asked").exists()
