"""A DeepSpeed client's own state directory (layout, private state files, checkpoint info), its
private DeMA state I/O, and its start-up helpers. No process group is started here."""

import json
import socket

import pytest
import torch

from fedzero.adapters.dema import DeMAConfig, inject_dema
from fedzero.adapters.dema.io import read_part
from fedzero.adapters.dema.zero import read_private, save_private
from fedzero.client.distributed import free_port, launcher_rank
from fedzero.client.state import (latest_private_before, mark_checkpoint_complete, prune_private,
                                  read_checkpoint_info, remove_checkpoints, round_is_done)
from fedzero.client.state_layout import ClientStateLayout, round_of_private, step_of_tag, step_tag
from fedzero.store import FederationStore


# =========================================================================== layout

def test_state_layout_paths(tmp_path):
    layout = ClientStateLayout(tmp_path)
    assert layout.private_path(3) == tmp_path / "private" / "r000003.safetensors"
    assert layout.private_path(1234567) == tmp_path / "private" / "r1234567.safetensors"
    assert layout.checkpoint_dir(4) == tmp_path / "checkpoints" / "r000004"
    assert layout.checkpoint_tag_dir(4, 2) == tmp_path / "checkpoints" / "r000004" / "step000002"
    assert layout.checkpoint_info(4) == tmp_path / "checkpoints" / "r000004" / "fedzero.json"
    assert ClientStateLayout(str(tmp_path)).root == tmp_path          # a str root is a Path
    with pytest.raises(ValueError):
        layout.private_path(-1)
    with pytest.raises(ValueError):
        step_tag(-1)


def test_state_layout_names_parse_back():
    for rnd in (0, 3, 999999, 1234567):
        assert round_of_private(ClientStateLayout("/s").private_path(rnd).name) == rnd
    for step in (0, 2, 1234567):
        assert step_of_tag(step_tag(step)) == step
    # Only names the layout writes: other padding, other suffixes, temp files are not state.
    for name in ("r0000003.safetensors", "r3.safetensors", "r000003.safetensors.tmp", "r000003.json", "x.safetensors"):
        assert round_of_private(name) is None
    for name in ("step0000002", "step2", "global_step2", "step000002.tmp"):
        assert step_of_tag(name) is None


# =========================================================================== private state files

def test_private_state_files_are_chosen_by_round(tmp_path):
    assert latest_private_before(tmp_path, 3) is None
    (tmp_path / "private").mkdir()
    for r in (0, 1, 4):
        (tmp_path / "private" / f"r{r:06d}.safetensors").write_bytes(b"")
    assert latest_private_before(tmp_path, 0) is None
    assert latest_private_before(tmp_path, 2)[0] == 1      # a rerun of round 2 starts from round 1's state
    assert latest_private_before(tmp_path, 4)[0] == 1      # never from the round being (re)trained
    assert latest_private_before(tmp_path, 9)[0] == 4


def test_a_completed_or_closed_round_is_not_trained_again(tmp_path):
    store = FederationStore(tmp_path / "store")
    state = tmp_path / "state"
    zero = {"w": torch.zeros(2)}
    store.publish_global(0, zero)
    assert not round_is_done(store, "c1", state, 0)
    store.write_update(0, "c1", zero, fingerprint="f", num_samples=1)
    assert not round_is_done(store, "c1", state, 0)        # crashed between upload and private save: redo
    (state / "private").mkdir(parents=True)
    (state / "private" / "r000000.safetensors").write_bytes(b"")
    assert round_is_done(store, "c1", state, 0)
    assert not round_is_done(store, "c2", state, 0)
    store.publish_global(1, zero)
    assert round_is_done(store, "c2", state, 0)            # closed: an update would change nothing
    (state / "private" / "r000000.safetensors").rename(state / "private" / "r000003.safetensors")
    assert round_is_done(store, "c1", state, 0) and not round_is_done(store, "c1", state, 1)


