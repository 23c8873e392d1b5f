"""`--report-to`: where a run's per-round scalars go while it trains, in the usual style.

    tensorboard   event files under OUT/tensorboard/ (torch.utils.tensorboard; the `tensorboard` package,
                  pip install -e '.[tensorboard]'): `tensorboard --logdir OUT/tensorboard`
    csv           OUT/scalars.csv: one row per (round, tag, value), appended after every round
    none          nothing beyond summary.json and metrics.csv, which every run writes

Default: tensorboard when the package is importable, else csv with a one-line note. Both sinks get
the same scalars (`round_scalars`), with the round as the step:

    train_loss/<client>, eval_loss/<client>, accuracy/<client> (and macro_f1, label_nll where labels
    were scored), gate_entropy/<client>/<slot>, uploaded_bytes/<client> (the round's upload shared out evenly,
    as metrics.csv does), uploaded_bytes/total,
    cmga/conflicts/<block>, cmga/pairs/<block>, cmga/mean_cos_before/<block>, cmga/mean_cos_after/<block>
    (from the round's aggregation report; blocks without conflict statistics report none),
    update_cosine/<block> (the mean pairwise cosine of the clients' updates)

A resumed run starts a new event file with `purge_step` at the round it resumes from, so a round
the interruption cut short is never shown twice; the CSV file drops its rows from that round on.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

REPORT_TO = ("tensorboard", "csv", "none")
TENSORBOARD_DIR = "tensorboard"
SCALARS_CSV = "scalars.csv"
CLIENT_METRICS = ("train_loss", "eval_loss", "accuracy", "macro_f1", "label_nll", "gate_entropy")
CMGA_STATS = {"n_conflicts": "conflicts", "n_pairs": "pairs", "mean_cos_before": "mean_cos_before",
              "mean_cos_after": "mean_cos_after"}


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def default_report_to() -> tuple[str, str | None]:
    """(the default sink, a note to print or None)."""
    if tensorboard_available():
        return "tensorboard", None
    return "csv", ("note: the tensorboard package is not installed (pip install -e '.[tensorboard]'): "
                   f"per-round scalars go to {SCALARS_CSV} instead (--report-to csv)")


def round_scalars(record: dict) -> list[tuple[str, float]]:
    """The scalars of one round of summary.json's `rounds` list, as (tag, value)."""
    out = []
    clients = record.get("clients", [])
    for row in clients:
        for key in CLIENT_METRICS:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append((f"{key}/{row['id']}", float(value)))
            elif isinstance(value, dict):           # gate entropy: per slot
                out.extend((f"{key}/{row['id']}/{part}", float(v)) for part, v in sorted(value.items())
                           if isinstance(v, (int, float)) and not isinstance(v, bool))
    uploaded = record.get("uploaded_bytes")
    if isinstance(uploaded, (int, float)):
        for row in clients:
            out.append((f"uploaded_bytes/{row['id']}", float(uploaded // max(len(clients), 1))))
        out.append(("uploaded_bytes/total", float(uploaded)))
    for block, stats in sorted((record.get("aggregation") or {}).items()):
        for key, name in CMGA_STATS.items():
            value = stats.get(key) if isinstance(stats, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append((f"cmga/{name}/{block}", float(value)))
    updates = ((record.get("diagnostics") or {}).get("updates") or {})
    for block, stats in sorted(updates.items()):
        value = stats.get("mean_cosine") if isinstance(stats, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((f"update_cosine/{block}", float(value)))
    return [(tag, value) for tag, value in out if math.isfinite(value)]


class Reporter:
    """No sink (`none`)."""
    kind = "none"

    def report_round(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter(Reporter):
    kind = "tensorboard"

    def __init__(self, out: Path, *, start_round: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:     # torch's writer needs the tensorboard package
            raise ValueError(f"--report-to tensorboard needs the tensorboard package ({err}); "
                             "pip install -e '.[tensorboard]', or use --report-to csv") from None
        self.log_dir = out / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_round if start_round > 0 else None)

    def report_round(self, record: dict) -> None:
        for tag, value in round_scalars(record):
            self.writer.add_scalar(tag, value, global_step=record["round"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CsvReporter(Reporter):
    kind = "csv"

    def __init__(self, out: Path, *, start_round: int):
        self.path = out / SCALARS_CSV
        kept = []
        if start_round > 0 and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if _int(row.get("round")) is not None
                        and _int(row["round"]) < start_round]
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["round", "tag", "value"])
            writer.writerows([row["round"], row["tag"], row["value"]] for row in kept)

    def report_round(self, record: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows([record["round"], tag, repr(value)] for tag, value in round_scalars(record))


def _int(text) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def check_report_to(kind: str) -> None:
    """Refuse a sink that cannot work here, before a run creates anything."""
    if kind not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {list(REPORT_TO)}, got {kind!r}")
    if kind == "tensorboard" and not tensorboard_available():
        raise ValueError("--report-to tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' "
                         "(or pip install tensorboard), or use --report-to csv")


def open_reporter(kind: str, out: Path, *, start_round: int = 0) -> Reporter:
    check_report_to(kind)
    if kind == "tensorboard":
        return TensorBoardReporter(out, start_round=start_round)
    if kind == "csv":
        return CsvReporter(out, start_round=start_round)
    return Reporter()
