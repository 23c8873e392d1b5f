"""Is the shared space aligned, per projector kind? The round-0 coordinate alignment of z = P(x)
(fedzero.adapters.dema.alignment) between the hetero testbed's clients, before any training.

    python benchmarks/alignment_by_projector.py --out docs/benchmarks/alignment/alignment.json

For each projector kind, every client of the `hetero` suite (two healed 10-layer SmolLM2 variants, the
384-wide GPT-NeoX-layout model, the 256-wide LLaMA; backbones from the bench cache, built if absent)
gets DeMA injected as a bench run would, and the alignment is measured on 96 in-domain tweets of a topic
no client holds (driverless_cars), disjoint from the 256 that the in-domain projectors are built or
fitted on (the bench's own carving: fedzero.bench.data.topic_anchor_texts, split seed 0). Kinds:
learned (random init), anchor on the bundled public speeches, anchor on the in-domain tweets (mean-pooled
relative codes, with and without whitening), canonical fitted on the speeches, canonical fitted on the
in-domain tweets. Cross-architecture pairs are the ones that matter: the two SmolLM2 clients share one
backbone (their alignment is 1 by construction for every kind but a seeded random one).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

KINDS = {
    "learned": ({"projector": "learned"}, None),
    "anchor, public speeches": ({"projector": "anchor"}, None),
    "anchor, in-domain": ({"projector": "anchor"}, "topic"),
    "anchor + whitening, in-domain": ({"projector": "anchor", "anchor_whiten": True}, "topic"),
    "canonical, public speeches": ({"projector": "canonical"}, None),
    "canonical, in-domain": ({"projector": "canonical"}, "topic"),
}
TOPIC = "driverless_cars"
MEASURE = 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", help="bench backbone cache (default ~/.cache/fedzero/bench)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from fedzero.adapters.dema import DeMAConfig, inject_dema
    from fedzero.adapters.dema.alignment import alignment_report
    from fedzero.backbones import load_backbone
    from fedzero.backbones.recipes import prepare_backbone
    from fedzero.bench.data import DataSettings, load_records, topic_anchor_texts
    from fedzero.bench.methods.dema import canonical_fit, summarize_alignment
    from fedzero.bench.suites import load_suite
    from fedzero.data import load_tokenizer

    suite = load_suite("hetero")
    clients = suite["settings"]["H"]["clients"]
    backbones = {c["backbone"]: prepare_backbone(c["backbone"], suite["backbones"][c["backbone"]], args.cache_dir,
                                                 log=lambda *_: None) for c in clients}
    tokenizers = {name: load_tokenizer(b.tokenizer_source, b.spec.path) for name, b in backbones.items()}
    data = DataSettings.from_dict(suite["data"])
    config = DeMAConfig(share="experts-only")
    texts = topic_anchor_texts(load_records(data), TOPIC, config.num_anchors + MEASURE, clients=clients, seed=0,
                               max_chars=data.max_chars)
    fit, measure = [t["text"] for t in texts[:config.num_anchors]], [t["text"] for t in texts[config.num_anchors:]]
    max_length = int(suite["train"]["max_length"])
    ctx = SimpleNamespace(clients=clients, tokenizer=lambda backbone: tokenizers[backbone])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        in_domain = Path(tmp) / "anchors.jsonl"
        in_domain.write_text("".join(json.dumps({"text": t}) + "\n" for t in fit))
        for kind, (fields, source) in KINDS.items():
            t0 = time.time()
            cfg = DeMAConfig(share="experts-only", **fields, anchor_file=str(in_domain) if source else None)
            models = [load_backbone(backbones[c["backbone"]].spec)[0] for c in clients]
            try:
                canonical = canonical_fit(cfg, ctx, models, max_length)[0] if cfg.uses_canonical else {}
            except ValueError as err:     # e.g. anchors whose last tokens are alike span too few directions
                rows[kind] = {"error": str(err)}
                print(f"{kind:<32} cannot be built: {err}", flush=True)
                continue
            handles = {c["id"]: inject_dema(m, cfg, tokenizer=tokenizers[c["backbone"]], canonical=canonical.get(i))
                       for i, (c, m) in enumerate(zip(clients, models))}
            report = summarize_alignment(alignment_report(handles, {c["id"]: tokenizers[c["backbone"]] for c in clients},
                                                          measure, max_length=max_length))
            cross = [p["mean"] for pair, p in report["pairs"].items() if not _same_backbone(pair, clients)]
            report["cross_architecture_mean"] = round(sum(cross) / len(cross), 4)
            report["seconds"] = round(time.time() - t0, 1)
            rows[kind] = report
            print(f"{kind:<32} cross-architecture {report['cross_architecture_mean']:+.3f}  "
                  f"(chance sd {report['chance_sd_mean']:.3f}; {report['seconds']:.0f} s)", flush=True)
    pairs = next(r["pairs"] for r in rows.values() if "pairs" in r)
    print("\n| projector | " + " | ".join(p.replace("~", " ~ ") for p in pairs) + " | cross-architecture mean |")
    print("|---|" + "---:|" * (len(pairs) + 1))
    for kind, report in rows.items():
        if "error" in report:
            print(f"| {kind} | " + " | ".join("–" for _ in pairs) + f" | cannot be built: {report['error']} |")
            continue
        print(f"| {kind} | " + " | ".join(f"{p['mean']:+.2f}" for p in report["pairs"].values())
              + f" | {report['cross_architecture_mean']:+.2f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"topic": TOPIC, "fit_texts": len(fit), "measured_texts": len(measure),
                                              "rank": config.rank, "kinds": rows}, indent=2) + "\n")


def _same_backbone(pair: str, clients: list[dict]) -> bool:
    a, b = pair.split("~")
    backbone = {c["id"]: c["backbone"] for c in clients}
    return backbone[a] == backbone[b]


if __name__ == "__main__":
    main()
