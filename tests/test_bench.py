"""fedzero bench: the data split, the report math, the communication table, and an end-to-end run of
the harness on tiny inline LLaMAs with the byte tokenizer (no SmolLM2, no training worth the name)."""

import json

import numpy as np
import pytest

from fedzero.adapters.dema import DeMAConfig
from fedzero.backbones.recipes import keep_layers
from fedzero.bench import report
from fedzero.bench.report import summary as report_summary
from fedzero.bench.comm_table import PUBLIC_CONFIGS, comm_markdown, comm_rows, llama2_configs
from fedzero.bench.data import DataSettings, dedup_key, split_tweets
from fedzero.bench.methods import first_round_cosine, pairwise_cosines, view_metrics
from fedzero.bench.suites import SWAP_NEG_POS, check_suite, load_suite
from fedzero.comm import dema_shared_params, full_model_params, lora_params
from fedzero.data import LABELS

TOPICS = ("t0", "t1", "t2")


def synthetic_records(n_per_topic=40, seed=0):
    """Labelled, topic-tagged records with unique texts, plus retweet-style near-duplicates."""
    rng = np.random.default_rng(seed)
    records = []
    for topic in TOPICS:
        for i in range(n_per_topic):
            label = LABELS[int(rng.integers(3))]
            records.append({"text": f"{topic} item {i} feels {label}", "label": label, "topic": topic,
                            "confidence": 1.0})
    # near-duplicates of the first records: a retweet and a copy with a handle and a URL
    records.append({**records[0], "text": "RT @someone: " + records[0]["text"]})
    records.append({**records[1], "text": records[1]["text"].upper() + " @x http://t.co/abc"})
    for uid, r in enumerate(records):
        r["uid"] = uid
    return records


CLIENTS = [{"id": "c0", "topics": ["t0"]}, {"id": "c1", "topics": ["t0"]}, {"id": "c2", "topics": ["t1"]},
           {"id": "c3", "topics": ["t2"]}]
SETTINGS = DataSettings(train_per_client=10, test_per_topic=6, val_per_topic=3, round_eval_per_topic=2,
                        max_chars=60, min_confidence=None)


# -- data split --------------------------------------------------------------------------------------

def test_no_client_trains_on_any_test_or_val_record_and_trains_are_disjoint():
    records = synthetic_records()
    split = split_tweets(records, CLIENTS, SETTINGS, seed=0)

    held = {r["uid"] for part in (split.test, split.val) for recs in part.values() for r in recs}
    held_keys = {dedup_key(records[u]["text"]) for u in held}
    train_uids = [r["uid"] for c in split.clients for r in c.train]
    assert len(train_uids) == len(set(train_uids))                       # no record in two clients
    assert not held & set(train_uids)                                    # no test/val record trained on
    assert not held_keys & {dedup_key(records[u]["text"]) for u in train_uids}   # nor a near-duplicate of one
    test_uids = [r["uid"] for recs in split.test.values() for r in recs]
    val_uids = [r["uid"] for recs in split.val.values() for r in recs]
    assert not set(test_uids) & set(val_uids)
    assert len({dedup_key(records[u]["text"]) for u in test_uids + val_uids + train_uids}) == \
        len(test_uids) + len(val_uids) + len(train_uids)                 # retweets collapsed


def test_clients_see_only_their_topics_and_views_partition_the_test_sets():
    split = split_tweets(synthetic_records(), CLIENTS, SETTINGS, seed=0)
    for c in split.clients:
        assert {r["topic"] for r in c.train} == set(c.topics)
        assert len(c.train) == SETTINGS.train_per_client
        assert all(r["prompt"].startswith("Tweet: ") and r["completion"] == f" {r['label']}" for r in c.train)
    assert split.views("c2") == {"own": ["t1"], "unseen": ["t0", "t2"], "global": ["t0", "t1", "t2"]}
    assert {t: len(r) for t, r in split.test.items()} == {"t0": 6, "t1": 6, "t2": 6}
    everyone = split_tweets(synthetic_records(), [{"id": "all", "topics": list(TOPICS)}], SETTINGS, seed=0)
    assert "unseen" not in everyone.views("all")


def test_scoring_the_val_split_scores_val_in_place_of_test_with_the_same_training_data():
    import dataclasses

    records = synthetic_records()
    split = split_tweets(records, CLIENTS, SETTINGS, seed=0)
    tune = split_tweets(records, CLIENTS, dataclasses.replace(SETTINGS, score="val"), seed=0)
    assert tune.test == split.val and tune.val == {}          # the test sets are never read
    assert [c.train for c in tune.clients] == [c.train for c in split.clients]
    with pytest.raises(ValueError, match="val_per_topic >= max"):
        DataSettings(test_per_topic=6, val_per_topic=1, round_eval_per_topic=2, score="val")
    assert load_suite("tune")["data"]["score"] == "val"


def test_split_is_deterministic_per_seed():
    def uids(split):
        return ([[r["uid"] for r in c.train] for c in split.clients],
                {t: [r["uid"] for r in recs] for t, recs in split.test.items()})

    records = synthetic_records()
    assert uids(split_tweets(records, CLIENTS, SETTINGS, seed=3)) == uids(split_tweets(records, CLIENTS, SETTINGS, seed=3))
    assert uids(split_tweets(records, CLIENTS, SETTINGS, seed=3)) != uids(split_tweets(records, CLIENTS, SETTINGS, seed=4))


def test_split_refuses_topics_too_small_and_unknown_topics():
    with pytest.raises(ValueError, match="usable records"):
        split_tweets(synthetic_records(n_per_topic=8), CLIENTS, SETTINGS, seed=0)
    with pytest.raises(ValueError, match="unknown topic"):
        split_tweets(synthetic_records(), [{"id": "x", "topics": ["nope"]}], SETTINGS, seed=0)


def test_view_metrics_concatenate_topic_scores():
    split = split_tweets(synthetic_records(), CLIENTS, SETTINGS, seed=0)
    truth = {t: np.array([LABELS.index(r["label"]) for r in recs]) for t, recs in split.test.items()}
    perfect = {t: np.eye(3)[y] * 5.0 for t, y in truth.items()}
    wrong = {t: np.eye(3)[(y + 1) % 3] * 5.0 for t, y in truth.items()}
    scores = {"t0": perfect["t0"], "t1": wrong["t1"], "t2": perfect["t2"]}
    m = view_metrics(scores, split, "c2")          # own = t1 (all wrong), unseen = t0 + t2 (all right)
    assert m["own"]["accuracy"] == 0.0 and m["unseen"]["accuracy"] == 1.0
    assert m["global"]["accuracy"] == pytest.approx(2 / 3) and m["global"]["n"] == 18


# -- conflicting objectives: a client's label_map ----------------------------------------------------------

SWAPPED = [{"id": "c0", "topics": ["t0"]}, {"id": "c1", "topics": ["t0"], "label_map": SWAP_NEG_POS},
           {"id": "c2", "topics": ["t1"]}]


def test_label_map_relabels_the_clients_train_records_only():
    records = synthetic_records()
    plain = split_tweets(records, [{k: v for k, v in c.items() if k != "label_map"} for c in SWAPPED], SETTINGS, seed=0)
    split = split_tweets(records, SWAPPED, SETTINGS, seed=0)

    mapped, same = split.client("c1"), plain.client("c1")
    assert [r["uid"] for r in mapped.train] == [r["uid"] for r in same.train]      # the same records, relabelled
    swap = {"negative": "positive", "positive": "negative", "neutral": "neutral"}
    assert [(r["label"], r["completion"]) for r in mapped.train] == \
        [(swap[records[r["uid"]]["label"]], f" {swap[records[r['uid']]['label']]}") for r in same.train]
    assert any(r["label"] != "neutral" for r in mapped.train)                     # the swap does something here
    assert split.client("c0").train == plain.client("c0").train and split.test == plain.test   # corpus labels
    assert mapped.label_map == SWAP_NEG_POS and split.client("c0").label_map is None
    summary = {c["id"]: c for c in split.summary()["clients"]}
    assert summary["c1"]["label_map"] == SWAP_NEG_POS and "label_map" not in summary["c0"]
    assert summary["c1"]["train_labels"]["positive"] == sum(records[r["uid"]]["label"] == "negative" for r in mapped.train)


