"""DeepSpeed clients: config completion, client YAML, memory estimate, and real launches (CPU, gloo)
whose uploaded update must equal the single-process LocalClient's.

The `slow` tests start real process groups (the deepspeed launcher with the top-level hostfile,
torchrun, plain python). They need DeepSpeed's shared-memory comm op built once (cached under
TORCH_EXTENSIONS_DIR; the `ds_ops` fixture builds it, ~1-3 min cold). Tolerance of the
comparison: 1e-6 absolute on deltas of size ~1e-2 (fp32; measured differences are ~1e-7 and come
from summation order in ZeRO's flattened, partitioned buffers and the all-reduce).
"""

import inspect
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedzero.adapters.dema import DeMAConfig, inject_dema
from fedzero.adapters.dema.io import read_part
from fedzero.client.deepspeed_client import (CRASH_ENV, CRASH_EXIT_CODE, initial_shared_state,
                                             latest_private_before, load_client_config, parse_client_config,
                                             round_is_done)
from fedzero.ds_config import complete_ds_config, read_ds_config, resolve_precision
from fedzero.store import FederationStore


REPO = Path(__file__).resolve().parent.parent
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
TOL = 1e-6


# =========================================================================== DeepSpeed configs

def test_every_ds_config_file_is_launched_by_a_test():
    """Each file in ds_configs/ runs a real client in one of this module's launch tests (the `slow`
    ones), and every config file those tests name exists: a new config without a launch test fails."""
    launch_tests = [f for name, f in globals().items() if name.startswith("test_") and callable(f)
                    and any(m.name == "slow" for m in getattr(f, "pytestmark", []))]
    named = set()
    for test in launch_tests:
        source = inspect.getsource(test)
        marks = "".join(repr(m.args) for m in test.pytestmark)     # parametrize lists live in the marks
        named |= set(re.findall(r"\b(\w+\.json)\b", source + marks)) - {"fedzero.json"}
    assert len(launch_tests) >= 4
    assert named == {p.name for p in DS_CONFIGS}


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


# =========================================================================== real launches (slow)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT", CRASH_ENV)}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _shm_files() -> set:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("deepspeed")}
    except FileNotFoundError:
        return set()


@pytest.fixture(scope="session")
def ds_ops():
    """Build (or find cached) DeepSpeed's CPU shared-memory comm op once, before any launch: every
    CPU init_distributed loads it (~1-3 min to compile cold; CI caches TORCH_EXTENSIONS_DIR)."""
    code = ("from deepspeed.accelerator import get_accelerator; "
            "get_accelerator().create_op_builder('ShareMemCommBuilder').load()")
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, capture_output=True, timeout=900)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny LLaMA saved as a *sharded* HF safetensors directory, and 48 real prompt/completion records."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("dsclient")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         initializer_range=0.1))
    model.save_pretrained(root / "backbone", max_shard_size="200KB")
    assert (root / "backbone" / "model.safetensors.index.json").is_file()
    lines = (REPO / "fedzero/resources/demo/airlines.train.jsonl").read_text().splitlines()[:48]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "test.jsonl").write_text("\n".join(lines[:8]) + "\n")
    return root


DISTILL = {"labels": ["negative", "neutral", "positive"], "template": "Tweet: {text}\nSentiment:", "anchors": 8,
           "batch_size": 2, "weight": 2.0, "max_chars": 60}


def _client_yaml(workspace, name, *, ds_config, overrides=None, accumulation=1, checkpoint_every=0,
                 distill=False, backbone="backbone", **dema) -> Path:
    folder = workspace / name
    folder.mkdir()
    data = {
        "seed": 0, "dema": {"rank": 8, "num_experts": 2, "num_slots": 2, "num_anchors": 16, **dema},
        "federation": {"rounds": 2},
        "train": {"local_steps": 4, "batch_size": 4, "lr": 0.01, "max_length": 96, "schedule": "cosine"},
        "client": {"id": "c1", "backbone": {"path": f"../{backbone}", "tokenizer": "byte"},
                   "data": {"train": "../train.jsonl", "test": "../test.jsonl"}},
        "deepspeed": {"config": str(REPO / "ds_configs" / ds_config), "overrides": overrides or {},
                      "gradient_accumulation_steps": accumulation, "checkpoint_every": checkpoint_every},
        "state_dir": "state", "wait": {"timeout": 60, "poll": 0.2},
    }
    if distill:     # True: DISTILL; a dict: DISTILL with these changes
        data["distill"] = {**DISTILL, **(distill if isinstance(distill, dict) else {})}
    path = folder / "client.yaml"
    path.write_text(yaml.safe_dump(data))
    store = FederationStore(folder / "store")
    if distill:     # a teacher already in round 0 (a real federation has its first one in round 1)
        teacher = torch.softmax(torch.randn(8, 3, generator=torch.Generator().manual_seed(1)), dim=1)
        store.write_teachers(0, {"c1": teacher})
    store.publish_global(0, initial_shared_state(load_client_config(path)))
    return path


