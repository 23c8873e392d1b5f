"""The sharded aggregator in one process (comm=None): shard plan, exactness against the in-process
strategy, quorum / deadline / late clients, restart, verification. The multi-rank runs are in
test_aggregator_mpi.py, which reuses the store builders below."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fedzero.adapters.dema import shared_block
from fedzero.aggregator import (AggregationError, QuorumError, Segment, TensorInfo, aggregator_settings,
                                load_aggregator_settings, plan_shards, run_aggregation)
from fedzero.store import FederationStore
from fedzero.strategies import ClientUpdate, make_strategy

REPO = Path(__file__).resolve().parents[1]

# Shapes chosen to be cut at awkward places by 2 and 3 ranks: odd row counts, a 0-d tensor, an
# empty tensor, a bf16 tensor next to float32 ones (mixed item sizes in the gathered bytes).
SHAPES = {
    "slots.0.experts.0.A": ((13, 7), torch.float32),
    "slots.0.experts.0.B": ((7, 13), torch.float32),
    "slots.0.gate": ((5,), torch.float32),
    "slots.1.experts.0.A": ((9, 3, 2), torch.float32),
    "slots.1.scale": ((), torch.float32),
    "slots.1.empty": ((0, 4), torch.float32),
    "slots.2.experts.0.A": ((11, 5), torch.bfloat16),
    "slots.2.gate": ((3,), torch.float32),
}
# client -> (fingerprint group, num_samples, slot_use, sign): "c" (group fb) pushes against fa, so
# CMGA has a conflict to project; "d" does not use slot2 (its weight there is 0).
CLIENTS = {
    "a": ("fa", 10, {"slot0": 2, "slot1": 1, "slot2": 1}, 1.0),
    "b": ("fa", 30, {"slot0": 1, "slot1": 1, "slot2": 2}, 1.0),
    "c": ("fb", 20, {"slot0": 1, "slot1": 2, "slot2": 1}, -1.0),
    "d": ("fc", 5, {"slot0": 1, "slot1": 1}, 0.5),
}
TOL = dict(rtol=1e-6, atol=1e-6)     # docs/aggregator.md, "Exactness"


def make_global(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g).to(dt) for k, (shape, dt) in SHAPES.items()}


def make_delta(client: str, round: int) -> dict[str, torch.Tensor]:
    """Common direction (shared by all clients, scaled by their sign) plus client noise."""
    g = torch.Generator().manual_seed(1000 * round + ord(client))
    common = torch.Generator().manual_seed(7 + round)
    sign = CLIENTS[client][3]
    return {k: (sign * (1.0 + torch.rand(shape, generator=common)) + 0.3 * torch.randn(shape, generator=g)).to(dt)
            for k, (shape, dt) in SHAPES.items()}


def write_updates(store: FederationStore, round: int, clients=tuple(CLIENTS)) -> None:
    for cid in clients:
        fp, n, use, _ = CLIENTS[cid]
        store.write_update(round, cid, make_delta(cid, round), fingerprint=fp, num_samples=n, slot_use=use)


def build_store(root, rounds: int = 2) -> FederationStore:
    """Global of round 0 plus every client's update for rounds 0..rounds-1 (deltas do not depend on
    the global, so later rounds can be written in advance)."""
    store = FederationStore(root)
    store.publish_global(0, make_global())
    for r in range(rounds):
        write_updates(store, r)
    return store


def strategy_for(name: str):
    return make_strategy(name, seed=5, server_lr=0.7, server_momentum=0.9)


def reference(name: str, rounds: int) -> list[dict[str, torch.Tensor]]:
    """The in-process path: Strategy.aggregate round after round with one strategy object."""
    strategy, state, out = strategy_for(name), make_global(), []
    for r in range(rounds):
        updates = [ClientUpdate(c, make_delta(c, r), CLIENTS[c][1], CLIENTS[c][0], CLIENTS[c][2]) for c in CLIENTS]
        state, metrics = strategy.aggregate(state, updates, round=r, block_of=shared_block)
        out.append(state)
    return out


def assert_matches_reference(store: FederationStore, name: str, rounds: int = 2) -> None:
    for r, expected in enumerate(reference(name, rounds)):
        got, _ = store.read_global(r + 1)
        assert sorted(got) == sorted(expected)
        for k in expected:
            assert got[k].dtype == expected[k].dtype and got[k].shape == expected[k].shape, k
            torch.testing.assert_close(got[k].float(), expected[k].float(), **TOL, msg=f"round {r}, {k}")


def quiet(_msg):
    pass


# ---------------------------------------------------------------- the shard plan

@pytest.mark.parametrize("world", [1, 2, 3, 5, 40])
def test_plan_shards_covers_every_element_once_in_contiguous_row_ranges(world):
    infos = [TensorInfo(k, shape, "F32") for k, (shape, _) in sorted(SHAPES.items())]

    plan = plan_shards(infos, world)

    seen = {i.key: np.zeros(i.rows, dtype=int) for i in infos if i.numel}
    for segs in plan:
        assert len({s.key for s in segs}) == len(segs)          # at most one row range per key per rank
        for s in segs:
            seen[s.key][s.start:s.stop] += 1
    assert all((v == 1).all() for v in seen.values())
    total = sum(i.numel for i in infos)
    loads = [sum((s.stop - s.start) * next(i for i in infos if i.key == s.key).row_numel for s in segs)
             for segs in plan]
    assert sum(loads) == total
    biggest_row = max(i.row_numel for i in infos)
    assert max(loads) - total / world <= len(infos) * biggest_row    # balanced up to row granularity


def test_plan_shards_splits_one_matrix_by_rows():
    plan = plan_shards([TensorInfo("w", (10, 4), "F32")], 3)

    assert plan == [[Segment("w", 0, 4)], [Segment("w", 4, 7)], [Segment("w", 7, 10)]]


# ---------------------------------------------------------------- exactness, one process

@pytest.mark.parametrize("name", ["fedavg", "cmga"])
def test_single_process_equals_in_process_strategy_over_two_rounds_with_momentum(tmp_path, name):
    store = build_store(tmp_path / "store")

    for r in range(2):       # a fresh strategy object each round: momentum must come from the store
        result = run_aggregation(store.root, r, strategy_for(name), comm=None, log=quiet)
        assert result["clients"] == ["a", "b", "c", "d"] and result["published_round"] == r + 1

    assert_matches_reference(store, name)
    assert sorted(store.read_server_state(1)) == sorted(k for k in SHAPES)


def write_predictions(store: FederationStore, round: int, clients=("a", "b", "c")) -> dict[str, torch.Tensor]:
    """Anchor predictions (output distillation) sent with some clients' updates: 4 anchors x 3 labels."""
    preds = {c: torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(ord(c))), dim=1)
             for c in clients}
    for c, p in preds.items():
        store.write_anchor_predictions(round, c, p)
    return preds