def test_a_mapped_client_is_scored_against_its_own_labels_in_every_view():
    split = split_tweets(synthetic_records(), SWAPPED, SETTINGS, seed=0)
    corpus = {t: np.array([LABELS.index(r["label"]) for r in recs]) for t, recs in split.test.items()}
    swapped = {t: 2 - y for t, y in corpus.items()}          # negative (0) <-> positive (2), neutral (1) kept
    says_corpus = {t: np.eye(3)[y] * 5.0 for t, y in corpus.items()}
    says_swapped = {t: np.eye(3)[y] * 5.0 for t, y in swapped.items()}

    for view in ("own", "unseen", "global"):
        assert view_metrics(says_swapped, split, "c1")[view]["accuracy"] == 1.0
        assert view_metrics(says_corpus, split, "c0")[view]["accuracy"] == 1.0
    neutral = np.mean(np.concatenate(list(corpus.values())) == 1)
    assert view_metrics(says_corpus, split, "c1")["global"]["accuracy"] == pytest.approx(neutral)


def test_corpus_frame_pairs_a_mapped_client_in_the_corpus_labels_and_its_prior_in_its_own():
    """A run's stored outcomes: per-record true labels in the corpus's labels, a mapped client's scores
    and train counts in its own. The report reads them in the corpus's (exact metrics), and re-fits the
    prior over the label words each client trained on."""
    from fedzero.bench.stats import encode_records, encode_scores, outcome_metrics, prior_shift

    labels = ["negative", "neutral", "positive"]
    test = {"t0": [{"uid": i, "label": labels[y]} for i, y in enumerate([0, 0, 1, 2, 2, 0])]}
    y = np.array([0, 0, 1, 2, 2, 0])
    right_in_own = np.eye(3)[2 - y] * 3.0                  # the swapped client predicts the swapped label
    counts = {"c0": [5, 2, 1], "c1": [1, 2, 5]}            # c1's own labels: mostly "positive" (= corpus negative)
    run = {"setting": "X", "method": "local", "seed": 0, "test_records": encode_records(test, labels),
           "clients": [{"id": "c0", "topics": ["t0"], "test_scores": encode_scores({"t0": np.eye(3)[y] * 3.0}),
                        "train_labels": dict(zip(labels, counts["c0"]))},
                       {"id": "c1", "topics": ["t0"], "test_scores": encode_scores({"t0": right_in_own}),
                        "train_labels": dict(zip(labels, counts["c1"])), "label_map": SWAP_NEG_POS}]}

    out = report_summary.run_outcomes([run])[0]
    assert outcome_metrics(out)["own.accuracy"] == 1.0 and outcome_metrics(out)["own.macro_f1"] == 1.0
    np.testing.assert_array_equal(out.scores[1], np.eye(3)[y] * 3.0)
    np.testing.assert_array_equal(out.train_labels, [[5, 2, 1], [5, 2, 1]])     # c1's counts in corpus labels
    assert report_summary.corpus_frame(report_summary.run_outcomes([run], own_labels=True)[0], [None, None]).scores[1].tolist() == \
        right_in_own.tolist()                                                    # no map: nothing moves

    prior = report_summary.prior_controls([run])[0]
    pooled_words = np.array(counts["c0"]) + counts["c1"]                        # [6, 4, 6] label words trained on
    own_shift = prior_shift(right_in_own, counts["c1"], pooled_words)
    np.testing.assert_allclose(prior.scores[1], own_shift[:, [2, 1, 0]])        # re-fit in own words, then read back
    np.testing.assert_allclose(prior.scores[0], prior_shift(np.eye(3)[y] * 3.0, counts["c0"], pooled_words))


def test_label_maps_are_checked_naming_the_setting_client_and_key():
    def refused(label_map, match):
        suite = load_suite("conflict-quick")
        suite["settings"]["X"]["clients"][2]["label_map"] = label_map
        with pytest.raises(ValueError, match=match):
            check_suite(suite)

    where = r"setting 'X', client 'X-airlines-swapped-small256-a': "
    refused({"negative": "positive"}, where + r"label_map\['negative'\] = 'positive', but 'positive' is not mapped itself")
    refused({"negative": "positive", "positive": "positive"},
            where + r"label_map\['negative'\]: 'positive' is the image of several labels \(\['negative', 'positive'\]\)")
    refused({"negative": "happy", "happy": "negative"}, where + r"label_map\['negative'\]: value 'happy' is not a label")
    refused({"Negative": "positive"}, where + r"label_map\['Negative'\]: key 'Negative' is not a label")
    refused("swap", where + "label_map must be a mapping")
    for fine in ({"negative": "positive", "positive": "neutral", "neutral": "negative"}, {"neutral": "neutral"}, {}):
        suite = load_suite("conflict-quick")
        suite["settings"]["X"]["clients"][2]["label_map"] = fine
        check_suite(suite)
    with pytest.raises(ValueError, match=r"client 'c1': label_map\['negative'\] = 'positive'"):
        split_tweets(synthetic_records(), [{"id": "c1", "topics": ["t0"], "label_map": {"negative": "positive"}}],
                     SETTINGS, seed=0)
    lm = load_suite("hetero-lm-quick")
    lm["settings"]["H"]["clients"][0]["label_map"] = SWAP_NEG_POS
    with pytest.raises(ValueError, match=r"client 'H-computers-smol10': 'label_map' relabels sentiment labels"):
        check_suite(lm)


def test_conflict_suites_load_with_two_backbone_groups_at_odds_on_one_topic():
    for name, seeds, rounds in (("conflict", [0, 1, 2], 4), ("conflict-quick", [0, 1], 2)):
        suite = load_suite(name)
        assert suite["seeds"] == seeds and suite["rounds"] == rounds and set(suite["settings"]) == {"X"}
        setting = suite["settings"]["X"]
        assert [m["name"] for m in setting["methods"]] == ["lora-local", "fedit", "dema-local", "dema-fedavg", "dema-cmga"]
        assert all(m["dema"] == {"share": "experts-only"} for m in setting["methods"] if m["runner"] == "dema")
        groups = {}
        for c in setting["clients"]:
            assert c["topics"] == ["airlines"]
            groups.setdefault(c["backbone"], []).append(c.get("label_map"))
        assert groups == {"smol10": [None, None], "small256": [SWAP_NEG_POS, SWAP_NEG_POS]}   # CMGA's groups disagree
    full, quick = load_suite("full"), load_suite("quick")
    assert {k: load_suite("conflict")["backbones"][k] for k in ("smol10", "small256")} == \
        {k: full["backbones"][k] for k in ("smol10", "small256")}               # the cached, healed backbones
    assert load_suite("conflict-quick")["backbones"] == {"smol10": quick["backbones"]["smol10"],
                                                        "small256": quick["backbones"]["small128"]}


# -- update geometry ----------------------------------------------------------------------------------

def test_first_round_cosine_pairs_only_comparable_updates():
    import torch

    u = {"a": {"slots.0.x": torch.tensor([1.0, 0.0]), "slots.1.x": torch.tensor([1.0, 1.0])},
         "b": {"slots.0.x": torch.tensor([0.0, 1.0]), "slots.1.x": torch.tensor([1.0, 1.0])},
         "c": {"other": torch.tensor([1.0, 2.0, 3.0])}}
    pairs = pairwise_cosines(u)
    assert [(p["a"], p["b"]) for p in pairs] == [("a", "b")]
    assert pairs[0]["cos"] == pytest.approx(2 / 3)               # <(1,0,1,1), (0,1,1,1)> / (√3 · √3)
    first = first_round_cosine({k: u[k] for k in ("a", "b")}, block_of=lambda k: k.split(".")[1])
    assert first["per_block"] == {"0": pytest.approx(0.0), "1": pytest.approx(1.0)}
    assert first["mean"] == pytest.approx(2 / 3)


# -- report math -----------------------------------------------------------------------------------------

def _fake_run(setting, method, seed, accs, total_up=0, cos=None):
    clients = [{"id": f"c{i}", "backbone": "a", "topics": ["t0"],
                "rounds": [{"round": 0, "eval": {"global": {"accuracy": 0.3}}},
                           {"round": 1, "train_loss": 1.0, "seconds_per_step": 0.5,
                            "eval": {"global": {"accuracy": a - 0.1}}},
                           {"round": 2, "train_loss": 0.9, "seconds_per_step": 0.7, "eval": {"global": {"accuracy": a}}}],
                "final": {v: {"accuracy": a, "macro_f1": a / 2, "label_nll": 1 - a} for v in ("own", "unseen", "global")}}
               for i, a in enumerate(accs)]
    per = total_up // (2 * len(accs))
    comm = [{"round": r, "upload_bytes": [per] * len(accs), "download_bytes": [per] * len(accs)} for r in (1, 2)]
    return {"setting": setting, "method": method, "seed": seed, "runner": "lora", "clients": clients, "comm": comm,
            "first_round_cosine": {"mean": cos, "pairs": []}}