def _reference(config_path: Path, rounds: int) -> list[dict]:
    """LocalClient (single process, no DeepSpeed) on the same backbone, data, seed and schedule, for
    rounds 0..rounds-1, where round r+1's global = round r's global + the reference delta (a
    one-client FedAvg). Publishes only round 0; `_publish_next` plays the aggregator."""
    from fedzero.backbones import load_backbone
    from fedzero.client import LocalClient
    from fedzero.client.local import mean_token_loss
    from fedzero.data import build_examples, load_tokenizer, read_jsonl

    cfg = load_client_config(config_path)
    store = FederationStore(config_path.parent / "store", create=False)
    model, fp = load_backbone(cfg.client.backbone)
    tok = load_tokenizer("byte")
    handle = inject_dema(model, cfg.dema, tokenizer=tok)
    examples = build_examples(read_jsonl(cfg.client.train_data), tok, cfg.client.train.max_length)
    distiller = (cfg.distill.make_distiller(tok, max_length=cfg.client.train.max_length, seed=cfg.seed)
                 if cfg.distill is not None else None)
    client = LocalClient("c1", handle, fp, examples, examples[:2], cfg.client.train, pad_id=tok.pad_token_id,
                         seed=cfg.seed, total_rounds=cfg.total_rounds, distiller=distiller)
    held_out = build_examples(read_jsonl(cfg.client.test_data), tok, cfg.client.train.max_length)   # 8 records
    out = []
    g, _ = store.read_global(0)
    for rnd in range(rounds):
        if distiller is not None:
            teacher = store.read_teacher(rnd, "c1")
            distiller.set_teacher(None if teacher is None else teacher.numpy())
        delta, metrics = client.train_round(g)
        out.append({"global": g, "delta": delta, "fingerprint": fp, "private": handle.private_state_dict(),
                    "slot_use": handle.slot_use(), **metrics,
                    "predictions": distiller.predict(model) if distiller is not None else None,
                    "quality": mean_token_loss(model, held_out, batch_size=cfg.client.train.eval_batch_size,
                                               pad_id=tok.pad_token_id)
                    if distiller is not None and distiller.reports_quality else None})
        g = {k: g[k] + delta[k] for k in g}
    return out


def _publish_next(config_path: Path, refs: list[dict], rnd: int) -> None:
    """The aggregator's part: once round rnd is over, publish round rnd+1's global (as the reference had it)."""
    nxt = {k: refs[rnd]["global"][k] + refs[rnd]["delta"][k] for k in refs[rnd]["delta"]}
    FederationStore(config_path.parent / "store", create=False).publish_global(rnd + 1, nxt)


def _check_update(config_path: Path, rnd: int, ref: dict, world: int, stage: int) -> dict:
    store = FederationStore(config_path.parent / "store", create=False)
    update, manifest = store.read_update(rnd, "c1")
    assert sorted(update) == sorted(ref["delta"])                  # exactly the shared tensors
    assert all(update[k].dtype == torch.float32 for k in update)
    worst = max(float((update[k] - ref["delta"][k]).abs().max()) for k in update)
    assert worst < TOL, f"round {rnd}: update differs from LocalClient's by {worst:.2e}"
    assert max(float(ref["delta"][k].abs().max()) for k in update) > 1e-3    # and it is not trivially zero
    assert manifest["fingerprint"] == ref["fingerprint"] and manifest["num_samples"] == 48
    assert manifest["slot_use"] == ref["slot_use"]
    m = manifest["metrics"]
    assert abs(m["train_loss"] - ref["train_loss"]) < 1e-5
    assert m["world_size"] == world and m["zero_stage"] == stage and m["precision"] == "fp32"
    private, _ = read_part(config_path.parent / "state" / "private" / f"r{rnd:06d}.safetensors")
    assert sorted(private) == sorted(ref["private"])
    assert all(float((private[k] - ref["private"][k]).abs().max()) < TOL for k in private)
    sent, quality = store.read_anchor_predictions_with_quality(rnd, "c1") or (None, None)
    assert (sent is None) == (ref["predictions"] is None)
    assert (quality is None) == (ref["quality"] is None)
    if quality is not None:     # the held-out loss of the model that made the predictions
        assert abs(quality - ref["quality"]) < 1e-5, f"round {rnd}: quality {quality} vs LocalClient's {ref['quality']}"
    if sent is not None:
        assert sent.dtype == torch.float32 and sent.shape == (8, 3)
        gap = float((sent.double() - torch.as_tensor(ref["predictions"])).abs().max())
        assert gap < 10 * TOL, f"round {rnd}: anchor predictions differ from LocalClient's by {gap:.2e}"
    return manifest


