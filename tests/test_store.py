"""Tests for fedzero.store (the federation store directory layout)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors import safe_open

from fedzero.store import (
    FederationStore,
    StoreConflictError,
    StoreError,
    StoreIntegrityError,
    StoreNotFoundError,
    StoreTimeoutError,
    atomic_write_json,
    sha256_file,
    validate_client_id,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.shared.A": torch.randn(4, 8, generator=g),
        "layers.0.shared.B": torch.randn(8, 4, generator=g).to(torch.bfloat16),
        "layers.1.shared.A": torch.randn(3, 5, generator=g).to(torch.float16),
        "counter": torch.arange(6, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


def _bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert _raw_bytes(a[k]) == _raw_bytes(b[k]), k


def _raw_bytes(t: torch.Tensor) -> bytes:
    # bit-level comparison (also NaN payloads and -0.0), independent of dtype
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _write(store, round=0, cid="client-0", seed=1, **kw):
    kw.setdefault("fingerprint", "fp-abc")
    kw.setdefault("num_samples", 10)
    return store.write_update(round, cid, _state(seed), **kw)


# ----------------------------------------------------------------------------- opening

def test_create_writes_marker_and_reopens(tmp_path):
    root = tmp_path / "store"
    s = FederationStore(root)
    assert json.loads((root / "store.json").read_text()) == {"format": "fedzero-store", "version": 1}
    assert (root / "rounds").is_dir()
    FederationStore(root, create=False)  # reopen
    FederationStore(root)  # reopen with create=True is fine too
    assert s.latest_global_round() is None


def test_empty_existing_dir_becomes_store(tmp_path):
    FederationStore(tmp_path)
    assert (tmp_path / "store.json").is_file()


def test_non_store_non_empty_dir_refused(tmp_path):
    (tmp_path / "something.txt").write_text("hello")
    with pytest.raises(StoreError, match="not empty"):
        FederationStore(tmp_path)
    assert not (tmp_path / "store.json").exists()


def test_create_false_missing_refused(tmp_path):
    with pytest.raises(StoreError, match="no federation store"):
        FederationStore(tmp_path / "nope", create=False)


def test_foreign_marker_and_future_version_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "store.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(StoreError, match="not a fedzero store"):
        FederationStore(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "store.json").write_text(json.dumps({"format": "fedzero-store", "version": 99}))
    with pytest.raises(StoreError, match="unsupported store version"):
        FederationStore(tmp_path / "b")


def test_root_is_a_file_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        FederationStore(f)


# ----------------------------------------------------------------------------- global

def test_global_round_trip_bit_identical(tmp_path):
    s = FederationStore(tmp_path)
    st = _state(0)
    path = s.publish_global(0, st, meta={"model": "tiny", "lr": 0.1})
    assert path == tmp_path / "rounds" / "r000000" / "global" / "shared.safetensors"
    assert s.has_global(0) and not s.has_global(1)
    got, manifest = s.read_global(0)
    _bit_identical(st, got)
    assert got["layers.0.shared.B"].dtype == torch.bfloat16
    assert manifest["round"] == 0
    assert manifest["meta"] == {"model": "tiny", "lr": 0.1}
    assert manifest["sha256"] == sha256_file(path)
    assert manifest["bytes"] == path.stat().st_size
    assert manifest["keys"] == sorted(st)


def test_global_non_contiguous_and_shared_storage(tmp_path):
    s = FederationStore(tmp_path)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    st = {"t": base.t(), "a": base[0:2], "b": base[2:4]}  # transposed view + shared storage
    s.publish_global(0, st)
    got, _ = s.read_global(0)
    for k in st:
        assert torch.equal(got[k], st[k])
        assert got[k].is_contiguous()


def test_publish_global_conflict_refused_identical_is_noop(tmp_path):
    s = FederationStore(tmp_path)
    s.publish_global(2, _state(0), meta={"v": 1})
    before = (tmp_path / "rounds" / "r000002" / "global" / "manifest.json").read_bytes()
    s.publish_global(2, _state(0), meta={"v": 2})  # same tensors: no-op
    after = (tmp_path / "rounds" / "r000002" / "global" / "manifest.json").read_bytes()
    assert before == after
    with pytest.raises(StoreConflictError, match="refusing to overwrite global of round 2"):
        s.publish_global(2, _state(1))
    got, _ = s.read_global(2)
    _bit_identical(_state(0), got)
    # no temp files left behind by the refused publish
    assert sorted(os.listdir(tmp_path / "rounds" / "r000002" / "global")) == [
        "manifest.json", "shared.safetensors"]


def test_publish_global_over_crashed_publish(tmp_path):
    s = FederationStore(tmp_path)
    gdir = tmp_path / "rounds" / "r000000" / "global"
    gdir.mkdir(parents=True)
    (gdir / "shared.safetensors").write_bytes(b"half a file")  # crash before the manifest
    assert not s.has_global(0)
    s.publish_global(0, _state(0))
    _bit_identical(_state(0), s.read_global(0)[0])


def test_latest_global_round(tmp_path):
    s = FederationStore(tmp_path)
    assert s.latest_global_round() is None
    s.publish_global(0, _state(0))
    assert s.latest_global_round() == 0
    s.publish_global(3, _state(3))
    s.publish_global(1, _state(1))
    # an incomplete global (tensor file only) does not count
    g5 = tmp_path / "rounds" / "r000005" / "global"
    g5.mkdir(parents=True)
    (g5 / "shared.safetensors").write_bytes(b"partial")
    (tmp_path / "rounds" / ".junk.tmp.1.ab").write_text("")
    assert s.latest_global_round() == 3
    assert s.list_global_rounds() == [0, 1, 3]


def test_global_checksum_tamper_detected(tmp_path):
    s = FederationStore(tmp_path)
    path = s.publish_global(0, _state(0))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreIntegrityError, match="checksum mismatch for global of round 0"):
        s.read_global(0)


def test_global_wrong_round_detected(tmp_path):
    s = FederationStore(tmp_path)
    s.publish_global(0, _state(0))
    # copy round 0's global into round 1's slot without fixing the manifest
    src = tmp_path / "rounds" / "r000000" / "global"
    dst = tmp_path / "rounds" / "r000001" / "global"
    dst.mkdir(parents=True)
    for name in ("shared.safetensors", "manifest.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    with pytest.raises(StoreIntegrityError, match="round mismatch for global of round 1"):
        s.read_global(1)


def test_read_missing_global(tmp_path):
    s = FederationStore(tmp_path)
    with pytest.raises(StoreNotFoundError, match="global of round 4 not found"):
        s.read_global(4)


def test_wait_for_global_timeout(tmp_path):
    s = FederationStore(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(StoreTimeoutError, match="round 7"):
        s.wait_for_global(7, timeout=0.2, poll=0.05)
    assert time.monotonic() - t0 < 2.0
    # StoreTimeoutError is a StoreError and a TimeoutError
    with pytest.raises(StoreError):
        s.wait_for_global(7, timeout=0.0, poll=0.05)
    with pytest.raises(TimeoutError):
        s.wait_for_global(7, timeout=0.0, poll=0.05)


def test_wait_for_global_returns_when_present(tmp_path):
    s = FederationStore(tmp_path)
    s.publish_global(1, _state(5), meta={"x": 1})
    got, manifest = s.wait_for_global(1, timeout=1.0, poll=0.01)
    _bit_identical(_state(5), got)
    assert manifest["meta"] == {"x": 1}


# ----------------------------------------------------------------------------- updates

def test_update_round_trip_and_manifest_fields(tmp_path):
    s = FederationStore(tmp_path)
    path = _write(s, round=3, cid="site_A.gpu-1", seed=2, num_samples=123,
                  metrics={"loss": 0.5, "steps": 10, "nan": float("nan")},
                  slot_use={"layers.0": [1, 0, 2]})
    assert path == s.update_path(3, "site_A.gpu-1")
    assert path == tmp_path / "rounds" / "r000003" / "updates" / "site_A.gpu-1" / "update.safetensors"
    got, m = s.read_update(3, "site_A.gpu-1")
    _bit_identical(_state(2), got)
    assert set(m) == {"client_id", "round", "fingerprint", "num_samples", "sha256", "bytes",
                      "keys", "metrics", "slot_use", "created"}
    assert m["client_id"] == "site_A.gpu-1"
    assert m["round"] == 3
    assert m["fingerprint"] == "fp-abc"
    assert m["num_samples"] == 123
    assert m["sha256"] == sha256_file(path)
    assert m["bytes"] == path.stat().st_size
    assert m["keys"] == sorted(_state(2))
    assert m["metrics"]["loss"] == 0.5 and m["metrics"]["steps"] == 10
    assert m["metrics"]["nan"] != m["metrics"]["nan"]  # NaN survives
    assert m["slot_use"] == {"layers.0": [1, 0, 2]}
    assert "T" in m["created"]
    assert s.verify_update(3, "site_A.gpu-1") == m


def test_update_defaults(tmp_path):
    s = FederationStore(tmp_path)
    _write(s, metrics=None, slot_use=None)
    m = s.list_updates(0)[0]
    assert m["metrics"] == {} and m["slot_use"] is None


def test_update_path_is_sliceable(tmp_path):
    s = FederationStore(tmp_path)
    _write(s, cid="c1", seed=4)
    with safe_open(str(s.update_path(0, "c1")), framework="pt") as f:
        sl = f.get_slice("layers.0.shared.A")[1:3]
    assert torch.equal(sl, _state(4)["layers.0.shared.A"][1:3])


def test_list_updates_sorted_and_complete_only(tmp_path):
    s = FederationStore(tmp_path)
    assert s.list_updates(0) == []
    for cid in ["zeta", "alpha", "mid"]:
        _write(s, cid=cid)
    udir = tmp_path / "rounds" / "r000000" / "updates"
    # tensor file without manifest (crash before the manifest was written)
    (udir / "crashed").mkdir()
    (udir / "crashed" / "update.safetensors").write_bytes((udir / "alpha" / "update.safetensors").read_bytes())
    # stray temp files, in a client dir and in updates/
    (udir / "writing").mkdir()
    (udir / "writing" / ".update.safetensors.tmp.123.abcd").write_bytes(b"partial")
    (udir / "writing" / ".manifest.json.tmp.123.abcd").write_text("{")
    (udir / "alpha" / ".update.safetensors.tmp.9.ff").write_bytes(b"stale")
    (udir / ".x.tmp.1.2").write_text("")
    ids = [m["client_id"] for m in s.list_updates(0)]
    assert ids == ["alpha", "mid", "zeta"]
    with pytest.raises(StoreNotFoundError, match="update of client crashed in round 0 not found"):
        s.read_update(0, "crashed")
    # the stale temp file does not disturb reading
    s.read_update(0, "alpha")


def test_list_updates_skips_inconsistent(tmp_path):
    s = FederationStore(tmp_path)
    _write(s, cid="good")
    _write(s, cid="a")
    _write(s, cid="b")
    udir = tmp_path / "rounds" / "r000000" / "updates"
    # a: manifest copied from another client (client id mismatch)
    ma = json.loads((udir / "a" / "manifest.json").read_text())
    ma["client_id"] = "good"
    (udir / "a" / "manifest.json").write_text(json.dumps(ma))
    # b: truncated tensor file (size mismatch)
    data = (udir / "b" / "update.safetensors").read_bytes()
    (udir / "b" / "update.safetensors").write_bytes(data[:-8])
    assert [m["client_id"] for m in s.list_updates(0)] == ["good"]
    with pytest.raises(StoreIntegrityError, match="client id mismatch"):
        s.read_update(0, "a")
    with pytest.raises(StoreIntegrityError, match="size mismatch for update of client b in round 0"):
        s.read_update(0, "b")


def test_update_checksum_tamper_detected(tmp_path):
    s = FederationStore(tmp_path)
    path = _write(s, round=3, cid="X")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(StoreIntegrityError, match="checksum mismatch for update of client X in round 3"):
        s.read_update(3, "X")
    with pytest.raises(StoreIntegrityError, match="checksum mismatch for update of client X in round 3"):
        s.verify_update(3, "X")


def test_update_manifest_tamper_detected(tmp_path):
    s = FederationStore(tmp_path)
    _write(s, cid="X")
    mpath = tmp_path / "rounds" / "r000000" / "updates" / "X" / "manifest.json"
    mpath.write_text("{not json")
    with pytest.raises(StoreIntegrityError, match="corrupt manifest"):
        s.read_update(0, "X")
    m = {"client_id": "X", "round": 0}
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreIntegrityError, match="lacks field"):
        s.verify_update(0, "X")
    assert s.list_updates(0) == []


def test_update_wrong_round_detected(tmp_path):
    s = FederationStore(tmp_path)
    _write(s, round=2, cid="c")
    src = tmp_path / "rounds" / "r000002" / "updates" / "c"
    dst = tmp_path / "rounds" / "r000003" / "updates" / "c"
    dst.mkdir(parents=True)
    for name in ("update.safetensors", "manifest.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    with pytest.raises(StoreIntegrityError, match="round mismatch for update of client c in round 3"):
        s.read_update(3, "c")
    with pytest.raises(StoreIntegrityError, match="round mismatch"):
        s.verify_update(3, "c")
    assert s.list_updates(3) == []
    assert [m["client_id"] for m in s.list_updates(2)] == ["c"]


def test_update_rewrite_replaces(tmp_path):
    s = FederationStore(tmp_path)
    _write(s, cid="c", seed=1, num_samples=5)
    _write(s, cid="c", seed=2, num_samples=7)
    got, m = s.read_update(0, "c")
    _bit_identical(_state(2), got)
    assert m["num_samples"] == 7
    assert sorted(os.listdir(tmp_path / "rounds" / "r000000" / "updates" / "c")) == [
        "manifest.json", "update.safetensors"]


@pytest.mark.parametrize("bad", ["", "..", ".", "../x", "a/b", "a\\b", ".hidden", "a b", "é",
                                 "x" * 129, None, 3, "a\x00b"])
def test_bad_client_ids_refused(tmp_path, bad):
    s = FederationStore(tmp_path)
    with pytest.raises(ValueError):
        validate_client_id(bad)
    with pytest.raises(ValueError):
        _write(s, cid=bad)
    with pytest.raises(ValueError):
        s.update_path(0, bad)
    with pytest.raises(ValueError):
        s.read_update(0, bad)
    assert not (tmp_path / "rounds" / "r000000").exists()
    assert not (tmp_path / "x").exists()


def test_bad_arguments_refused(tmp_path):
    s = FederationStore(tmp_path)
    with pytest.raises(ValueError):
        _write(s, round=-1)
    with pytest.raises(ValueError):
        _write(s, round=True)
    with pytest.raises(ValueError):
        _write(s, num_samples=-3)
    with pytest.raises(ValueError):
        _write(s, fingerprint="")
    with pytest.raises(ValueError, match="not JSON serializable"):
        _write(s, metrics={"obj": object()})
    with pytest.raises(ValueError, match="not a torch.Tensor"):
        s.write_update(0, "c", {"a": [1, 2]}, fingerprint="f", num_samples=1)
    with pytest.raises(ValueError):
        s.publish_global(0, _state(0), meta={"x": object()})
    assert s.list_updates(0) == []


def test_metrics_with_tensor_scalars(tmp_path):
    s = FederationStore(tmp_path)
    _write(s, metrics={"loss": torch.tensor(1.5)})
    assert s.list_updates(0)[0]["metrics"] == {"loss": 1.5}


# ----------------------------------------------------------------------------- aggregate

def test_result_round_trip(tmp_path):
    s = FederationStore(tmp_path)
    res = {"strategy": "cmga", "clients": ["a", "b"], "blocks": {"layers.0": {"norm": 1.25}}}
    path = s.write_result(4, res)
    assert path == tmp_path / "rounds" / "r000004" / "aggregate" / "result.json"
    assert s.has_result(4)
    assert s.read_result(4) == {**res, "round": 4}
    with pytest.raises(ValueError):
        s.write_result(4, {"round": 5})
    with pytest.raises(StoreNotFoundError):
        s.read_result(5)
    # a result copied to the wrong round is detected
    s.result_path(6).parent.mkdir(parents=True)
    atomic_write_json(s.result_path(6), {"round": 4})
    with pytest.raises(StoreIntegrityError, match="round mismatch"):
        s.read_result(6)


def test_server_state_round_trip(tmp_path):
    s = FederationStore(tmp_path)
    assert s.read_server_state(0) is None
    mom = {"m.layers.0": torch.randn(5, 3).to(torch.bfloat16), "step": torch.tensor(3)}
    path = s.write_server_state(0, mom)
    assert path == tmp_path / "rounds" / "r000000" / "aggregate" / "server_state.safetensors"
    _bit_identical(mom, s.read_server_state(0))
    mom2 = {"m.layers.0": torch.zeros(5, 3, dtype=torch.bfloat16)}
    s.write_server_state(0, mom2)
    _bit_identical(mom2, s.read_server_state(0))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(StoreIntegrityError, match="checksum mismatch for server state of round 0"):
        s.read_server_state(0)


def test_two_handles_see_same_store(tmp_path):
    a = FederationStore(tmp_path)
    b = FederationStore(tmp_path, create=False)
    a.publish_global(0, _state(0))
    _write(b, cid="k")
    assert b.has_global(0)
    assert [m["client_id"] for m in a.list_updates(0)] == ["k"]


# ----------------------------------------------------------------------------- crashes, waiting

def test_crash_before_manifest_leaves_update_invisible(tmp_path, monkeypatch):
    import fedzero.store.artifact as artifact_mod  # where every manifest is written

    s = FederationStore(tmp_path)
    _write(s, cid="c", seed=1)  # a first, complete attempt

    def boom(path, obj):
        raise KeyboardInterrupt("simulated crash before the manifest")

    monkeypatch.setattr(artifact_mod, "atomic_write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        _write(s, cid="c", seed=2)  # the retry dies between tensor file and manifest
    monkeypatch.undo()
    # the half-done retry is invisible: the old manifest was removed before the new data
    assert s.list_updates(0) == []
    assert not s.has_update(0, "c")
    assert (tmp_path / "rounds" / "r000000" / "updates" / "c" / "update.safetensors").exists()
    _write(s, cid="c", seed=3)  # a later retry completes
    _bit_identical(_state(3), s.read_update(0, "c")[0])


def test_wait_for_global_sees_late_publish(tmp_path):
    import threading

    s = FederationStore(tmp_path)
    t = threading.Timer(0.2, lambda: FederationStore(tmp_path).publish_global(2, _state(2)))
    t.start()
    try:
        got, manifest = s.wait_for_global(2, timeout=10.0, poll=0.02)
    finally:
        t.join()
    assert manifest["round"] == 2
    _bit_identical(_state(2), got)