def _fake_results():
    suite = {"name": "fake", "seeds": [0, 1], "rounds": 2, "train": {"local_steps": 2, "batch_size": 4},
             "lr": {"dema": 1e-3, "lora": 1e-3},
             "settings": {"A": {"clients": [{"id": "c0", "backbone": "a", "topics": ["t0"]},
                                            {"id": "c1", "backbone": "a", "topics": ["t1"]}],
                                "methods": [{"name": "local"}, {"name": "fed"}]}}}
    runs = [_fake_run("A", "local", 0, [0.5, 0.7]), _fake_run("A", "local", 1, [0.6, 0.8]),
            _fake_run("A", "fed", 0, [0.8, 0.8], total_up=4000, cos=0.5),
            _fake_run("A", "fed", 1, [0.9, 0.7], total_up=4000, cos=0.7)]
    zero = {"A": {"0": {"c0": {v: {"accuracy": 0.3, "macro_f1": 0.2, "label_nll": 1.1} for v in ("own", "unseen", "global")},
                        "c1": {v: {"accuracy": 0.5, "macro_f1": 0.2, "label_nll": 1.1} for v in ("own", "unseen", "global")}}}}
    return {"suite": suite, "runs": runs, "zero_shot": zero, "comm_table": comm_rows(), "machine": {}}


def test_report_mean_std_over_seeds_of_client_means():
    s = report.summarize(_fake_results())["A"]
    local, fed = s["methods"]["local"], s["methods"]["fed"]
    # local: seed means 0.6 and 0.7 -> 0.65 ± std([0.6, 0.7], ddof=1)
    assert local["global.accuracy"][0] == pytest.approx(0.65)
    assert local["global.accuracy"][1] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert fed["global.accuracy"][0] == pytest.approx(0.8) and fed["global.accuracy"][1] == pytest.approx(0.0)
    assert fed["global.label_nll"][0] == pytest.approx(0.2)
    assert fed["first_round_cos"][:2] == (pytest.approx(0.6), pytest.approx(np.std([0.5, 0.7], ddof=1)))
    assert local["first_round_cos"] == (None, None, 0)
    # 1000 bytes up and 1000 down per client and round, 2 clients, 2 rounds
    assert fed["bytes_total"][0] == 8000 and local["bytes_total"][0] == 0
    assert fed["bytes_upload_per_client_round"][0] == pytest.approx(1000)
    assert fed["curve"][0][0] == pytest.approx(0.3) and fed["curve"][2][0] == pytest.approx(0.8)
    assert local["per_client"]["c0"]["global"][0] == pytest.approx(0.55)
    assert s["zero_shot"]["global.accuracy"] == (pytest.approx(0.4), None, 1)
    assert report_summary.mean_std([1.0]) == (1.0, None, 1) and report_summary.fmt((0.5, None, 1)) == "0.500 (n=1)"


def test_report_markdown_and_plots(tmp_path):
    results = _fake_results()
    results["plots"] = report.plots(results, tmp_path)
    assert sorted(p.split("/")[-1] for p in results["plots"]) == [
        "accuracy_per_round.png", "accuracy_vs_bytes.png", "first_round_cosine.png", "own_per_round.png",
        "per_client_accuracy.png"]
    assert all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in results["plots"])
    md = report.markdown(results)
    # headline: macro-F1 (a / 2 here), balanced accuracy (these runs predate it: "–"), accuracy, per view
    assert "| fed | 0.400 ± 0.000 | 0.400 ± 0.000 | 0.400 ± 0.000 | – | – | – | 0.800 ± 0.000 |" in md
    assert "| local | 0.325 ± 0.035 |" in md
    assert "| backbone zero-shot | 0.200 (n=1) | 0.200 (n=1) | 0.200 (n=1) | – | – | – | 0.400 (n=1) |" in md
    assert "Per-client steps and training time: not recorded in these runs." in md
    assert "llama-2-70b" in md


# -- communication table ------------------------------------------------------------------------------------

def test_comm_table_matches_fedzero_comm(tmp_path):
    rows = {r["model"]: r for r in comm_rows()}
    for name, (cfg, _) in llama2_configs().items():
        assert rows[name]["full_params"] == full_model_params(cfg)
        assert rows[name]["lora_params"] == lora_params(cfg, 16)
        assert rows[name]["dema_params"] == dema_shared_params(DeMAConfig(), cfg["hidden_size"])
        assert rows[name]["dema_bytes"] == 2 * rows[name]["dema_params"]
    # the public numbers of method.md: DeMA experts and gates 264k (+ 8 x 2 x 4096 x 64 projector params
    # on 7B with the default shape-matched sharing); LoRA r=16 q,k,v,o on 7B 16.8M; 7B 6.7B
    assert rows["llama-2-7b"]["dema_experts_params"] == 8 * 4 * 2 * 64 * 64 + 8 * 4 * 64 == 264_192
    assert rows["llama-2-7b"]["dema_params"] == 264_192 + 8 * 2 * 4096 * 64
    assert rows["llama-2-7b"]["lora_params"] == 32 * 4 * 16 * (4096 + 4096) == 16_777_216
    assert rows["llama-2-7b"]["full_params"] == 6_738_415_616
    # the built-in public configs give the same counts as the repository's files
    fallback = {r["model"]: r for r in comm_rows(config_dir=tmp_path / "missing")}
    assert {k: (r["full_params"], r["lora_params"]) for k, r in fallback.items()} == \
        {k: (r["full_params"], r["lora_params"]) for k, r in rows.items()}
    assert set(PUBLIC_CONFIGS) == set(rows)
    assert "| llama-2-7b |" in comm_markdown(list(rows.values()))


# -- suites and testbed helpers --------------------------------------------------------------------------------

def test_suites_load_and_bad_entries_are_refused():
    for name in ("quick", "full"):      # the report suites (tune sweeps one method)
        suite = load_suite(name)
        methods = {m["name"] for s in suite["settings"].values() for m in s["methods"]}
        assert {"lora-local", "fedit", "dema-local", "dema-fedavg", "dema-cmga", "hetlora", "flora", "flexlora"} <= methods
    bad = load_suite("quick")
    bad["settings"]["A"]["methods"].append({"name": "x", "runner": "dema", "strategy": "cmga", "dema": {"nope": 1}})
    with pytest.raises(ValueError, match="nope"):
        check_suite(bad)
    bad = load_suite("quick")
    bad["settings"]["A"]["methods"].append({"name": "y", "runner": "lora", "strategy": "hetlora", "rank": "client"})
    with pytest.raises(ValueError, match="rank 'client'"):
        check_suite(bad)
    for distill in ({"weight": 1.0, "typo": 2}, {"weight": 0.0}):
        bad = load_suite("quick")
        bad["settings"]["A"]["methods"].append({"name": "z", "runner": "dema", "strategy": "local", "distill": distill})
        with pytest.raises(ValueError, match="distill"):
            check_suite(bad)
    bad = load_suite("quick")
    bad["settings"]["A"]["methods"].append({"name": "w", "runner": "lora", "strategy": "fedit", "distill": {}})
    with pytest.raises(ValueError, match="DeMA option"):
        check_suite(bad)


def test_keep_layers_evenly_spaced_first_and_last():
    assert keep_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert keep_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert keep_layers(4, 4) == [0, 1, 2, 3]


# -- end to end --------------------------------------------------------------------------------------------------

def _llama(hidden, layers, heads, seed):
    return {"kind": "llama", "init_seed": seed, "tokenizer": "byte",
            "config": {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                       "num_key_value_heads": heads, "intermediate_size": 2 * hidden, "vocab_size": 259,
                       "max_position_embeddings": 256}}