def _run(cmd, env, timeout=240):
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


DEEPSPEED = [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", "hostfile", "--no_ssh", "--node_rank", "0",
             "--master_addr", "127.0.0.1"]


@pytest.mark.slow
def test_deepspeed_launcher_two_processes_zero3_serve_and_resume(workspace, ds_ops):
    """The real `deepspeed` launcher with the repo's hostfile (2 processes), ZeRO-3 with every parameter
    partitioned (persistence threshold 0), killed after step 3 of round 0 with a checkpoint at step 2,
    then restarted in --serve mode for rounds 0 and 1: both updates equal LocalClient's."""
    path = _client_yaml(workspace, "z3", ds_config="zero3.json", checkpoint_every=2,
                        overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    refs = _reference(path, rounds=2)
    shm_before = _shm_files()
    args = ["launch/client.py", "--config", str(path), "--store", str(path.parent / "store"), "--round", "0"]

    rc, out = _run(DEEPSPEED + ["--master_port", str(_free_port())] + args + ["--serve"], _env(**{CRASH_ENV: "3"}))
    assert rc == CRASH_EXIT_CODE, out[-3000:]
    store = FederationStore(path.parent / "store", create=False)
    assert not store.has_update(0, "c1")                          # nothing half-written is visible
    ckpt = path.parent / "state" / "checkpoints" / "r000000"
    assert json.loads((ckpt / "fedzero.json").read_text())["step"] == 2
    assert sorted(p.name for p in (ckpt / "step000002").iterdir()) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    # Restarted with the same command. The serving process waits for round 1's global, which this
    # test publishes (as the aggregator would) only once round 0's update is in the store.
    serve = subprocess.Popen(DEEPSPEED + ["--master_port", str(_free_port())] + args + ["--serve"], cwd=REPO,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 200
        while not store.has_update(0, "c1") and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if store.has_update(0, "c1"):
            _publish_next(path, refs, 0)
        out, _ = serve.communicate(timeout=200)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, out[-3000:]
    assert "resuming round 0 at step 2" in out
    assert "ZeRO-3 fp32 on 2 cpu process(es)" in out and "(partitioned)" in out
    assert _check_update(path, 0, refs[0], world=2, stage=3)["metrics"]["resumed_at_step"] == 2
    assert _check_update(path, 1, refs[1], world=2, stage=3)["metrics"]["resumed_at_step"] == 0
    assert not ckpt.exists()                                      # a finished round leaves no checkpoint
    assert _shm_files() <= shm_before                             # /dev/shm stays clean


@pytest.mark.slow
@pytest.mark.parametrize("ds_config, dema", [
    ("zero2.json", {"share": "shape-matched"}),
    ("zero3.json", {"projector": "anchor+learned", "anchor_out": True}),
], ids=["zero2-shape-matched", "zero3-anchor+learned"])
def test_torchrun_two_processes_with_accumulation(workspace, ds_ops, ds_config, dema):
    """torchrun, 2 processes, 2 accumulation steps (batch 4 = micro 1 x 2 processes x 2). ZeRO-2 with
    shape-matched projector sharing (the projector bank travels); ZeRO-3 with anchor projectors, whose
    anchors are computed on the partitioned backbone (temporary ZeRO inference hooks), fine-tuned at a
    scaled learning rate with the anchor penalty (external parameters of a penalty module). Both
    distil from a teacher on the anchor prompts and send their anchor predictions."""
    stage = 2 if ds_config == "zero2.json" else 3
    path = _client_yaml(workspace, f"tr{stage}", ds_config=ds_config, accumulation=2, distill=True,
                        overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else None,
                        **dema)
    ref = _reference(path, rounds=1)[0]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    rc, out = _run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "launch/client.py",
                    "--config", str(path), "--store", str(path.parent / "store"), "--round", "0"], _env())
    assert rc == 0, out[-3000:]
    assert "batch 4 = micro 1 x 2 processes x 2 accumulation steps" in out
    update = _check_update(path, 0, ref, world=2, stage=stage)
    assert any(k.startswith("proj.h64.") for k in update["keys"]) == (dema.get("share") == "shape-matched")


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_torchrun_two_processes_send_their_quality_with_the_predictions(workspace, ds_ops, ds_config):
    """distill.teacher 'quality': the client sends, with its anchor predictions, its mean loss on its
    held-out examples (data.test), measured on the trained model under ZeRO-2 (rank 0) or ZeRO-3 (every
    rank: the forward is collective): equal to LocalClient's, as are the update and the predictions."""
    stage = 2 if ds_config == "zero2.json" else 3
    path = _client_yaml(workspace, f"q{stage}", ds_config=ds_config, distill={"teacher": "quality"},
                        overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else None)
    ref = _reference(path, rounds=1)[0]
    assert ref["quality"] is not None
    torchrun = str(Path(sys.executable).parent / "torchrun")
    rc, out = _run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "launch/client.py",
                    "--config", str(path), "--store", str(path.parent / "store"), "--round", "0"], _env())
    assert rc == 0, out[-3000:]
    _check_update(path, 0, ref, world=2, stage=stage)


