"""Benchmark suites: the testbed, the data cut, the training budget and the methods, as plain dicts.

    fedzero bench --suite quick --out runs/bench-quick      # minutes: checks the harness end to end
    fedzero bench --suite full  --out runs/bench-full       # hours on 2 CPU cores: the report's numbers
    fedzero bench --suite tune  --out runs/bench-tune       # gate temperature x DeMA lr, scored on val
    fedzero bench --suite long  --out runs/bench-long       # the key methods with twice the training
    fedzero bench --suite depth30 --out runs/bench-depth30  # SmolLM2-135M itself as one of the clients
    fedzero bench --suite hetero-lm --out runs/bench-hetero-lm   # the LM task (docs/lm_task.md)
    fedzero bench --suite conflict --out runs/bench-conflict     # conflicting objectives: where CMGA can matter
    fedzero bench --suite my_suite.yaml --out DIR           # your own (same fields as below)

Every method of a suite gets the same clients, data, seeds, rounds, local steps, batch size and lr
schedule. A new DeMA variant is one more entry in a setting's "methods", e.g.
    {"name": "dema-anchor-cmga", "runner": "dema", "strategy": "cmga",
     "dema": {"projector": "anchor", "share": "shape-matched"}}
(the dema dict goes to DeMAConfig.from_dict unchanged: the suite is refused at start if DeMAConfig
does not know a field yet).

Settings:
    A  different backbones across clients. FedIT can only federate within a same-backbone group;
       rank-heterogeneous LoRA methods do not apply across widths. DeMA federates everyone.
    B  one backbone, heterogeneous LoRA budgets (ranks): where HetLoRA/FLoRA/FlexLoRA apply. FedIT
       (one rank for all) against LoRA local-only is the control that federation pays on this task.

DeMA's lr and gate temperature were chosen by the tune suite on the val split (data.score "val"),
never on the test sets; LoRA's lr is a common value, not tuned.

Tasks: a suite classifies tweet sentiment by topic unless it says "task": "lm": then it models the
language of per-client domains of the Debian fortunes corpus (docs/lm_task.md) and takes "lm_data"
(fedzero.bench.lm_data.LMDataSettings fields) in place of "data", and clients take "domains" in
place of "topics". Distillation exchanges label predictions, so an LM suite refuses it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from fedzero.backbones.recipes import check_backbone_spec

from .data import DataSettings, check_label_map
from .lm_data import FORTUNES_DOMAINS, LMDataSettings
from .methods import check_method

SUITE_FIELDS = {"name", "description", "task", "seeds", "backbones", "data", "lm_data", "rounds", "train", "lr",
                "eval_every", "settings", "memory"}
TASKS = ("classification", "lm")
SETTING_FIELDS = {"description", "clients", "methods"}
MEMORY_METHODS = ("full", "lora", "dema", "dema-side")


def _methods_a() -> list[dict]:
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


def _methods_b(het_local: bool) -> list[dict]:
    methods = _methods_a()[:2]
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
    return methods + _methods_a()[2:]


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
              "methods": _methods_a()},
        "B": {"description": "three clients on the 10-layer variant, LoRA ranks 4 / 8 / 16",
              "clients": [{"id": "B-airlines-r4", "backbone": "smol10", "topics": ["airlines"], "rank": 4},
                          {"id": "B-apple-r8", "backbone": "smol10", "topics": ["apple"], "rank": 8},
                          {"id": "B-coachella-r16", "backbone": "smol10", "topics": ["coachella"], "rank": 16}],
              "methods": _methods_b(het_local=False)},
    },
    "memory": {"backbone": "smol10", "batch_size": 4, "seq_len": 64, "steps": 2, "methods": list(MEMORY_METHODS)},
}

def _dema_variants() -> list[dict]:
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
              "methods": _methods_a() + _dema_variants()},
        "B": {"description": "three clients on the healed 10-layer SmolLM2 variant, LoRA ranks 4 / 8 / 16",
              "clients": [{"id": "B-airlines-r4", "backbone": "smol10", "topics": ["airlines"], "rank": 4},
                          {"id": "B-apple-r8", "backbone": "smol10", "topics": ["apple"], "rank": 8},
                          {"id": "B-coachella-r16", "backbone": "smol10", "topics": ["coachella"], "rank": 16}],
              # One backbone is one CMGA group, and CMGA over one group is FedAvg exactly (tested), so the
              # CMGA runs would repeat the FedAvg ones. Shape-matched FedAvg shares the whole adapter
              # here: the identical-backbone sanity check.
              "methods": [m for m in _methods_b(het_local=True) if m["strategy"] != "cmga"]
                         + [m for m in _dema_variants() if m["name"] == "dema-shaped-fedavg"]},
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
               "clients": clients, "methods": [m for m in a["methods"] if m["name"] in keep]}
    return {**suite, "name": "depth30", "settings": {"C": setting}, "memory": None,
            "description": "The full suite's budget with SmolLM2-135M itself as one of four heterogeneous clients"}


# The heterogeneous testbed: three widths and two families. SmolLM2's healed 10-layer
# variant (576 wide, LLaMA layout) holds two clients, so FedIT has a same-backbone group; a
# GPT-NeoX-layout model 384 wide (parallel residual, fused qkv, LayerNorm) and the 256-wide LLaMA,
# both pretrained briefly on the public text with SmolLM2's tokenizer (no pretrained model of another
# family ships in a package), hold one each.
HETERO_BACKBONES = {
    "smol10": FULL["backbones"]["smol10"],
    "neox384": {"kind": "small", "heldout_blocks": 24,
                "config": {"model_type": "gpt_neox", "hidden_size": 384, "num_hidden_layers": 4,
                           "num_attention_heads": 6, "intermediate_size": 1536, "rotary_pct": 0.25,
                           "use_parallel_residual": True},
                "train": {"steps": 300, "batch_size": 8, "seq_len": 64, "lr": 1e-3, "warmup_steps": 20}},
    "small256": FULL["backbones"]["small256"],
}
HETERO_CLIENTS = [{"id": "H-airlines-smol10", "backbone": "smol10", "topics": ["airlines"]},
                  {"id": "H-apple-smol10", "backbone": "smol10", "topics": ["apple"]},
                  {"id": "H-coachella-neox384", "backbone": "neox384", "topics": ["coachella"]},
                  {"id": "H-deflategate-small256", "backbone": "small256", "topics": ["deflategate"]}]


def _replica(method: dict) -> dict:
    """The method again with other training randomness (adapter init, data order) on the same test
    records: its gain over the method is what noise alone moves, the instrument's noise floor."""
    return {**method, "name": f"{method['name']}-replica", "replica": 1,
            "description": f"{method['name']} again, other training randomness: the noise floor"}