def test_prune_private_keeps_the_last_two_rounds(tmp_path):
    prune_private(tmp_path, 5)                             # no private/ yet: nothing to do
    layout = ClientStateLayout(tmp_path)
    layout.private_dir.mkdir()
    for r in range(6):
        layout.private_path(r).write_bytes(b"")
    (layout.private_dir / "notes.txt").write_text("not state")
    prune_private(tmp_path, 5)
    assert sorted(p.name for p in layout.private_dir.iterdir()) == ["notes.txt", "r000004.safetensors",
                                                                     "r000005.safetensors"]


def test_private_state_round_trip(tmp_path):
    from conftest import tiny_llama

    handle = inject_dema(tiny_llama(), DeMAConfig(rank=4, num_experts=2, num_slots=2, share="experts-only"))
    values = {k: torch.randn(v.shape) for k, v in handle.private_state_dict().items()}
    path = save_private(handle, values, ClientStateLayout(tmp_path).private_path(0), fingerprint="fp")
    got = read_private(handle, path, fingerprint="fp")
    assert sorted(got) == sorted(values) and all(torch.equal(got[k], values[k]) for k in values)
    _, header = read_part(path)                            # the header describes the handle, not the values
    assert header["part"] == "private" and header["fingerprint"] == "fp"
    assert header["hidden_size"] == handle.hidden_size and header["num_layers"] == handle.num_layers
    with pytest.raises(ValueError, match="backbone"):
        read_private(handle, path, fingerprint="other")


# =========================================================================== checkpoint info

def test_checkpoint_info_marks_one_complete_tag(tmp_path):
    layout = ClientStateLayout(tmp_path)
    assert read_checkpoint_info(tmp_path, 4) is None
    for step in (2, 4):
        layout.checkpoint_tag_dir(4, step).mkdir(parents=True)
    mark_checkpoint_complete(tmp_path, 4, 4, global_sha256="abc", losses=[1.5, 1.25])
    assert read_checkpoint_info(tmp_path, 4) == {"round": 4, "step": 4, "tag": "step000004",
                                                 "global_sha256": "abc", "losses": [1.5, 1.25]}
    assert sorted(p.name for p in layout.checkpoint_dir(4).iterdir()) == ["fedzero.json", "step000004"]
    assert json.loads(layout.checkpoint_info(4).read_text())["tag"] == "step000004"
    remove_checkpoints(tmp_path, 4)
    assert not layout.checkpoint_dir(4).exists() and read_checkpoint_info(tmp_path, 4) is None
    remove_checkpoints(tmp_path, 4)                        # already gone: fine


# =========================================================================== start-up helpers

def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("env, rank", [({}, 0), ({"RANK": "3"}, 3), ({"PMI_RANK": "2"}, 2),
                                       ({"OMPI_COMM_WORLD_RANK": "5"}, 5), ({"RANK": "1", "PMI_RANK": "2"}, 1)])
def test_launcher_rank(monkeypatch, env, rank):
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launcher_rank() == rank


def test_launch_script_passes_the_step_hook_to_the_client(monkeypatch, tmp_path):
    """launch/client.py's main(after_step=...) hands the hook to run_client (tests/hooked_client.py
    relies on it to kill a real client mid-round)."""
    import fedzero.client.deepspeed_client as ds_client
    from hooked_client import REPO, load_launcher

    calls = []
    monkeypatch.setattr(ds_client, "run_client", lambda cfg, store, first, rounds, **kw: calls.append((first, rounds, kw)))

    def hook(rnd, step):
        pass

    main = load_launcher().main
    config = str(REPO / "configs/client_example.yaml")
    assert main(["--config", config, "--store", str(tmp_path), "--round", "1", "--serve", "--rounds", "2"],
                after_step=hook) == 0
    assert main(["--config", config, "--store", str(tmp_path), "--round", "0"]) == 0
    assert calls == [(1, 2, {"after_step": hook}), (0, 1, {"after_step": None})]
