"""The LoRA runner: PEFT LoRA on every client (fedzero.baselines.LoRAClient), the method's
fedzero.baselines strategy within each same-backbone group (a client alone on its backbone trains
alone and sends nothing; "local" aggregates nothing anywhere)."""

from __future__ import annotations

import time

import numpy as np

from fedzero.backbones import load_backbone
from fedzero.baselines import same_backbone_groups
from fedzero.data import build_examples

from .context import RunContext, client_record, log_round, record_training
from .evaluation import evaluate_round, round_zero
from .geometry import dw_cosines, first_round_cosine, lora_dw_factors
from .spec import LoRAMethod


def run_lora(spec: LoRAMethod, ctx: RunContext) -> dict:
    from fedzero.baselines import LoRAClient, LoRASettings

    settings = ctx.settings(spec)
    strategy = spec.make_strategy()

    clients, records = [], []
    for i, c in enumerate(ctx.clients):
        r = spec.rank_of(c)
        model, fp = load_backbone(ctx.backbones[c["backbone"]].spec)
        tok = ctx.tokenizer(c["backbone"])
        train = build_examples(ctx.split.client(c["id"]).train, tok, settings.max_length)
        client = LoRAClient(c["id"], model, f"{c['backbone']}:{fp}", train, [], settings,
                            LoRASettings(rank=r, init_seed=ctx.seed), pad_id=tok.pad_token_id,
                            seed=ctx.client_seed(i), total_rounds=ctx.rounds)
        clients.append(client)
        rec = client_record(c, fp, client.num_samples, sum(p.numel() for p in client.trainable_parameters()), ctx)
        rec["rank"] = r
        rec["rounds"].append({"round": 0, "eval": round_zero(ctx, c["id"])})
        records.append(rec)

    groups = same_backbone_groups([c.fingerprint for c in clients])
    comm, first, aggregation = [], None, []
    for rnd in range(ctx.rounds):
        states, deltas, changes = [], {}, {}
        for k, client in enumerate(clients):
            before = client.lora_state()
            t0 = time.time()
            state, metrics = client.train_round(None)
            seconds = time.time() - t0
            states.append(state)
            if rnd == 0:
                deltas[client.client_id] = {key: state[key] - before[key] for key in state}
                changes[client.client_id] = lora_dw_factors(before, state, client.scaling)
            record_training(records[k], rnd + 1, metrics["train_loss"], seconds, settings.local_steps, client.step)
        if rnd == 0:
            first = first_round_cosine(deltas)       # of the LoRA factors (same rank and backbone only)
            pairs = dw_cosines(changes)               # of the weight updates dW (any ranks, same backbone)
            first["dw_mean"] = float(np.mean([p["cos"] for p in pairs])) if pairs else None
            first["dw_pairs"] = pairs
        up, down = [0] * len(clients), [0] * len(clients)
        round_metrics = {}
        for fp, members in groups.items():
            if len(members) < 2:
                continue            # alone on its backbone: nothing to federate with, nothing sent
            agg = strategy.aggregate([states[k] for k in members], [clients[k].num_samples for k in members],
                                     [clients[k].rank for k in members], rnd,
                                     fingerprints=[clients[k].fingerprint for k in members],
                                     scalings=[clients[k].scaling for k in members])
            for j, k in enumerate(members):
                clients[k].apply(agg, j)
                size = next(iter(states[k].values())).element_size()
                up[k] = int(agg.metrics["upload_params"][j]) * size
                down[k] = int(agg.metrics["download_params"][j]) * size
            round_metrics[fp] = {key: v for key, v in agg.metrics.items() if key not in ("upload_params", "download_params")}
        aggregation.append(round_metrics)
        comm.append({"round": rnd + 1, "upload_bytes": up, "download_bytes": down})
        evaluate_round(rnd + 1, ctx, [(c.model, ctx.tokenizer(cc["backbone"])) for c, cc in zip(clients, ctx.clients)],
                       records)
        log_round(ctx, spec.name, rnd + 1, records)
    return {"runner": "lora", "strategy": spec.strategy, "clients": records, "comm": comm,
            "first_round_cosine": first, "aggregation": aggregation,
            "groups": {fp: [clients[k].client_id for k in m] for fp, m in groups.items()}}