def _hetero() -> dict:
    """Sized to resolve a 3-point difference: 300 test tweets per topic (1,200 per global view), 5
    seeds, paired bootstrap intervals; the budget is where local-only's val curve has flattened
    (the hetero-budget suite)."""
    keep = ("lora-local", "fedit", "dema-local", "dema-fedavg", "dema-cmga")
    methods = [m for m in _methods_a() if m["name"] in keep]
    methods += [m for m in _dema_variants() if m["name"] in ("dema-shaped-fedavg", "dema-distill-local")]
    methods.append(_replica(next(m for m in methods if m["name"] == "dema-local")))
    setting = {"description": "four clients, three widths, two families: two on the healed 10-layer SmolLM2 "
                              "variant (576, LLaMA layout; a FedIT group), one on a 384-wide GPT-NeoX-layout "
                              "model, one on the 256-wide LLaMA; one topic each",
               "clients": HETERO_CLIENTS, "methods": methods}
    return {"name": "hetero",
            "description": "Heterogeneous clients (three widths, two layouts), 300 test tweets per topic, 5 seeds, "
                           "gains with 95% paired bootstrap intervals and the prior-only control",
            "seeds": [0, 1, 2, 3, 4], "backbones": copy.deepcopy(HETERO_BACKBONES),
            "data": {"train_per_client": 192, "test_per_topic": 300, "val_per_topic": 60,
                     "round_eval_per_topic": 15, "max_chars": 120},
            "rounds": 8, "eval_every": 2,
            "train": {"local_steps": 6, "batch_size": 8, "max_length": 64, "schedule": "cosine",
                      "warmup_steps": 3, "eval_batch_size": 40},
            "lr": {"dema": 3e-3, "lora": 1e-3}, "settings": {"H": setting}, "memory": None}