def check_teachers(store: FederationStore, preds: dict[str, torch.Tensor]) -> None:
    """Round 1's teachers: per predicting client the sample-weighted mean of the others' predictions,
    and for d (no predictions) the mean of all of them."""
    n = {c: CLIENTS[c][1] for c in preds}
    assert store.read_result(0)["distill"] == {"used": sorted(preds), "dropped": {}}
    for c in [*preds, "d"]:
        others = [o for o in preds if o != c]
        expected = sum(n[o] * preds[o].double() for o in others) / sum(n[o] for o in others)
        torch.testing.assert_close(store.read_teacher(1, c), expected.float())


def test_predictions_sent_with_the_updates_become_the_next_rounds_teachers(tmp_path):
    store = build_store(tmp_path / "store", rounds=1)
    preds = write_predictions(store, 0)
    run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet)
    check_teachers(store, preds)


# Quality-weighted teachers: a, b and c send their held-out loss with their predictions; d's predictions
# come without one, so the quality rule leaves them out and d gets the all-clients teacher ("*").
QUALITY = {"a": 0.9, "b": 1.4, "c": 0.6}


def quality_rule():
    from fedzero.distill.teachers import TeacherRule

    return TeacherRule("quality")


def write_quality_predictions(store: FederationStore, round: int) -> dict[str, torch.Tensor]:
    preds = write_predictions(store, round, clients=("a", "b", "c", "d"))
    for c, q in QUALITY.items():
        store.write_anchor_predictions(round, c, preds[c], quality=q)
    return preds


