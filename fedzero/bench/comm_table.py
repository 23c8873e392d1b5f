"""Shared bytes per client and round on LLaMA-2 7B / 13B / 70B, from their configs alone (no weights):
DeMA at its defaults vs FedIT's LoRA r=16 on q,k,v,o vs sending the full model. Counts come from
fedzero.comm; bytes = parameters × bytes per element of what travels (default 2: bf16).

The configs are configs/models/llama-2-{7b,13b,70b}.json when the repository has them; otherwise
the public values below (Meta's Llama-2 release configs: same numbers).
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

from fedzero.adapters.dema import DeMAConfig
from fedzero.comm import dema_shared_params, full_model_params, lora_params

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"
MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
_COMMON = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096,
           "tie_word_embeddings": False, "hidden_act": "silu", "rms_norm_eps": 1e-05}
PUBLIC_CONFIGS = {
    "llama-2-7b": {**_COMMON, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_COMMON, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-2-70b": {**_COMMON, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
}


def llama2_configs(config_dir: Path | None = REPO_CONFIGS) -> dict[str, tuple[dict, str]]:
    """{model: (config dict, where it came from)}."""
    out = {}
    for name in MODELS:
        path = None if config_dir is None else Path(config_dir) / f"{name}.json"
        if path is not None and path.is_file():
            out[name] = (json.loads(path.read_text()), str(path))
        else:
            out[name] = (PUBLIC_CONFIGS[name], "fedzero.bench.comm_table.PUBLIC_CONFIGS")
    return out


def comm_rows(dema: DeMAConfig | None = None, lora_rank: int = 16, bytes_per_param: int = 2,
              config_dir: Path | None = REPO_CONFIGS) -> list[dict]:
    """Per LLaMA-2 model: parameters a client uploads per round with the full model, LoRA (FedIT),
    DeMA as configured (default: shape-matched, so its width's projector bank travels too) and DeMA
    with experts-only sharing (what crosses widths)."""
    dema = dema or DeMAConfig()
    experts = dema_shared_params(dataclasses.replace(dema, share="experts-only"))
    rows = []
    for name, (cfg, source) in llama2_configs(config_dir).items():
        full, lora = full_model_params(cfg), lora_params(cfg, lora_rank)
        shared = dema_shared_params(dema, cfg["hidden_size"])
        rows.append({
            "model": name, "config": source, "bytes_per_param": bytes_per_param,
            "full_params": full, "lora_params": lora, "dema_params": shared, "dema_experts_params": experts,
            "full_bytes": full * bytes_per_param, "lora_bytes": lora * bytes_per_param,
            "dema_bytes": shared * bytes_per_param, "dema_experts_bytes": experts * bytes_per_param,
            "dema_vs_lora": shared / lora, "dema_vs_full": shared / full, "lora_vs_full": lora / full,
            "dema_experts_vs_lora": experts / lora,
            "reduction_vs_lora_pct": 100 * (1 - shared / lora), "reduction_vs_full_pct": 100 * (1 - shared / full),
        })
    return rows


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def comm_markdown(rows: list[dict], dema: DeMAConfig | None = None, lora_rank: int = 16) -> str:
    dema = dema or DeMAConfig()
    bpp = rows[0]["bytes_per_param"] if rows else 2
    lines = [f"Shared per client and round (upload; the download is the same size), {bpp} bytes per parameter. "
             f"DeMA r={dema.rank}, M={dema.num_experts}, S={dema.num_slots}, h={dema.expert_hidden}, share={dema.share} "
             f"(experts + gates, plus the width's {dema.num_slots} per-slot projector pairs when projectors are shared); "
             f"'experts only': what a client sends with share=experts-only (all that crosses widths); "
             f"LoRA r={lora_rank} on q,k,v,o (FedIT).",
             "",
             "| model | full model | LoRA r=16 (FedIT) | DeMA | DeMA experts only | DeMA / LoRA | experts only / LoRA | DeMA / full | LoRA / full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['full_params'] / 1e9:.2f}B params, {_size(r['full_bytes'])} "
                     f"| {r['lora_params'] / 1e6:.2f}M, {_size(r['lora_bytes'])} "
                     f"| {r['dema_params'] / 1e6:.2f}M, {_size(r['dema_bytes'])} "
                     f"| {r['dema_experts_params'] / 1e3:.0f}k, {_size(r['dema_experts_bytes'])} "
                     f"| {100 * r['dema_vs_lora']:.2f}% | {100 * r['dema_experts_vs_lora']:.2f}% "
                     f"| {100 * r['dema_vs_full']:.4f}% | {100 * r['lora_vs_full']:.3f}% |")
    return "\n".join(lines)


# -- the transfer mechanisms (docs/benchmarks.md, "Making transfer pay across architectures") ------------

def mechanism_rows(dema: DeMAConfig | None = None, lora_rank: int = 16, bytes_per_param: int = 2,
                   anchors: int = 64, labels: int = 3, top_k: int = 16, positions_per_anchor: int = 64,
                   config_dir: Path | None = REPO_CONFIGS) -> list[dict]:
    """Per LLaMA-2 model, the bytes a client uploads per round under each transfer mechanism next to
    FedIT's LoRA, from the configs alone. Weight sharing at `bytes_per_param`; predictions as the store
    holds them: label-level N x C float32, token-level top_k (int32 id + float32 probability) per scored
    position (positions_per_anchor is an upper figure: the anchors' token count, at most max_length);
    the canonical projector's bases are sent once, at round 0: one N x m float64 per decoder layer."""
    dema = dema or DeMAConfig()
    experts = dema_shared_params(dataclasses.replace(dema, share="experts-only")) * bytes_per_param
    label = anchors * labels * 4
    token = anchors * positions_per_anchor * top_k * 8
    rows = []
    for name, (cfg, _) in llama2_configs(config_dir).items():
        bank = dema_shared_params(dataclasses.replace(dema, share="shape-matched"), cfg["hidden_size"]) * bytes_per_param
        rows.append({"model": name, "fedit": lora_params(cfg, lora_rank) * bytes_per_param,
                     "experts_only": experts, "shape_matched": bank, "depth_aware": bank,
                     "canonical_per_round": experts,
                     "canonical_once": cfg["num_hidden_layers"] * dema.num_anchors * dema.canonical_dims * 8,
                     "distill_label": label, "distill_token": token})
    return rows


def mechanism_markdown(rows: list[dict], dema: DeMAConfig | None = None) -> str:
    dema = dema or DeMAConfig()
    lines = ["Upload per client and round (the download is as large, but a token-level teacher is the union of the "
             "others' top tokens, so up to (clients − 1) times wider): weights in bf16, predictions as stored. DeMA "
             f"r={dema.rank}, M={dema.num_experts}, S={dema.num_slots}; canonical: {dema.num_anchors} anchors, "
             f"m={dema.canonical_dims} components per layer, sent once; distillation: 64 anchors, 3 labels or top-16 "
             "next tokens at up to 64 positions each. `python -m fedzero.bench.comm_table`.",
             "",
             "| model | FedIT LoRA r=16 | experts only (FedAvg/CMGA) | shape-matched or depth-aware | canonical | "
             "label distillation | token distillation |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {_size(r['fedit'])} | {_size(r['experts_only'])} | {_size(r['shape_matched'])} "
                     f"| {_size(r['canonical_per_round'])} + {_size(r['canonical_once'])} once "
                     f"| {_size(r['distill_label'])} | ≤ {_size(r['distill_token'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(comm_markdown(comm_rows()))
    print()
    print(mechanism_markdown(mechanism_rows()))
