"""The conflict suites: two backbone groups with opposite objectives on one topic, where CMGA can
matter (conflict at the full suite's backbones and budget, conflict-quick at CI size)."""

from __future__ import annotations

import copy

from .suites_report import FULL, QUICK, methods_a


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
               "methods": [m for m in methods_a() if m["name"] in CONFLICT_METHODS]}
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


SUITES = {"conflict": _conflict(), "conflict-quick": _conflict_quick()}