def tiny_suite(source, label_map=None):
    """label_map: given to client c2 (the one alone on backbone b)."""
    return {
        "name": "tiny", "seeds": [0, 1],
        "backbones": {"a": _llama(16, 2, 2, 1), "b": _llama(24, 3, 3, 2)},
        "data": {"train_per_client": 8, "test_per_topic": 4, "val_per_topic": 2, "round_eval_per_topic": 2,
                 "max_chars": 30, "min_confidence": None, "source": str(source)},
        "rounds": 2, "eval_every": 1,
        "train": {"local_steps": 2, "batch_size": 4, "max_length": 96, "eval_batch_size": 16},
        "lr": {"dema": 1e-2, "lora": 1e-2},
        "settings": {"A": {"description": "two clients on backbone a, one on b",
                           "clients": [{"id": "c0", "backbone": "a", "topics": ["t0"]},
                                       {"id": "c1", "backbone": "a", "topics": ["t1"]},
                                       {"id": "c2", "backbone": "b", "topics": ["t2"],
                                        **({"label_map": label_map} if label_map else {})}],
                           "methods": [{"name": "fedit", "runner": "lora", "strategy": "fedit", "rank": 2},
                                       {"name": "dema-cmga", "runner": "dema", "strategy": "cmga",
                                        "dema": {"rank": 4, "num_experts": 2, "num_slots": 2,
                                                 "share": "experts-only"}},
                                       {"name": "dema-sm", "runner": "dema", "strategy": "fedavg",
                                        "dema": {"rank": 4, "num_experts": 2, "num_slots": 2,
                                                 "share": "shape-matched"}}]}},
    }


def test_bench_end_to_end_on_tiny_models_then_resumes(tmp_path):
    from fedzero.bench import run_bench

    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "uid"}) + "\n"
                              for r in synthetic_records(n_per_topic=20)))
    out = tmp_path / "bench"
    logs = []
    results = run_bench(tiny_suite(source, SWAP_NEG_POS), out, threads=1, memory=False, command="test", log=logs.append)

    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        [f"A-{m}-seed{s}.json" for m in ("fedit", "dema-cmga", "dema-sm") for s in (0, 1)]
        + [f"A-zero-shot-seed{s}.json" for s in (0, 1)])
    assert {(r["method"], r["seed"]) for r in results["runs"]} == {
        (m, s) for m in ("fedit", "dema-cmga", "dema-sm") for s in (0, 1)}
    by = {(r["method"], r["seed"]): r for r in results["runs"]}
    fedit, dema = by[("fedit", 0)], by[("dema-cmga", 0)]
    # FedIT federates the two clients on backbone a only; the client alone on b sends nothing
    assert fedit["groups"] and sorted(map(sorted, fedit["groups"].values())) == [["c0", "c1"], ["c2"]]
    assert [r["upload_bytes"][2] for r in fedit["comm"]] == [0, 0] and all(r["upload_bytes"][0] > 0 for r in fedit["comm"])
    # DeMA sends its shared state (fp32) from every client, every round
    shared = dema["clients"][0]["shared_params"]
    assert shared == dema_shared_params(DeMAConfig(rank=4, num_experts=2, num_slots=2, share="experts-only"))
    assert all(r["upload_bytes"] == [4 * shared] * 3 for r in dema["comm"])
    # shape-matched sharing: the clients on backbone a also send their per-slot projectors, b its own bank
    sm = by[("dema-sm", 0)]
    sizes = sm["comm"][0]["upload_bytes"]
    assert sizes[0] == sizes[1] == 4 * sm["clients"][0]["shared_params"] > 4 * shared
    assert sizes[2] == 4 * sm["clients"][2]["shared_params"] != sizes[0]
    assert len(sm["first_round_cosine"]["pairs"]) == 3          # every pair shares the experts and gates
    assert set(sm["first_round_cosine"]["per_block"]) > {"slot0", "slot1"}
    assert set(dema["clients"][0]["gate_entropy"]) == {"slot0", "slot1"} and len(dema["diagnostics"]) == 2
    # round 0 is the frozen backbone, identical for every method; every round is scored; final views exist
    for run in results["runs"]:
        for c in run["clients"]:
            assert [r["round"] for r in c["rounds"]] == [0, 1, 2]
            assert set(c["final"]) == {"own", "unseen", "global"} and c["final"]["global"]["n"] == 12
        assert -1 <= run["first_round_cosine"]["mean"] <= 1
    assert fedit["clients"][0]["rounds"][0]["eval"] == dema["clients"][0]["rounds"][0]["eval"]
    # per-record outcomes: the same test records for every method of a seed, each client's label scores on
    # them (the finals, up to the stored 4 decimals), its train label counts, steps and training seconds
    # (c2 reads its labels swapped: its finals are against the swapped labels, which the report's outcomes
    # reproduce in the corpus's labels)
    from fedzero.bench.stats import outcome_metrics
    assert fedit["test_records"] == dema["test_records"] != by[("fedit", 1)]["test_records"]
    for run in results["runs"]:
        assert [c.get("label_map") for c in run["clients"]] == [None, None, SWAP_NEG_POS]
        outcomes = report_summary.run_outcomes([run])[run["seed"]]
        assert outcomes.scores.shape == (3, 12, 3) and outcomes.train_labels.sum(axis=1).tolist() == [8, 8, 8]
        levels = outcome_metrics(outcomes)
        for view in ("own", "unseen", "global"):
            assert levels[f"{view}.accuracy"] == pytest.approx(np.mean([c["final"][view]["accuracy"] for c in run["clients"]]))
        assert all(c["train_steps"] == 4 and c["train_seconds"] > 0 for c in run["clients"])
    # CMGA's effect, per round, on the two slot blocks; only CMGA runs carry it
    for seed in (0, 1):
        effect = by[("dema-cmga", seed)]["cmga_effect"]
        assert [e["round"] for e in effect] == [1, 2] and all(e["total_blocks"] == 2 for e in effect)
        for e in effect:
            assert set(e["rel_diff"]) == {"slot0", "slot1"} and 0 <= e["changed_blocks"] <= 2
            assert (e["changed_blocks"] == 0) == (e["rel_diff_max"] == 0) and e["pairs"] == 2   # 2 groups x 2 blocks
    assert not any("cmga_effect" in r for r in results["runs"] if r["method"] != "dema-cmga")
    assert len(dema["first_round_cosine"]["pairs"]) == 3 and len(fedit["first_round_cosine"]["pairs"]) == 1
    md = (out / "report.md").read_text()
    assert "## Setting A" in md and "| dema-cmga |" in md and "| fedit |" in md
    assert "`c2` = b on t2 (labels read as: negative → positive, positive → negative)" in md
    assert "| method | round | blocks changed | rel. diff mean |" in md and "| dema-cmga | 2 | " in md
    assert all((out / name).exists() for name in ("results.json", "accuracy_per_round.png", "per_client_accuracy.png"))

    # a second invocation finds every run done and only rebuilds the report
    logs.clear()
    again = run_bench(tiny_suite(source, SWAP_NEG_POS), out, threads=1, memory=False, log=logs.append)
    assert again["runs_this_invocation"] == 0 and sum("done earlier" in line for line in logs) == 6
    assert [r["clients"][0]["final"] for r in again["runs"]] == [r["clients"][0]["final"] for r in results["runs"]]
    other = tiny_suite(source, SWAP_NEG_POS)
    other["rounds"] = 3
    with pytest.raises(FileExistsError, match="different suite"):
        run_bench(other, out, threads=1, memory=False, log=logs.append)
    # a changed method spec is redone, for every seed, and the others are kept
    changed = tiny_suite(source, SWAP_NEG_POS)
    next(m for m in changed["settings"]["A"]["methods"] if m["name"] == "fedit")["lr"] = 2e-3
    logs.clear()
    third = run_bench(changed, out, threads=1, memory=False, log=logs.append)
    assert third["runs_this_invocation"] == 2 and sum("spec changed" in line for line in logs) == 2
    assert {r["spec"].get("lr") for r in third["runs"] if r["method"] == "fedit"} == {2e-3}
    with pytest.raises(ValueError, match="unknown setting"):
        run_bench(tiny_suite(source, SWAP_NEG_POS), out, threads=1, memory=False, settings=["Z"])


def test_peak_memory_measure_in_process_on_a_tiny_model():
    from fedzero.bench.peakmem import measure

    spec = {"llama_config": _llama(16, 2, 2, 1)["config"], "init_seed": 1}
    full = measure(spec, "full", batch_size=2, seq_len=16, steps=1)
    dema = measure(spec, "dema-side", batch_size=2, seq_len=16, steps=1)
    # DeMA at its defaults (r=64) is larger than this 16-wide toy model; on real backbones it is tiny
    assert full["trainable_params"] == 13_488 and dema["trainable_params"] > 0
    assert full["peak_rss_bytes"] > 0 and len(full["step_seconds"]) == 1


