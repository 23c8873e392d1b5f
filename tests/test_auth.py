"""Issue 14, part 2: updates bound to their global, and HMAC-signed updates (fedzero/store/auth.py).

Four good clients a-d (test_aggregator's stores) sign their updates; client e sends a hostile one.
In the MPI aggregator's code path (run_aggregation, comm=None) and in the in-process screening
(screen_round, as fedzero simulate screens): e is left out and quarantined with a reason naming it,
and the published global is exactly the one of the good clients alone."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch

from fedzero.aggregator import run_aggregation
from fedzero.store import FederationStore
from fedzero.store.auth import (KeyFileError, KeySet, client_key, create_keys, read_key, sign_manifest,
                                aggregator_keys_dir, client_key_path)
from fedzero.store.screen import GlobalSpec, screen_round

from test_aggregator import CLIENTS, make_delta, make_global, quiet, strategy_for

GOOD = tuple(CLIENTS)


def signed_store(root, keys: KeySet, round: int = 0) -> FederationStore:
    store = FederationStore(root)
    store.publish_global(0, make_global())
    write_signed(store, keys, round)
    return store


def write_signed(store, keys, round, clients=GOOD):
    for cid in clients:
        fp, n, use, _ = CLIENTS[cid]
        store.write_update(round, cid, make_delta(cid, round), fingerprint=fp, num_samples=n, slot_use=use,
                           key=keys.get(cid))


def write_e(store, round=0, key=None, **kw):
    store.write_update(round, "e", make_delta("a", round), fingerprint="fa", num_samples=7,
                       slot_use={"slot0": 1}, key=key, **kw)


def edit(store, rnd, cid, **fields):
    path = store.layout.update_files(rnd, cid).manifest
    m = json.loads(path.read_text())
    m.update(fields)
    path.write_text(json.dumps(m))


def clean_global(tmp_path, keys) -> bytes:
    store = signed_store(tmp_path / "clean", keys)
    run_aggregation(store.root, 0, strategy_for("cmga"), comm=None, log=quiet, keys=keys)
    return store.global_path(1).read_bytes()


@pytest.fixture
def keys():
    return KeySet.generate([*GOOD, "e"])


def forged(store, keys):                       # a hostile writer's own signature (random key)
    write_e(store, key=os.urandom(32))


def unsigned(store, keys):
    write_e(store)


def cross_client(store, keys):                # e's directory, signed with a's key
    write_e(store, key=keys.get("a"))


def edited_after_signing(store, keys):        # e's own signature, then its claimed samples inflated
    write_e(store, key=keys.get("e"))
    edit(store, 0, "e", num_samples=10 ** 6)


def stolen_update(store, keys):               # a's signed update copied under e (a sybil)
    shutil.rmtree(store.layout.updates_dir(0) / "e", ignore_errors=True)
    shutil.copytree(store.layout.updates_dir(0) / "a", store.layout.updates_dir(0) / "e")
    edit(store, 0, "e", client_id="e")


CASES = {
    "unsigned": (unsigned, "unsigned"),
    "forged": (forged, "HMAC does not verify with client 'e'"),
    "cross_client": (cross_client, "HMAC does not verify with client 'e'"),
    "edited_after_signing": (edited_after_signing, "HMAC does not verify"),
    "stolen_update": (stolen_update, "HMAC does not verify with client 'e'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mpi_path_leaves_out_a_badly_signed_update(tmp_path, keys, case):
    make, reason = CASES[case]
    store = signed_store(tmp_path / "store", keys)
    make(store, keys)

    result = run_aggregation(store.root, 0, strategy_for("cmga"), comm=None, log=quiet, keys=keys)

    assert result["clients"] == list(GOOD)
    assert reason in result["left_out"]["e"]["reason"]
    assert result["left_out"]["e"]["file"] == "rounds/r000000/updates/e/manifest.json"
    assert store.global_path(1).read_bytes() == clean_global(tmp_path, keys)
    assert [q["client"] for q in result["quarantined"]] == ["e"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_process_screening_leaves_out_a_badly_signed_update(tmp_path, keys, case):
    make, reason = CASES[case]
    store = signed_store(tmp_path / "store", keys)
    make(store, keys)
    spec = GlobalSpec.from_state(make_global())

    good, bad = screen_round(store, 0, spec, keys=keys, log=quiet)

    assert [m["client_id"] for m, _ in good] == list(GOOD)
    assert [r.client for r in bad] == ["e"] and reason in bad[0].reason


def test_a_client_without_a_key_is_refused(tmp_path):
    keys = KeySet.generate(GOOD)
    store = signed_store(tmp_path / "store", keys)
    write_e(store, key=os.urandom(32))

    result = run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet, keys=keys)

    assert "client 'e' has no key in the aggregator's key set" in result["left_out"]["e"]["reason"]


def replay_into_round_1(store):
    """e's round-0 update copied into round 1 with its round field edited (the global differs)."""
    src, dst = store.layout.updates_dir(0) / "e", store.layout.updates_dir(1) / "e"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)
    edit(store, 1, "e", round=1)


