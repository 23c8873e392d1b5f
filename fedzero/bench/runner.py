"""`fedzero bench`: build the testbed, run every (setting, seed, method), then write the report.

    OUT/suite.json                      the suite as run (a rerun into OUT must match it, seeds aside)
    OUT/runs/<setting>-<method>-seed<k>.json   one file per finished run (written atomically)
    OUT/runs/<setting>-zero-shot-seed<k>.json  the frozen backbones' test-set scores (round 0)
    OUT/memory.json                     peak memory per method (one subprocess each)
    OUT/results.json                    everything above plus the testbed, splits, machine, comm table
    OUT/report.md, OUT/*.png            tables and plots (fedzero.bench.report)

A finished run is never recomputed: rerunning the same command into the same OUT resumes where an
interrupted invocation stopped (the full suite takes hours on 2 cores), and more seeds can be added
later with --seeds (the report covers the seeds of the invocation: pass them all). The report is
rebuilt at the end from the run files of the suite's settings, methods and seeds.

Several workers may share one OUT (e.g. two processes of one torch thread each on 2 cores): a
run is claimed with a lock file (OUT/runs/.<run>.lock, holding the pid; a dead holder's lock is
taken over), so each run is done once; `--settings B A` sets the order a worker walks the settings.
A finished run is kept while its method trains the same thing (same_run: a DeMA method by its
resolved DeMAConfig, so a changed default redoes the runs that relied on it).
A last invocation finds every run done and writes the whole report.

An LM suite (task "lm", docs/lm_task.md) reads the fortunes corpus before anything else (so a
machine without it fails in a second, with the install command), splits it per seed with
lm_data.lm_split, checks that every record fits train.max_length for every client's tokenizer, and
stores per-record held-out NLL where classification stores label scores.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from fedzero.backbones.recipes import prepare_backbone

from .comm_table import comm_rows
from .data import DataSettings, load_records, split_tweets
from .lm_corpus import load_corpus
from .lm_data import LMDataSettings, LMSplit, lm_split
from .methods import DeMAMethod, MethodSpec, RunContext, run_method, zero_shot_metrics, zero_shot_scores
from .peakmem import measure_all
from .report import markdown, plots, summarize
from .suites import check_suite, load_suite


def default_threads() -> int:
    """All cores when the machine is idle; 1 when others already keep half of it busy (1-minute load
    average >= cores / 2). On a shared 2-core machine, OpenMP's spinning threads made 2 threads up
    to 10x slower than 1 (OMP_WAIT_POLICY=PASSIVE, set by fedzero.bench.run_bench, softens that)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if load >= cores / 2 else cores


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration, ValueError):
        pass
    gib = f", {mem / 2**30:.0f} GiB" if mem else ""
    return {"description": f"{cores} cores ({cpu}){gib}, no GPU used", "cpu": cpu, "cores": cores,
            "memory_bytes": mem, "torch": torch.__version__, "threads": threads, "python": platform.python_version(),
            "load_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")     # workers sharing OUT never share a tmp file
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _claim(lock: Path) -> bool:
    """Take the lock file of one run for this process; False if a live process holds it."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text() or 0)
            os.kill(pid, 0)                 # raises if no such process: the holder died
            return pid == os.getpid()
        except (ValueError, ProcessLookupError, FileNotFoundError):
            tmp = lock.with_name(f"{lock.name}.{os.getpid()}")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, lock)
            return True
        except PermissionError:         # alive, another user's
            return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def same_run(run: dict, spec: MethodSpec) -> bool:
    """Whether a finished run trained what the method `spec` asks for now. Descriptions do not count; a
    DeMA method counts by its resolved DeMAConfig, so a default that changes later cannot pass off old
    runs as new ones, and pinning the old value explicitly keeps them."""
    def essentials(m: dict) -> dict:
        return json.loads(json.dumps({k: v for k, v in m.items() if k not in ("description", "dema")}))

    if essentials(run.get("spec") or {}) != essentials(spec.raw):
        return False
    if not isinstance(spec, DeMAMethod):
        return True
    from fedzero.adapters.dema import DeMAConfig
    seed = spec.training_seed(run["seed"])
    wanted = json.loads(json.dumps(spec.config(seed).to_dict()))
    defaults = json.loads(json.dumps(DeMAConfig.from_dict({"seed": seed}).to_dict()))
    stored = run.get("dema")
    if not isinstance(stored, dict):
        return False
    # A field DeMAConfig gained after the run was made is absent from it; at its default it trains what
    # the run trained (a new field's default keeps the old behaviour), set to anything else it does not.
    added = set(wanted) - set(stored)
    return set(stored) <= set(wanted) and all(stored[k] == wanted[k] for k in stored) \
        and all(wanted[k] == defaults[k] for k in added)


def _fixed_part(suite: dict) -> dict:
    """What every run of a suite depends on: all but its seeds and its settings' method lists."""
    fixed = {k: v for k, v in suite.items() if k != "seeds"}
    fixed["settings"] = {s: {k: v for k, v in st.items() if k != "methods"} for s, st in suite["settings"].items()}
    return json.loads(json.dumps(fixed))