@pytest.mark.parametrize("adapter", ["none", "dema-parallel", "dema-side", "lora"])
def test_label_scores_through_kept_positions_equal_full_logits(adapter):
    """fedzero.evaluate.label_scores runs the LM head only at scored positions (HF logits_to_keep),
    through DeMA (both placements) and PEFT LoRA: equal to summing full-logit log-probabilities."""
    import torch
    import torch.nn.functional as F

    from conftest import with_random_adapter
    from fedzero.backbones import BackboneSpec, load_backbone
    from fedzero.data import ByteTokenizer, build_examples, collate
    from fedzero.evaluate import label_scores

    model, _ = load_backbone(BackboneSpec(llama_config=_llama(16, 2, 2, 1)["config"], init_seed=1))
    model = with_random_adapter(model, adapter)      # non-zero adapters: they change the scores
    records = [{"prompt": f"Tweet: item {i} {'x' * i}\nSentiment:"} for i in range(5)]
    tok = ByteTokenizer()
    fast = label_scores(model, tok, records, list(LABELS), max_length=64, batch_size=4)
    examples = build_examples([{"prompt": r["prompt"], "completion": f" {label}"} for r in records for label in LABELS],
                              tok, 64)
    with torch.no_grad():
        batch = collate(examples, tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        logp = -F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        ref = (logp * (targets != -100)).sum(dim=1).view(5, 3).numpy()
    assert fast.shape == (5, 3) and fast.dtype == np.float64
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-4)


def test_lora_dw_cosine_equals_explicit_weight_updates_across_ranks():
    import torch

    from fedzero.bench.methods import dw_cosines, lora_dw_factors

    g = torch.Generator().manual_seed(0)

    def state(r, zero_b=False):
        return {f"m{i}.lora_A.weight": torch.randn(r, 5, generator=g) for i in range(2)} | {
            f"m{i}.lora_B.weight": (torch.zeros(4, r) if zero_b else torch.randn(4, r, generator=g)) for i in range(2)}

    before = {"a": state(2, zero_b=True), "b": state(3)}
    after = {"a": state(2), "b": state(3)}
    scal = {"a": 2.0, "b": 0.5}
    changes = {k: lora_dw_factors(before[k], after[k], scal[k]) for k in before}
    (pair,) = dw_cosines(changes)

    def dw(k):                                                      # explicit [out, in] updates, float64
        b, a = ({n: t.double() for n, t in s.items()} for s in (before[k], after[k]))
        return torch.cat([(scal[k] * (a[f"m{i}.lora_B.weight"] @ a[f"m{i}.lora_A.weight"]
                                      - b[f"m{i}.lora_B.weight"] @ b[f"m{i}.lora_A.weight"])).reshape(-1)
                          for i in range(2)])
    expected = float(dw("a") @ dw("b") / (dw("a").norm() * dw("b").norm()))
    assert pair["cos"] == pytest.approx(expected, rel=1e-9)


def test_gain_over_local_pairs_each_method_with_the_control_that_trains_alike():
    from fedzero.bench.report.summary import local_control, point_gain

    methods = [{"name": "lora-local", "runner": "lora", "strategy": "local", "rank": 16},
               {"name": "lora-local-het", "runner": "lora", "strategy": "local", "rank": "client"},
               {"name": "fedit", "runner": "lora", "strategy": "fedit", "rank": 16},
               {"name": "hetlora", "runner": "lora", "strategy": "hetlora", "rank": "client"},
               {"name": "dema-local", "runner": "dema", "strategy": "local", "dema": {}},
               {"name": "dema-shaped", "runner": "dema", "strategy": "fedavg", "dema": {"share": "shape-matched"}},
               {"name": "dema-distill", "runner": "dema", "strategy": "local", "dema": {}, "distill": {}},
               {"name": "dema-anchor-local", "runner": "dema", "strategy": "local", "dema": {"projector": "anchor"}},
               {"name": "dema-anchor-cmga", "runner": "dema", "strategy": "cmga", "dema": {"projector": "anchor"}},
               {"name": "dema-lr", "runner": "dema", "strategy": "fedavg", "dema": {}, "lr": 1.0}]
    controls = {m["name"]: local_control(m, methods) for m in methods}
    assert controls == {"lora-local": None, "lora-local-het": None, "fedit": "lora-local",
                        "hetlora": "lora-local-het", "dema-local": None, "dema-shaped": "dema-local",
                        "dema-distill": "dema-local", "dema-anchor-local": None,
                        "dema-anchor-cmga": "dema-anchor-local", "dema-lr": None}

    def run(seed, accs):
        return {"seed": seed, "clients": [{"id": c, "final": {"own": {"accuracy": a[0]}, "unseen": {"accuracy": a[1]},
                                                              "global": {"accuracy": a[2]}}} for c, a in accs.items()]}

    runs = {"fed": [run(0, {"x": (0.5, 0.6, 0.55), "y": (0.7, 0.4, 0.5)}), run(1, {"x": (0.6, 0.6, 0.6), "y": (0.7, 0.5, 0.6)}),
                    run(2, {"x": (0.1, 0.1, 0.1), "y": (0.1, 0.1, 0.1)})],          # seed 2 has no control: left out
            "alone": [run(0, {"x": (0.5, 0.4, 0.45), "y": (0.8, 0.2, 0.4)}), run(1, {"x": (0.4, 0.5, 0.45), "y": (0.7, 0.3, 0.5)})]}
    # runs without per-record scores: the gain from their final metrics, paired by seed, no interval
    g = point_gain(runs["fed"], runs["alone"], ["x", "y"], "alone")
    assert g["seeds"] == [0, 1] and g["control"] == "alone" and not g["bootstrap"]
    unseen_x = g["per_client"]["x"]["unseen"]["accuracy"]
    assert unseen_x.point == pytest.approx(0.15) and unseen_x.low is None     # seeds: +0.2, +0.1
    assert g["mean"]["own"]["accuracy"].point == pytest.approx(0.025)          # seed 0: (0 - 0.1)/2, seed 1: (0.2 + 0)/2
    assert g["mean"]["own"]["macro_f1"] is None                                # not recorded


def test_run_claims_are_exclusive_and_a_dead_workers_claim_is_taken_over(tmp_path):
    import os
    import subprocess
    import sys

    from fedzero.bench.runner import _claim

    lock = tmp_path / ".A-x-seed0.lock"
    assert _claim(lock) and lock.read_text() == str(os.getpid())
    assert _claim(lock)                                   # our own claim stays ours
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(str(child.pid))                   # a live worker holds it
        assert not _claim(lock)
    finally:
        child.kill()
        child.wait()
    assert _claim(lock) and lock.read_text() == str(os.getpid())   # its holder died


# -- the LM task ---------------------------------------------------------------------------------------------------

def tiny_lm_suite(corpus):
    """An LM suite at toy size: the end-to-end suite's tiny byte-tokenizer LLaMAs on a fortunes-format corpus."""
    dema = {"rank": 4, "num_experts": 2, "num_slots": 2, "share": "experts-only"}
    return {
        "name": "tiny-lm", "task": "lm", "seeds": [0, 1],
        "backbones": {"a": _llama(16, 2, 2, 1), "b": _llama(24, 3, 3, 2)},
        "lm_data": {"train_docs": 8, "test_docs": 4, "val_docs": 2, "round_eval_docs": 2, "max_chars": 64,
                    "source": str(corpus)},
        "rounds": 2, "eval_every": 1,
        "train": {"local_steps": 2, "batch_size": 4, "max_length": 96, "eval_batch_size": 8},
        "lr": {"dema": 1e-2, "lora": 1e-2},
        "settings": {"A": {"description": "two clients on backbone a, one on b holding two domains",
                           "clients": [{"id": "c0", "backbone": "a", "domains": ["d0"]},
                                       {"id": "c1", "backbone": "a", "domains": ["d1"]},
                                       {"id": "c2", "backbone": "b", "domains": ["d2", "d3"]}],
                           "methods": [{"name": "lora-local", "runner": "lora", "strategy": "local", "rank": 2},
                                       {"name": "fedit", "runner": "lora", "strategy": "fedit", "rank": 2},
                                       {"name": "dema-local", "runner": "dema", "strategy": "local", "dema": dema},
                                       {"name": "dema-cmga", "runner": "dema", "strategy": "cmga", "dema": dema}]}},
        "memory": None,
    }


