"""Step time and peak memory of a DeepSpeed client at ZeRO-2 / ZeRO-3 / ZeRO-3+offload, 1 and 2 processes.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/client_memory.py --out runs/bench-client

Each configuration is one real round of launch/client.py (torchrun, --nproc_per_node 1 or 2) on a
small random LLaMA (default: hidden 256, 8 layers, ~6M parameters, byte vocabulary) saved as a sharded
HF directory, training DeMA (r=16, M=4, S=4) on 8 x 128-token demo examples per step. A row reads the
manifest the client wrote: median optimizer-step time and peak RSS (max over ranks, and the sum over
ranks), plus peak GPU memory on a GPU. The first row is the single-process LocalClient (no DeepSpeed)
on the same model and data. Child processes get MALLOC_MMAP_THRESHOLD_=131072 unless the variable is
set (to "" for glibc's default): see _env. On a 2-core CPU machine the numbers measure overheads, not scaling:
2 processes share 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# (file, label, overrides): the shipped files, plus ZeRO-3 with DeepSpeed's live-parameter limits lowered
# (by default up to 1e9 gathered elements stay resident between forward and backward: a whole small model).
LEAN = {"zero_optimization": {"stage3_max_live_parameters": 10_000_000, "stage3_max_reuse_distance": 0}}
CONFIGS = [("zero2.json", "ZeRO-2", None), ("zero3.json", "ZeRO-3", None),
           ("zero3.json", "ZeRO-3, live params 1e7, reuse 0", LEAN),
           ("zero3_offload.json", "ZeRO-3 + offload", None)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="new working directory (model, stores, results.json)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per measured round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--local-reference", help=argparse.SUPPRESS)   # internal: run LocalClient on this YAML
    return p.parse_args(argv)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")}
    env.setdefault("DS_ACCELERATOR", "cpu")
    # glibc otherwise keeps freed tensors of up to 32 MB in its heap (its mmap threshold grows with
    # every freed block), so peak RSS would count every weight that ZeRO-3 built whole and then
    # partitioned. A fixed threshold returns them to the system. Set it to "" to measure without.
    if env.get("MALLOC_MMAP_THRESHOLD_") == "":
        env.pop("MALLOC_MMAP_THRESHOLD_")
    else:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    return env


def build_workspace(out: Path, args) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.hidden // 32)
    config = LlamaConfig(vocab_size=259, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=512, initializer_range=0.1)
    LlamaForCausalLM(config).save_pretrained(out / "backbone", max_shard_size="8MB")
    demo = REPO / "fedzero/resources/demo"
    shutil.copy(demo / "airlines.train.jsonl", out / "train.jsonl")
    shutil.copy(demo / "airlines.test.jsonl", out / "test.jsonl")
    return out


def client_yaml(out: Path, name: str, ds_config: str, args, overrides: dict | None = None) -> Path:
    from fedzero.client.bootstrap import initial_shared_state
    from fedzero.client.client_config import load_client_config
    from fedzero.store import FederationStore

    folder = out / name
    folder.mkdir()
    data = {"seed": 0, "dema": {"rank": 16, "num_experts": 4, "num_slots": 4}, "federation": {"rounds": 1},
            "train": {"local_steps": args.steps, "batch_size": args.batch_size, "lr": 0.01,
                      "max_length": args.max_length},
            "client": {"id": "bench", "backbone": {"path": "../backbone", "tokenizer": "byte"},
                       "data": {"train": "../train.jsonl", "test": "../test.jsonl"}},
            "deepspeed": {"config": str(REPO / "ds_configs" / ds_config), "overrides": overrides or {}},
            "state_dir": "state",
            "wait": {"timeout": 60, "poll": 0.2}}
    path = folder / "client.yaml"
    path.write_text(yaml.safe_dump(data))
    FederationStore(folder / "store").publish_global(0, initial_shared_state(load_client_config(path)))
    return path


def local_reference(config_path: str) -> None:
    """LocalClient, one round, printing the same figures as a client manifest (JSON on the last line)."""
    from fedzero.adapters.dema import inject_dema
    from fedzero.backbones import load_backbone
    from fedzero.client import LocalClient
    from fedzero.client.client_config import load_client_config
    from fedzero.data import build_examples, load_tokenizer, read_jsonl
    from fedzero.store import FederationStore

    cfg = load_client_config(config_path)
    model, fp = load_backbone(cfg.client.backbone)
    handle = inject_dema(model, cfg.dema)
    tok = load_tokenizer("byte")
    examples = build_examples(read_jsonl(cfg.client.train_data), tok, cfg.client.train.max_length)
    global_state, _ = FederationStore(Path(config_path).parent / "store", create=False).read_global(0)
    steps = cfg.client.train.local_steps
    # One optimizer step per train_round call, so that each step is timed on its own.
    client = LocalClient("bench", handle, fp, examples, examples[:1], replace(cfg.client.train, local_steps=1),
                         pad_id=tok.pad_token_id, seed=cfg.seed, total_rounds=steps)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        client.train_round(global_state)
        times.append(time.perf_counter() - started)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_seconds_median": sorted(times)[len(times) // 2], "peak_rss_mib_max": rss,
                      "peak_rss_mib_sum": rss, "world_size": 1}))


def run_config(path: Path, procs: int) -> tuple[dict, float]:
    from fedzero.client.distributed import free_port

    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(procs), "--master_port", str(free_port()), "launch/client.py",
           "--config", str(path), "--store", str(path.parent / "store"), "--round", "0"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    (path.parent / "launch.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); log: {path.parent / 'launch.log'}")
    manifest = json.loads((path.parent / "store/rounds/r000000/updates/bench/manifest.json").read_text())
    return manifest["metrics"], wall


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_reference:
        local_reference(args.local_reference)
        return 0
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    build_workspace(out, args)
    import torch  # noqa: F401  (after the workspace: only for the parameter count below)
    from transformers import AutoConfig

    from fedzero.comm import full_model_params
    params = full_model_params(AutoConfig.from_pretrained(str(out / "backbone")))
    rows = []
    ref_path = client_yaml(out, "local", "zero2.json", args)
    proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--local-reference", str(ref_path)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout + proc.stderr)
    rows.append({"config": "LocalClient (no DeepSpeed)", "procs": 1, **json.loads(proc.stdout.strip().splitlines()[-1])})
    for procs in args.procs:
        for index, (ds_config, label, overrides) in enumerate(CONFIGS):
            path = client_yaml(out, f"{index}-{Path(ds_config).stem}-{procs}p", ds_config, args, overrides)
            metrics, wall = run_config(path, procs)
            rows.append({"config": label, "procs": procs, "launch_wall_seconds": round(wall, 1), **metrics})
            print(f"{label:<34} {procs} proc: step {metrics['step_seconds_median']:.3f} s, "
                  f"peak RSS max {metrics['peak_rss_mib_max']:.0f} MiB, sum {metrics['peak_rss_mib_sum']:.0f} MiB",
                  flush=True)
    result = {"model_params": params, "hidden": args.hidden, "layers": args.layers, "batch_size": args.batch_size,
              "max_length": args.max_length, "steps": args.steps, "device": _env()["DS_ACCELERATOR"],
              "cpu_count": os.cpu_count(), "malloc_mmap_threshold": _env().get("MALLOC_MMAP_THRESHOLD_"),
              "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nmodel: {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers); batch "
          f"{args.batch_size} x {args.max_length} tokens; {args.steps} steps per round; {os.cpu_count()} CPU cores\n")
    print("| configuration | processes | median step (s) | peak RSS per process, max (MiB) | peak RSS, all processes (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['procs']} | {r['step_seconds_median']:.3f} | {r['peak_rss_mib_max']:.0f} "
              f"| {r['peak_rss_mib_sum']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
