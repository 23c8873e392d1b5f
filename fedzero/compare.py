"""`fedzero compare RUN_A RUN_B`: did federating help? Per client, the final eval loss (and label
accuracy where the runs recorded it) of two runs of the same clients, and the gain of A over B.

    fedzero simulate --config run.yaml --out runs/fed
    fedzero simulate --config run.yaml --out runs/local --strategy local
    fedzero compare runs/fed runs/local          # positive gain: the federation did better

A run's numbers come from its summary.json (`read_run`; `fedzero plot` reads runs the same way):
per round and client the train and eval loss, and the label metrics simulate scores after the last
round (federate scores each client after every round the same way, in its own process). A run still
going or interrupted has a partial summary.json (its completed rounds); compare reads those too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

SUMMARY = "summary.json"
LABEL_METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "label_nll")


@dataclass
class ClientHistory:
    id: str
    fingerprint: str | None
    rounds: list[int] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)
    eval_loss: list[float | None] = field(default_factory=list)
    accuracy: list[float | None] = field(default_factory=list)      # None where the round scored no labels
    before: dict = field(default_factory=dict)                       # eval before training (simulate's "final")
    after: dict = field(default_factory=dict)                        # and after the last round

    def final(self, key: str) -> float | None:
        """The value after the last round (None: not recorded)."""
        values = {"eval_loss": self.eval_loss, "train_loss": self.train_loss, "accuracy": self.accuracy}[key]
        return values[-1] if values else None


@dataclass
class RunHistory:
    path: Path
    strategy: str | None
    labels: list[str] | None
    clients: dict[str, ClientHistory]

    @property
    def num_rounds(self) -> int:
        return max((len(c.rounds) for c in self.clients.values()), default=0)

    def describe(self) -> str:
        return f"{self.path} (strategy {self.strategy}, {self.num_rounds} rounds)"


def read_run(path: str | os.PathLike) -> RunHistory:
    """A run's per-round history from its summary.json (`path`: the run directory or the file)."""
    path = Path(path).expanduser()
    summary_path = path / SUMMARY if path.is_dir() else path
    if not summary_path.is_file():
        why = (f"{path} does not exist" if not path.exists() else
               f"{path} has no {SUMMARY}: not a fedzero run (simulate writes it after every round, federate at the end)")
        raise FileNotFoundError(why)
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{summary_path}: not JSON ({err})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("rounds"), list):
        raise ValueError(f"{summary_path}: no 'rounds' list: not a fedzero run summary")
    clients: dict[str, ClientHistory] = {}
    for rnd in summary["rounds"]:
        for row in rnd.get("clients", []):
            client = clients.setdefault(row["id"], ClientHistory(row["id"], row.get("fingerprint")))
            client.rounds.append(rnd["round"])
            client.train_loss.append(row.get("train_loss"))
            client.eval_loss.append(row.get("eval_loss"))
            client.accuracy.append(row.get("accuracy"))
    for row in summary.get("final", []):
        if row.get("id") in clients:
            clients[row["id"]].before = {k[:-len("_before")]: v for k, v in row.items() if k.endswith("_before")}
            clients[row["id"]].after = {k[:-len("_after")]: v for k, v in row.items() if k.endswith("_after")}
    return RunHistory(summary_path.parent, summary.get("strategy"), summary.get("labels"), clients)


