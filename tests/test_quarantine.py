"""Issue 14, part 1: one bad update never aborts the round, and nothing non-finite is published.

A corpus of broken and hostile updates from client "e" next to four good clients (a-d, the stores of
test_aggregator.py). For each, in the MPI aggregator's code path (comm=None) and in the in-process
path (simulate's screening + Strategy.aggregate): the round completes without "e", the published
global equals the aggregate of the good clients exactly, e's directory is in the round's quarantine
with a reason naming client, file and reason, and the report lists it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from fedzero.adapters.dema import shared_block
from fedzero.aggregator import AggregationError, QuorumError, run_aggregation
from fedzero.config import ConfigError, FederationSettings
from fedzero.store_transport import refuse_nonfinite, screened_updates
from fedzero.store import FederationStore, validate_client_id
from fedzero.store.artifact import write_artifact
from fedzero.store.manifest import ServerStateManifest
from fedzero.strategies import ClientUpdate, make_strategy

from test_aggregator import CLIENTS, SHAPES, make_delta, make_global, quiet, strategy_for, write_updates

UPDATE = "rounds/r000000/updates/e/update.safetensors"
MANIFEST = "rounds/r000000/updates/e/manifest.json"


def good_store(root: Path) -> FederationStore:
    store = FederationStore(root)
    store.publish_global(0, make_global())
    write_updates(store, 0)
    return store


def write_e(store: FederationStore, **changes) -> None:
    delta = make_delta("a", 0)
    delta.update(changes)
    store.write_update(0, "e", delta, fingerprint="fa", num_samples=7, slot_use={"slot0": 1})


def replace_bytes(store: FederationStore, data: bytes) -> None:
    """e writes these bytes as its update, with a manifest that agrees about size and sha256 (a
    hostile client lies consistently)."""
    write_e(store)
    store.update_path(0, "e").write_bytes(data)
    edit_manifest(store, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def edit_manifest(store: FederationStore, raw: str | None = None, **fields) -> None:
    path = store.root / MANIFEST
    m = json.loads(path.read_text())
    m.update(fields)
    text = json.dumps(m)
    if raw is not None:                                    # a JSON number Python's json cannot write
        key, literal = raw.split("=", 1)
        text = text.replace(json.dumps({key: "__RAW__"})[1:-1], f'"{key}": {literal}')
    path.write_text(text)


def lying_header(store: FederationStore) -> None:
    header = json.dumps({"slots.0.gate": {"dtype": "F32", "shape": [5], "data_offsets": [0, 20]}}).encode()
    replace_bytes(store, struct.pack("<Q", len(header)) + header + b"\0" * 8)


def truncated(store: FederationStore) -> None:
    write_e(store)
    data = store.update_path(0, "e").read_bytes()
    replace_bytes(store, data[: len(data) // 2])


def truncated_manifest_unchanged(store: FederationStore) -> None:
    write_e(store)
    path = store.update_path(0, "e")
    path.write_bytes(path.read_bytes()[:100])


def symlink_to(target_of) -> callable:
    def make(store: FederationStore) -> None:
        write_e(store)
        target = target_of(store)
        path = store.update_path(0, "e")
        path.unlink()
        path.symlink_to(target)
        edit_manifest(store, bytes=target.stat().st_size, sha256=hashlib.sha256(target.read_bytes()).hexdigest())
    return make


def outside(store: FederationStore) -> Path:
    target = store.root.parent / "outside.safetensors"
    target.write_bytes(store.update_path(0, "a").read_bytes())
    return target


def hard_link_outside(store: FederationStore) -> None:
    write_e(store)
    target = store.root.parent / "linked.safetensors"
    os.link(store.update_path(0, "e"), target)


def directory_symlink(store: FederationStore) -> None:
    (store.root / "rounds/r000000/updates/e").symlink_to(store.root / "rounds/r000000/updates/a")


RANDOM = bytes(range(256)) * 4                               # 1 kB: its first 8 bytes read as a length
PICKLE = pickle.dumps({"slots.0.gate": [0.0] * 5}, protocol=4)


def _u64(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


# case -> (how e's update is made, the file named, the reason); the bound on a header is
# 2 x the global's header + 4096 bytes (fedzero/store/screen.py)
CASES = {
    "truncated": (truncated, UPDATE, "tensor 'slots.0.experts.0.A' has data offsets [0, 364] outside the file's {m} data bytes"),
    "truncated, manifest unchanged": (truncated_manifest_unchanged, UPDATE,
                                      "size mismatch: the manifest says {size} bytes, the file has 100"),
    "empty": (lambda s: replace_bytes(s, b""), UPDATE, "file of 0 bytes is too short for a safetensors header"),
    "random bytes": (lambda s: replace_bytes(s, RANDOM), UPDATE,
                     f"safetensors header of {_u64(RANDOM)} bytes exceeds the bound of {{bound}} bytes (from the "
                     "global's header): not a safetensors file of this federation"),
    "pickle": (lambda s: replace_bytes(s, PICKLE), UPDATE,
               f"safetensors header of {_u64(PICKLE)} bytes exceeds the bound of {{bound}} bytes (from the "
               "global's header): not a safetensors file of this federation"),
    "lying header": (lying_header, UPDATE,
                     "tensor 'slots.0.gate' has data offsets [0, 20] outside the file's 8 data bytes"),
    "NaN": (lambda s: write_e(s, **{"slots.0.gate": torch.tensor([1.0, math.nan, 0.0, 2.0, 1.0])}), UPDATE,
            "tensor 'slots.0.gate' holds non-finite values (1 NaN, 0 Inf)"),
    "Inf": (lambda s: write_e(s, **{"slots.1.experts.0.A": torch.full((9, 3, 2), -math.inf)}), UPDATE,
            "tensor 'slots.1.experts.0.A' holds non-finite values (0 NaN, 54 Inf)"),
    "fp16 for fp32": (lambda s: write_e(s, **{"slots.0.gate": torch.zeros(5, dtype=torch.float16)}), UPDATE,
                      "tensor 'slots.0.gate' has dtype F16, the global's is F32"),
    "wrong shape": (lambda s: write_e(s, **{"slots.0.gate": torch.zeros(6)}), UPDATE,
                    "tensor 'slots.0.gate' has shape [6], the global's is [5]"),
    "symlink to another client's file": (symlink_to(lambda s: s.update_path(0, "a")), UPDATE,
                                         "update.safetensors is a symlink (to {target}); updates must be regular "
                                         "files inside the store"),
    "symlink outside the store": (symlink_to(outside), UPDATE,
                                  "update.safetensors is a symlink (to {target}); updates must be regular files "
                                  "inside the store"),
    "hard link outside the store": (hard_link_outside, UPDATE,
                                    "update.safetensors has 2 hard links; an update must be a file of its own"),
    "directory symlinked to another client's": (directory_symlink, "rounds/r000000/updates/e",
                                                "the client's directory is a symlink (to {root}/rounds/r000000/"
                                                "updates/a)"),
    "num_samples 'x'": (lambda s: (write_e(s), edit_manifest(s, num_samples="x")), MANIFEST,
                        "update of client e in round 0 ({root}/" + MANIFEST + "): manifest field 'num_samples' "
                        "has bad type str"),
    "num_samples 1e400": (lambda s: (write_e(s), edit_manifest(s, raw="num_samples=1e400", num_samples="__RAW__")),
                          MANIFEST, "update of client e in round 0 ({root}/" + MANIFEST + "): manifest field "
                          "'num_samples' has bad type float"),
    "num_samples 1e12": (lambda s: (write_e(s), edit_manifest(s, num_samples=10 ** 12)), MANIFEST,
                         "manifest field 'num_samples' is 1000000000000, above federation.max_num_samples "
                         "(1000000000)"),
    "num_samples -1": (lambda s: (write_e(s), edit_manifest(s, num_samples=-1)), MANIFEST,
                       "update of client e in round 0 ({root}/" + MANIFEST + "): manifest field 'num_samples' "
                       "is negative"),
    "num_samples 0": (lambda s: (write_e(s), edit_manifest(s, num_samples=0)), MANIFEST,
                      "manifest field 'num_samples' must be >= 1, got 0"),
    "slot_use 'x'": (lambda s: (write_e(s), edit_manifest(s, slot_use="x")), MANIFEST,
                     "update of client e in round 0 ({root}/" + MANIFEST + "): manifest field 'slot_use' has bad "
                     "type str"),
    "slot_use {slot0: 'x'}": (lambda s: (write_e(s), edit_manifest(s, slot_use={"slot0": "x"})), MANIFEST,
                              "manifest field 'slot_use' must map blocks to finite numbers >= 0, got 'slot0': 'x'"),
}


def expected_reason(store: FederationStore, case: str) -> str:
    _, _, reason = CASES[case]
    header = struct.unpack("<Q", store.global_path(0).read_bytes()[:8])[0]
    good = store.update_path(0, "a").read_bytes()
    n = _u64(good)
    fields = {"bound": 2 * header + 4096, "root": store.root, "size": len(good),
              "n": len(good) - 8 - n, "m": len(good) // 2 - 8 - n}
    link = store.root / UPDATE
    if link.is_symlink():
        fields["target"] = os.readlink(link)
    return reason.format(**fields)


@pytest.fixture(scope="module")
def clean_global(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The aggregate of the good clients alone (a-d), published by the aggregator."""
    store = good_store(tmp_path_factory.mktemp("clean") / "store")
    run_aggregation(store.root, 0, strategy_for("cmga"), comm=None, log=quiet)
    return store.read_global(1)[0]