def test_lm_suite_end_to_end_on_tiny_models_then_resumes(tmp_path):
    from test_lm_data import fake_corpus

    from fedzero.bench import run_bench
    from fedzero.bench.stats import LMOutcomes, decode_run, lm_outcome_metrics

    fake_corpus(str(tmp_path / "corpus"))
    out = tmp_path / "bench"
    results = run_bench(tiny_lm_suite(tmp_path / "corpus"), out, threads=1, memory=False, log=lambda *_: None)
    methods = ("lora-local", "fedit", "dema-local", "dema-cmga")
    assert {(r["method"], r["seed"]) for r in results["runs"]} == {(m, s) for m in methods for s in (0, 1)}
    assert (out / "runs" / "A-zero-shot-seed0.json").exists()
    by = {(r["method"], r["seed"]): r for r in results["runs"]}
    assert sorted(map(sorted, by[("fedit", 0)]["groups"].values())) == [["c0", "c1"], ["c2"]]
    for run in results["runs"]:
        assert run["test_records"]["task"] == "lm" and list(run["test_records"]["domains"]) == ["d0", "d1", "d2", "d3"]
        assert run["test_records"] == by[("fedit", run["seed"])]["test_records"]     # the pairing
        for c in run["clients"]:
            assert "topics" not in c and c["domains"] and c["train_chars"] > 0 and "train_labels" not in c
            assert [r["round"] for r in c["rounds"]] == [0, 1, 2] and all(r["eval"] for r in c["rounds"])
            assert set(c["final"]) == {"own", "unseen", "global"}
            # the byte tokenizer with bos: every text byte is a token, plus eos per record
            assert c["final"]["global"]["tokens"] == c["final"]["global"]["bytes"] + c["final"]["global"]["n"]
            assert c["train_steps"] == 4 and c["train_seconds"] > 0
        assert run["clients"][2]["final"]["own"]["n"] == sum(
            len(run["test_records"]["domains"][d]["uids"].split()) for d in ("d2", "d3"))
        outcomes = decode_run(run)
        assert isinstance(outcomes, LMOutcomes) and outcomes.nll.shape[0] == 3
        levels = lm_outcome_metrics(outcomes)                # the stored records reproduce the finals
        assert levels["global.nll_per_token"] == pytest.approx(
            np.mean([c["final"]["global"]["nll_per_token"] for c in run["clients"]]), rel=1e-5)
    # round 0 is the frozen backbone for every method; training lowers held-out NLL (lr 1e-2, 4 steps)
    zero = [r["clients"][0]["rounds"][0]["eval"] for r in results["runs"] if r["seed"] == 0]
    assert all(z == zero[0] for z in zero)
    assert all(c["final"]["own"]["nll_per_token"] < c["rounds"][0]["eval"]["own"]["nll_per_token"]
               for r in results["runs"] for c in r["clients"] if r["runner"] == "dema")

    entry = report.summarize(json.loads((out / "results.json").read_text()))["A"]
    assert set(entry["gains"]) == {"fedit", "dema-cmga"} and entry["priors"] == {}
    assert entry["gains"]["dema-cmga"]["control"] == "dema-local" and entry["gains"]["dema-cmga"]["bootstrap"]
    assert entry["methods"]["fedit"]["curve"].keys() == {0, 1, 2}
    md = (out / "report.md").read_text()
    assert "| method | own NLL/token | unseen NLL/token | global NLL/token | own NLL/byte |" in md
    assert "| method | control | own Δ% | unseen Δ% | global Δ% | seeds |" in md
    assert "| dema-cmga | dema-local | " in md and "No prior-only control" in md and "| backbone zero-shot |" in md
    assert "`c2` = b on d2, d3" in md and "Budget per client" in md
    assert all((out / f).stat().st_size > 1000 for f in ("nll_per_round.png", "per_client_nll.png", "gain_over_local.png"))

    logs = []
    again = run_bench(tiny_lm_suite(tmp_path / "corpus"), out, threads=1, memory=False, log=logs.append)
    assert again["runs_this_invocation"] == 0 and sum("done earlier" in line for line in logs) == 8


def test_lm_suite_without_the_corpus_fails_before_any_backbone_is_built(tmp_path, monkeypatch):
    from fedzero.bench import lm_corpus, run_bench, runner

    def no_backbones(*args, **kwargs):
        raise AssertionError("a backbone was prepared before the corpus was read")

    monkeypatch.setattr(lm_corpus, "FORTUNES_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(runner, "prepare_backbone", no_backbones)
    suite = tiny_lm_suite("fortunes")
    for c in suite["settings"]["A"]["clients"]:
        c["domains"] = ["computers"]
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        run_bench(suite, tmp_path / "bench", threads=1, memory=False, log=lambda *_: None)


def test_lm_records_longer_than_max_length_are_refused_before_training(tmp_path):
    from test_lm_data import fake_corpus

    from fedzero.bench import run_bench

    fake_corpus(str(tmp_path / "corpus"))
    suite = tiny_lm_suite(tmp_path / "corpus")
    suite["train"]["max_length"] = 40                # records of up to 64 bytes do not fit
    with pytest.raises(ValueError, match="raise train.max_length or lower lm_data.max_chars"):
        run_bench(suite, tmp_path / "bench", threads=1, memory=False, log=lambda *_: None)
    assert not list((tmp_path / "bench" / "runs").glob("*.json"))


def test_lm_suites_load_and_lm_mistakes_are_refused_naming_the_key():
    for name in ("hetero-lm", "hetero-lm-quick"):
        suite = load_suite(name)
        assert suite["task"] == "lm" and "data" not in suite
        assert [c["backbone"] for c in suite["settings"]["H"]["clients"]] == ["smol10", "smol10", "neox384", "small256"]
        assert all(m["distill"]["level"] == "token" for m in suite["settings"]["H"]["methods"] if m.get("distill"))
    assert {m["name"] for m in load_suite("hetero-lm")["settings"]["H"]["methods"]} == {
        "lora-local", "fedit", "dema-local", "dema-fedavg", "dema-shaped-fedavg", "dema-local-replica",
        "dema-canonical-local", "dema-canonical-fedavg", "dema-distill-token", "dema-distill-token-quality"}
    assert {m.get("projector_anchors") for m in load_suite("hetero-lm")["settings"]["H"]["methods"]} == {None, "domain:cookie"}

    def refused(change, match):
        suite = load_suite("hetero-lm-quick")
        change(suite)
        with pytest.raises(ValueError, match=match):
            check_suite(suite)

    clients = lambda s: s["settings"]["H"]["clients"]        # noqa: E731
    refused(lambda s: s.update(task="lm-task"), "task must be one of")
    refused(lambda s: s.update(data={"train_per_client": 8}), "takes 'lm_data', not 'data'")
    refused(lambda s: s.pop("lm_data"), "missing 'lm_data'")
    refused(lambda s: s["lm_data"].update(test_docs=0), "lm_data.test_docs")
    refused(lambda s: s["lm_data"].update(tests_docs=5), "tests_docs")
    refused(lambda s: s["lm_data"].update(round_eval_docs=99), "lm_data.round_eval_docs")
    refused(lambda s: clients(s)[0].update(topics=["airlines"]), "take 'domains', not 'topics'")
    refused(lambda s: clients(s)[0].update(domains="computers"), "'domains' must be a non-empty list")
    refused(lambda s: clients(s)[0].update(domains=["computer"]), "unknown domain.*'domains'")
    refused(lambda s: s["lm_data"].update(domains=["people"]), "missing from lm_data.domains")
    refused(lambda s: s["settings"]["H"]["methods"].append(
        {"name": "d", "runner": "dema", "strategy": "local", "distill": {"weight": 1.0}}), "'distill' .* LM suite")
    refused(lambda s: s.update(memory={"backbone": "smol10", "batch_size": 4, "seq_len": 64, "steps": 2}), "'memory'")
    suite = load_suite("hetero-quick")                       # and the classification side of the same checks
    suite["lm_data"] = {}
    with pytest.raises(ValueError, match="takes 'data', not 'lm_data'"):
        check_suite(suite)
    suite = load_suite("hetero-quick")
    suite["settings"]["H"]["clients"][0] = {"id": "x", "backbone": "smol10", "domains": ["computers"]}
    with pytest.raises(ValueError, match="'domains' is for LM suites"):
        check_suite(suite)


# -- in-domain anchors for output distillation (distill.anchor_source) -------------------------------

def test_topic_anchors_come_from_a_topic_no_client_holds_disjoint_from_every_split_record():
    from fedzero.bench.data import topic_anchor_texts

    records = synthetic_records()
    extra = [{**records[0], "topic": "t2", "text": "RT @a: " + records[0]["text"]},   # a t0 tweet filed under t2
             {**records[-3], "text": records[-3]["text"] + " http://t.co/x"}]        # a t2 near-duplicate
    records = records + [{**r, "uid": len(records) + i} for i, r in enumerate(extra)]
    clients = [{"id": "c0", "topics": ["t0"]}, {"id": "c1", "topics": ["t1"]}]
    split = split_tweets(records, clients, SETTINGS, seed=0)
    anchors = topic_anchor_texts(records, "t2", 30, clients=clients, seed=0, max_chars=SETTINGS.max_chars)
    assert len(anchors) == 30 and all(records[a["uid"]]["topic"] == "t2" for a in anchors)
    keys = [dedup_key(a["text"]) for a in anchors]
    assert len(set(keys)) == 30                                           # no two near-duplicates
    held = [r["uid"] for c in split.clients for r in c.train] + [r["uid"] for part in (split.test, split.val)
                                                                for recs in part.values() for r in recs]
    assert not set(keys) & {dedup_key(records[u]["text"]) for u in held}
    assert records[-2]["uid"] not in {a["uid"] for a in anchors}          # the t0 tweet in t2 never is one
    assert all(len(a["text"]) <= SETTINGS.max_chars for a in anchors)
    # the split's seed picks them from t2's 40 texts (its two duplicates left out), the same for the same seed
    assert topic_anchor_texts(records, "t2", 30, clients=clients, seed=0, max_chars=60) == anchors
    assert topic_anchor_texts(records, "t2", 30, clients=clients, seed=1, max_chars=60) != anchors
    with pytest.raises(ValueError, match=r"anchor topic 't0' is held by client\(s\) \['c0'\]"):
        topic_anchor_texts(records, "t0", 5, clients=clients, seed=0, max_chars=60)
    with pytest.raises(ValueError, match=r"'t2' has 40 usable texts, 50 are needed.*no client holds: \['t2'\]"):
        topic_anchor_texts(records, "t2", 50, clients=clients, seed=0, max_chars=60)


def test_anchor_source_is_a_checked_optional_distill_field():
    from fedzero.bench.methods import parse_method

    base = {"name": "d", "runner": "dema", "strategy": "local"}
    assert parse_method({**base, "distill": {"weight": 1.0}}).distill.anchor is None
    assert parse_method({**base, "distill": {"anchor_source": "topic:claritin"}}).distill.anchor == ("topic", "claritin")
    for bad in ("claritin", "topic:", 3):
        with pytest.raises(ValueError, match="anchor_source must be 'topic:<name>'"):
            parse_method({**base, "distill": {"anchor_source": bad}})


def test_bench_distills_on_anchors_of_a_topic_no_client_holds(tmp_path):
    """End to end on tiny models: "anchor_source": "topic:t2" trains on t2's texts as anchors (named in the
    run); the same method without it keeps its record as before (no anchor fields); a setting where a
    client holds t2 is refused, naming the client."""
    from fedzero.bench import run_bench
    from fedzero.bench.data import topic_anchor_texts

    records = synthetic_records(n_per_topic=20)
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "uid"}) + "\n" for r in records))
    suite = tiny_suite(source)
    suite["seeds"] = [0]
    suite["train"]["local_steps"] = 3        # Adam's first step moves by lr * sign(gradient) alone
    distill = {"weight": 1.0, "anchors": 6, "batch_size": 2}
    clients = [c for c in suite["settings"]["A"]["clients"] if c["id"] != "c2"]      # t0 and t1: t2 is free
    suite["settings"]["A"].update(clients=clients, methods=[
        {"name": "distill", "runner": "dema", "strategy": "local", "dema": {"rank": 4, "num_experts": 2, "num_slots": 2},
         "distill": distill},
        {"name": "distill-t2", "runner": "dema", "strategy": "local", "dema": {"rank": 4, "num_experts": 2, "num_slots": 2},
         "distill": {**distill, "anchor_source": "topic:t2"}}])
    results = run_bench(suite, tmp_path / "bench", threads=1, memory=False, log=lambda _: None)
    by = {r["method"]: r for r in results["runs"]}
    assert by["distill"]["distill"] == distill and "distill_anchors" not in by["distill"]
    anchors = topic_anchor_texts(records, "t2", 6, clients=clients, seed=0, max_chars=30)
    assert by["distill-t2"]["distill_anchors"] == {"source": "topic:t2", "uids": [a["uid"] for a in anchors]}
    # other anchors, other teachers: round 2 trains otherwise (round 1 had no teacher yet)
    losses = {m: [c["rounds"][2]["train_loss"] for c in by[m]["clients"]] for m in by}
    assert [c["rounds"][1]["train_loss"] for c in by["distill"]["clients"]] == \
        [c["rounds"][1]["train_loss"] for c in by["distill-t2"]["clients"]]
    assert losses["distill"] != losses["distill-t2"]

    held = tiny_suite(source)
    held["seeds"] = [0]
    held["settings"]["A"]["methods"] = [{**suite["settings"]["A"]["methods"][1]}]
    with pytest.raises(ValueError, match=r"setting 'A': distill.anchor_source: anchor topic 't2' is held by "
                                         r"client\(s\) \['c2'\]"):
        run_bench(held, tmp_path / "held", threads=1, memory=False, log=lambda _: None)