def check_quality_teachers(store: FederationStore, preds: dict[str, torch.Tensor]) -> None:
    """Round 1's teachers are exactly those round_teachers makes in process from the same inputs."""
    from fedzero.distill.teachers import round_teachers

    result = store.read_result(0)["distill"]
    assert result["used"] == ["a", "b", "c"] and list(result["dropped"]) == ["d"]
    assert result["quality"] == QUALITY and result["teacher"] == "quality" and result["without_teacher"] == []
    used = {c: preds[c].numpy() for c in QUALITY}
    expected = round_teachers(used, {c: CLIENTS[c][1] for c in CLIENTS}, quality_rule(), QUALITY)
    assert sorted(expected) == ["*", "a", "b", "c"]
    for c in ["a", "b", "c", "d"]:
        assert torch.equal(store.read_teacher(1, c), expected.get(c, expected["*"])), c


def test_quality_teachers_from_the_predictions_and_their_qualities(tmp_path):
    store = build_store(tmp_path / "store", rounds=1)
    preds = write_quality_predictions(store, 0)
    run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet, teacher_rule=quality_rule())
    check_quality_teachers(store, preds)


def test_cmga_result_reports_the_conflict_and_resolves_it(tmp_path):
    store = build_store(tmp_path / "store", rounds=1)

    result = run_aggregation(store.root, 0, strategy_for("cmga"), comm=None, log=quiet)

    st = result["blocks"]["slot0"]
    assert st["n_groups"] == 3 and st["n_conflicts"] >= 2
    assert st["mean_cos_before"] < 0 < st["mean_cos_after"]
    assert store.read_result(0)["blocks"]["slot0"]["beta"] == st["beta"]


def test_tiny_chunks_and_no_cache_give_the_same_global(tmp_path):
    a, b = build_store(tmp_path / "a", rounds=1), build_store(tmp_path / "b", rounds=1)

    run_aggregation(a.root, 0, strategy_for("cmga"), comm=None, log=quiet)
    result = run_aggregation(b.root, 0, strategy_for("cmga"), comm=None, log=quiet, chunk_bytes=1, cache_bytes=0)

    assert result["io"]["passes"] == 2
    assert result["io"]["update_bytes_read"] == 2 * sum(
        sum(t.numel() * t.element_size() for t in make_delta(c, 0).values()) for c in CLIENTS)
    ga, gb = a.read_global(1)[0], b.read_global(1)[0]
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], **TOL)


# ---------------------------------------------------------------- quorum, deadline, late clients

def test_late_client_arriving_before_the_deadline_is_included(tmp_path):
    store = build_store(tmp_path / "store", rounds=0)
    write_updates(store, 0, ["a", "b"])
    timer = threading.Timer(0.4, write_updates, args=(store, 0, ["c"]))
    timer.start()
    try:
        result = run_aggregation(store.root, 0, strategy_for("fedavg"), expected=["a", "b", "c"], quorum=2,
                                 deadline_s=20, poll_s=0.05, comm=None, log=quiet)
    finally:
        timer.join()

    assert result["clients"] == ["a", "b", "c"] and result["missing"] == []
    assert result["arrived_after_s"]["a"] == 0.0 and result["arrived_after_s"]["c"] >= 0.3
    assert not result["deadline_passed"] and result["timing"]["wait_s"] < 10


def test_deadline_below_quorum_fails_naming_the_missing_clients(tmp_path):
    store = build_store(tmp_path / "store", rounds=0)
    write_updates(store, 0, ["a"])

    with pytest.raises(QuorumError, match=r"1 of the 3 updates.*missing: b, c") as err:
        run_aggregation(store.root, 0, strategy_for("cmga"), expected=["a", "b", "c"], deadline_s=0.2,
                        poll_s=0.05, comm=None, log=quiet)

    assert err.value.missing == ["b", "c"] and err.value.arrived == ["a"]
    assert not store.has_global(1) and not store.has_result(0)


def test_deadline_above_quorum_proceeds_and_reports_the_missing(tmp_path):
    store = build_store(tmp_path / "store", rounds=0)
    write_updates(store, 0, ["a", "b", "c"])
    lines = []

    result = run_aggregation(store.root, 0, strategy_for("cmga"), expected=["a", "b", "c", "d"], quorum=2,
                             deadline_s=0.2, poll_s=0.05, comm=None, log=lines.append)

    assert result["clients"] == ["a", "b", "c"] and result["missing"] == ["d"] and result["deadline_passed"]
    assert store.read_result(0)["missing"] == ["d"] and store.has_global(1)
    assert any("arrived 3/4" in line and "missing: d" in line for line in lines)


