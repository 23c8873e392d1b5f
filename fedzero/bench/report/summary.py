"""A report's numbers: from results.json to, per setting, each method's levels over seeds, its gains
over its controls with paired bootstrap intervals, budgets, prediction spreads and CMGA's effect
(the definitions are in the package docstring)."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict

import numpy as np

from ..bootstrap import paired_bootstrap
from ..stats import CLASS_METRICS, LM_GAINS, LM_METRICS, Interval, Outcomes, decode_run, outcome_metrics, prior_only

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
    from .gate import gate_summary      # gate.py builds on this module's gains
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
        entry["gate"] = gate_summary(entry, runs_by[setting], setting_spec["methods"], task_of(results) == "lm")
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
        dema = {k: v for k, v in (m.get("dema") or {}).items()          # sharing does not change local training
                if k not in ("share", "depth_overlap_min")}
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


def gain_rows(entry: dict) -> list[str]:
    """Row order of the gain tables: the prior-only controls first (the reference), then the methods."""
    return [*entry.get("priors", {}), *(n for n in entry.get("gains", {}) if n not in entry.get("priors", {}))]
