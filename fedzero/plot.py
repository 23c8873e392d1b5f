"""`fedzero plot RUN`: PNGs of a run's per-round loss and accuracy per client (from its summary.json,
read as `fedzero compare` reads it). Needs matplotlib: `pip install 'fedzero[plots]'`.

    RUN/plots/loss.png        per client: eval loss (solid; "before" = before any training) and train loss (dashed)
    RUN/plots/accuracy.png    per client: label accuracy where the run scored it (before, and after the last round)
"""

from __future__ import annotations

import os
from pathlib import Path

from fedzero.compare import read_run

BEFORE = -1          # the x position of "before training"


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> dict[str, dict]:
    """Write the PNGs; returns {file: {line label: (x, y)}}: exactly the lines drawn."""
    plt = _pyplot()
    history = read_run(run)
    out = Path(out) if out is not None else history.path / "plots"
    out.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, dict] = {}

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, client in enumerate(history.clients.values()):
        color = f"C{i}"
        points = [(r, v) for r, v in zip(client.rounds, client.eval_loss) if v is not None]
        if client.before.get("eval_loss") is not None:
            points.insert(0, (BEFORE, client.before["eval_loss"]))
        if points:
            ax.plot(*zip(*points), "-o", color=color, label=f"{client.id} eval")
        train = [(r, v) for r, v in zip(client.rounds, client.train_loss) if v is not None]
        if train:
            ax.plot(*zip(*train), "--x", color=color, alpha=0.6, label=f"{client.id} train")
    _finish(ax, history, "loss (nats per token)")
    drawn["loss.png"] = _lines(ax)
    fig.savefig(out / "loss.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    accuracy = {c.id: [(r, v) for r, v in zip(c.rounds, c.accuracy) if v is not None] for c in history.clients.values()}
    for client in history.clients.values():
        if client.before.get("accuracy") is not None:
            accuracy[client.id].insert(0, (BEFORE, client.before["accuracy"]))
    if any(accuracy.values()):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (cid, points) in enumerate(accuracy.items()):
            if points:
                ax.plot(*zip(*points), "-o", color=f"C{i}", label=cid)
        _finish(ax, history, "label accuracy" + (f" ({', '.join(history.labels)})" if history.labels else ""))
        drawn["accuracy.png"] = _lines(ax)
        fig.savefig(out / "accuracy.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    return {str(out / name): lines for name, lines in drawn.items()}


def _finish(ax, history, ylabel: str) -> None:
    rounds = list(range(history.num_rounds))
    ax.set_xticks([BEFORE, *rounds], ["before", *map(str, rounds)])
    ax.set_xlabel("after round")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{history.path.name}: strategy {history.strategy}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)


def _lines(ax) -> dict:
    return {line.get_label(): (list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
            for line in ax.get_lines()}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("fedzero plot needs matplotlib, an optional extra: pip install 'fedzero[plots]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def add_plot_parser(subparsers):
    p = subparsers.add_parser("plot", help="PNGs of a run's per-round loss and accuracy per client "
                                           "(needs the plots extra: pip install 'fedzero[plots]')")
    p.add_argument("run", metavar="RUN", help="a run directory (its summary.json)")
    p.add_argument("--out", help="directory for the PNGs (default RUN/plots)")
    p.set_defaults(func=run_plot)
    return p


def run_plot(args) -> int:
    import sys

    try:
        written = plot_run(args.run, args.out)
    except ImportError as err:
        print(f"fedzero plot: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0
