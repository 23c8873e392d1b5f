"""The LM task's report tables (docs/lm_task.md): data sizes, NLL levels, communication, gains over
local-only with intervals, per-client gains and levels. The classification tables: tables.py."""

from __future__ import annotations

from ..stats import LM_METRICS
from .summary import VIEWS, fmt
from .cells import first_split, interval, mb


def lm_data_lines(results: dict, setting: str) -> list[str]:
    """Train and test sizes of the first seed's LM split (lm_data.LMSplit.summary)."""
    first = first_split(results, setting)
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


def lm_tables(entry: dict) -> list[str]:
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
                     f"| {mb(m['bytes_upload_per_client_round'])} | {mb(m['bytes_total'])} |")
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
                     + " | ".join(interval(g["mean"][v]["nll_per_token"], 2) for v in VIEWS) + f" | {g['seeds']} |")
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
                f"{interval(pc[c]['own']['nll_per_token'], 2)} \\| {interval(pc[c]['unseen']['nll_per_token'], 2)}"
                for c in clients) + " |")
    lines += ["", "Per client, global NLL per token:", "",
              "| method | " + " | ".join(f"`{c}`" for c in clients) + " |", "|---|" + "---:|" * len(clients)]
    for name, m in entry["methods"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(m["per_client"][c]["global"]) for c in clients) + " |")
    return lines
