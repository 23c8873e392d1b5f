"""Aggregation blocks in the store: the global's manifest carries them (meta["blocks"]), the
aggregator uses what it declares and writes them into the global it publishes, and a global
published without them (an older store) aggregates exactly as before, by the key-name rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedzero.adapters.dema import shared_block
from fedzero.aggregator import AggregationError, run_aggregation
from fedzero.store import FederationStore
from fedzero.store.errors import StoreIntegrityError
from fedzero.store.manifest import GlobalManifest, parse_manifest
from fedzero.strategies import ClientUpdate

from test_aggregator import (CLIENTS, SM_CLIENTS, TOL, build_sm_store, build_store, make_delta, make_global,
                             quiet, sm_delta, sm_global, strategy_for, write_updates)

SHA = "0" * 64


def test_global_manifest_round_trip_carries_the_blocks(tmp_path):
    store = FederationStore(tmp_path / "store")
    blocks = {k: shared_block(k) for k in make_global()}
    store.publish_global(0, make_global(), meta={"seed": 1, "blocks": blocks})
    store.publish_global(1, make_global(1))

    manifest = store.global_manifest(0)
    assert manifest.blocks == blocks and manifest.meta["seed"] == 1
    assert store.read_global(0)[1]["meta"]["blocks"] == blocks
    again = parse_manifest(GlobalManifest, manifest.to_dict(), round=0, what="global", path=Path("m.json"))
    assert again == manifest and again.blocks == blocks
    assert store.global_manifest(1).blocks is None                     # published without them


@pytest.mark.parametrize("blocks", [{"slots.0.gate": 3}, {"slots.0.gate": ""}, ["slot0"]])
def test_a_global_manifest_with_malformed_blocks_is_refused(blocks):
    data = {"round": 0, "sha256": SHA, "bytes": 1, "keys": ["slots.0.gate"], "meta": {"blocks": blocks}}
    with pytest.raises(StoreIntegrityError, match="manifest field 'meta' has 'blocks' that is not an object"):
        parse_manifest(GlobalManifest, data, round=0, what="global", path=Path("m.json"))


def _declare_blocks(root: Path, global_of, build) -> FederationStore:
    """The same store as `build` makes, but round 0's global declares its (key-name rule) blocks."""
    store = build(root, rounds=2)
    files = store.layout.global_files(0)
    files.manifest.unlink()
    files.tensors.unlink()
    state = global_of()
    store.publish_global(0, state, meta={"blocks": {k: shared_block(k) for k in state}})
    return store


@pytest.mark.parametrize("kind", ["full", "shape-matched"])
def test_a_global_without_blocks_aggregates_exactly_as_one_declaring_them(tmp_path, kind):
    build, global_of = (build_store, make_global) if kind == "full" else (build_sm_store, sm_global)
    old = build(tmp_path / "old", rounds=2)
    new = _declare_blocks(tmp_path / "new", global_of, build)
    assert old.global_manifest(0).blocks is None and new.global_manifest(0).blocks is not None

    for r in range(2):
        results = [run_aggregation(s.root, r, strategy_for("cmga"), comm=None, log=quiet) for s in (old, new)]
        assert results[0]["blocks"] == results[1]["blocks"]
        (a, _), (b, _) = old.read_global(r + 1), new.read_global(r + 1)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        # the aggregator writes the blocks it used into the global it publishes
        expected = {k: shared_block(k) for k in sorted(a)}
        assert old.global_manifest(r + 1).blocks == new.global_manifest(r + 1).blocks == expected


def test_the_blocks_a_global_declares_are_the_ones_aggregated(tmp_path):
    store = FederationStore(tmp_path / "store")
    store.publish_global(0, make_global(), meta={"blocks": {k: "everything" for k in make_global()}})
    for c in CLIENTS:                     # no slot_use: weight num_samples in every block
        store.write_update(0, c, make_delta(c, 0), fingerprint=CLIENTS[c][0], num_samples=CLIENTS[c][1])

    result = run_aggregation(store.root, 0, strategy_for("cmga"), comm=None, log=quiet)

    updates = [ClientUpdate(c, make_delta(c, 0), CLIENTS[c][1], CLIENTS[c][0]) for c in CLIENTS]
    expected, metrics = strategy_for("cmga").aggregate(make_global(), updates, round=0, block_of=lambda k: "everything")
    assert list(result["blocks"]) == ["everything"] and not result["blocks"]["everything"].get("skipped")
    assert result["blocks"]["everything"]["n_conflicts"] >= 1          # c pushes against a and b
    got, _ = store.read_global(1)
    for k in expected:
        torch.testing.assert_close(got[k].float(), expected[k].float(), **TOL, msg=k)
    assert not torch.equal(got["slots.0.gate"], make_global()["slots.0.gate"])
    assert store.global_manifest(1).blocks == {k: "everything" for k in sorted(make_global())}


def test_declared_blocks_that_do_not_match_the_tensors_fail_the_round(tmp_path):
    store = FederationStore(tmp_path / "store")
    blocks = {k: shared_block(k) for k in make_global() if k != "slots.1.scale"}
    store.publish_global(0, make_global(), meta={"blocks": {**blocks, "slots.7.gate": "slot7"}})
    write_updates(store, 0)

    with pytest.raises(AggregationError, match=r"declared blocks do not match its tensors: no block for "
                                               r"\['slots.1.scale'\], blocks for absent tensors \['slots.7.gate'\]"):
        run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet)
    assert not store.has_global(1)


def test_shape_matched_global_with_declared_blocks_equals_the_in_process_path(tmp_path):
    store = _declare_blocks(tmp_path / "store", sm_global, build_sm_store)
    run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet)

    updates = [ClientUpdate(c, sm_delta(c, 0), v[1], v[0], v[2]) for c, v in SM_CLIENTS.items()]
    expected, _ = strategy_for("fedavg").aggregate(sm_global(), updates, round=0,
                                                   block_of=store.global_manifest(0).blocks)
    got, _ = store.read_global(1)
    for k in expected:
        torch.testing.assert_close(got[k].float(), expected[k].float(), **TOL, msg=k)
