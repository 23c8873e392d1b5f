"""Aggregation throughput: GB/s of client-update data read, sharded MPI aggregator vs a naive average.

    python benchmarks/aggregate_throughput.py                          # 16 clients x 256 MB (4 GB of updates)
    python benchmarks/aggregate_throughput.py --clients 4 --mb 16      # a quick look

Writes a synthetic federation store (float32 updates, 8 blocks "slots.<s>.w" of [rows, 4096], 4
backbone groups so CMGA has groups to align) under --dir (default: a fresh temp dir, removed at the
end), then times on the same data:
  naive    one process: safetensors.torch.load_file of every update whole, weighted sum in float32
           (no Gram, no CMGA, nothing written) — the floor a plain FedAvg loop pays;
  sharded  `mpirun -np N python launch/aggregate.py` for each N in --ranks and each --verify mode,
           OMP_NUM_THREADS = cores / N
           (run on round 0 again each time: round 1's global, result and server state are removed
           in between). GB/s = update bytes read / the aggregator's own "aggregate_s" (plan,
           verification, both passes, reductions, gather; not start-up, waiting or the commit),
           and "end-to-end" = / total_s (adds the commit: server state, result, the new global).
Disk: clients x mb (+ 3 x mb for the global, the new global and the server state). Memory: the
naive run holds one update plus the sum; a sharded rank holds its slices of all updates
(clients x mb / N; see --cache-gb in launch/aggregate.py) plus a few global-sized buffers.
The files were just written, so they are read from the page cache: a warm-cache figure. Each
configuration runs --repeat times and the fastest run is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COLS = 4096
SLOTS = 8


def build(root: Path, clients: int, mb: float, seed: int = 0) -> tuple[list[str], int]:
    from fedzero.store import FederationStore

    rows = max(1, int(mb * 1e6 / 4 / COLS / SLOTS))
    shapes = {f"slots.{s}.w": (rows, COLS) for s in range(SLOTS)}
    store = FederationStore(root)
    g = torch.Generator().manual_seed(seed)
    store.publish_global(0, {k: torch.randn(s, generator=g) for k, s in shapes.items()})
    common = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ids = [f"c{i:02d}" for i in range(clients)]
    for i, cid in enumerate(ids):
        sign = -1.0 if i % 4 == 3 else 1.0           # group g3 pulls against the others: a conflict to resolve
        delta = {k: sign * common[k] + torch.randn(s, generator=g) for k, s in shapes.items()}
        store.write_update(0, cid, delta, fingerprint=f"g{i % 4}", num_samples=100 + i)
        del delta
    total = sum(m["bytes"] for m in store.list_updates(0))
    return ids, total


def naive(root: Path) -> tuple[float, int]:
    """Every update loaded whole, weighted average in float32. Returns (seconds, bytes read)."""
    from safetensors.torch import load_file

    from fedzero.store import FederationStore

    store = FederationStore(root, create=False)
    manifests = store.list_updates(0)
    total_w = sum(m["num_samples"] for m in manifests)
    t = time.perf_counter()
    acc, nbytes = None, 0
    for m in manifests:
        path = store.update_path(0, m["client_id"])
        delta = load_file(str(path))
        nbytes += os.path.getsize(path)
        w = m["num_samples"] / total_w
        if acc is None:
            acc = {k: v * w for k, v in delta.items()}
        else:
            for k, v in delta.items():
                acc[k].add_(v, alpha=w)
        del delta
    return time.perf_counter() - t, nbytes


def reset_round(root: Path) -> None:
    shutil.rmtree(root / "rounds" / "r000001", ignore_errors=True)
    shutil.rmtree(root / "rounds" / "r000000" / "aggregate", ignore_errors=True)


def sharded(root: Path, config: Path, ids: list[str], ranks: int, verify: str) -> dict:
    reset_round(root)
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or "mpirun"
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    cmd = [mpirun, "-np", str(ranks), sys.executable, str(REPO / "launch" / "aggregate.py"), "--store", str(root),
           "--round", "0", "--config", str(config), "--expected", *ids, "--verify", verify]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"aggregator failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")
    result = json.loads((root / "rounds" / "r000000" / "aggregate" / "result.json").read_text())
    result["launch_wall_s"] = wall
    # the stored result is written before the commit finishes; the last log line has the total
    result["timing"]["total_s"] = float(re.search(r"total ([0-9.]+) s", proc.stdout).group(1))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--mb", type=float, default=256.0, help="size of one client's update in MB (float32)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--verify", nargs="+", default=["size", "sha256"], choices=["size", "sha256"])
    p.add_argument("--strategy", default="cmga", choices=["cmga", "fedavg"])
    p.add_argument("--dir", default=None, help="where to build the store (default: a temp dir, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the store")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs per configuration; the fastest is reported (first touches of fresh memory on a VM are slow)")
    args = p.parse_args(argv)

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fedzero-bench-"))
    root = base / "store"
    try:
        t = time.perf_counter()
        ids, total = build(root, args.clients, args.mb)
        print(f"built {args.clients} updates, {total / 1e9:.2f} GB in {root} ({time.perf_counter() - t:.0f} s); "
              f"{os.cpu_count()} cores", flush=True)
        config = base / "run.yaml"
        config.write_text(f"seed: 0\nfederation: {{strategy: {args.strategy}, server_lr: 1.0, server_momentum: 0.9}}\n")

        secs, nbytes = min(naive(root) for _ in range(args.repeat))
        print(f"{'naive torch average (1 process)':44s} {nbytes / 1e9:6.2f} GB in {secs:6.2f} s = "
              f"{nbytes / secs / 1e9:5.2f} GB/s", flush=True)
        for verify in args.verify:
            for n in args.ranks:
                r = min((sharded(root, config, ids, n, verify) for _ in range(args.repeat)),
                        key=lambda x: x["timing"]["aggregate_s"])
                io, tm = r["io"], r["timing"]
                read = io["update_bytes_read"]
                print(f"{f'sharded {args.strategy}, {n} rank(s), verify {verify}':44s} {read / 1e9:6.2f} GB in "
                      f"{tm['aggregate_s']:6.2f} s = {read / tm['aggregate_s'] / 1e9:5.2f} GB/s   "
                      f"(end-to-end {tm['total_s']:.2f} s = {read / tm['total_s'] / 1e9:.2f} GB/s; "
                      f"launch {r['launch_wall_s']:.1f} s; {io['passes']} pass(es), "
                      f"{io['bytes_hashed'] / 1e9:.2f} GB hashed)", flush=True)
                print(f"{'':44s} stages: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in tm["stages_s"].items()),
                      flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