def test_client_arriving_after_the_cutoff_is_reported_late_and_not_used(tmp_path):
    store = build_store(tmp_path / "store", rounds=0)
    write_updates(store, 0, ["a", "b", "c"])

    def log(line):           # runs on rank 0 right after the cut-off: d shows up too late
        if "arrived" in line and not store.has_update(0, "d"):
            write_updates(store, 0, ["d"])

    result = run_aggregation(store.root, 0, strategy_for("fedavg"), expected=list(CLIENTS), quorum=3,
                             deadline_s=0, comm=None, log=log)

    assert result["clients"] == ["a", "b", "c"] and result["missing"] == ["d"] and result["late"] == ["d"]


def test_unexpected_clients_are_ignored_and_without_a_list_the_quorum_suffices(tmp_path):
    store = build_store(tmp_path / "store", rounds=1)

    result = run_aggregation(store.root, 0, strategy_for("fedavg"), expected=["a", "b"], comm=None, log=quiet)
    assert result["clients"] == ["a", "b"] and result["ignored"] == ["c", "d"]

    other = build_store(tmp_path / "other", rounds=1)
    result = run_aggregation(other.root, 0, strategy_for("fedavg"), comm=None, log=quiet)
    assert result["clients"] == ["a", "b", "c", "d"] and result["expected"] is None


# ---------------------------------------------------------------- restart, verification, logs

def test_completed_round_is_not_recomputed(tmp_path):
    store = build_store(tmp_path / "store", rounds=1)
    first = run_aggregation(store.root, 0, strategy_for("cmga"), comm=None, log=quiet)
    before = store.global_path(1).read_bytes()

    again = run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet)

    assert again["already_complete"] and again["blocks"] == first["blocks"]
    assert store.global_path(1).read_bytes() == before


def test_rerun_after_a_crash_before_publishing_gives_the_same_global(tmp_path):
    a, b = build_store(tmp_path / "a"), build_store(tmp_path / "b")
    for r in range(2):
        run_aggregation(a.root, r, strategy_for("cmga"), comm=None, log=quiet)
    run_aggregation(b.root, 0, strategy_for("cmga"), comm=None, log=quiet)
    run_aggregation(b.root, 1, strategy_for("cmga"), comm=None, log=quiet)
    # crash after writing round 1's server state and result, before publishing round 2's global
    (b.global_path(2).parent / "manifest.json").unlink()
    b.global_path(2).unlink()

    run_aggregation(b.root, 1, strategy_for("cmga"), comm=None, log=quiet)

    assert a.global_path(2).read_bytes() == b.global_path(2).read_bytes()


def test_momentum_without_the_previous_server_state_is_refused_unless_reset(tmp_path):
    store = FederationStore(tmp_path / "store")
    store.publish_global(0, make_global())
    store.publish_global(3, make_global(1))              # e.g. a run resumed from elsewhere
    write_updates(store, 3)

    with pytest.raises(AggregationError, match="left no server state"):
        run_aggregation(store.root, 3, strategy_for("cmga"), comm=None, log=quiet)
    run_aggregation(store.root, 3, strategy_for("cmga"), comm=None, log=quiet, reset_server_state=True)

    assert store.has_global(4)


def test_missing_global_is_an_error(tmp_path):
    store = build_store(tmp_path / "store", rounds=2)

    with pytest.raises(AggregationError, match="global of round 1 is not published"):
        run_aggregation(store.root, 1, strategy_for("fedavg"), comm=None, log=quiet)


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                                      # same size, different bytes
    path.write_bytes(bytes(data))


def test_sha256_verification_catches_a_corrupted_update_size_mode_does_not(tmp_path):
    store = build_store(tmp_path / "store", rounds=1)
    trusting = build_store(tmp_path / "trusting", rounds=1)
    for s in (store, trusting):
        _corrupt(s.update_path(0, "c"))

    result = run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet)
    trusted = run_aggregation(trusting.root, 0, strategy_for("fedavg"), comm=None, log=quiet, verify="size")

    # sha256: c is left out (quarantined, named with its file and the reason), the round goes on
    assert result["clients"] == ["a", "b", "d"] and list(result["left_out"]) == ["c"]
    assert result["left_out"]["c"]["file"] == "rounds/r000000/updates/c/update.safetensors"
    assert result["left_out"]["c"]["reason"].startswith("checksum mismatch for update of client c: manifest says sha256 ")
    assert not store.update_path(0, "c").exists()
    assert (store.root / "rounds/r000000/quarantine/0001/files/update.safetensors").is_file()
    # size: a same-size corruption is trusted (docs/security.md)
    assert trusted["clients"] == ["a", "b", "c", "d"] and trusted["left_out"] == {}
    assert trusted["io"]["bytes_hashed"] == 0 and trusting.has_global(1)