def check_quarantine(store: FederationStore, file: str, reason: str) -> None:
    entry = store.root / "rounds/r000000/quarantine/0001"
    info = json.loads((entry / "reason.json").read_text())
    assert (info["client"], info["file"], info["reason"], info["round"]) == ("e", file, reason, 0)
    assert info["moved_to"] == "rounds/r000000/quarantine/0001/files"
    assert os.path.lexists(entry / "files") and not os.path.lexists(store.root / "rounds/r000000/updates/e")
    assert sorted(os.listdir(store.root / "rounds/r000000/quarantine")) == ["0001"]


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_update_is_left_out_by_the_aggregator_and_the_round_goes_on(tmp_path, case, clean_global):
    store = good_store(tmp_path / "store")
    CASES[case][0](store)
    file, reason = CASES[case][1], expected_reason(store, case)
    lines = []

    result = run_aggregation(store.root, 0, strategy_for("cmga"), comm=None, log=lines.append)

    assert result["clients"] == ["a", "b", "c", "d"]
    assert result["left_out"] == {"e": {"file": file, "reason": reason}}
    assert result["quarantined"] == [{"entry": "rounds/r000000/quarantine/0001", "client": "e", "file": file,
                                      "reason": reason}]
    assert store.read_result(0)["left_out"] == result["left_out"]
    check_quarantine(store, file, reason)
    assert f"[aggregate r0] left out client 'e', file {file}: {reason} (quarantined in " \
           "rounds/r000000/quarantine/0001)" in lines
    got = store.read_global(1)[0]
    assert all(torch.equal(got[k], clean_global[k]) for k in SHAPES)          # exactly the good clients' aggregate


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_update_is_left_out_in_process_as_in_the_aggregator(tmp_path, case):
    store = good_store(tmp_path / "store")
    CASES[case][0](store)
    file, reason = CASES[case][1], expected_reason(store, case)
    state, lines = make_global(), []

    updates, left_out = screened_updates(store, 0, state, shared_block, 10 ** 9, log=lines.append)

    assert [u.client_id for u in updates] == ["a", "b", "c", "d"]
    assert [r.to_dict() for r in left_out] == [{"client": "e", "file": file, "reason": reason}]
    assert lines == [f"round 0: left out client 'e', file {file}: {reason} (quarantined in "
                     "rounds/r000000/quarantine/0001)"]
    check_quarantine(store, file, reason)
    got, _ = make_strategy("cmga", seed=5, server_lr=0.7, server_momentum=0.9).aggregate(
        state, updates, round=0, block_of=shared_block)
    good = [ClientUpdate(c, make_delta(c, 0), CLIENTS[c][1], CLIENTS[c][0], CLIENTS[c][2]) for c in "abcd"]
    expected, _ = make_strategy("cmga", seed=5, server_lr=0.7, server_momentum=0.9).aggregate(
        state, good, round=0, block_of=shared_block)
    assert all(torch.equal(got[k], expected[k]) for k in SHAPES)