def _hetero_budget() -> dict:
    """How long local-only needs: the hetero testbed's local-only methods for twice the rounds,
    scored on the val split after every round (the test sets are never read)."""
    suite = _hetero()
    setting = suite["settings"]["H"]
    setting["methods"] = [m for m in setting["methods"]
                          if m["strategy"] == "local" and "distill" not in m and not m.get("replica")]
    return {**suite, "name": "hetero-budget", "seeds": [0, 1], "rounds": 12, "eval_every": 2,
            "description": "The hetero testbed's local-only methods for 12 rounds x 6 steps, val split (30 "
                           "tweets per topic) scored every 2 rounds: where the val curve flattens sets the "
                           "hetero budget",
            "data": {**suite["data"], "score": "val", "val_per_topic": 30, "round_eval_per_topic": 30}}


def _hetero_quick() -> dict:
    """The hetero suite's shape at CI size: the same layouts at toy widths, two seeds, minutes."""
    suite = _hetero()
    quick = QUICK["backbones"]
    backbones = {"smol10": quick["smol10"],
                 "neox384": {**HETERO_BACKBONES["neox384"], "heldout_blocks": 4,
                             "config": {**HETERO_BACKBONES["neox384"]["config"], "hidden_size": 96,
                                        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 192},
                             "train": quick["small128"]["train"]},
                 "small256": quick["small128"]}
    setting = suite["settings"]["H"]
    setting["methods"] = [m for m in setting["methods"]
                          if m["name"] in ("lora-local", "fedit", "dema-local", "dema-fedavg", "dema-distill-local",
                                           "dema-local-replica")]
    return {**suite, "name": "hetero-quick", "seeds": [0, 1], "backbones": backbones, "rounds": 2, "eval_every": 2,
            "description": "The hetero suite's shape at harness-check size (toy widths, 2 rounds x 2 steps, "
                           "12 test tweets per topic); its numbers say nothing about the methods",
            "data": {**QUICK["data"], "test_per_topic": 12},
            "train": {**QUICK["train"]}}


# The LM task on the hetero testbed (docs/lm_task.md): the same backbones and client layout (two on
# the healed 10-layer SmolLM2, one on the 384-wide GPT-NeoX layout, one on the 256-wide LLaMA), one
# fortunes domain each. Records of at most 192 characters are at most 127 SmolLM2 tokens over the
# four domains' whole corpus (every seed and side), so max_length 136 refuses and cuts none. Scoring
# is most of a run's cost (the LM head over a 49k vocabulary at every position): with 90 test
# documents per domain (579-618 records, ~21k tokens) one run's final scoring (2 x smol10 + neox384 +
# small256) took 105 s on 1 thread of a loaded 2-core machine (docs/lm_task.md, "Speed").
HETERO_LM_CLIENTS = [{"id": "H-computers-smol10", "backbone": "smol10", "domains": ["computers"]},
                     {"id": "H-definitions-smol10", "backbone": "smol10", "domains": ["definitions"]},
                     {"id": "H-songs-poems-neox384", "backbone": "neox384", "domains": ["songs-poems"]},
                     {"id": "H-people-small256", "backbone": "small256", "domains": ["people"]}]
# No dema-cmga: on the hetero testbed the cross-group cosines are about 0 (|cos| < 0.02), CMGA moves a
# block's aggregate by 0.2-0.5% of its norm and not one of dema-fedavg's 24,000 test predictions (5
# seeds x 4 clients x 1,200) (docs/benchmarks.md); the conflict suites are where CMGA is measured.
HETERO_LM_METHODS = ("lora-local", "fedit", "dema-local", "dema-fedavg", "dema-shaped-fedavg", "dema-local-replica")


