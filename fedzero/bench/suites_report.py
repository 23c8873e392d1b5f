"""The suites of the first report (docs/benchmarks.md): quick (the harness check), full (the
report's numbers), tune (gate temperature x DeMA lr on the val split), long (twice the training) and
depth30 (SmolLM2-135M itself as a client), and the method lists other suites draw from.

Settings:
    A  different backbones across clients. FedIT can only federate within a same-backbone group;
       rank-heterogeneous LoRA methods do not apply across widths. DeMA federates everyone.
    B  one backbone, heterogeneous LoRA budgets (ranks): where HetLoRA/FLoRA/FlexLoRA apply. FedIT
       (one rank for all) against LoRA local-only is the control that federation pays on this task.

DeMA's lr and gate temperature were chosen by the tune suite on the val split (data.score "val"),
never on the test sets; LoRA's lr is a common value, not tuned.
"""

from __future__ import annotations

import copy

from .peakmem import METHODS as MEMORY_METHODS


def methods_a() -> list[dict]:
    return [
        {"name": "lora-local", "runner": "lora", "strategy": "local", "rank": 16,
         "description": "PEFT LoRA r=16 on q,k,v,o, no federation"},
        {"name": "fedit", "runner": "lora", "strategy": "fedit", "rank": 16,
         "description": "FedAvg of LoRA r=16 within each same-backbone group"},
        # experts-only: the learned projectors stay private (DeMA's default before this benchmark)
        {"name": "dema-local", "runner": "dema", "strategy": "local", "dema": {"share": "experts-only"},
         "description": "DeMA (learned projectors), no federation"},
        {"name": "dema-fedavg", "runner": "dema", "strategy": "fedavg", "dema": {"share": "experts-only"},
         "description": "DeMA, experts-only sharing, FedAvg of the shared experts and gates"},
        {"name": "dema-cmga", "runner": "dema", "strategy": "cmga", "dema": {"share": "experts-only"},
         "description": "DeMA, experts-only sharing, CMGA over backbone groups"},
    ]


def methods_b(het_local: bool) -> list[dict]:
    methods = methods_a()[:2]
    if het_local:
        methods.append({"name": "lora-local-het", "runner": "lora", "strategy": "local", "rank": "client",
                        "description": "PEFT LoRA at each client's own rank, no federation"})
    methods += [
        {"name": "hetlora", "runner": "lora", "strategy": "hetlora", "rank": "client",
         "description": "zero-padded averaging of heterogeneous ranks, truncated back"},
        {"name": "flora", "runner": "lora", "strategy": "flora", "rank": "client",
         "description": "stacked factors merged into the base, fresh LoRA each round"},
        {"name": "flexlora", "runner": "lora", "strategy": "flexlora", "rank": "client",
         "description": "average of the full dW, SVD back to each rank"},
    ]
    return methods + methods_a()[2:]