# -- in-domain projector anchors, the canonical fit and quality teachers in the bench (issue 12) ------

def test_projector_anchors_is_checked():
    from fedzero.bench.methods import parse_method

    base = {"name": "c", "runner": "dema", "strategy": "fedavg", "projector_anchors": "topic:t2"}
    assert parse_method({**base, "dema": {"projector": "canonical"}}).projector_anchors == ("topic", "t2")
    assert parse_method({**base, "dema": {"projector": "anchor"}}).projector_anchors == ("topic", "t2")
    lm = parse_method({**base, "projector_anchors": "domain:wisdom", "dema": {"projector": "canonical"}})
    assert lm.projector_anchors == ("domain", "wisdom")
    lm.check_setting([], lm=True, where="w")
    with pytest.raises(ValueError, match="projector_anchors of a classification suite must be 'topic:<name>'"):
        lm.check_setting([], lm=False, where="w")
    with pytest.raises(ValueError, match="projector_anchors is for projectors 'anchor' and 'canonical'.*'learned'"):
        parse_method({**base, "dema": {}})
    with pytest.raises(ValueError, match="dema.anchor_file or projector_anchors, not both"):
        parse_method({**base, "dema": {"projector": "anchor", "anchor_file": "x.jsonl"}})
    for bad in ("t2", "domain:", 3):
        with pytest.raises(ValueError, match="projector_anchors must be 'topic:<name>' .* or 'domain:<name>'"):
            parse_method({**base, "projector_anchors": bad, "dema": {"projector": "anchor"}})
    with pytest.raises(ValueError, match="LoRA method takes no 'dema' settings or 'projector_anchors'"):
        parse_method({"name": "l", "runner": "lora", "strategy": "local", "projector_anchors": "topic:t2"})
    with pytest.raises(ValueError, match="distill.teacher must be one of"):
        parse_method({**base, "dema": {"projector": "anchor"}, "distill": {"teacher": "best"}})