def _hetero_lm() -> dict:
    """The hetero suite's testbed, methods (distillation aside: it is label-level) and budget on the LM
    task: held-out NLL per token and per byte on each client's own domain and on the others', 5 seeds,
    gains as % lower NLL per token over local-only with 95% paired bootstrap intervals. Each client
    trains on 200 documents (228-476 records over the seeds; long documents in computers and
    songs-poems): 8 rounds x 6 steps x batch 8 read 384 records, 0.8 to 1.7 passes (the hetero
    suite reads its 192 tweets twice)."""
    hetero = _hetero()
    methods = [m for m in hetero["settings"]["H"]["methods"] if m["name"] in HETERO_LM_METHODS]
    setting = {"description": "four clients, three widths, two families: two on the healed 10-layer SmolLM2 "
                              "variant (576, LLaMA layout; a FedIT group), one on a 384-wide GPT-NeoX-layout "
                              "model, one on the 256-wide LLaMA; one fortunes domain each",
               "clients": copy.deepcopy(HETERO_LM_CLIENTS), "methods": methods}
    return {"name": "hetero-lm", "task": "lm",
            "description": "Language modelling of per-client domains (Debian fortunes) on the hetero testbed: "
                           "held-out NLL on own and unseen domains, 90 test documents per domain, 5 seeds, "
                           "gains over local-only with 95% paired bootstrap intervals",
            "seeds": [0, 1, 2, 3, 4], "backbones": copy.deepcopy(HETERO_BACKBONES),
            "lm_data": {"train_docs": 200, "test_docs": 90, "val_docs": 60, "round_eval_docs": 10, "max_chars": 192},
            "rounds": 8, "eval_every": 2,
            "train": {"local_steps": 6, "batch_size": 8, "max_length": 136, "schedule": "cosine",
                      "warmup_steps": 3, "eval_batch_size": 16},
            "lr": copy.deepcopy(hetero["lr"]), "settings": {"H": setting}, "memory": None}


def _hetero_lm_quick() -> dict:
    """hetero-lm at CI size: hetero-quick's toy backbones, 2 seeds, 2 rounds x 2 steps, 6 test documents
    per domain; checks the harness, says nothing about the methods."""
    suite = _hetero_lm()
    return {**suite, "name": "hetero-lm-quick", "seeds": [0, 1], "backbones": _hetero_quick()["backbones"],
            "rounds": 2, "eval_every": 1,
            "description": "The hetero-lm suite's shape at harness-check size (toy widths, 2 rounds x 2 steps, "
                           "6 test documents per domain); its numbers say nothing about the methods",
            "lm_data": {"train_docs": 24, "test_docs": 6, "val_docs": 0, "round_eval_docs": 2, "max_chars": 192},
            "train": {**QUICK["train"], "max_length": 136, "eval_batch_size": 16}}


# Conflicting objectives (where CMGA can matter). CMGA groups clients by
# backbone and resolves conflicts between the groups' mean updates; on the other suites' testbeds it
# may find none to resolve (its runs then equal FedAvg's, which the run's "cmga_effect" shows). Here
# two backbone groups hold the same topic and the second reads its labels swapped (negative <->
# positive, neutral kept: data.py's label_map), so what one group learns the other must unlearn.
# Two clients per group, so FedIT federates within each group (whose clients agree).
SWAP_NEG_POS = {"negative": "positive", "positive": "negative"}
CONFLICT_CLIENTS = [{"id": "X-airlines-smol10-a", "backbone": "smol10", "topics": ["airlines"]},
                    {"id": "X-airlines-smol10-b", "backbone": "smol10", "topics": ["airlines"]},
                    {"id": "X-airlines-swapped-small256-a", "backbone": "small256", "topics": ["airlines"],
                     "label_map": SWAP_NEG_POS},
                    {"id": "X-airlines-swapped-small256-b", "backbone": "small256", "topics": ["airlines"],
                     "label_map": SWAP_NEG_POS}]
CONFLICT_METHODS = ("lora-local", "fedit", "dema-local", "dema-fedavg", "dema-cmga")


def _conflict() -> dict:
    """The conflict setting at the full suite's backbones (healed smol10, small256) and budget (4 rounds
    x 6 local steps, batch 8), 3 seeds. One topic, so a client's views are its own topic (global = own,
    no unseen); 96 test tweets of it, the scoring cost per client of the full suite's 4 topics x 24.
    Cost, estimated (not run) from the full suite's timings on 1 thread: per run about 70 s of training
    on the two smol10 clients (1.5 s/step x 24 steps each), 15 s on the small256 ones, and about as much
    scoring: ~3 min per run, 15 runs ~45 min, plus the backbones if not cached."""
    setting = {"description": "two backbone groups on one topic (airlines) with opposite objectives: two clients "
                              "on the healed 10-layer SmolLM2 variant with the corpus's labels, two on the 256-wide "
                              "LLaMA with negative and positive swapped",
               "clients": copy.deepcopy(CONFLICT_CLIENTS),
               "methods": [m for m in _methods_a() if m["name"] in CONFLICT_METHODS]}
    return {"name": "conflict",
            "description": "Conflicting client objectives (one topic, one backbone group's labels swapped): does "
                           "CMGA resolve what FedAvg averages away? 3 seeds, 4 rounds x 6 local steps",
            "seeds": [0, 1, 2], "backbones": {name: copy.deepcopy(FULL["backbones"][name]) for name in ("smol10", "small256")},
            "data": {"train_per_client": 192, "test_per_topic": 96, "val_per_topic": 20, "round_eval_per_topic": 24,
                     "max_chars": 120},
            "rounds": 4, "eval_every": 2, "train": copy.deepcopy(FULL["train"]), "lr": copy.deepcopy(FULL["lr"]),
            "settings": {"X": setting}, "memory": None}