@pytest.mark.parametrize("name", [".hidden", "e\n", "x" * 129, "a b"])
def test_a_directory_that_is_not_a_plain_client_id_is_left_out(tmp_path, name, clean_global):
    store = good_store(tmp_path / "store")
    (store.root / "rounds/r000000/updates/a").rename(store.root / "rounds/r000000/updates" / name)
    write_updates(store, 0, ["a"])
    with pytest.raises(ValueError) as why:
        validate_client_id(name)

    result = run_aggregation(store.root, 0, strategy_for("cmga"), comm=None, log=quiet)

    assert result["clients"] == ["a", "b", "c", "d"]
    assert result["left_out"] == {name: {"file": f"rounds/r000000/updates/{name}",
                                         "reason": f"not a plain client id: {why.value}"}}
    assert (store.root / "rounds/r000000/quarantine/0001/files/update.safetensors").is_file()
    assert all(torch.equal(store.read_global(1)[0][k], clean_global[k]) for k in SHAPES)


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a\n", "x" * 129, "a/b", ""])
def test_one_client_id_validator_refuses_what_is_not_a_plain_name(name):
    with pytest.raises(ValueError):
        validate_client_id(name)


def test_the_aggregators_expected_ids_are_checked_by_the_same_validator(tmp_path):
    store = good_store(tmp_path / "store")
    with pytest.raises(ValueError, match=r"^invalid client id '\.\.': must not start with '\.'$"):
        run_aggregation(store.root, 0, strategy_for("fedavg"), expected=["a", ".."], comm=None, log=quiet)
    assert not store.has_global(1)


