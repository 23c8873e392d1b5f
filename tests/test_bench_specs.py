"""The bench's typed pieces: every named suite loads and its methods parse into typed specs; malformed
methods are refused naming the setting, the method and the key; "local" is the DeMA runner's
registered no-aggregation strategy; backbone recipes are classes, one per kind."""

import pytest
import torch

from fedzero.backbones.recipes import KINDS, RECIPES, Recipe, check_backbone_spec, recipe
from fedzero.bench.methods import DEMA_STRATEGIES, Aggregation, DeMAMethod, LoRAMethod, NoAggregation, parse_method
from fedzero.bench.methods.exchange import make_exchange
from fedzero.bench.suites import SUITES, check_suite, load_suite
from fedzero.strategies import STRATEGIES, ClientUpdate


@pytest.mark.parametrize("name", sorted(SUITES))
def test_every_named_suite_loads_and_its_methods_parse_into_typed_specs(name):
    suite = load_suite(name)
    specs = check_suite(suite)
    assert list(specs) == list(suite["settings"])
    for setting, methods in specs.items():
        raw = suite["settings"][setting]["methods"]
        assert [m.name for m in methods] == [m["name"] for m in raw]
        for spec, method in zip(methods, raw):
            assert spec.raw is method and spec.runner == method["runner"]
            assert isinstance(spec, {"dema": DeMAMethod, "lora": LoRAMethod}[method["runner"]])
            if isinstance(spec, LoRAMethod):
                assert spec.rank == (None if method.get("rank") == "client" else method.get("rank", 16))
                assert all(spec.rank_of(c) >= 1 for c in suite["settings"][setting]["clients"])
            else:
                assert spec.config(7).seed == method.get("dema", {}).get("seed", 7)
                assert (spec.distill is None) == (method.get("distill") is None)


def test_typed_specs_carry_what_the_runners_read():
    dema = parse_method({"name": "d", "runner": "dema", "strategy": "cmga", "strategy_options": {"c_max": 3.0},
                         "dema": {"rank": 4}, "distill": {"weight": 2, "anchor_source": "topic:t2"}, "lr": "1e-3",
                         "replica": 2})
    assert dema.lr == 1e-3 and dema.training_seed(5) == 5 + 2 * 1_000_003 and dema.config(5).rank == 4
    assert dema.distill.record == {"weight": 2, "anchors": 64, "batch_size": 4, "anchor_source": "topic:t2"}
    assert (dema.distill.weight, dema.distill.anchors, dema.distill.anchor) == (2.0, 64, ("topic", "t2"))
    exchange = dema.exchange(5)
    assert isinstance(exchange, Aggregation) and exchange.strategy.c_max == 3.0 and exchange.effect == []
    lora = parse_method({"name": "h", "runner": "lora", "strategy": "hetlora", "rank": "client"})
    assert lora.rank is None and lora.rank_of({"id": "c", "rank": 8}) == 8 and lora.lr is None
    with pytest.raises(ValueError, match="client 'c' has no LoRA rank"):
        lora.rank_of({"id": "c"})


@pytest.mark.parametrize("change,message", [
    ({"strategy": "cmga", "strategy_options": {"typo": 1}}, r"method 'm': strategy_options: .*typo"),
    ({"strategy_options": {"x": 1}}, r"method 'm': strategy_options: strategy 'local' takes no options"),
    ({"strategy": "fedavg", "strategy_options": {"seed": 3}}, r"method 'm': strategy_options: 'seed' is the run's"),
    ({"dema": {"nope": 1}}, r"method 'm': dema: unknown DeMAConfig field.*nope"),
    ({"dema": [1]}, r"method 'm': dema must be a mapping"),
    ({"strategy": "fedit"}, r"method 'm': strategy must be one of \['local', 'fedavg', 'cmga'\] for runner 'dema'"),
    ({"runner": "peft"}, r"method 'm': runner must be one of"),
    ({"lr": -1}, r"method 'm': lr must be a number > 0"),
    ({"distill": {"weight": "x"}}, r"method 'm': distill needs weight > 0"),
    ({"distill": {"weight": 1.0}, "runner": "lora", "rank": 4}, r"method 'm': 'distill' is a DeMA option"),
    ({"runner": "lora", "rank": "clients"}, r"method 'm': rank must be a positive int or 'client'"),
    ({"runner": "lora", "rank": 4, "strategy_options": {"typo": 1}}, r"method 'm': strategy_options: .*typo"),
    ({"typo": 1}, r"method 'm': unknown field\(s\) \['typo'\]"),
])
def test_a_malformed_method_is_refused_naming_the_setting_method_and_key(change, message):
    suite = load_suite("quick")
    suite["settings"]["A"]["methods"].append({"name": "m", "runner": "dema", "strategy": "local", **change})
    with pytest.raises(ValueError, match=r"setting 'A', " + message):
        check_suite(suite)