def _conflict_quick() -> dict:
    """The conflict suite at CI size: the quick suite's toy backbones (QUICK's small128 under the name
    small256, as hetero-quick does), its budget (2 rounds x 2 steps), 24 test tweets, 2 seeds: its 10
    runs took 95 s and 102 s in two invocations on 1 thread of a loaded 2-core machine (backbones
    cached). Checks the harness and the label maps, says nothing about the methods."""
    suite = _conflict()
    suite["settings"]["X"]["description"] = ("two backbone groups on one topic (airlines) with opposite objectives: "
                                             "two clients on the quick 10-layer SmolLM2 variant with the corpus's "
                                             "labels, two on the quick 128-wide LLaMA with negative and positive swapped")
    return {**suite, "name": "conflict-quick", "seeds": [0, 1],
            "backbones": {"smol10": copy.deepcopy(QUICK["backbones"]["smol10"]),
                          "small256": copy.deepcopy(QUICK["backbones"]["small128"])},
            "description": "The conflict suite's shape at harness-check size (toy backbones, 2 rounds x 2 steps, "
                           "24 test tweets); its numbers say nothing about the methods",
            "data": {**QUICK["data"], "test_per_topic": 24},
            "rounds": 2, "eval_every": 2, "train": copy.deepcopy(QUICK["train"]), "lr": copy.deepcopy(QUICK["lr"])}


TUNE = _tune()
LONG = _long()
DEPTH30 = _depth30()
SUITES = {"quick": QUICK, "full": FULL, "tune": TUNE, "long": LONG, "depth30": DEPTH30,
          "hetero": _hetero(), "hetero-budget": _hetero_budget(), "hetero-quick": _hetero_quick(),
          "hetero-lm": _hetero_lm(), "hetero-lm-quick": _hetero_lm_quick(),
          "conflict": _conflict(), "conflict-quick": _conflict_quick()}


def load_suite(name_or_path: str | Path) -> dict:
    """A copy of a named suite, or a suite read from a JSON/YAML file; checked before it is returned."""
    if str(name_or_path) in SUITES:
        suite = copy.deepcopy(SUITES[str(name_or_path)])
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"no suite named {str(name_or_path)!r} (known: {sorted(SUITES)}) and no such file")
        text = path.read_text()
        suite = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        suite.setdefault("name", path.stem)
    check_suite(suite)
    return suite