# ---------------------------------------------------------------- too few good updates: the round fails

def test_too_few_good_updates_fail_the_round_naming_them(tmp_path):
    store = good_store(tmp_path / "store")
    CASES["fp16 for fp32"][0](store)
    reason = expected_reason(store, "fp16 for fp32")

    with pytest.raises(QuorumError) as err:
        run_aggregation(store.root, 0, strategy_for("fedavg"), expected=["a", "e"], quorum=2, comm=None, log=quiet)

    assert str(err.value) == ("round 0: every expected client was heard from with 1 of the 2 updates the quorum "
                              f"needs; missing: none; arrived: a; left out: client 'e', file {UPDATE}: {reason}")
    assert not store.has_global(1) and not store.has_result(0) and store.read_server_state(0) is None
    check_quarantine(store, UPDATE, reason)


def test_an_update_left_out_after_planning_can_break_the_quorum(tmp_path):
    store = good_store(tmp_path / "store")
    CASES["NaN"][0](store)

    with pytest.raises(QuorumError) as err:
        run_aggregation(store.root, 0, strategy_for("fedavg"), quorum=5, comm=None, log=quiet)

    assert str(err.value) == ("round 0: 4 of the 5 updates the quorum needs passed the checks; used: a, b, c, d; "
                              f"left out: client 'e', file {UPDATE}: tensor 'slots.0.gate' holds non-finite values "
                              "(1 NaN, 0 Inf)")
    assert not store.has_global(1) and not store.has_result(0)


def test_in_process_round_without_a_good_update_fails_naming_them(tmp_path):
    store = FederationStore(tmp_path / "store")
    store.publish_global(0, make_global())
    CASES["wrong shape"][0](store)

    with pytest.raises(ValueError) as err:
        screened_updates(store, 0, make_global(), shared_block, 10 ** 9, log=quiet)

    assert str(err.value) == ("round 0: no client update passed the checks; left out: client 'e', file "
                              f"{UPDATE}: tensor 'slots.0.gate' has shape [6], the global's is [5]")


# ---------------------------------------------------------------- nothing non-finite is published