class _Handle:
    def __init__(self, state):
        self.state = state

    def shared_state_dict(self):
        return {k: v.clone() for k, v in self.state.items()}

    def load_shared_state_dict(self, state):
        self.state = {k: v.clone() for k, v in state.items()}


class _Client:
    def __init__(self, value):
        self.handle = _Handle({"slots.0.x": torch.tensor([value, 0.0])})


def test_local_is_the_registered_no_aggregation_strategy_beside_the_aggregating_ones():
    # fedzero.strategies registers "local" too (simulate's control); the bench keeps NoAggregation under that name
    assert list(DEMA_STRATEGIES) == ["local", *(name for name in STRATEGIES if name != "local")]
    clients = [_Client(1.0), _Client(3.0)]
    local = make_exchange("local", {}, seed=0)
    assert isinstance(local, NoAggregation)
    local.begin(clients)
    clients[0].handle.state = {"slots.0.x": torch.tensor([5.0, 0.0])}       # client 0 trains
    local.trained(0, clients[0])
    assert local.start(0)["slots.0.x"].tolist() == [5.0, 0.0] and local.start(1)["slots.0.x"].tolist() == [3.0, 0.0]
    updates = [ClientUpdate(f"c{k}", {"slots.0.x": torch.ones(2)}, 1, f"g{k}") for k in range(2)]
    sent = local.finish(0, clients, updates)
    assert sent.weight_bytes == [0, 0] and sent.aggregation is None and local.record() == {}

    clients = [_Client(1.0), _Client(1.0)]
    fedavg = make_exchange("fedavg", {}, seed=0)
    fedavg.begin(clients)
    assert fedavg.start(1)["slots.0.x"].tolist() == [1.0, 0.0]
    updates = [ClientUpdate("a", {"slots.0.x": torch.tensor([2.0, 0.0])}, 1, "g"),
               ClientUpdate("b", {"slots.0.x": torch.tensor([0.0, 2.0])}, 1, "g")]
    sent = fedavg.finish(0, clients, updates)
    assert sent.weight_bytes == [8, 8] and set(sent.aggregation) == {"slot0"}
    assert "beta" not in sent.aggregation["slot0"] and fedavg.record() == {}
    assert all(c.handle.state["slots.0.x"].tolist() == [2.0, 1.0] for c in clients)
    cmga = make_exchange("cmga", {}, seed=0)
    cmga.begin(clients)
    cmga.finish(0, clients, updates)
    assert [e["round"] for e in cmga.record()["cmga_effect"]] == [1]


def test_backbone_recipes_are_classes_registered_by_kind():
    assert KINDS == ("smollm2", "depth", "small", "llama") and all(issubclass(c, Recipe) for c in RECIPES.values())
    small = recipe("s", {"kind": "small", "config": {"hidden_size": 8}})
    assert type(small) is RECIPES["small"] and small.name == "s"
    for spec, message in [({"kind": "big"}, r"backbone 'b': kind must be one of"),
                          ({"kind": "depth", "layers": 1}, r"'layers' must be an integer >= 2"),
                          ({"kind": "small"}, r"needs 'config'"),
                          ({"kind": "small", "config": {}, "embed_init": "pca"}, r"embed_init must be"),
                          ({"kind": "depth", "layers": 4, "train": {"epochs": 1}}, r"unknown train field"),
                          ({"kind": "smollm2", "layers": 4}, r"backbone 'b' \(smollm2\): unknown field")]:
        with pytest.raises(ValueError, match=message):
            check_backbone_spec("b", spec)
    llama = recipe("t", {"kind": "llama", "config": {"hidden_size": 16, "num_hidden_layers": 2}}).prepare()
    assert llama.tokenizer == "byte" and llama.report["num_layers"] == 2 and llama.spec.llama_config


def test_mechanism_bytes_follow_from_the_configs():
    """The transfer mechanisms' bytes per client-round on LLaMA-2 (comm_table.mechanism_rows): weights from
    fedzero.comm's counts in bf16, label predictions N x C float32, token predictions top_k x (int32 + float32)
    per position, canonical bases one N x m float64 per layer, once."""
    from fedzero.adapters.dema import DeMAConfig
    from fedzero.bench.comm_table import comm_rows, mechanism_markdown, mechanism_rows
    from fedzero.comm import dema_shared_params

    rows = {r["model"]: r for r in mechanism_rows()}
    base = {r["model"]: r for r in comm_rows()}
    seven = rows["llama-2-7b"]
    assert seven["fedit"] == base["llama-2-7b"]["lora_bytes"] and seven["shape_matched"] == base["llama-2-7b"]["dema_bytes"]
    assert seven["experts_only"] == dema_shared_params(DeMAConfig(share="experts-only")) * 2
    assert seven["distill_label"] == 64 * 3 * 4 and seven["distill_token"] == 64 * 64 * 16 * 8
    assert seven["canonical_once"] == 32 * 256 * 128 * 8 and rows["llama-2-70b"]["canonical_once"] == 80 * 256 * 128 * 8
    assert "| llama-2-13b | 52.43 MB |" in mechanism_markdown(list(rows.values()))
