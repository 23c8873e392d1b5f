"""The LoRA runner: PEFT LoRA on every client (fedzero.baselines.LoRAClient), the method's
fedzero.baselines strategy within each same-backbone group (a client alone on its backbone trains
alone and sends nothing; "local" aggregates nothing anywhere)."""

from __future__ import annotations

import numpy as np

from fedzero.backbones import load_backbone
from fedzero.baselines import same_backbone_groups
from fedzero.data import build_examples
from fedzero.federation_round import FederationRound, Transport

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

    transport = LoRATransport(strategy, clients, records, settings.local_steps)
    federation = FederationRound(clients, transport)
    for rnd in range(ctx.rounds):
        federation.run(rnd)
        evaluate_round(rnd + 1, ctx, [(c.model, ctx.tokenizer(cc["backbone"])) for c, cc in zip(clients, ctx.clients)],
                       records)
        log_round(ctx, spec.name, rnd + 1, records)
    groups = transport.groups
    return {"runner": "lora", "strategy": spec.strategy, "clients": records, "comm": transport.comm,
            "first_round_cosine": transport.first, "aggregation": transport.aggregation,
            "groups": {fp: [clients[k].client_id for k in m] for fp, m in groups.items()}}


class LoRATransport(Transport):
    """A LoRA baseline's round in memory (fedzero.federation_round): every client goes on from its own
    LoRA (train_round(None)), its training goes into its run record; at the end of the round the
    strategy aggregates the LoRA states within each same-backbone group and each member takes its
    share (a client alone on its backbone trains alone and sends nothing). Keeps the run's per-round
    records: comm bytes, the strategy's metrics per group and the first round's cosines (of the LoRA
    factors and of the weight updates dW)."""

    def __init__(self, strategy, clients: list, records: list[dict], local_steps: int):
        self.strategy, self.clients, self.records, self.local_steps = strategy, clients, records, local_steps
        self.groups = same_backbone_groups([c.fingerprint for c in clients])
        self.comm, self.aggregation, self.first = [], [], None

    def open(self, rnd: int) -> None:
        self.states, self.deltas, self.changes = [], {}, {}

    def receive(self, rnd: int, k: int, client) -> None:
        self.before = client.lora_state()

    def start(self, rnd: int, k: int, client) -> None:
        return None         # its own LoRA, as the last aggregation left it

    def send(self, rnd: int, k: int, client, state: dict, metrics: dict, seconds: float) -> None:
        self.states.append(state)
        if rnd == 0:
            self.deltas[client.client_id] = {key: state[key] - self.before[key] for key in state}
            self.changes[client.client_id] = lora_dw_factors(self.before, state, client.scaling)
        record_training(self.records[k], rnd + 1, metrics["train_loss"], seconds, self.local_steps, client.step)

    def finish(self, rnd: int, outcome) -> None:
        clients, states = self.clients, self.states
        if rnd == 0:
            self.first = first_round_cosine(self.deltas)       # of the LoRA factors (same rank and backbone only)
            pairs = dw_cosines(self.changes)                   # of the weight updates dW (any ranks, same backbone)
            self.first["dw_mean"] = float(np.mean([p["cos"] for p in pairs])) if pairs else None
            self.first["dw_pairs"] = pairs
        up, down = [0] * len(clients), [0] * len(clients)
        round_metrics = {}
        for fp, members in self.groups.items():
            if len(members) < 2:
                continue            # alone on its backbone: nothing to federate with, nothing sent
            agg = self.strategy.aggregate([states[k] for k in members], [clients[k].num_samples for k in members],
                                          [clients[k].rank for k in members], rnd,
                                          fingerprints=[clients[k].fingerprint for k in members],
                                          scalings=[clients[k].scaling for k in members])
            for j, k in enumerate(members):
                clients[k].apply(agg, j)
                size = next(iter(states[k].values())).element_size()
                up[k] = int(agg.metrics["upload_params"][j]) * size
                down[k] = int(agg.metrics["download_params"][j]) * size
            round_metrics[fp] = {key: v for key, v in agg.metrics.items() if key not in ("upload_params", "download_params")}
        self.aggregation.append(round_metrics)
        self.comm.append({"round": rnd + 1, "upload_bytes": up, "download_bytes": down})