def test_update_with_a_wrong_shape_is_left_out_naming_the_client(tmp_path):
    store = build_store(tmp_path / "store", rounds=0)
    write_updates(store, 0, ["a"])
    bad = make_delta("b", 0)
    bad["slots.0.gate"] = torch.zeros(6)
    store.write_update(0, "b", bad, fingerprint="fa", num_samples=1)

    result = run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet)

    assert result["clients"] == ["a"]
    assert result["left_out"] == {"b": {"file": "rounds/r000000/updates/b/update.safetensors",
                                        "reason": "tensor 'slots.0.gate' has shape [6], the global's is [5]"}}
    with pytest.raises(QuorumError, match=r"0 of the 1 updates the quorum needs; missing: none; arrived: none; "
                                          r"left out: client 'b', file rounds/r000001/updates/b/update.safetensors: "
                                          r"tensor 'slots.0.gate' has shape \[6\]"):
        store.write_update(1, "b", bad, fingerprint="fa", num_samples=1)
        run_aggregation(store.root, 1, strategy_for("fedavg"), expected=["b"], comm=None, log=quiet)
    assert not store.has_global(2)


def test_log_lines_name_clients_bytes_time_and_block_stats(tmp_path):
    store = build_store(tmp_path / "store", rounds=1)
    lines = []

    run_aggregation(store.root, 0, strategy_for("cmga"), expected=list(CLIENTS), comm=None, log=lines.append)

    text = "\n".join(lines)
    assert all(line.startswith("[aggregate r0] ") for line in lines)
    assert "arrived 4/4: a (+0.0 s), b (+0.0 s), c (+0.0 s), d (+0.0 s); missing: none" in text
    assert "1 rank(s), verify sha256: read " in text and "B/s" in text
    assert "slot0: 3 group(s), " in text and "pairs conflicted, mean cos -" in text
    assert "published the global of round 1; late (arrived after the cut-off, not used): none" in text


# ---------------------------------------------------------------- the run YAML

def test_settings_from_the_demo_config():
    s = load_aggregator_settings(REPO / "configs" / "demo.yaml")

    assert (s.strategy, s.server_lr, s.seed) == ("cmga", 1.0, 0)
    assert s.client_ids == ["airlines", "apple", "coachella"]
    assert s.make_strategy().name == "cmga"


def test_settings_refuse_unknown_federation_keys():
    with pytest.raises(ValueError, match="unknown key"):
        aggregator_settings({"federation": {"strategy": "fedavg", "server_lrr": 2}})
    s = aggregator_settings({"seed": 3, "federation": {"strategy": "fedavg", "server_momentum": 0.5}})
    assert s.client_ids is None and s.make_strategy().server_opt.momentum == 0.5


def test_block_without_weight_is_left_unchanged_and_gets_no_momentum(tmp_path):
    store = build_store(tmp_path / "store", rounds=0)
    write_updates(store, 0, ["d"])                        # d does not use slot2: its total weight there is 0
    strategy = strategy_for("cmga")

    result = run_aggregation(store.root, 0, strategy, comm=None, log=quiet)

    assert result["blocks"]["slot2"]["skipped"] and not result["blocks"]["slot0"].get("skipped")
    new, old = store.read_global(1)[0], make_global()
    assert all(torch.equal(new[k], old[k]) for k in SHAPES if k.startswith("slots.2."))
    expected, _ = strategy_for("cmga").aggregate(make_global(), [ClientUpdate("d", make_delta("d", 0), 5, "fc",
                                                                              CLIENTS["d"][2])],
                                                 round=0, block_of=shared_block)
    assert all(torch.equal(new[k], expected[k]) for k in SHAPES)
    assert sorted(store.read_server_state(0)) == sorted(k for k in SHAPES if not k.startswith("slots.2."))


# ---------------------------------------------------------------- shape-matched sharing: updates holding a subset of the blocks