def test_bench_canonical_projectors_on_in_domain_anchors_and_quality_teachers(tmp_path):
    """End to end on tiny models of two widths: a canonical projector fitted across the clients on a free
    topic's texts (named in the run, with the round-0 alignment measured on other texts of that topic,
    and the config recorded without the run's temporary anchor file, so resuming keeps the run); a
    quality-teacher distillation whose clients report their val loss every round and train otherwise
    than under the mean teacher."""
    from fedzero.bench import run_bench
    from fedzero.bench.data import topic_anchor_texts
    from fedzero.bench.methods.dema import ALIGNMENT_TEXTS

    records = synthetic_records(n_per_topic=120)
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "uid"}) + "\n" for r in records))
    suite = tiny_suite(source)
    suite["seeds"] = [0]
    suite["train"]["local_steps"] = 3
    small = {"rank": 4, "num_experts": 2, "num_slots": 2, "share": "experts-only"}
    distill = {"weight": 1.0, "anchors": 6, "batch_size": 2, "anchor_source": "topic:t2"}
    clients = suite["settings"]["A"]["clients"]       # two on a, one on b; t1 is free: three clients, so the
    clients[1]["topics"] = ["t0"]                      # rule weighs two teachers of each
    suite["settings"]["A"].update(clients=clients, methods=[
        {"name": "canonical", "runner": "dema", "strategy": "fedavg", "projector_anchors": "topic:t1",
         "dema": {**small, "projector": "canonical+learned", "num_anchors": 12}},
        {"name": "mean", "runner": "dema", "strategy": "local", "dema": small,
         "distill": {**distill, "anchor_source": "topic:t1"}},
        {"name": "quality", "runner": "dema", "strategy": "local", "dema": small,
         "distill": {**distill, "anchor_source": "topic:t1", "teacher": "quality"}}])
    results = run_bench(suite, tmp_path / "bench", threads=1, memory=False, log=lambda _: None)
    by = {r["method"]: r for r in results["runs"]}
    canonical = by["canonical"]
    anchors = topic_anchor_texts(records, "t1", 12 + ALIGNMENT_TEXTS, clients=clients, seed=0, max_chars=30)
    assert canonical["projector_anchors"] == {"source": "topic:t1", "uids": [a["uid"] for a in anchors[:12]],
                                              "alignment_uids": [a["uid"] for a in anchors[12:]]}
    assert canonical["dema"]["anchor_file"] is None and canonical["dema"]["projector"] == "canonical+learned"
    assert canonical["canonical_fit"]["fit_texts"] == 12 and canonical["canonical_fit"]["components"] == 8
    alignment = canonical["alignment"]
    assert alignment["texts"] == ALIGNMENT_TEXTS and list(alignment["pairs"]) == ["c0~c1", "c0~c2", "c1~c2"]
    per_slot = [a for pair in alignment["pairs"].values() for a in pair["per_slot"]]
    assert len(per_slot) == 6 and all(-1 <= a <= 1 for a in per_slot)
    assert alignment["mean"] == pytest.approx(sum(per_slot) / 6, abs=1e-4)
    assert alignment["pairs"]["c0~c1"]["mean"] == pytest.approx(1.0)     # one backbone, one fit: the same z
    assert "alignment" not in by["mean"]
    for c in by["quality"]["clients"]:
        assert all(r["val_loss"] > 0 for r in c["rounds"][1:])
    assert all("val_loss" not in r for c in by["mean"]["clients"] for r in c["rounds"])
    # round 1 trains without a teacher in both; from round 2 on, other teachers train otherwise
    assert [c["rounds"][1]["train_loss"] for c in by["mean"]["clients"]] == \
        [c["rounds"][1]["train_loss"] for c in by["quality"]["clients"]]
    assert [c["rounds"][2]["train_loss"] for c in by["mean"]["clients"]] != \
        [c["rounds"][2]["train_loss"] for c in by["quality"]["clients"]]
    again = run_bench(suite, tmp_path / "bench", threads=1, memory=False, log=lambda _: None)
    assert again["runs_this_invocation"] == 0


def test_lm_bench_canonical_projectors_on_a_domain_no_client_holds(tmp_path):
    """projector_anchors "domain:<name>" on the LM task: the canonical space fitted on that domain's records,
    named in the run with the round-0 alignment; a topic source is refused before any run."""
    from test_lm_data import fake_corpus

    from fedzero.bench import run_bench
    from fedzero.bench.lm_corpus import load_corpus
    from fedzero.bench.lm_data import domain_anchor_texts
    from fedzero.bench.methods.dema import ALIGNMENT_TEXTS

    fake_corpus(str(tmp_path / "corpus"), n_docs=150)
    suite = tiny_lm_suite(tmp_path / "corpus")
    suite["seeds"] = [0]
    setting = suite["settings"]["A"]
    setting["clients"][2]["domains"] = ["d2"]                           # d3 is free
    method = {"name": "canonical", "runner": "dema", "strategy": "fedavg", "projector_anchors": "domain:d3",
              "dema": {"rank": 4, "num_experts": 2, "num_slots": 2, "share": "experts-only",
                       "projector": "canonical", "num_anchors": 12}}
    token = {"name": "token", "runner": "dema", "strategy": "local", "dema": {**method["dema"], "projector": "learned"},
             "distill": {"level": "token", "top_k": 4, "anchors": 5, "batch_size": 2, "anchor_source": "domain:d3",
                         "teacher": "quality"}}
    setting["methods"] = [method, token]
    results = run_bench(suite, tmp_path / "bench", threads=1, memory=False, log=lambda *_: None)
    run, tok = sorted(results["runs"], key=lambda r: r["method"] != "canonical")
    corpus = load_corpus(str(tmp_path / "corpus"))
    anchors = domain_anchor_texts(corpus, "d3", 12 + ALIGNMENT_TEXTS, clients=setting["clients"], seed=0, max_chars=64)
    assert run["projector_anchors"]["uids"] == [a["uid"] for a in anchors[:12]]
    # token-level distillation on the LM task: anchors of the free domain, every client's val loss each round,
    # bytes up = its top-4 rows (8 bytes per kept token), down = its teacher's (as wide as the others' union)
    assert tok["distill_anchors"]["uids"] == [a["uid"] for a in anchors[:5]]
    assert all(r["val_loss"] > 0 for c in tok["clients"] for r in c["rounds"][1:])
    up = [tok["comm"][0]["upload_bytes"][k] for k in range(3)]
    assert all(u > 0 and u % (4 * 8) == 0 for u in up)
    assert all(d >= u for d, u in zip(tok["comm"][0]["download_bytes"], up))     # a union of >= top_k tokens
    assert run["alignment"]["texts"] == ALIGNMENT_TEXTS and run["alignment"]["pairs"]["c0~c1"]["mean"] == pytest.approx(1.0)
    assert run["canonical_fit"]["fit_texts"] == 12
    setting["methods"] = [{**method, "projector_anchors": "topic:d3"}]
    with pytest.raises(ValueError, match="projector_anchors of an LM suite must be 'domain:<name>'"):
        run_bench(suite, tmp_path / "bench2", threads=1, memory=False, log=lambda *_: None)
    setting["methods"] = [{**token, "distill": {**token["distill"], "level": "label"}}]
    with pytest.raises(ValueError, match="'distill' at level 'label' cannot run in an LM suite"):
        run_bench(suite, tmp_path / "bench3", threads=1, memory=False, log=lambda *_: None)


def test_bench_runs_depth_aware_sharing_as_simulate_does(tmp_path):
    """share 'depth-aware' in the bench: clients of one width and different depths send their depth ranges
    with their updates; with a threshold no pair of different depths reaches, the 4-layer client keeps its own
    projectors (the bank the 2-layer clients share moves apart from it), and the run completes and resumes."""
    from fedzero.bench import run_bench

    records = synthetic_records(n_per_topic=20)
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "uid"}) + "\n" for r in records))
    suite = tiny_suite(source)
    suite["seeds"] = [0]
    suite["backbones"]["b"] = _llama(16, 4, 2, 2)                      # a's width, twice its depth
    dema = {"rank": 4, "num_experts": 2, "num_slots": 2, "share": "depth-aware", "depth_overlap_min": 0.9}
    suite["settings"]["A"]["methods"] = [{"name": "depth", "runner": "dema", "strategy": "fedavg", "dema": dema},
                                         {"name": "depth-cmga", "runner": "dema", "strategy": "cmga", "dema": dema}]
    results = run_bench(suite, tmp_path / "bench", threads=1, memory=False, log=lambda _: None)
    run, cmga = sorted(results["runs"], key=lambda r: r["method"])
    assert [c["id"] for c in run["clients"]] == ["c0", "c1", "c2"]
    assert all(c["final"] for c in run["clients"])
    # CMGA's effect is recorded over the expert blocks; the depth-aware banks carry no Gram and are left out
    effect = cmga["cmga_effect"][0]
    assert effect["total_blocks"] == 2 and set(effect["rel_diff"]) == {"slot0", "slot1"}
    again = run_bench(suite, tmp_path / "bench", threads=1, memory=False, log=lambda _: None)
    assert again["runs_this_invocation"] == 0


def test_report_only_runs_nothing_and_reports_what_is_on_disk(tmp_path):
    """--report-only: after seed 0 ran, a report-only invocation over seeds 0 and 1 runs nothing (no run, no
    zero-shot scoring) and reports the seed-0 runs."""
    from fedzero.bench import run_bench

    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "uid"}) + "\n"
                              for r in synthetic_records(n_per_topic=20)))
    suite = tiny_suite(source)
    suite["settings"]["A"]["methods"] = suite["settings"]["A"]["methods"][1:2]          # dema-cmga
    first = run_bench(suite, tmp_path / "bench", seeds=[0], threads=1, memory=False, log=lambda _: None)
    assert first["runs_this_invocation"] == 1
    report = run_bench(suite, tmp_path / "bench", seeds=[0, 1], threads=1, memory=False, report_only=True,
                       log=lambda _: None)
    assert report["runs_this_invocation"] == 0 and [r["seed"] for r in report["runs"]] == [0]
    assert not (tmp_path / "bench" / "runs" / "A-zero-shot-seed1.json").exists()
    assert (tmp_path / "bench" / "report.md").read_text().count("dema-cmga") > 0