def check_suite(suite: dict) -> None:
    """Everything that can be checked without compute, so a typo fails in a second, not an hour in."""
    if not isinstance(suite, dict):
        raise ValueError("a suite must be a mapping")
    unknown = sorted(set(suite) - SUITE_FIELDS)
    if unknown:
        raise ValueError(f"suite: unknown field(s) {unknown}; allowed {sorted(SUITE_FIELDS)}")
    task = suite.get("task", "classification")
    if task not in TASKS:
        raise ValueError(f"suite: task must be one of {list(TASKS)}, got {task!r}")
    lm = task == "lm"
    data_key, wrong = ("lm_data", "data") if lm else ("data", "lm_data")
    if wrong in suite:
        raise ValueError(f"suite {suite.get('name')!r}: a {task} suite takes {data_key!r}, not {wrong!r}"
                         + ("" if lm else " (the LM task's data: set task 'lm')"))
    for key in ("seeds", "backbones", data_key, "rounds", "train", "lr", "settings"):
        if key not in suite:
            raise ValueError(f"suite {suite.get('name')!r}: missing {key!r}")
    if not suite["seeds"] or any(not isinstance(s, int) for s in suite["seeds"]):
        raise ValueError("suite: seeds must be a non-empty list of integers")
    if int(suite["rounds"]) < 1 or int(suite.get("eval_every", 1)) < 1:
        raise ValueError("suite: rounds and eval_every must be >= 1")
    for name, spec in suite["backbones"].items():
        check_backbone_spec(name, spec)
    lm_settings = LMDataSettings.from_dict(suite["lm_data"]) if lm else None
    if not lm:
        DataSettings.from_dict(suite["data"])
    from fedzero.client import TrainSettings
    TrainSettings.from_dict({**suite["train"], "lr": 1.0})
    if "lr" in suite["train"]:
        raise ValueError("suite: give learning rates in 'lr': {'dema': …, 'lora': …}, not in 'train'")
    for runner in ("dema", "lora"):
        if not float(suite["lr"].get(runner, 0)) > 0:
            raise ValueError(f"suite: lr.{runner} must be > 0")
    for sname, setting in suite["settings"].items():
        unknown = sorted(set(setting) - SETTING_FIELDS)
        if unknown:
            raise ValueError(f"setting {sname!r}: unknown field(s) {unknown}")
        ids = [c.get("id") for c in setting["clients"]]
        if len(set(ids)) != len(ids) or not all(ids):
            raise ValueError(f"setting {sname!r}: clients need unique ids, got {ids}")
        for c in setting["clients"]:
            if c.get("backbone") not in suite["backbones"]:
                raise ValueError(f"setting {sname!r}, client {c.get('id')!r}: unknown backbone {c.get('backbone')!r}")
            if lm:
                _check_lm_client(sname, c, lm_settings)
            elif not c.get("topics"):
                raise ValueError(f"setting {sname!r}, client {c['id']!r}: needs 'topics'"
                                 + (" ('domains' is for LM suites, task 'lm')" if "domains" in c else ""))
            else:
                check_label_map(f"setting {sname!r}, client {c['id']!r}", c.get("label_map"))
        names = [m.get("name") for m in setting["methods"]]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"setting {sname!r}: methods need unique names, got {names}")
        for m in setting["methods"]:
            check_method(m)
            if lm and m.get("distill") is not None:
                raise ValueError(f"setting {sname!r}, method {m['name']!r}: 'distill' exchanges label predictions "
                                 "(classification only); an LM suite cannot run it")
            if m.get("rank") == "client" and any(not isinstance(c.get("rank"), int) for c in setting["clients"]):
                raise ValueError(f"setting {sname!r}, method {m['name']!r}: rank 'client' needs a 'rank' per client")
    memory = suite.get("memory")
    if memory and lm:
        raise ValueError("suite: 'memory' (peak memory per method) is measured by classification suites; set it "
                         "to null in an LM suite")
    if memory:
        if memory.get("backbone") not in suite["backbones"]:
            raise ValueError(f"memory: unknown backbone {memory.get('backbone')!r}")
        bad = [m for m in memory.get("methods", MEMORY_METHODS) if m not in MEMORY_METHODS]
        if bad:
            raise ValueError(f"memory: unknown method(s) {bad}; known {MEMORY_METHODS}")


def _check_lm_client(setting: str, client: dict, settings: LMDataSettings) -> None:
    """An LM suite's client: 'domains' (a non-empty list without repeats), known to the fortunes corpus
    when that is the source, and scored (in lm_data.domains when that is given)."""
    where = f"setting {setting!r}, client {client.get('id')!r}"
    if "topics" in client:
        raise ValueError(f"{where}: an LM suite's clients take 'domains', not 'topics'")
    if "label_map" in client:
        raise ValueError(f"{where}: 'label_map' relabels sentiment labels; the LM task has none")
    domains = client.get("domains")
    if (not isinstance(domains, list) or not domains or len(set(domains)) != len(domains)
            or not all(isinstance(d, str) and d for d in domains)):
        raise ValueError(f"{where}: 'domains' must be a non-empty list of distinct domain names "
                         f"(e.g. ['computers']), got {domains!r}")
    if settings.source == "fortunes":
        unknown = [d for d in domains if d not in FORTUNES_DOMAINS]
        if unknown:
            raise ValueError(f"{where}: unknown domain(s) {unknown} in 'domains'; the fortunes corpus has "
                             f"{list(FORTUNES_DOMAINS)}")
    if settings.domains is not None:
        unscored = [d for d in domains if d not in settings.domains]
        if unscored:
            raise ValueError(f"{where}: 'domains' {unscored} missing from lm_data.domains {settings.domains}")
