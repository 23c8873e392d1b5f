"""The report's plots (PNG, matplotlib imported only here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .summary import TASK_METRICS, VIEWS, gain_rows, own_curves, summarize, task_of


def _own_curves(results: dict, settings: list[str], out_dir: Path, plt, color) -> list[str]:
    fig, axes = plt.subplots(2, len(settings), figsize=(6.5 * len(settings), 8), squeeze=False)
    for col, setting in enumerate(settings):
        curves = own_curves(results, setting)
        for row, (metric, title) in enumerate((("macro_f1", "own-topic macro-F1"), ("label_nll", "own-topic label NLL"))):
            ax = axes[row][col]
            for i, (name, points) in enumerate(curves[metric].items()):
                rounds = list(points)
                ys = np.array([points[r][0] for r in rounds])
                sd = np.array([points[r][1] or 0.0 for r in rounds])
                ax.plot(rounds, ys, marker="o", label=name, color=color(i), ls="--" if name.startswith("dema") else "-")
                ax.fill_between(rounds, ys - sd, ys + sd, color=color(i), alpha=0.15)
            ax.set_title(f"setting {setting}: {title} per round (± std over seeds)")
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "own_per_round.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def plots(results: dict, out_dir: Path, summary: dict | None = None) -> list[str]:
    """accuracy_per_round.png, own_per_round.png, accuracy_vs_bytes.png, per_client_accuracy.png, first_round_cosine.png,
    gain_over_local.png and gain_over_prior.png (macro-F1 and accuracy gains with their bootstrap
    intervals). Colours from tab20 (suites have more than 10 methods); DeMA dashed. LM suites:
    nll_per_round.png, nll_vs_bytes.png, per_client_nll.png (NLL per token), first_round_cosine.png
    and gain_over_local.png (% lower NLL per token with its bootstrap interval)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = summary or summarize(results)
    settings = list(summary)
    out_dir = Path(out_dir)
    files = []
    task = TASK_METRICS[task_of(results)]
    main, label, stem = task["main"], task["main_label"], task["file"]

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
        ax.set_title(f"setting {setting}: global {label} (per-round eval subset)")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(f"{label} (mean over clients and seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, f"{stem}_per_round.png")

    if task_of(results) != "lm":
        files.extend(_own_curves(results, settings, out_dir, plt, color))

    fig, axes = grid()
    for ax, setting in zip(axes, settings):
        for name, m in summary[setting]["methods"].items():
            x, y = m["bytes_total"][0], m[f"global.{main}"][0]
            if x is None or y is None:
                continue
            err = m[f"global.{main}"][1] or 0.0
            ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=3, label=name)
            ax.annotate(name, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("symlog", linthresh=1e3)
        ax.set_title(f"setting {setting}: final global {label} vs bytes communicated")
        ax.set_xlabel("total bytes, up + down, all rounds and clients (symlog; 0 = no federation)")
        ax.set_ylabel(f"global {label}")
        ax.grid(alpha=0.3)
    save(fig, f"{stem}_vs_bytes.png")

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
        ax.set_title(f"setting {setting}: final global {label} per client")
        ax.set_ylabel(f"{label} (mean ± std over seeds)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    save(fig, f"per_client_{stem}.png")

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

    def interval_bars(ax, names, gains, metric, title):
        """Three bars per row (own / unseen / global), each with its 95% bootstrap interval as an
        asymmetric error bar (none where the runs stored no per-record scores)."""
        views = "domains" if task_of(results) == "lm" else "topics"
        x = np.arange(len(names))
        for offset, view in zip((-0.27, 0.0, 0.27), VIEWS):
            cells = [gains[n]["mean"][view][metric] for n in names]
            ys = np.array([c.point * 100 if c is not None else np.nan for c in cells])
            err = np.array([[(c.point - c.low) * 100, (c.high - c.point) * 100] if c is not None and c.low is not None
                            else [np.nan, np.nan] for c in cells]).T.reshape(2, len(cells))   # NaN: no bar
            ax.bar(x + offset, ys, 0.27, yerr=err, capsize=2, label=f"{view} {views}")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{n}\n(vs {gains[n]['control']})" for n in names], rotation=25, fontsize=7, ha="right")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(f"{task['gain_unit']}, paired by seed and record\n(error bars: 95% bootstrap interval)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")

    for key, name, what in (("gains", "gain_over_local.png", "over training alone"),
                            ("transfer", "gain_over_prior.png", "over the prior-only control")):
        if not any(g["seeds"] for st in settings for g in summary[st].get(key, {}).values()):
            continue            # nothing to plot (runs that predate per-record scores have no transfer)
        fig, axes = plt.subplots(len(task["gains"]), len(settings), figsize=(7 * len(settings), 4.5 * len(task["gains"])),
                                 squeeze=False)
        for col, setting in enumerate(settings):
            entry = summary[setting]
            for row, (metric, gain_label) in enumerate(task["gains"]):
                rows = [n for n in gain_rows(entry) if n in entry[key] and entry[key][n]["seeds"]]
                interval_bars(axes[row][col], rows, entry[key], metric,
                              f"setting {setting}: {gain_label} gain {what}")
        save(fig, name)
    return files