def _check_resume(out: Path, suite: dict) -> None:
    """OUT may be resumed by the same suite, or one with other seeds or more/changed methods (a run
    whose method spec changed is redone, see run_bench); anything else would mix incomparable runs."""
    path = out / "suite.json"
    if path.exists():
        if _fixed_part(json.loads(path.read_text())) != _fixed_part(suite):
            raise FileExistsError(f"{out} holds runs of a different suite (its suite.json differs beyond seeds "
                                  "and methods); choose a new --out")
    elif out.exists() and any(p.name not in ("suite.json",) for p in out.iterdir()):
        raise FileExistsError(f"output directory {out} is not empty and holds no suite.json; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, suite)


def check_lm_lengths(split: LMSplit, clients: list[dict], backbones: dict, max_length: int) -> None:
    """Refuse, before any training, a split whose records do not fit train.max_length under some client's
    tokenizer: training would silently cut them and scoring refuses them (lm_score.score_records)."""
    from fedzero.data import load_tokenizer

    texts = {r["text"] for recs in split.test.values() for r in recs}
    texts |= {r["text"] for c in split.clients for r in c.train}
    for name in dict.fromkeys(c["backbone"] for c in clients):
        b = backbones[name]
        tok = load_tokenizer(b.tokenizer_source, b.spec.path)
        room = max_length - 1 - (tok.bos_token_id is not None)
        longest = max(len(tok.encode(t)) for t in texts)
        if longest > room:
            raise ValueError(f"train.max_length {max_length} holds {room} text tokens besides bos/eos, but backbone "
                             f"{name!r} makes {longest} of a record of the split: raise train.max_length or lower "
                             "lm_data.max_chars")


def run_bench(suite: str | Path | dict, out: str | Path, *, seeds: list[int] | None = None,
              threads: int | None = None, cache_dir: str | Path | None = None, memory: bool = True,
              settings: list[str] | None = None, report_only: bool = False, command: str = "", log=print) -> dict:
    """Run a suite (a name from fedzero.bench.suites, a JSON/YAML file, or a dict) into `out`.
    `settings`: run only these settings' runs in this invocation (the report covers what is on disk);
    `report_only`: run nothing (no run, no zero-shot scoring), only write the report of what is on disk.
    Returns the results dict that is also written to out/results.json."""
    started = time.time()
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:     # fail now, not after hours of runs
        raise ModuleNotFoundError("fedzero bench writes PNG plots with matplotlib: pip install matplotlib")
    spec = copy.deepcopy(suite) if isinstance(suite, dict) else load_suite(suite)
    methods = check_suite(spec)         # {setting: typed method specs}: what the runs take
    if seeds:
        spec["seeds"] = [int(s) for s in seeds]
    unknown = sorted(set(settings or ()) - set(spec["settings"]))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; the suite has {sorted(spec['settings'])}")
    selected = {s: spec["settings"][s] for s in (settings or spec["settings"])}
    out = Path(out)
    _check_resume(out, spec)
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    machine = machine_info(threads)
    log(f"[bench] suite {spec['name']!r} -> {out}; {threads} torch thread(s); load average {machine['load_start']}")
    lm = spec.get("task") == "lm"
    if lm:      # before the backbones (minutes): without the corpus this fails now, naming the install command
        lm_settings = LMDataSettings.from_dict(spec["lm_data"])
        load_corpus(lm_settings.source)

    used = list(dict.fromkeys(c["backbone"] for s in selected.values() for c in s["clients"]))
    if spec.get("memory") and memory:
        used = list(dict.fromkeys(used + [spec["memory"]["backbone"]]))
    t0 = time.time()
    backbones = {name: prepare_backbone(name, spec["backbones"][name], cache_dir, log=log) for name in used}
    backbone_seconds = time.time() - t0

    if lm:
        def make_split(setting: dict, seed: int) -> LMSplit:
            split = lm_split(lm_settings, seed, {c["id"]: c["domains"] for c in setting["clients"]})
            check_lm_lengths(split, setting["clients"], backbones, int(spec["train"]["max_length"]))
            return split
    else:
        data_settings = DataSettings.from_dict(spec["data"])
        records = load_records(data_settings)

        def make_split(setting: dict, seed: int):
            return split_tweets(records, setting["clients"], data_settings, seed)
    runs_dir = out / "runs"
    runs_dir.mkdir(exist_ok=True)
    splits, zero_shot, ran = {}, {}, 0
    for sname, setting in selected.items():
        for seed in spec["seeds"]:
            split = make_split(setting, seed)
            splits.setdefault(sname, {})[str(seed)] = split.summary()
            ctx = RunContext(sname, seed, setting["clients"], backbones, split, int(spec["rounds"]),
                             dict(spec["train"]), dict(spec["lr"]), int(spec.get("eval_every", 1)), log=log)
            if lm:          # projector_anchors "domain:<name>" carves anchors from a domain of the corpus
                ctx.corpus, ctx.max_chars = load_corpus(lm_settings.source), lm_settings.max_chars
            else:           # distill.anchor_source carves anchors from a topic of the same corpus
                ctx.corpus, ctx.max_chars = records, data_settings.max_chars
            zpath = runs_dir / f"{sname}-zero-shot-seed{seed}.json"
            if zpath.exists():
                ctx.zero_shot = json.loads(zpath.read_text())["scores"]
            elif report_only:
                continue
            else:
                t = time.time()
                ctx.zero_shot = zero_shot_scores(ctx)
                _write_json(zpath, {"scores": ctx.zero_shot, "seconds": round(time.time() - t, 1)})
            zero_shot.setdefault(sname, {})[str(seed)] = zero_shot_metrics(ctx)
            for method in [] if report_only else methods[sname]:
                path = runs_dir / f"{sname}-{method.name}-seed{seed}.json"
                if path.exists():
                    if same_run(json.loads(path.read_text()), method):
                        log(f"[bench] {sname} / {method.name} / seed {seed}: done earlier, kept")
                        continue
                    log(f"[bench] {sname} / {method.name} / seed {seed}: its method spec changed, rerunning")
                lock = runs_dir / f".{path.stem}.lock"
                if not _claim(lock):
                    log(f"[bench] {sname} / {method.name} / seed {seed}: another worker is running it, skipped")
                    continue
                if path.exists() and same_run(json.loads(path.read_text()), method):
                    lock.unlink(missing_ok=True)           # another worker finished it meanwhile
                    continue
                try:
                    result = run_method(method, ctx)
                    _write_json(path, result)
                finally:
                    lock.unlink(missing_ok=True)
                ran += 1
                key = "nll_per_token" if lm else "accuracy"
                g = [c["final"]["global"][key] for c in result["clients"] if c.get("final")]
                log(f"[bench] {sname} / {method.name} / seed {seed}: global {'NLL/token' if lm else 'acc'} "
                    f"{sum(g) / max(len(g), 1):.3f} (mean over clients), {result['wall_seconds']:.0f} s")

    mem_rows = None
    if spec.get("memory") and memory:
        mpath = out / "memory.json"
        m = spec["memory"]
        if mpath.exists():
            mem_rows = json.loads(mpath.read_text())
        elif not report_only:
            bb = backbones[m["backbone"]]
            spec_fields = {"path": bb.spec.path} if bb.spec.path else {"llama_config": bb.spec.llama_config,
                                                                        "init_seed": bb.spec.init_seed}
            rows = measure_all(spec_fields, m.get("methods"), int(m["batch_size"]), int(m["seq_len"]),
                               int(m["steps"]), threads=threads, log=log)
            mem_rows = {"backbone": m["backbone"], "batch_size": m["batch_size"], "seq_len": m["seq_len"],
                        "steps": m["steps"], "threads": threads, "rows": rows}
            _write_json(mpath, mem_rows)

    runs = []
    specs = {(s, m.name): m for s, ms in methods.items() for m in ms}
    for path in sorted(runs_dir.glob("*-seed*.json")):
        if "-zero-shot-" in path.name:
            continue
        run = json.loads(path.read_text())
        method = specs.get((run["setting"], run["method"]))
        if method is not None and run["seed"] in spec["seeds"] and same_run(run, method):
            runs.append(run)
    machine["load_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    results = {"suite": spec, "command": command, "machine": machine,
               "backbones": {n: b.report for n, b in backbones.items()},
               "backbone_seconds_this_invocation": round(backbone_seconds, 1),
               "splits": splits, "zero_shot": zero_shot, "runs": runs, "runs_this_invocation": ran,
               "comm_table": comm_rows(), "memory": mem_rows, "wall_seconds": round(time.time() - started, 1)}
    summary = summarize(results)
    results["plots"] = plots(results, out, summary)
    _write_json(out / "results.json", results)
    (out / "report.md").write_text(markdown(results, summary))
    return results
