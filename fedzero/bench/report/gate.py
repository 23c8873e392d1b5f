"""The gate a transfer mechanism must pass to become a default (docs/benchmarks.md, "The gate").

On one task's suite, a DeMA method passes when, over at least 5 seeds:
- its global gain over each reference is at least 5 points of macro-F1 (the LM task: 5% lower NLL
  per token) with the 95% paired bootstrap interval above zero; the references are training alone
  with either adapter (dema-local, lora-local) and the applicable baseline (fedit);
- (classification) its gain over the prior-only control of its own local-only control, the transfer,
  has its 95% interval above zero: a re-fitted label prior alone does not explain it;
- no client loses more than 2 points (LM: 2%) on its own data against training alone (dema-local),
  point estimate.
A mechanism becomes a default only if it passes on both tasks; each suite's report judges its own.
"""

from __future__ import annotations

from ..stats import CLASS_METRICS, LM_GAINS
from .summary import interval_gain, run_outcomes

REFERENCES = ("dema-local", "lora-local", "fedit")
ALONE = "dema-local"          # the own-data check's reference: the same adapters, trained alone
MIN_GAIN = 0.05               # 5 points of macro-F1, or 5% lower NLL per token
MAX_OWN_LOSS = 0.02           # 2 points, or 2%
MIN_SEEDS = 5


def candidates(specs: list[dict], present) -> list[str]:
    """The methods a gate judges: DeMA methods that are not a reference or a replica (present: the
    methods with runs)."""
    return [s["name"] for s in specs if s.get("runner") == "dema" and not s.get("replica")
            and s["name"] not in REFERENCES and s["name"] in present]


def gate_summary(entry: dict, runs_by_method: dict[str, list[dict]], specs: list[dict], lm: bool) -> dict:
    """{method: {"vs": {reference: Interval}, "transfer": Interval | None, "own_worst": (client, Interval),
    "seeds": [...], "fails": [reasons], "passes": bool}} for every candidate; {} without dema-local."""
    if ALONE not in entry["methods"]:
        return {}
    metric, metrics = ("nll_per_token", LM_GAINS) if lm else ("macro_f1", CLASS_METRICS)
    refs = [r for r in REFERENCES if r in entry["methods"]]
    names = candidates(specs, entry["methods"])
    outcomes = {n: run_outcomes(runs_by_method.get(n, [])) for n in names + refs}
    out = {}
    for name in names:
        row = {"vs": {}, "transfer": None, "own_worst": None, "seeds": entry["methods"][name]["seeds"], "fails": []}
        for ref in refs:
            gain = interval_gain(outcomes[name], outcomes[ref], entry["clients"], ref, metrics)
            row["vs"][ref] = gain["mean"]["global"][metric]
            if ref == ALONE:
                own = [(c, gain["per_client"][c]["own"][metric]) for c in entry["clients"]
                       if gain["per_client"][c]["own"][metric] is not None]
                row["own_worst"] = min(own, key=lambda item: item[1].point) if own else None
        if not lm:
            row["transfer"] = (entry.get("transfer", {}).get(name) or {}).get("mean", {}).get("global", {}).get(metric)
        row["fails"] = _fails(row, refs, lm)
        row["passes"] = not row["fails"]
        out[name] = row
    return out


def _fails(row: dict, refs: list[str], lm: bool) -> list[str]:
    unit = "%" if lm else " points"
    fails = [f"no {r} runs" for r in REFERENCES if r not in refs]
    if len(row["seeds"]) < MIN_SEEDS:
        fails.append(f"{len(row['seeds'])} seeds (< {MIN_SEEDS})")
    for ref, g in row["vs"].items():
        if g is None or g.low is None:
            fails.append(f"no interval against {ref}")
        elif g.point < MIN_GAIN or g.low <= 0:
            fails.append(f"{g.point * 100:+.1f}{unit} against {ref}" + (" (interval not above 0)" if g.low <= 0 else ""))
    if not lm:
        t = row["transfer"]
        if t is None or t.low is None or t.low <= 0:
            fails.append("transfer over the prior-only control not above 0" if t is not None else "no transfer interval")
    if row["own_worst"] is None:
        fails.append("no own-data gains")
    elif row["own_worst"][1].point < -MAX_OWN_LOSS:
        client, g = row["own_worst"]
        fails.append(f"{client} loses {-g.point * 100:.1f}{unit} on its own data")
    return fails


def gate_table(entry: dict, lm: bool, interval) -> list[str]:
    """The report's gate table (interval: the tables' formatter of an Interval)."""
    gate = entry.get("gate")
    if not gate:
        return []
    digits = 2 if lm else 1
    unit = "% lower NLL per token" if lm else "points of macro-F1"
    lines = ["", f"The gate (fedzero/bench/report/gate.py): global gain in {unit} over training alone (dema-local, "
             "lora-local) and the baseline (fedit), each needing >= 5 with its 95% interval above 0"
             + ("" if lm else "; the transfer over the prior-only control above 0")
             + f"; the worst client's own-data gain over dema-local no worse than -2; {MIN_SEEDS} seeds.", "",
             "| method | vs dema-local | vs lora-local | vs fedit |" + ("" if lm else " transfer |")
             + " worst own Δ | seeds | verdict |",
             "|---|---:|---:|---:|" + ("" if lm else "---:|") + "---|---|---|"]
    for name, row in gate.items():
        cells = [interval(row["vs"].get(r), digits) for r in REFERENCES]
        if not lm:
            cells.append(interval(row["transfer"], digits))
        worst = "–" if row["own_worst"] is None else f"{interval(row['own_worst'][1], digits)} ({row['own_worst'][0]})"
        verdict = "passes" if row["passes"] else "fails: " + "; ".join(row["fails"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {worst} | {row['seeds']} | {verdict} |")
    return lines