# DeMA's `share: shape-matched` (docs/aggregator.md): the global is the union of every width's
# projector bank; a client uploads the experts plus its own width's bank only. h32's bank is held by
# no client this round (its block stays unchanged). The shapes make 2 ranks cut a width-8 projector
# and 3 ranks a width-16 one (bf16) between rows, so a block held by some clients only spans ranks.
SM_SHAPES = {
    "slots.0.experts.0.A": ((13, 7), torch.float32),
    "slots.0.gate": ((5,), torch.float32),
    "slots.1.experts.0.A": ((9, 3, 2), torch.float32),
    "slots.1.experts.0.B": ((7, 5), torch.bfloat16),
    "proj.h8.slots.0.in_proj.weight": ((4, 8), torch.float32),
    "proj.h8.slots.0.in_proj.bias": ((4,), torch.float32),
    "proj.h8.slots.1.in_proj.weight": ((4, 8), torch.float32),
    "proj.h8.out_proj.weight": ((5, 3), torch.float32),
    "proj.h16.slots.0.in_proj.weight": ((4, 16), torch.float32),
    "proj.h16.slots.1.in_proj.weight": ((4, 16), torch.bfloat16),
    "proj.h16.out_proj.weight": ((16, 3), torch.float32),
    "proj.h32.slots.0.in_proj.weight": ((1, 32), torch.float32),
}
# client -> (fingerprint, num_samples, slot_use, sign, width): a and c share width 8 (different
# backbones), b (width 16) pushes against them, so CMGA has a conflict in the expert blocks.
SM_CLIENTS = {
    "a": ("w8a", 10, {"slot0": 2, "slot1": 1, "slot0.h8": 2, "slot1.h8": 1, "side_out.h8": 1}, 1.0, 8),
    "b": ("w16", 20, {"slot0": 1, "slot1": 2, "slot0.h16": 1, "slot1.h16": 2, "side_out.h16": 1}, -1.0, 16),
    "c": ("w8c", 30, None, 0.5, 8),
}
SM_NOBODY = [k for k in SM_SHAPES if k.startswith("proj.h32.")]


def sm_global(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(SM_SHAPES[k][0], generator=g).to(SM_SHAPES[k][1]) for k in sorted(SM_SHAPES)}


def sm_delta(client: str, round: int) -> dict[str, torch.Tensor]:
    """The experts plus the client's own width's bank: common direction × sign plus client noise."""
    width, sign = SM_CLIENTS[client][4], SM_CLIENTS[client][3]
    g = torch.Generator().manual_seed(1000 * round + ord(client))
    common = torch.Generator().manual_seed(11 + round)
    out = {}
    for k in sorted(SM_SHAPES):
        shape, dt = SM_SHAPES[k]
        c = torch.rand(shape, generator=common)              # drawn for every key: same stream for all clients
        if k.startswith("slots.") or k.startswith(f"proj.h{width}."):
            out[k] = (sign * (1.0 + c) + 0.3 * torch.randn(shape, generator=g)).to(dt)
    return out


def build_sm_store(root, rounds: int = 2) -> FederationStore:
    store = FederationStore(root)
    store.publish_global(0, sm_global())
    for r in range(rounds):
        for cid, (fp, n, use, _, _) in SM_CLIENTS.items():
            store.write_update(r, cid, sm_delta(cid, r), fingerprint=fp, num_samples=n, slot_use=use)
    return store


def sm_reference(name: str, rounds: int) -> list[tuple[dict[str, torch.Tensor], dict]]:
    strategy, state, out = strategy_for(name), sm_global(), []
    for r in range(rounds):
        updates = [ClientUpdate(c, sm_delta(c, r), v[1], v[0], v[2]) for c, v in SM_CLIENTS.items()]
        state, metrics = strategy.aggregate(state, updates, round=r, block_of=shared_block)
        out.append((state, metrics))
    return out


