"""DeepSpeed clients in real launches (CPU, gloo) whose uploaded update must equal the single-process
LocalClient's. (The client's config, memory estimate: test_client_config.py; its state directory and
start-up helpers: test_client_state.py.)

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
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedzero.adapters.dema import inject_dema
from fedzero.adapters.dema.io import read_part
from fedzero.client.bootstrap import initial_shared_state
from fedzero.client.client_config import load_client_config
from fedzero.client.distributed import free_port
from fedzero.client.state_layout import ClientStateLayout
from fedzero.store import FederationStore
from hooked_client import CRASH_ENV, CRASH_EXIT_CODE, STEP_LOG_ENV


REPO = Path(__file__).resolve().parent.parent
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
TOL = 1e-6


# =========================================================================== DeepSpeed configs launched

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


# =========================================================================== real launches (slow)

def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT", CRASH_ENV, STEP_LOG_ENV)}
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
    private, _ = read_part(ClientStateLayout(config_path.parent / "state").private_path(rnd))
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

    # Killed by the test's step hook (tests/hooked_client.py: launch/client.py with the hook installed).
    steps = path.parent / "steps.jsonl"
    rc, out = _run(DEEPSPEED + ["--master_port", str(free_port()), "tests/hooked_client.py"] + args[1:] + ["--serve"],
                   _env(**{CRASH_ENV: "3", STEP_LOG_ENV: str(steps)}))
    assert rc == CRASH_EXIT_CODE, out[-3000:]
    # The hook ran after every step, and after the checkpoint of step 2 (checkpoint_every=2).
    assert [json.loads(line) for line in steps.read_text().splitlines()] == [
        {"round": 0, "step": 1, "checkpoint": None}, {"round": 0, "step": 2, "checkpoint": 2},
        {"round": 0, "step": 3, "checkpoint": 2}]
    store = FederationStore(path.parent / "store", create=False)
    assert not store.has_update(0, "c1")                          # nothing half-written is visible
    ckpt = path.parent / "state" / "checkpoints" / "r000000"
    assert json.loads((ckpt / "fedzero.json").read_text())["step"] == 2
    assert sorted(p.name for p in (ckpt / "step000002").iterdir()) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    # Restarted with the same command. The serving process waits for round 1's global, which this
    # test publishes (as the aggregator would) only once round 0's update is in the store.
    serve = subprocess.Popen(DEEPSPEED + ["--master_port", str(free_port())] + args + ["--serve"], cwd=REPO,
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
    rc, out = _run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/client.py",
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
    rc, out = _run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/client.py",
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
