"""CMGA's effect on the aggregate as the bench records it (fedzero.bench.methods.cmga_effect) and
reports it (fedzero.bench.report): exact values on hand-made updates."""

import math

import numpy as np
import pytest
import torch

from fedzero.bench.report import summary as report_summary, tables as report_tables
from fedzero.bench.methods import block_effect, cmga_effect
from fedzero.strategies import CMGA, ClientUpdate


def by_slot(key):
    return key.split(".")[0]


def upd(cid, group, **delta):
    return ClientUpdate(cid, {k.replace("_", "."): torch.tensor(v) for k, v in delta.items()}, 1, group)


STATE = {"slot0.x": torch.zeros(2), "slot1.x": torch.zeros(2)}


def aggregate(updates):
    new, metrics = CMGA(seed=0).aggregate(STATE, updates, round=0, block_of=by_slot)
    return new, cmga_effect(0, STATE, updates, metrics["blocks"], block_of=by_slot)


def test_opposite_groups_change_the_aggregate_by_the_hand_computed_amount():
    # slot0: g_a = (2, 0), g_b = (-1, 1) conflict (<g_a, g_b> = -2): CMGA projects each off the other,
    # g'_a = (1, 1), g'_b = (0, 1), aggregate (0.5, 1) against FedAvg's (0.5, 0.5): ‖(0, 0.5)‖ / ‖(0.5, 0.5)‖ = 1/√2.
    # slot1: (1, 0) and (1, 1) agree: CMGA is FedAvg there.
    new, effect = aggregate([upd("a", "ga", slot0_x=[2.0, 0.0], slot1_x=[1.0, 0.0]),
                             upd("b", "gb", slot0_x=[-1.0, 1.0], slot1_x=[1.0, 1.0])])

    assert torch.equal(new["slot0.x"], torch.tensor([0.5, 1.0])) and torch.equal(new["slot1.x"], torch.tensor([1.0, 0.5]))
    assert effect["round"] == 1 and (effect["changed_blocks"], effect["total_blocks"]) == (1, 2)
    assert effect["rel_diff"] == {"slot0": pytest.approx(1 / math.sqrt(2), rel=1e-6), "slot1": 0.0}
    assert effect["rel_diff_mean"] == pytest.approx(1 / (2 * math.sqrt(2)), rel=1e-5)
    assert effect["rel_diff_max"] == pytest.approx(1 / math.sqrt(2), rel=1e-5)
    assert (effect["conflicts"], effect["pairs"]) == (1, 2)
    assert effect["cos_before_mean"] == pytest.approx(0.0, abs=1e-6)      # -1/√2 in slot0, +1/√2 in slot1


def test_aligned_groups_leave_the_aggregate_exactly_as_fedavg():
    _, effect = aggregate([upd("a", "ga", slot0_x=[2.0, 0.0], slot1_x=[1.0, 0.0]),
                           upd("b", "gb", slot0_x=[1.0, 1.0], slot1_x=[0.0, 3.0]),     # orthogonal: no conflict
                           upd("c", "gb", slot0_x=[-1.0, 0.5], slot1_x=[1.0, 1.0])])  # conflicts within its group only

    assert (effect["changed_blocks"], effect["total_blocks"]) == (0, 2)
    assert effect["rel_diff"] == {"slot0": 0.0, "slot1": 0.0}
    assert effect["rel_diff_mean"] == 0.0 and effect["rel_diff_max"] == 0.0
    assert (effect["conflicts"], effect["pairs"]) == (0, 2)


def test_one_group_has_no_pairs_and_no_effect():
    _, effect = aggregate([upd("a", "g", slot0_x=[2.0, 0.0], slot1_x=[1.0, 0.0]),
                           upd("b", "g", slot0_x=[-1.0, 1.0], slot1_x=[-1.0, 0.0])])

    assert effect["changed_blocks"] == 0 and effect["pairs"] == 0 and effect["cos_before_mean"] is None


def test_block_effect_from_the_gram_alone():
    X = np.array([[2.0, 0.0], [-1.0, 1.0]])
    gram = X @ X.T

    assert block_effect(gram, [0.5, 0.5], [0.5, 0.5]) == (False, 0.0)
    changed, rel = block_effect(gram, [0.25, 0.75], [0.5, 0.5])      # (-0.25, 0.75) vs (0.5, 0.5)
    assert changed and rel == pytest.approx(np.linalg.norm([-0.75, 0.25]) / np.linalg.norm([0.5, 0.5]))
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert block_effect(opposite @ opposite.T, [1.0, 0.0], [0.5, 0.5]) == (True, None)   # FedAvg's is 0


# -- the report -------------------------------------------------------------------------------------------

def _run(method, seed, effect=None):
    run = {"setting": "X", "method": method, "seed": seed, "runner": "dema",
           "clients": [{"id": "c0", "backbone": "a", "topics": ["t0"], "rounds": []}], "comm": []}
    if effect is not None:
        run["cmga_effect"] = effect
    return run


def _row(rnd, changed, rel_mean, rel_max, conflicts, cos):
    return {"round": rnd, "changed_blocks": changed, "total_blocks": 4, "rel_diff_mean": rel_mean,
            "rel_diff_max": rel_max, "conflicts": conflicts, "pairs": 4, "cos_before_mean": cos, "rel_diff": {}}


def test_report_table_means_over_seeds_and_dashes_for_runs_without_the_record():
    runs = [_run("cmga", 0, [_row(1, 0, 0.0, 0.0, 0, 0.5), _row(2, 2, 0.1, 0.3, 1, 0.1)]),
            _run("cmga", 1, [_row(1, 1, 0.02, 0.08, 1, 0.3), _row(2, 4, 0.3, 0.5, 3, -0.1)]),
            _run("cmga", 2)]                                    # recorded before cmga_effect existed
    summary = report_summary.cmga_effect_summary(runs)
    assert summary["recorded"] == [0, 1] and summary["missing"] == [2]
    assert summary["rounds"][2]["changed_blocks"][0] == 3.0 and summary["rounds"][1]["rel_diff_max"][0] == 0.04

    table = "\n".join(report_tables._cmga_table({"cmga_effect": {"cmga": summary,
                                                          "old-cmga": report_summary.cmga_effect_summary([_run("x", 0)])}}))
    assert "| cmga | 1 | 0.5 / 4 | 0.01 | 0.04 | 0.5 / 4 | +0.400 | [0, 1] (– for [2]) |" in table
    assert "| cmga | 2 | 3 / 4 | 0.2 | 0.4 | 2 / 4 | +0.000 | [0, 1] (– for [2]) |" in table
    assert "| old-cmga | – | – | – | – | – | – | [0] |" in table
    assert report_tables._cmga_table({"cmga_effect": {}}) == []