def compare_runs(a: RunHistory, b: RunHistory) -> dict:
    """Per client in both runs: final eval loss of each, gain = B's loss - A's (positive: A lower), and
    where both recorded label metrics, each run's and A's gain (accuracy A - B)."""
    for run in (a, b):
        if not any(c.final("eval_loss") is not None for c in run.clients.values()):
            raise ValueError(f"{run.path}/{SUMMARY} records no eval loss per client (a federate run of an older "
                             "fedzero recorded train loss only; rerun `fedzero federate` into it: it scores the "
                             "rounds whose private parts the clients still keep)")
    common = [cid for cid in a.clients if cid in b.clients]
    if not common:
        raise ValueError(f"the runs share no client: {a.path} has {sorted(a.clients)}, {b.path} has {sorted(b.clients)}")
    rows, notes = [], []
    for cid in common:
        ca, cb = a.clients[cid], b.clients[cid]
        if ca.fingerprint != cb.fingerprint:
            notes.append(f"client {cid!r} has different backbones in the two runs ({ca.fingerprint} vs "
                         f"{cb.fingerprint}): its numbers are not comparable")
        la, lb = ca.final("eval_loss"), cb.final("eval_loss")
        row = {"client": cid, "eval_loss_a": la, "eval_loss_b": lb,
               "loss_gain": None if la is None or lb is None else lb - la,
               "loss_gain_pct": None if la is None or lb is None or lb == 0 else 100 * (lb - la) / lb}
        acc_a, acc_b = ca.final("accuracy"), cb.final("accuracy")
        if acc_a is not None and acc_b is not None:
            row.update(accuracy_a=acc_a, accuracy_b=acc_b, accuracy_gain=acc_a - acc_b)
        rows.append(row)
    for run, other in ((a, b), (b, a)):
        only = sorted(set(run.clients) - set(other.clients))
        if only:
            notes.append(f"only in {run.path}: {only}")
    if a.labels and b.labels and a.labels != b.labels:
        notes.append(f"the runs scored different label words ({a.labels} vs {b.labels}): accuracies not comparable")
    gains = [r["loss_gain"] for r in rows if r["loss_gain"] is not None]
    return {"a": a.describe(), "b": b.describe(), "clients": rows, "notes": notes,
            "mean_loss_gain": sum(gains) / len(gains) if gains else None}


def format_comparison(result: dict) -> str:
    rows = result["clients"]
    with_acc = any("accuracy_gain" in r for r in rows)
    head = (f"{'client':<16}{'eval loss A':>13}{'B':>10}{'gain':>10}{'gain %':>9}"
            + (f"{'accuracy A':>13}{'B':>8}{'gain':>8}" if with_acc else ""))
    lines = [f"A: {result['a']}", f"B: {result['b']}", "gain: how much better A is (eval loss B - A; accuracy A - B)",
             "", head]
    for r in rows:
        line = f"{r['client']:<16}{_num(r['eval_loss_a'], 13, 4)}{_num(r['eval_loss_b'], 10, 4)}" \
               f"{_num(r['loss_gain'], 10, 4, sign=True)}{_num(r['loss_gain_pct'], 9, 2, sign=True)}"
        if with_acc:
            line += (f"{_num(r.get('accuracy_a'), 13, 3)}{_num(r.get('accuracy_b'), 8, 3)}"
                     f"{_num(r.get('accuracy_gain'), 8, 3, sign=True)}")
        lines.append(line)
    if result["mean_loss_gain"] is not None:
        lines.append(f"{'mean':<16}{'':>23}{_num(result['mean_loss_gain'], 10, 4, sign=True)}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def _num(value, width: int, digits: int, *, sign: bool = False) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>+{width}.{digits}f}" if sign else f"{value:>{width}.{digits}f}"


def add_compare_parser(subparsers):
    p = subparsers.add_parser("compare", help="per-client final eval loss (and accuracy) of two runs and the gain of "
                                              "the first over the second: did federating help? (e.g. a run against "
                                              "its --strategy local control)")
    p.add_argument("run_a", metavar="RUN_A", help="a run directory (its summary.json), e.g. the federated run")
    p.add_argument("run_b", metavar="RUN_B", help="the run to compare against, e.g. the --strategy local run")
    p.add_argument("--out", help="also write the comparison as JSON")
    p.set_defaults(func=run_compare)
    return p


def run_compare(args) -> int:
    result = compare_runs(read_run(args.run_a), read_run(args.run_b))
    print(format_comparison(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0