def _store_files(store: FederationStore) -> dict[str, str]:
    return {str(p.relative_to(store.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.root.rglob("*")) if p.is_file()}


def test_server_lr_overflow_is_refused_before_anything_is_written(tmp_path):
    store = good_store(tmp_path / "store")
    before = _store_files(store)
    strategy = make_strategy("fedavg", seed=5, server_lr=1e308)

    with pytest.raises(AggregationError) as err:
        run_aggregation(store.root, 0, strategy, comm=None, log=quiet)

    assert str(err.value) == (
        "publishing failed on rank 0: refusing to publish the global of round 1: the new global's tensor "
        "'slots.0.experts.0.A' holds 0 NaN and 91 Inf values. Possible causes: server_lr 1e+308 (the step is lr x "
        "the aggregate, in float32 or wider). The client updates were checked finite. Nothing was written.")
    assert _store_files(store) == before                                       # the store is unchanged

    state, updates = make_global(), [ClientUpdate(c, make_delta(c, 0), CLIENTS[c][1], CLIENTS[c][0], CLIENTS[c][2])
                                     for c in "abcd"]
    strategy = make_strategy("fedavg", seed=5, server_lr=1e308)
    new, agg = strategy.aggregate(state, updates, round=0, block_of=shared_block)
    with pytest.raises(ValueError) as in_process:
        refuse_nonfinite(0, strategy, new, {}, agg)
    assert "publishing failed on rank 0: " + str(in_process.value) == str(err.value)


def test_a_nan_momentum_state_is_refused_naming_it(tmp_path):
    store = good_store(tmp_path / "store")
    write_updates(store, 1)
    run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet)
    state = store.read_server_state(0)
    state["slots.0.gate"][2] = math.nan                      # written past the store's own guard
    write_artifact(store.layout.server_state_files(0), state, ServerStateManifest, round=0)
    before = _store_files(store)

    with pytest.raises(AggregationError) as err:
        run_aggregation(store.root, 1, strategy_for("fedavg"), comm=None, log=quiet)

    assert str(err.value) == (
        "publishing failed on rank 0: refusing to publish the global of round 2: the new global's tensor "
        "'slots.0.gate' holds 1 NaN and 0 Inf values; the new server momentum's tensor 'slots.0.gate' holds 1 NaN "
        "and 0 Inf values. Possible causes: server_lr 0.7 (the step is lr x the aggregate, in float32 or wider); "
        "server_momentum 0.9 (the momentum state of round 0, which itself holds non-finite values). The client "
        "updates were checked finite. Nothing was written.")
    assert _store_files(store) == before


def test_the_store_refuses_to_publish_a_non_finite_global_or_server_state(tmp_path):
    store = FederationStore(tmp_path / "store")
    bad = {"w": torch.tensor([1.0, math.inf])}

    with pytest.raises(ValueError, match=r"^refusing to write the global of round 0: tensor 'w' holds non-finite "
                                         r"values \(0 NaN, 1 Inf\); nothing was written$"):
        store.publish_global(0, bad)
    with pytest.raises(ValueError, match=r"^refusing to write the server state of round 0: tensor 'w' holds "
                                         r"non-finite values \(0 NaN, 1 Inf\); nothing was written$"):
        store.write_server_state(0, bad)
    assert not store.has_global(0) and store.read_server_state(0) is None


# ---------------------------------------------------------------- settings

@pytest.mark.parametrize("options, message", [
    ({"harmonize_norms": "no"}, "CMGA harmonize_norms must be true or false, got 'no'"),
    ({"c_max": math.nan}, "CMGA c_max must be >= 1 and finite, got nan"),
    ({"server_lr": math.nan}, "server lr must be a finite number > 0, got nan"),
    ({"server_lr": math.inf}, "server lr must be a finite number > 0, got inf"),
])
def test_strategies_refuse_non_finite_or_non_bool_options_built_directly(options, message):
    with pytest.raises(ValueError) as err:
        make_strategy("cmga", **options)
    assert str(err.value) == message


@pytest.mark.parametrize("value, message", [
    (0, "federation.max_num_samples must be >= 1, got 0"),
    ("x", "federation.max_num_samples must be an integer, got 'x'"),
    (1e12, "federation.max_num_samples must be an integer, got 1000000000000.0"),
])
def test_max_num_samples_is_checked_at_load(value, message):
    with pytest.raises(ConfigError) as err:
        FederationSettings(max_num_samples=value)
    assert message in str(err.value)


def test_max_num_samples_from_the_config_bounds_the_claim(tmp_path):
    store = good_store(tmp_path / "store")
    write_e(store)                                           # e claims 7 samples, b 30

    result = run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet, max_num_samples=30)

    assert sorted(result["clients"]) == ["a", "b", "c", "d", "e"]              # b's 30 is at the bound
    store = good_store(tmp_path / "store2")
    result = run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet, max_num_samples=29)
    assert result["clients"] == ["a", "c", "d"]
    assert result["left_out"]["b"]["reason"] == ("manifest field 'num_samples' is 30, above "
                                                 "federation.max_num_samples (29)")