def assert_sm_matches_reference(store: FederationStore, name: str, rounds: int = 2) -> None:
    for r, (expected, metrics) in enumerate(sm_reference(name, rounds)):
        got, _ = store.read_global(r + 1)
        assert sorted(got) == sorted(expected)
        for k in expected:
            assert got[k].dtype == expected[k].dtype and got[k].shape == expected[k].shape, k
            torch.testing.assert_close(got[k].float(), expected[k].float(), **TOL, msg=f"round {r}, {k}")
        for k in SM_NOBODY:                                  # held by nobody: bit-identical to the start
            assert torch.equal(got[k], sm_global()[k]), k
        blocks = store.read_result(r)["blocks"]
        assert sorted(blocks) == sorted(metrics["blocks"])
        for block, st in metrics["blocks"].items():
            assert blocks[block].get("skipped", False) == st.get("skipped", False), block
            np.testing.assert_allclose(blocks[block]["beta"], st["beta"], rtol=1e-9, atol=1e-12, err_msg=block)
    assert blocks["slot0.h32"]["skipped"]
    assert blocks["slot0.h16"]["beta"][0] == blocks["slot0.h16"]["beta"][2] == 0.0      # a, c lack width 16
    # momentum buffers: every key that was ever stepped, none for the bank nobody held
    assert sorted(store.read_server_state(rounds - 1)) == sorted(k for k in SM_SHAPES if k not in SM_NOBODY)


@pytest.mark.parametrize("name", ["fedavg", "cmga"])
def test_shape_matched_updates_holding_a_subset_of_blocks_equal_in_process_strategy(tmp_path, name):
    store = build_sm_store(tmp_path / "store")

    for r in range(2):       # a fresh strategy object each round: momentum comes from the store
        result = run_aggregation(store.root, r, strategy_for(name), comm=None, log=quiet,
                                 chunk_bytes=64 if r else 64 << 20)     # round 1: many small read chunks
        assert result["clients"] == ["a", "b", "c"]

    assert_sm_matches_reference(store, name)
    held = sum(t.numel() * t.element_size() for c in SM_CLIENTS for t in sm_delta(c, 1).values())
    assert result["io"]["update_bytes_read"] == held          # nothing is read for a block a client lacks
    if name == "cmga":
        assert result["blocks"]["slot0"]["n_conflicts"] >= 1


def _sm_bad_update(case: str) -> dict[str, torch.Tensor]:
    delta = sm_delta("a", 0)
    if case == "partial":
        del delta["proj.h8.slots.0.in_proj.bias"]
    elif case == "no block":
        delta = {}
    elif case == "unexpected":
        delta["proj.h64.slots.0.in_proj.weight"] = torch.zeros(4, 64)
    return delta


@pytest.mark.parametrize("case, pattern", [
    ("partial", r"client 'a': delta holds block 'slot0.h8' only in part \(missing \['proj.h8.slots.0.in_proj.bias'\]\)"),
    ("no block", r"client 'a': delta keys do not match the global state \(missing .*it holds no block\)"),
    ("unexpected", r"client 'a': delta keys not in the global state \(unexpected \['proj.h64.slots.0.in_proj.weight'\]\)"),
], ids=["partial", "no-block", "unexpected"])
def test_partial_empty_or_foreign_update_is_refused_as_the_in_process_strategy_does(tmp_path, case, pattern):
    """The in-process strategy refuses such an update (a library call: ValueError); the aggregator
    leaves it out with the very same message and aggregates the others."""
    store = build_sm_store(tmp_path / "store", rounds=0)
    for cid in ("b", "c"):
        fp, n, use, _, _ = SM_CLIENTS[cid]
        store.write_update(0, cid, sm_delta(cid, 0), fingerprint=fp, num_samples=n, slot_use=use)
    store.write_update(0, "a", _sm_bad_update(case), fingerprint="w8a", num_samples=10)
    updates = [ClientUpdate("a", _sm_bad_update(case), 10, "w8a")] + [
        ClientUpdate(c, sm_delta(c, 0), SM_CLIENTS[c][1], SM_CLIENTS[c][0]) for c in ("b", "c")]

    with pytest.raises(ValueError, match=pattern) as ref:
        strategy_for("fedavg").aggregate(sm_global(), updates, round=0, block_of=shared_block)
    result = run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet)

    assert result["clients"] == ["b", "c"]
    assert result["left_out"]["a"]["reason"] == str(ref.value)        # the very same message
    good = [ClientUpdate(c, sm_delta(c, 0), SM_CLIENTS[c][1], SM_CLIENTS[c][0], SM_CLIENTS[c][2]) for c in ("b", "c")]
    expected, _ = strategy_for("fedavg").aggregate(sm_global(), good, round=0, block_of=shared_block)
    got = store.read_global(1)[0]
    for k in expected:
        torch.testing.assert_close(got[k].float(), expected[k].float(), **TOL)
