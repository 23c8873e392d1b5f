"""Tests for the store's shared pieces: layout (every path), manifest (one parser, one validator),
artifact (tensors first, manifest last; read and verify) and the polled global wait."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedzero.store import FederationStore, StoreIntegrityError, StoreNotFoundError, StoreTimeoutError
from fedzero.store.artifact import (publish_artifact, read_artifact, read_artifact_if_present, remove_artifact,
                                    verify_artifact, write_artifact)
from fedzero.store.layout import ArtifactFiles, StoreLayout, round_of_dirname
from fedzero.store.manifest import (GlobalManifest, PredictionsManifest, ServerStateManifest, UpdateManifest,
                                    load_manifest, parse_manifest)

SHA = "ab" * 32


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16)}


# ----------------------------------------------------------------------------- layout

def test_layout_paths_are_the_documented_ones(tmp_path):
    lay = StoreLayout(tmp_path)
    r = tmp_path / "rounds" / "r000003"
    assert lay.marker == tmp_path / "store.json"
    assert lay.round_dir(3) == r
    assert lay.global_files(3) == ArtifactFiles(r / "global" / "shared.safetensors", r / "global" / "manifest.json")
    assert lay.teachers_files(3) == ArtifactFiles(r / "global" / "teachers.safetensors",
                                                  r / "global" / "teachers.manifest.json")
    assert lay.update_files(3, "c-1") == ArtifactFiles(r / "updates" / "c-1" / "update.safetensors",
                                                       r / "updates" / "c-1" / "manifest.json")
    assert lay.predictions_files(3, "c-1") == ArtifactFiles(
        r / "updates" / "c-1" / "anchor_predictions.safetensors",
        r / "updates" / "c-1" / "anchor_predictions.manifest.json")
    assert lay.result_path(3) == r / "aggregate" / "result.json"
    assert lay.server_state_files(3) == ArtifactFiles(r / "aggregate" / "server_state.safetensors",
                                                      r / "aggregate" / "server_state.manifest.json")
    assert lay.round_dir(1234567).name == "r1234567"


def test_layout_refuses_bad_rounds_and_client_ids_before_forming_a_path(tmp_path):
    lay = StoreLayout(tmp_path)
    for bad in ("..", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            lay.update_files(0, bad)
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="round must be"):
            lay.round_dir(bad)


def test_round_of_dirname_accepts_only_the_names_the_store_writes():
    assert round_of_dirname("r000003") == 3 and round_of_dirname("r1234567") == 1234567
    for other in ("r0000003", "r12", "x000001", ".r000001.tmp.1.ab", "r000001x"):
        assert round_of_dirname(other) is None


def test_every_file_the_store_writes_lies_where_the_layout_says(tmp_path):
    store = FederationStore(tmp_path)
    lay = store.layout
    store.publish_global(0, _tensors(0))
    store.write_anchor_predictions(0, "c", torch.full((2, 3), 1 / 3), quality=0.5)
    store.write_update(0, "c", _tensors(1), fingerprint="fp", num_samples=1)
    store.write_teachers(1, {"*": torch.full((2, 3), 1 / 3)})
    store.write_server_state(0, _tensors(2))
    store.write_result(0, {"strategy": "fedavg"})
    expected = {lay.marker, lay.result_path(0)}
    for files in (lay.global_files(0), lay.update_files(0, "c"), lay.predictions_files(0, "c"),
                  lay.teachers_files(1), lay.server_state_files(0)):
        expected |= {files.tensors, files.manifest}
    assert {p for p in tmp_path.rglob("*") if p.is_file()} == expected
    assert store.global_path(0) == lay.global_files(0).tensors
    assert store.update_path(0, "c") == lay.update_files(0, "c").tensors
    assert store.server_state_path(0) == lay.server_state_files(0).tensors
    assert store.result_path(0) == lay.result_path(0) and store.round_dir(0) == lay.round_dir(0)


# ----------------------------------------------------------------------------- manifest

def _update_dict(**changes) -> dict:
    data = {"round": 2, "client_id": "c", "sha256": SHA, "bytes": 10, "keys": ["a", "b"], "fingerprint": "fp",
            "num_samples": 4, "metrics": {"loss": 1.5}, "slot_use": None, "created": "2024-01-01T00:00:00+00:00"}
    return {**data, **changes}


def test_manifest_round_trip_keeps_every_field_and_unknown_ones():
    data = _update_dict(future_field={"x": 1})
    m = parse_manifest(UpdateManifest, data, round=2, client_id="c", what="update", path=Path("m.json"))
    assert isinstance(m, UpdateManifest)
    assert (m.client_id, m.num_samples, m.slot_use, m.keys) == ("c", 4, None, ["a", "b"])
    assert m.to_dict() == data
    again = parse_manifest(UpdateManifest, json.loads(json.dumps(m.to_dict())), round=2, client_id="c",
                           what="update", path=Path("m.json"))
    assert again == m


def test_optional_fields_are_not_written_when_absent():
    p = PredictionsManifest(round=0, sha256=SHA, bytes=1, keys=["probs"])
    assert "quality" not in p.to_dict() and "created" not in p.to_dict()
    back = parse_manifest(PredictionsManifest, p.to_dict(), round=0, what="predictions", path=Path("m"))
    assert back.quality is None
    s = ServerStateManifest(round=1, sha256=SHA, bytes=0, keys=[], created="t")
    assert s.to_dict() == {"round": 1, "sha256": SHA, "bytes": 0, "keys": [], "created": "t"}


@pytest.mark.parametrize("kind, changes, message", [
    (UpdateManifest, {"num_samples": None}, "manifest field 'num_samples' has bad type NoneType"),
    (UpdateManifest, {"num_samples": True}, "manifest field 'num_samples' has bad type bool"),
    (UpdateManifest, {"num_samples": -1}, "manifest field 'num_samples' is negative"),
    (UpdateManifest, {"bytes": -1}, "manifest field 'bytes' is negative"),
    (UpdateManifest, {"sha256": "xyz"}, "manifest field 'sha256' is not a hex sha256"),
    (UpdateManifest, {"keys": ["a", 3]}, "manifest field 'keys' must be a list of str"),
    (UpdateManifest, {"metrics": []}, "manifest field 'metrics' has bad type list"),
    (UpdateManifest, {"round": 3}, "round mismatch for update: manifest m.json says round 3"),
    (UpdateManifest, {"client_id": "d"}, "client id mismatch for update: manifest m.json says client 'd'"),
    (GlobalManifest, {"meta": [1]}, "manifest field 'meta' has bad type list"),
    (PredictionsManifest, {"quality": -1.0}, "manifest field 'quality' must be a finite number >= 0"),
    (PredictionsManifest, {"quality": True}, "manifest field 'quality' must be a finite number >= 0"),
])
def test_a_bad_manifest_is_refused_naming_the_field(kind, changes, message):
    data = {**_update_dict(meta={}), **changes}
    with pytest.raises(StoreIntegrityError, match=message.replace("(", r"\(")):
        parse_manifest(kind, data, round=2, client_id="c", what="update", path=Path("m.json"))


@pytest.mark.parametrize("field", ["round", "sha256", "bytes", "keys", "client_id", "fingerprint", "num_samples",
                                   "metrics", "slot_use", "created"])
def test_a_manifest_missing_a_required_field_is_refused_naming_it(field):
    data = _update_dict()
    del data[field]
    with pytest.raises(StoreIntegrityError, match=rf"update \(m.json\): manifest lacks field '{field}'"):
        parse_manifest(UpdateManifest, data, round=2, client_id="c", what="update", path=Path("m.json"))


def test_load_manifest_tells_missing_from_corrupt(tmp_path):
    path = tmp_path / "manifest.json"
    with pytest.raises(StoreNotFoundError, match="global of round 0 not found: no manifest at"):
        load_manifest(GlobalManifest, path, round=0, what="global of round 0")
    for text in ("{not json", "[1, 2]"):
        path.write_text(text)
        with pytest.raises(StoreIntegrityError, match="corrupt manifest"):
            load_manifest(GlobalManifest, path, round=0, what="global of round 0")


# ----------------------------------------------------------------------------- artifact

def _files(tmp_path) -> ArtifactFiles:
    return ArtifactFiles(tmp_path / "x" / "t.safetensors", tmp_path / "x" / "t.manifest.json")


def test_artifact_round_trip_and_tampering_detected(tmp_path):
    files = _files(tmp_path)
    write_artifact(files, _tensors(0), ServerStateManifest, round=5)
    tensors, manifest = read_artifact(files, ServerStateManifest, round=5, what="thing")
    assert manifest.keys == ["a", "b"] and manifest.bytes == files.tensors.stat().st_size
    for k, t in _tensors(0).items():
        assert torch.equal(tensors[k], t)
    assert verify_artifact(files, ServerStateManifest, round=5, what="thing") == manifest

    good = files.tensors.read_bytes()
    files.tensors.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))          # same size, other bytes
    for check in (read_artifact, verify_artifact):
        with pytest.raises(StoreIntegrityError, match="checksum mismatch for thing: manifest says sha256"):
            check(files, ServerStateManifest, round=5, what="thing")
    files.tensors.write_bytes(good[:-1])
    with pytest.raises(StoreIntegrityError, match=f"size mismatch for thing: manifest says {len(good)} bytes"):
        read_artifact(files, ServerStateManifest, round=5, what="thing")
    files.tensors.unlink()
    with pytest.raises(StoreIntegrityError, match="manifest present but tensor file .* is missing"):
        verify_artifact(files, ServerStateManifest, round=5, what="thing")
    with pytest.raises(StoreIntegrityError, match="round mismatch"):
        read_artifact(files, ServerStateManifest, round=6, what="thing")


def test_artifact_keys_must_match_the_manifest(tmp_path):
    files = _files(tmp_path)
    write_artifact(files, _tensors(0), ServerStateManifest, round=0)
    data = json.loads(files.manifest.read_text())
    files.manifest.write_text(json.dumps({**data, "keys": ["a"]}))
    with pytest.raises(StoreIntegrityError, match=r"key mismatch for thing: file .* holds \['a', 'b'\]"):
        read_artifact(files, ServerStateManifest, round=0, what="thing")


def test_artifact_absent_removed_and_write_once(tmp_path):
    files = _files(tmp_path)
    assert read_artifact_if_present(files, ServerStateManifest, round=0, what="thing") is None
    publish_artifact(files, _tensors(0), GlobalManifest, what="thing", round=0, meta={"v": 1})
    publish_artifact(files, _tensors(0), GlobalManifest, what="thing", round=0, meta={"v": 2})   # identical: no-op
    assert load_manifest(GlobalManifest, files.manifest, round=0, what="thing").meta == {"v": 1}
    with pytest.raises(Exception, match="refusing to overwrite thing"):
        publish_artifact(files, _tensors(1), GlobalManifest, what="thing", round=0, meta={})
    remove_artifact(files)
    assert not files.manifest.exists() and not files.tensors.exists()


# ----------------------------------------------------------------------------- the polled wait

def test_global_wait_polls_times_out_and_retries_integrity_failures(tmp_path):
    store = FederationStore(tmp_path)
    wait = store.global_wait(0, timeout=None)
    assert wait.poll() is None and wait.seconds_left() is None
    store.publish_global(0, _tensors(0))
    tensors, manifest = wait.poll()
    assert manifest["round"] == 0 and sorted(tensors) == ["a", "b"]

    with pytest.raises(StoreTimeoutError, match="waiting for the global of round 1"):
        store.global_wait(1, timeout=0).poll()

    good = store.global_path(0).read_bytes()
    store.global_path(0).write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    lagging = store.global_wait(0, timeout=None)
    assert lagging.poll() is None and lagging.poll() is None                 # maybe a lagging file system
    with pytest.raises(StoreIntegrityError, match="checksum mismatch for global of round 0"):
        lagging.poll()


# ----------------------------------------------------------------------------- the aggregator reads through them

def test_the_aggregator_refuses_a_bad_global_manifest_naming_the_field(tmp_path):
    from test_aggregator import build_store, quiet, strategy_for

    from fedzero.aggregator import AggregationError, run_aggregation

    store = build_store(tmp_path / "store", rounds=1)
    mpath = store.layout.global_files(0).manifest
    mpath.write_text(json.dumps({**json.loads(mpath.read_text()), "sha256": "not-a-digest"}))
    with pytest.raises(AggregationError, match="manifest field 'sha256' is not a hex sha256"):
        run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet)
