"""The heterogeneous benchmark's instrument: its testbed really is heterogeneous, and its larger
test sets (300 tweets per topic on the real corpus, 5 seeds) never leak into training."""

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
