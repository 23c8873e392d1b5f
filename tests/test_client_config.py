"""A DeepSpeed client's configuration: the ds_configs/ files completed, CLIENT.yaml, the hostfile,
its part of round 0's global, and the memory estimate that sizes it."""

from pathlib import Path

import pytest
import torch
import yaml

from fedzero.adapters.dema import DeMAConfig, inject_dema
from fedzero.client.bootstrap import initial_shared_state
from fedzero.client.client_config import load_client_config, parse_client_config
from fedzero.ds_config import complete_ds_config, read_ds_config, resolve_precision

REPO = Path(__file__).resolve().parent.parent
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


# =========================================================================== DeepSpeed configs

@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_config_files_complete(path):
    raw = read_ds_config(path)                       # plain JSON, no comments
    ds = complete_ds_config(path, batch_size=16, world_size=2, gradient_accumulation_steps=2, lr=0.01,
                            weight_decay=0.1, grad_clip=1.0, precision="auto", device_type="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["train_batch_size"] == 4 * 2 * 2 == 16
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["params"]["lr"] == 0.01 and ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["optimizer"]["params"]["torch_adam"] is True     # no Adam op to compile
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert raw == read_ds_config(path)                # the file itself is untouched
    zero = ds["zero_optimization"]
    if path.name == "zero2.json":
        assert zero["stage"] == 2
    else:
        assert zero["stage"] == 3
        offload = path.name == "zero3_offload.json"
        assert (zero.get("offload_param", {}).get("device") == "cpu") == offload
        assert (zero.get("offload_optimizer", {}).get("device") == "cpu") == offload


@pytest.mark.parametrize("bad, match", [
    ({"train_batch_size": 32}, "train_batch_size"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
    ({"bf16": {"enabled": True}}, "bf16"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "optimizer.params.lr"),
])
def test_ds_config_refuses_numbers_written_twice(bad, match):
    base = {"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
    with pytest.raises(ValueError, match=match):
        complete_ds_config({**base, **bad}, batch_size=8, world_size=1, lr=1e-3)


def test_ds_config_needs_optimizer_and_whole_micro_batches():
    with pytest.raises(ValueError, match="optimizer"):
        complete_ds_config({"zero_optimization": {"stage": 2}}, batch_size=8, world_size=1, lr=1e-3)
    with pytest.raises(ValueError, match="not divisible"):
        complete_ds_config(REPO / "ds_configs/zero3.json", batch_size=6, world_size=4, lr=1e-3)
    ds = complete_ds_config(REPO / "ds_configs/zero3.json", batch_size=8, world_size=1, lr=1e-3,
                            overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["zero_optimization"]["stage"] == 3      # overrides merge key by key


def test_precision_by_device():
    assert resolve_precision("auto", "cpu", False) == "fp32"
    assert resolve_precision("auto", "cuda", True) == "bf16"
    assert resolve_precision("auto", "cuda", False) == "fp16"
    assert resolve_precision("bf16", "cpu", False) == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu", False)


# =========================================================================== client YAML, hostfile

def test_client_example_config_loads():
    cfg = load_client_config(REPO / "configs/client_example.yaml")
    assert cfg.client.id == "airlines" and cfg.total_rounds == 4 and cfg.client.train.batch_size == 16
    assert cfg.deepspeed.config.resolve() == REPO / "ds_configs/zero3.json"
    assert cfg.deepspeed.checkpoint_every == 4
    assert cfg.state_dir.name == "airlines"
    ds = complete_ds_config(cfg.deepspeed.config, batch_size=cfg.client.train.batch_size, world_size=2,
                            lr=cfg.client.train.lr, device_type="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 8
    # The client is the same as the demo federation's client of that id.
    demo = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    assert cfg.dema.to_dict() == DeMAConfig.from_dict({"seed": demo["seed"], **demo["dema"]}).to_dict()
    example = yaml.safe_load((REPO / "configs/client_example.yaml").read_text())
    assert example["client"]["backbone"] == next(c for c in demo["clients"] if c["id"] == "airlines")["backbone"]
    assert example["train"] == demo["train"] and example["federation"]["rounds"] == demo["federation"]["rounds"]


def test_client_config_refuses_unknown_keys(tmp_path):
    data = yaml.safe_load((REPO / "configs/client_example.yaml").read_text())
    with pytest.raises(ValueError, match="unknown key"):
        parse_client_config({**data, "zero_stage": 3}, REPO / "configs")
    with pytest.raises(ValueError, match="deepspeed"):
        parse_client_config({**data, "deepspeed": {**data["deepspeed"], "micro_batch": 2}}, REPO / "configs")
    with pytest.raises(FileNotFoundError):
        parse_client_config({**data, "deepspeed": {"config": "nope.json"}}, REPO / "configs")


def test_hostfile_is_a_one_machine_example():
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(str(REPO / "hostfile"))) == {"localhost": 2}


@pytest.mark.parametrize("share", ["experts-only", "shape-matched"])
def test_initial_shared_state_is_what_the_client_builds(share):
    from fedzero.backbones import load_backbone

    data = yaml.safe_load((REPO / "configs/client_example.yaml").read_text())
    data["dema"] = {**data["dema"], "share": share}
    cfg = parse_client_config(data, REPO / "configs")
    expected = inject_dema(load_backbone(cfg.client.backbone)[0], cfg.dema).shared_state_dict()
    got = initial_shared_state(cfg)                   # built on a meta-device backbone
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert any(k.startswith("proj.h96.") for k in got) == (share == "shape-matched")



# =========================================================================== memory estimate

@pytest.mark.parametrize("name, params", [("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320),
                                          ("llama-2-70b", 68_976_648_192)])
def test_memory_estimate(name, params):
    from fedzero.comm import dema_shared_params
    from fedzero.memory import estimate, load_model_config

    cfg = load_model_config(REPO / f"configs/models/{name}.json")
    est = estimate(cfg, gpus_per_node=8, nodes=2)
    assert est["params"] == params
    assert est["dema_shared"] == dema_shared_params(DeMAConfig(), cfg["hidden_size"]) and est["dema_private"] == 0
    private = estimate(cfg, gpus_per_node=8, nodes=2, dema=DeMAConfig(share="experts-only"))
    assert private["dema_shared"] == dema_shared_params(DeMAConfig(share="experts-only"))
    assert private["dema_private"] == 2 * cfg["num_hidden_layers"] * cfg["hidden_size"] * 64
    full, lora, dema = est["lines"]
    # Full fine-tuning without offload: DeepSpeed's 18 bytes per parameter over 16 GPUs + 4 bytes per
    # parameter of the gathered largest layer.
    assert full["zero3_gpu"] == 4 * est["largest_layer"] + 18 * params // 16
    assert dema["zero3_gpu"] < full["zero3_gpu"] / 4
    assert dema["offload_gpu"] < dema["zero3_gpu"] and dema["offload_cpu"] < full["offload_cpu"] / 4
    acts = list(est["activations"].values())
    assert acts[0] > acts[1] > acts[2] > 0           # all layers > checkpointed > side placement


def test_memory_estimate_cli(capsys):
    from fedzero.cli import main

    assert main(["memory-estimate", "--model-config", str(REPO / "configs/models/llama-2-13b.json"),
                 "--gpus", "4", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "llama-2-13b: 13.02B parameters" in out and "full fine-tuning" in out and "DeMA r=64" in out
