"""The heterogeneous testbed's suites: hetero (classification, sized to resolve a 3-point
difference), hetero-budget (how long local-only needs), hetero-quick (its shape at CI size), and the
LM task on the same testbed, hetero-lm and hetero-lm-quick (docs/lm_task.md)."""

from __future__ import annotations

import copy

from .suites_report import FULL, QUICK, dema_variants, methods_a


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


# The transfer mechanisms on this testbed (docs/benchmarks.md, "Making transfer pay"). The public
# in-domain pool is a topic no client holds (driverless_cars: 4,801 tweets; the anchors are disjoint
# from every client's records, data.py).
ANCHOR_TOPIC = "topic:driverless_cars"
LM_ANCHOR_DOMAIN = "domain:cookie"      # the LM task's: 1,068 documents, 1,846 records of <= 192 characters


def transfer_methods() -> list[dict]:
    """An aligned shared space (canonical projectors fitted across the clients on in-domain public
    anchors, a learned private residual on top; its local-only control, since the projector changes
    local training too) and in-domain output distillation (mean and quality-weighted teachers)."""
    canonical = {"projector": "canonical+learned", "share": "experts-only"}
    distill = {"weight": 1.0, "anchors": 64, "batch_size": 4, "anchor_source": ANCHOR_TOPIC}
    return [
        {"name": "dema-canonical-local", "runner": "dema", "strategy": "local", "dema": canonical,
         "projector_anchors": ANCHOR_TOPIC,
         "description": "DeMA, canonical projectors (fitted across clients on 256 in-domain public tweets) plus a "
                        "learned residual, no federation: the projector's own control"},
        {"name": "dema-canonical-fedavg", "runner": "dema", "strategy": "fedavg", "dema": canonical,
         "projector_anchors": ANCHOR_TOPIC,
         "description": "DeMA, canonical projectors on in-domain anchors, experts-only FedAvg"},
        {"name": "dema-distill-indomain", "runner": "dema", "strategy": "local", "dema": {"share": "experts-only"},
         "distill": distill,
         "description": "DeMA, no weights travel; distillation on 64 in-domain public tweets, mean teacher"},
        {"name": "dema-distill-quality", "runner": "dema", "strategy": "local", "dema": {"share": "experts-only"},
         "distill": {**distill, "teacher": "quality"},
         "description": "DeMA, no weights travel; distillation on 64 in-domain public tweets, quality-weighted "
                        "teacher (val loss and confidence)"},
        {"name": "dema-distill-quality-stronger", "runner": "dema", "strategy": "local", "dema": {"share": "experts-only"},
         "distill": {**distill, "teacher": "quality", "only_stronger": True},
         "description": "the same, each client distilling only from clients whose val loss is lower than its own"},
    ]


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
    methods = [m for m in methods_a() if m["name"] in keep]
    methods += [m for m in dema_variants() if m["name"] in ("dema-shaped-fedavg", "dema-distill-local")]
    methods.append(_replica(next(m for m in methods if m["name"] == "dema-local")))
    methods += transfer_methods()
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
    setting["methods"] = [m for m in setting["methods"] if m["name"] in ("lora-local", "dema-local")]
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
    # the aligned shared space on the LM task: canonical projectors fitted on a fortunes domain no client holds
    methods += [{**m, "projector_anchors": LM_ANCHOR_DOMAIN, "description": m["description"].replace(
        "256 in-domain public tweets", "256 public records of the fortunes 'cookie' domain")}
        for m in transfer_methods() if m["name"].startswith("dema-canonical")]
    # in-domain output distillation on the LM task: token level (all four clients share SmolLM2's tokenizer)
    token = {"level": "token", "top_k": 16, "weight": 1.0, "anchors": 64, "batch_size": 4, "anchor_source": LM_ANCHOR_DOMAIN}
    methods += [{"name": "dema-distill-token", "runner": "dema", "strategy": "local", "dema": {"share": "experts-only"},
                 "distill": token, "description": "DeMA, no weights travel; token-level distillation (top-16 next "
                                                  "tokens, mean teacher) on 64 records of the fortunes 'cookie' domain"},
                {"name": "dema-distill-token-quality", "runner": "dema", "strategy": "local",
                 "dema": {"share": "experts-only"}, "distill": {**token, "teacher": "quality"},
                 "description": "the same with the quality-weighted teacher (val loss and confidence per position)"}]
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


SUITES = {"hetero": _hetero(), "hetero-budget": _hetero_budget(), "hetero-quick": _hetero_quick(),
          "hetero-lm": _hetero_lm(), "hetero-lm-quick": _hetero_lm_quick()}