QUICK = {
    "name": "quick",
    "description": "Harness check, minutes on 2 cores: a 10-layer SmolLM2 variant healed for only a few "
                   "steps and a tiny small-LLaMA, 2 rounds x 2 local steps, 6 test tweets per topic, scored after the last round. "
                   "Its numbers say nothing about the methods.",
    "seeds": [0, 1],
    "backbones": {
        "smol10": {"kind": "depth", "layers": 10, "heldout_blocks": 4,
                   "train": {"steps": 8, "batch_size": 4, "seq_len": 64, "lr": 3e-4, "warmup_steps": 2}},
        "small128": {"kind": "small", "heldout_blocks": 4,
                     "config": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "intermediate_size": 384},
                     "train": {"steps": 8, "batch_size": 4, "seq_len": 64, "lr": 1e-3, "warmup_steps": 2}},
    },
    "data": {"train_per_client": 48, "test_per_topic": 6, "val_per_topic": 0, "round_eval_per_topic": 2,
             "max_chars": 80},
    "rounds": 2,
    "eval_every": 2,            # scoring is most of a run's time: the final round only
    "train": {"local_steps": 2, "batch_size": 4, "max_length": 64, "schedule": "cosine", "eval_batch_size": 27},
    "lr": {"dema": 3e-3, "lora": 1e-3},
    "settings": {
        "A": {"description": "two clients on the 10-layer variant (a FedIT group), one on the small LLaMA",
              "clients": [{"id": "A-airlines-smol10", "backbone": "smol10", "topics": ["airlines"]},
                          {"id": "A-apple-smol10", "backbone": "smol10", "topics": ["apple"]},
                          {"id": "A-coachella-small128", "backbone": "small128", "topics": ["coachella"]}],
              "methods": methods_a()},
        "B": {"description": "three clients on the 10-layer variant, LoRA ranks 4 / 8 / 16",
              "clients": [{"id": "B-airlines-r4", "backbone": "smol10", "topics": ["airlines"], "rank": 4},
                          {"id": "B-apple-r8", "backbone": "smol10", "topics": ["apple"], "rank": 8},
                          {"id": "B-coachella-r16", "backbone": "smol10", "topics": ["coachella"], "rank": 16}],
              "methods": methods_b(het_local=False)},
    },
    "memory": {"backbone": "smol10", "batch_size": 4, "seq_len": 64, "steps": 2, "methods": list(MEMORY_METHODS)},
}

def dema_variants() -> list[dict]:
    """DeMA's sharing / projector options, each x {FedAvg, CMGA}, the local-only control of the
    anchor projector (sharing options do not change local training; projector options do), and
    output distillation on the public anchors, alone and on top of shape-matched FedAvg."""
    shaped = {"share": "shape-matched"}
    anchor = {"projector": "anchor+learned", "anchor_out": True, "share": "experts-only"}  # anchor projectors never travel
    distill = {"weight": 1.0, "anchors": 64, "batch_size": 4}
    return [
        {"name": "dema-shaped-fedavg", "runner": "dema", "strategy": "fedavg", "dema": shaped,
         "description": "DeMA, shape-matched sharing (projectors too, among equal widths), FedAvg"},
        {"name": "dema-shaped-cmga", "runner": "dema", "strategy": "cmga", "dema": shaped,
         "description": "DeMA, shape-matched sharing, CMGA"},
        {"name": "dema-anchor-local", "runner": "dema", "strategy": "local", "dema": anchor,
         "description": "DeMA, anchor+learned in-projector, anchor out-projector, no federation"},
        {"name": "dema-anchor-fedavg", "runner": "dema", "strategy": "fedavg", "dema": anchor,
         "description": "DeMA, anchor+learned in-projector, anchor out-projector, FedAvg"},
        {"name": "dema-anchor-cmga", "runner": "dema", "strategy": "cmga", "dema": anchor,
         "description": "DeMA, anchor+learned in-projector, anchor out-projector, CMGA"},
        # method.md's fallback when weights carry nothing across widths: transfer through outputs
        {"name": "dema-distill-local", "runner": "dema", "strategy": "local", "dema": {"share": "experts-only"},
         "distill": distill,
         "description": "DeMA, no weights travel; label predictions on 64 public anchor prompts are "
                        "exchanged and each client distils from the others' mean"},
        {"name": "dema-distill-shaped-fedavg", "runner": "dema", "strategy": "fedavg", "dema": shaped,
         "distill": distill, "description": "DeMA, shape-matched FedAvg plus anchor-output distillation"},
    ]