@pytest.mark.parametrize("authenticate", [False, True])
def test_an_old_rounds_update_with_its_round_edited_is_refused(tmp_path, keys, authenticate):
    used = keys if authenticate else None
    store = signed_store(tmp_path / "store", keys)
    write_e(store, key=keys.get("e"))
    run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet, keys=used)
    write_signed(store, keys, 1)
    replay_into_round_1(store)

    result = run_aggregation(store.root, 1, strategy_for("fedavg"), comm=None, log=quiet, keys=used)

    assert result["clients"] == list(GOOD)
    why = result["left_out"]["e"]["reason"]
    # signed: the HMAC covers the round; unsigned: the binding to round 0's global gives it away
    assert ("HMAC does not verify" in why) if authenticate else ("bound to global sha256" in why), why


def test_every_update_records_the_global_it_was_trained_from(tmp_path, keys):
    store = signed_store(tmp_path / "store", keys)
    sha = store.global_manifest(0).sha256
    assert all(store.read_update(0, c)[1]["global_sha256"] == sha for c in GOOD)
    write_e(store, global_sha256="0" * 64)            # a client that read another (stale) global

    good, bad = screen_round(store, 0, GlobalSpec.from_state(make_global()), log=quiet)

    assert [r.client for r in bad] == ["e"] and "bound to global sha256 0000000000000000" in bad[0].reason
    assert len(good) == 4


def test_signature_covers_the_manifest_fields(keys):
    m = {"client_id": "a", "round": 0, "global_sha256": "1" * 64, "sha256": "2" * 64, "bytes": 10, "keys": ["x"],
         "num_samples": 3}
    sig = sign_manifest(m, keys.get("a"))
    for field, value in [("round", 1), ("global_sha256", "3" * 64), ("sha256", "4" * 64), ("num_samples", 4),
                         ("client_id", "b"), ("keys", ["y"])]:
        assert sign_manifest({**m, field: value}, keys.get("a")) != sig, field
    assert sign_manifest(m, keys.get("b")) != sig


# ---------------------------------------------------------------- key files

def test_prepare_keys_are_private_and_shared_with_the_aggregator_only(tmp_path):
    run = tmp_path / "run"
    made = create_keys(run, {c: run / "clients" / c for c in GOOD})
    agg = KeySet.load(aggregator_keys_dir(run), GOOD)
    for c in GOOD:
        assert stat.S_IMODE(os.stat(made[c]).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(aggregator_keys_dir(run) / f"{c}.key").st_mode) == 0o600
        assert client_key(run / "clients" / c) == agg.get(c)
    assert len({agg.get(c) for c in GOOD}) == 4
    assert not (run / "store").exists()                # nothing of the keys in the store
    again = create_keys(run, {c: run / "clients" / c for c in GOOD})      # a re-run keeps them
    assert [client_key(run / "clients" / c) for c in GOOD] == [agg.get(c) for c in GOOD] and again == made
    assert agg.clients == list(GOOD) and not any(agg.get(c).hex() in repr(agg) for c in GOOD)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_key_file_others_may_read_is_refused_without_showing_the_key(tmp_path, mode):
    path = client_key_path(tmp_path / "clients" / "a")
    create_keys(tmp_path, {"a": path.parent})
    key = read_key(path)
    os.chmod(path, mode)

    with pytest.raises(KeyFileError, match=f"{path}.*mode {mode:04o}.*chmod 600") as err:
        read_key(path)
    with pytest.raises(KeyFileError):
        client_key(path.parent)
    assert key.hex() not in str(err.value)


def test_a_key_file_that_is_a_symlink_or_malformed_is_refused(tmp_path):
    create_keys(tmp_path, {"a": tmp_path / "a"})
    link = tmp_path / "link.key"
    link.symlink_to(client_key_path(tmp_path / "a"))
    with pytest.raises(KeyFileError, match="symlink"):
        read_key(link)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    os.chmod(bad, 0o600)
    with pytest.raises(KeyFileError, match="does not hold a key"):
        read_key(bad)
    with pytest.raises(KeyFileError, match="missing"):
        KeySet.load(aggregator_keys_dir(tmp_path), ["a", "zz"])


def test_simulate_path_signs_and_checks_with_in_memory_keys(tmp_path, keys):
    """What fedzero simulate does under federation.authenticate (fedzero.store_transport /
    simulate's StoreTransport): in-memory keys, updates written signed, screened with the keys."""
    store = signed_store(tmp_path / "store", keys)
    good, bad = screen_round(store, 0, GlobalSpec.from_state(make_global()), keys=keys, log=quiet)
    assert [m["client_id"] for m, _ in good] == list(GOOD) and not bad
    assert all(torch.equal(t, make_delta(m["client_id"], 0)[k]) for m, d in good for k, t in d.items())
