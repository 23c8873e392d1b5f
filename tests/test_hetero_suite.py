"""The heterogeneous benchmark's instrument: its testbed really is heterogeneous, and its larger
test sets (300 tweets per topic on the real corpus, 5 seeds) never leak into training."""

import json

import pytest

from fedzero.bench.data import DataSettings, dedup_key, load_records, split_tweets
from fedzero.bench.suites import load_suite


@pytest.mark.parametrize("name", ["hetero", "hetero-budget", "hetero-quick"])
def test_hetero_suites_load_and_hold_three_widths_and_two_layouts(name):
    suite = load_suite(name)
    clients = suite["settings"]["H"]["clients"]
    specs = [suite["backbones"][c["backbone"]] for c in clients]
    layouts = {spec.get("config", {}).get("model_type", "llama") for spec in specs}
    assert layouts == {"llama", "gpt_neox"}
    if name != "hetero-quick":        # the quick variant keeps the layouts at toy widths
        widths = {spec["config"]["hidden_size"] for spec in specs if "config" in spec} | {576}
        assert widths == {576, 384, 256}


def test_hetero_suite_is_five_seeds_and_at_least_150_test_tweets_per_topic():
    suite = load_suite("hetero")
    assert suite["seeds"] == [0, 1, 2, 3, 4] and suite["data"]["test_per_topic"] >= 150


@pytest.fixture(scope="module")
def corpus():
    return load_records(DataSettings())


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_hetero_split_of_the_real_corpus_never_leaks(corpus, seed):
    suite = load_suite("hetero")
    settings = DataSettings.from_dict(suite["data"])
    clients = suite["settings"]["H"]["clients"]
    split = split_tweets(corpus, clients, settings, seed)
    assert {t: len(r) for t, r in split.test.items()} == {t: 300 for c in clients for t in c["topics"]}
    held = [r for part in (split.test, split.val) for recs in part.values() for r in recs]
    train = [r for c in split.clients for r in c.train]
    assert [len(c.train) for c in split.clients] == [settings.train_per_client] * len(clients)
    uids = [r["uid"] for r in held + train]
    assert len(uids) == len(set(uids))                       # test, val and every client's train disjoint
    keys = [dedup_key(corpus[u]["text"]) for u in uids]
    assert len(keys) == len(set(keys))                       # and no near-duplicate on two sides


def test_a_replica_trains_with_other_randomness_on_the_same_records_and_is_its_noise_floor(tmp_path):
    """A method's replica ('replica': 1) trains with another seed (adapter init, data order) on the
    same test records; the report measures it against the method itself (the noise floor row), and a
    resumed bench recognises the replica's finished runs."""
    import json

    import numpy as np

    from fedzero.bench import run_bench
    from fedzero.bench.methods import parse_method
    from test_bench import _llama, synthetic_records

    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "uid"}) + "\n"
                              for r in synthetic_records(n_per_topic=20)))
    local = {"name": "dema-local", "runner": "dema", "strategy": "local",
             "dema": {"rank": 4, "num_experts": 2, "num_slots": 2}}
    suite = {"name": "tiny-replica", "seeds": [0, 1], "backbones": {"a": _llama(16, 2, 2, 1)},
             "data": {"train_per_client": 8, "test_per_topic": 4, "val_per_topic": 0, "round_eval_per_topic": 0,
                      "max_chars": 30, "min_confidence": None, "source": str(source)},
             "rounds": 1, "train": {"local_steps": 2, "batch_size": 4, "max_length": 96, "eval_batch_size": 16},
             "lr": {"dema": 1e-2, "lora": 1e-2},
             "settings": {"A": {"clients": [{"id": "c0", "backbone": "a", "topics": ["t0"]},
                                            {"id": "c1", "backbone": "a", "topics": ["t1"]}],
                                "methods": [local, {**local, "name": "dema-local-replica", "replica": 1}]}}}
    out = tmp_path / "bench"
    results = run_bench(suite, out, threads=1, memory=False, log=lambda *_: None)
    by = {(r["method"], r["seed"]): r for r in results["runs"]}
    for seed in (0, 1):
        base, replica = by[("dema-local", seed)], by[("dema-local-replica", seed)]
        assert replica["seed"] == seed and replica["test_records"] == base["test_records"]
        replica_seed = parse_method(replica["spec"]).training_seed(seed)
        assert base["dema"]["seed"] == seed and replica["dema"]["seed"] == replica_seed != seed
        assert not np.allclose([c["rounds"][1]["train_loss"] for c in replica["clients"]],
                               [c["rounds"][1]["train_loss"] for c in base["clients"]])
    md = (out / "report.md").read_text()
    assert any(line.startswith("| dema-local-replica | dema-local |") for line in md.splitlines())

    logs = []
    again = run_bench(suite, out, threads=1, memory=False, log=logs.append)
    assert again["runs_this_invocation"] == 0 and sum("done earlier" in line for line in logs) == 4


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True])
def test_a_replica_must_be_a_non_negative_integer(bad):
    from fedzero.bench.methods import parse_method

    with pytest.raises(ValueError, match="replica must be an integer"):
        parse_method({"name": "m", "runner": "dema", "strategy": "local", "replica": bad})