# What the report's numbers come from, sized to run in about 1 h 45 min on 2 CPU cores (two bench
# workers of one torch thread each sharing OUT). SmolLM2-135M itself (30 layers) is the source of
# the depth variants, but no federation client runs it: a 30-layer client costs three 10-layer ones,
# and 21 methods x 3 seeds did not fit. Evaluation is half of a run's cost (3 label words scored per
# tweet), hence 24 test tweets per topic and per-round curves every 2 rounds on 6 per topic.
FULL = {
    "name": "full",
    "description": "The report's suite: two healed depth variants of SmolLM2-135M (10 and 6 of its 30 layers) "
                   "and a 256-wide LLaMA pretrained on public text; 3 seeds, 4 rounds x 6 local steps.",
    "seeds": [0, 1, 2],
    "backbones": {
        "smollm2": {"kind": "smollm2", "heldout_blocks": 24},
        "smol10": {"kind": "depth", "layers": 10, "heldout_blocks": 24,
                   "train": {"steps": 160, "batch_size": 8, "seq_len": 64, "lr": 5e-4, "warmup_steps": 10}},
        "smol6": {"kind": "depth", "layers": 6, "heldout_blocks": 24,
                  "train": {"steps": 160, "batch_size": 8, "seq_len": 64, "lr": 5e-4, "warmup_steps": 10}},
        "small256": {"kind": "small", "heldout_blocks": 24,
                     "config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "intermediate_size": 768},
                     "train": {"steps": 300, "batch_size": 8, "seq_len": 64, "lr": 1e-3, "warmup_steps": 20}},
    },
    "data": {"train_per_client": 192, "test_per_topic": 24, "val_per_topic": 20, "round_eval_per_topic": 6,
             "max_chars": 120},
    "rounds": 4,
    "eval_every": 2,
    "train": {"local_steps": 6, "batch_size": 8, "max_length": 64, "schedule": "cosine", "warmup_steps": 3,
              "eval_batch_size": 40},
    "lr": {"dema": 3e-3, "lora": 1e-3},
    "settings": {
        "A": {"description": "two clients on the healed 10-layer SmolLM2 variant (a FedIT group), one on the "
                             "healed 6-layer variant (same width), one on the 256-wide small LLaMA",
              "clients": [{"id": "A-airlines-smol10", "backbone": "smol10", "topics": ["airlines"]},
                          {"id": "A-apple-smol10", "backbone": "smol10", "topics": ["apple"]},
                          {"id": "A-coachella-smol6", "backbone": "smol6", "topics": ["coachella"]},
                          {"id": "A-deflategate-small256", "backbone": "small256", "topics": ["deflategate"]}],
              "methods": methods_a() + dema_variants()},
        "B": {"description": "three clients on the healed 10-layer SmolLM2 variant, LoRA ranks 4 / 8 / 16",
              "clients": [{"id": "B-airlines-r4", "backbone": "smol10", "topics": ["airlines"], "rank": 4},
                          {"id": "B-apple-r8", "backbone": "smol10", "topics": ["apple"], "rank": 8},
                          {"id": "B-coachella-r16", "backbone": "smol10", "topics": ["coachella"], "rank": 16}],
              # One backbone is one CMGA group, and CMGA over one group is FedAvg exactly (tested), so the
              # CMGA runs would repeat the FedAvg ones. Shape-matched FedAvg shares the whole adapter
              # here: the identical-backbone sanity check.
              "methods": [m for m in methods_b(het_local=True) if m["name"] != "dema-cmga"]
                         + [m for m in dema_variants() if m["name"] == "dema-shaped-fedavg"]},
    },
    "memory": {"backbone": "smollm2", "batch_size": 8, "seq_len": 64, "steps": 3, "methods": list(MEMORY_METHODS)},
}


