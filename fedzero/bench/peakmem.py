"""Peak memory of one client's training (process RSS on the CPU): full fine-tuning vs LoRA vs DeMA
on the same backbone, batch and sequence length, each in its own process.

    python -m fedzero.bench.peakmem --spec '{"path": "DIR"}' --method dema --batch-size 8 --seq-len 128

prints one JSON line. `measure_all` runs that once per method (a fresh process each: a process's
peak RSS never goes down, so measurements in one process would contaminate each other).

Within the process, the peak is taken after the backbone is loaded: the kernel's high-water mark
(VmHWM) is reset by writing 5 to /proc/self/clear_refs, then `steps` optimizer steps run on random
tokens (full causal-LM loss, AdamW) and VmHWM is read again. Reported: RSS after loading, the peak
during training, and their difference (what training adds on top of holding the model). Where the
reset is not allowed, the whole-process peak (ru_maxrss) is reported instead and flagged.
Methods: "full" (every parameter trains), "lora" (PEFT r=16 on q,k,v,o), "dema" (DeMA defaults,
parallel placement), "dema-side" (DeMA defaults, side placement: no backbone autograd).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("full", "lora", "dema", "dema-side")


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(spec: dict, method: str, batch_size: int, seq_len: int, steps: int, threads: int | None = None) -> dict:
    """Run in the current process (call it in a fresh one; see the module doc)."""
    import torch

    from fedzero.adapters.dema import DeMAConfig, inject_dema
    from fedzero.backbones import BackboneSpec, load_backbone

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known {METHODS}")
    if threads:
        torch.set_num_threads(threads)
    model, _ = load_backbone(BackboneSpec(**spec))
    if method == "full":
        model.requires_grad_(True)
    elif method == "lora":
        from fedzero.baselines import LoRASettings
        from peft import get_peft_model

        model = get_peft_model(model, LoRASettings(rank=16).peft_config(model))
    else:
        inject_dema(model, DeMAConfig(placement="side" if method == "dema-side" else "parallel"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))

    rss_loaded = _status_kb("VmRSS")
    reset = _reset_peak()
    model.train()
    times = []
    for _ in range(steps):
        t0 = time.time()
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.time() - t0)
    peak = _status_kb("VmHWM") if reset else None
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux
    result = {"method": method, "batch_size": batch_size, "seq_len": seq_len, "steps": steps,
              "trainable_params": sum(p.numel() for p in params),
              "rss_after_load_bytes": rss_loaded * 1024 if rss_loaded else None,
              "peak_rss_bytes": (peak if reset and peak else process_peak) * 1024,
              "peak_is_training_only": bool(reset and peak),
              "process_peak_rss_bytes": process_peak * 1024,
              "step_seconds": times}
    if result["rss_after_load_bytes"]:
        result["training_increment_bytes"] = result["peak_rss_bytes"] - result["rss_after_load_bytes"]
    if torch.cuda.is_available():
        result["note"] = "measured on the CPU; GPU memory is not measured by this script"
    return result


def measure_all(spec: dict, methods, batch_size: int, seq_len: int, steps: int, threads: int = 1,
                timeout: float = 3600, log=print) -> list[dict]:
    rows = []
    for method in methods:
        cmd = [sys.executable, "-m", "fedzero.bench.peakmem", "--spec", json.dumps(spec), "--method", method,
               "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--steps", str(steps),
               "--threads", str(threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"peak-memory run for {method!r} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["wall_seconds"] = round(time.time() - t0, 1)
        log(f"[bench] memory {method}: peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB "
            f"(after load {row['rss_after_load_bytes'] / 2**20:.0f} MiB), {row['trainable_params']:,} trainable")
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="BackboneSpec fields as JSON, e.g. {\"path\": \"DIR\"}")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    print(json.dumps(measure(json.loads(args.spec), args.method, args.batch_size, args.seq_len, args.steps,
                             args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