def test_own_curves_average_clients_then_seeds_per_round():
    from fedzero.bench.report.summary import own_curves

    def run(method, seed, values):
        return {"setting": "H", "method": method, "seed": seed,
                "clients": [{"rounds": [{"round": r, "eval": {"own": {"macro_f1": v, "label_nll": 1 - v}}}
                                        for r, v in enumerate(vals)]} for vals in values]}

    results = {"runs": [run("m", 0, [[0.2, 0.4], [0.4, 0.6]]), run("m", 1, [[0.4, 0.8], [0.6, 0.8]]),
                        run("other", 0, [[0.1, 0.1], [0.1, 0.1]])]}
    curves = own_curves(results, "H")
    assert curves["macro_f1"]["m"][0] == pytest.approx((0.4, 0.1 * 2 ** 0.5, 2))   # seeds' means 0.3 and 0.5
    assert curves["macro_f1"]["m"][1][0] == pytest.approx(0.65)
    assert curves["label_nll"]["other"][1] == (pytest.approx(0.9), None, 1)
    from fedzero.bench.report.tables import _own_curve_tables
    table = _own_curve_tables(results, "H")
    assert "| m | 0.400 | 0.650 |" in table and "| other | 0.900 | 0.900 |" in table


def test_a_dema_run_made_before_a_config_field_existed_is_kept_at_that_fields_default():
    """Resuming a long suite must not redo finished DeMA runs because DeMAConfig gained a field since
    (its default keeps the old behaviour), but must redo them when the method now sets it otherwise
    or when a field the run recorded changed."""
    from fedzero.adapters.dema import DeMAConfig
    from fedzero.bench.methods import parse_method
    from fedzero.bench.runner import same_run

    method = {"name": "dema-local", "runner": "dema", "strategy": "local", "dema": {"share": "experts-only"}}
    recorded = json.loads(json.dumps(DeMAConfig.from_dict({"seed": 3, "share": "experts-only"}).to_dict()))
    old = {k: v for k, v in recorded.items() if k != "canonical_ridge"}      # made before the field existed
    spec = parse_method(method)
    assert same_run({"seed": 3, "spec": method, "dema": recorded}, spec)
    assert same_run({"seed": 3, "spec": method, "dema": old}, spec)
    changed = {**method, "dema": {"share": "experts-only", "canonical_ridge": 0.5}}
    assert not same_run({"seed": 3, "spec": changed, "dema": old}, parse_method(changed))
    assert not same_run({"seed": 3, "spec": method, "dema": {**old, "rank": old["rank"] + 1}}, spec)
    assert not same_run({"seed": 3, "spec": method, "dema": {**recorded, "gone": 1}}, spec)