@pytest.mark.slow
def test_plain_python_one_process_zero3_offload_side_placement(workspace, ds_ops):
    """One process started as plain `python` (no launcher), ZeRO-3 with parameters and optimizer
    offloaded to CPU, DeMA side placement; round 1 runs as a separate invocation that must pick up
    the private state saved after round 0."""
    path = _client_yaml(workspace, "z3off", ds_config="zero3_offload.json", placement="side")
    refs = _reference(path, rounds=2)
    for rnd in (0, 1):
        rc, out = _run([sys.executable, "launch/client.py", "--config", str(path), "--store",
                        str(path.parent / "store"), "--round", str(rnd)], _env())
        assert rc == 0, out[-3000:]
        _check_update(path, rnd, refs[rnd], world=1, stage=3)
        if rnd == 0:
            _publish_next(path, refs, 0)


FAMILIES = {
    "gpt_neox": {"hidden_size": 64, "num_attention_heads": 4},
    "gemma3_text": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
}


@pytest.mark.slow
@pytest.mark.parametrize("family, dema", [("gpt_neox", {"projector": "anchor"}), ("gemma3_text", {"placement": "side"}),
                                          ("gemma3_text", {"placement": "parallel"})])
def test_plain_python_one_process_zero3_other_families(workspace, ds_ops, family, dema):
    """Backbones of other families, every parameter partitioned before their layout is found from the
    structure: GPT-NeoX (gpt_neox.layers, final_layer_norm, an untied embed_out) with anchor projectors
    computed on the partitioned backbone; Gemma3 (tied embeddings, post-feed-forward norms) with side
    placement, and with parallel placement (each layer's delta is carried from its wrapped MLP past its
    partitioned post-feed-forward norm by hooks). The update equals LocalClient's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **FAMILIES[family], intermediate_size=128, num_hidden_layers=4,
                                  vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258,
                                  max_position_embeddings=256, initializer_range=0.1)
    AutoModelForCausalLM.from_config(config).save_pretrained(workspace / f"backbone-{family}", max_shard_size="200KB")
    path = _client_yaml(workspace, f"fam-{family}-{len(list(workspace.glob('fam-*')))}", ds_config="zero3.json",
                        backbone=f"backbone-{family}",
                        overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}}, **dema)
    ref = _reference(path, rounds=1)[0]
    rc, out = _run([sys.executable, "launch/client.py", "--config", str(path), "--store", str(path.parent / "store"),
                    "--round", "0"], _env())
    assert rc == 0, out[-3000:]
    assert "(partitioned)" in out
    _check_update(path, 0, ref, world=1, stage=3)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_one_process_zero3_bf16(workspace):
    """On a GPU, precision auto means bf16: the update is only loosely LocalClient's (fp32) one."""
    path = _client_yaml(workspace, "gpu", ds_config="zero3.json")
    ref = _reference(path, rounds=1)[0]
    env = _env()
    env.pop("DS_ACCELERATOR")
    rc, out = _run([sys.executable, "launch/client.py", "--config", str(path), "--store", str(path.parent / "store"),
                    "--round", "0"], env)
    assert rc == 0, out[-3000:]
    assert "ZeRO-3 bf16 on 1 cuda process(es)" in out
    update, manifest = FederationStore(path.parent / "store", create=False).read_update(0, "c1")
    assert sorted(update) == sorted(ref["delta"]) and all(torch.isfinite(v).all() for v in update.values())
    assert abs(manifest["metrics"]["train_loss"] - ref["train_loss"]) < 0.05
    assert manifest["metrics"]["peak_gpu_mib_max"] > 0