def _tune() -> dict:
    """The gate temperature x DeMA lr grid of fedzero's defaults, chosen on the val split: the full
    suite's setting A (same backbones, clients, data cut and budget) with the val sets scored in
    place of the test sets, DeMA with default sharing and FedAvg, 2 seeds, final round only."""
    suite = copy.deepcopy(FULL)
    setting = suite["settings"]["A"]
    setting["methods"] = [
        {"name": f"dema-t{t:g}-lr{lr:g}", "runner": "dema", "strategy": "fedavg", "lr": lr,
         "dema": {"temperature": t}, "description": f"DeMA (defaults), FedAvg, gate temperature {t:g}, lr {lr:g}"}
        for t in (0.5, 1.0, 2.0) for lr in (1e-3, 3e-3, 1e-2)]
    return {**suite, "name": "tune", "seeds": [0, 1], "settings": {"A": setting}, "memory": None,
            "description": "Gate temperature x DeMA lr on the val split (setting A of the full suite, 2 seeds)",
            "data": {**suite["data"], "score": "val", "round_eval_per_topic": 0}}


def _long() -> dict:
    """Twice the full suite's training (8 rounds x 6 local steps, the cosine schedule stretched over
    them) for the methods the conclusions rest on: does a longer run change who beats training alone?"""
    suite = copy.deepcopy(FULL)
    keep = {"A": ("lora-local", "dema-local", "dema-shaped-fedavg", "dema-distill-local"),
            "B": ("lora-local", "fedit", "dema-local", "dema-shaped-fedavg")}
    settings = {name: {**suite["settings"][name],
                       "methods": [m for m in suite["settings"][name]["methods"] if m["name"] in methods]}
                for name, methods in keep.items()}
    return {**suite, "name": "long", "rounds": 8, "settings": settings, "memory": None,
            "description": "The full suite's testbed and data, 8 rounds x 6 local steps, 3 seeds, the methods "
                           "the conclusions rest on"}


def depth30_mechanisms() -> list[dict]:
    """What answers this setting's two failures: projectors shared only where the clients' depth ranges
    overlap (share 'depth-aware', docs/method.md), and a teacher that weighs each client by its held-out
    loss, so the 30-layer client is not pulled towards the weaker ones (distill.teacher 'quality')."""
    distill = {"weight": 1.0, "anchors": 64, "batch_size": 4}
    return [{"name": "dema-depthaware-fedavg", "runner": "dema", "strategy": "fedavg",
             "dema": {"share": "depth-aware", "depth_overlap_min": 0.5},
             "description": "DeMA, projectors shared per slot only among clients whose depth ranges overlap "
                            "(IoU >= 0.5), weighted by the overlap; experts as usual; FedAvg"},
            {"name": "dema-distill-quality", "runner": "dema", "strategy": "local", "dema": {"share": "experts-only"},
             "distill": {**distill, "teacher": "quality"},
             "description": "DeMA, no weights travel; distillation on 64 public anchors, quality-weighted teacher"}]


def _depth30() -> dict:
    """What the full suite cut: SmolLM2-135M itself (30 layers) as a client, beside its healed 10- and
    6-layer variants and the 256-wide LLaMA (four backbones, four topics), at the full suite's budget."""
    suite = copy.deepcopy(FULL)
    a = suite["settings"]["A"]
    clients = [{"id": "C-airlines-smollm2", "backbone": "smollm2", "topics": ["airlines"]},
               {"id": "C-apple-smol10", "backbone": "smol10", "topics": ["apple"]},
               {"id": "C-coachella-smol6", "backbone": "smol6", "topics": ["coachella"]},
               {"id": "C-deflategate-small256", "backbone": "small256", "topics": ["deflategate"]}]
    keep = ("dema-local", "dema-shaped-fedavg", "dema-distill-local")     # the control and the two that moved
    setting = {"description": "SmolLM2-135M (30 layers), its healed 10- and 6-layer variants (same width) and the "
                              "256-wide small LLaMA, one topic each",
               "clients": clients, "methods": [m for m in a["methods"] if m["name"] in keep] + depth30_mechanisms()}
    return {**suite, "name": "depth30", "settings": {"C": setting}, "memory": None,
            "description": "The full suite's budget with SmolLM2-135M itself as one of four heterogeneous clients"}


SUITES = {"quick": QUICK, "full": FULL, "tune": _tune(), "long": _long(), "depth30": _depth30()}
