"""fedzero.bench.stats, fedzero.bench.bootstrap and the class metrics they build on: exact answers on
hand-made numbers."""

import math

import numpy as np
import pytest

from fedzero.bench import stats
from fedzero.bench.bootstrap import draw_resamples, full_sample_gains, pair_outcomes, paired_bootstrap, slot_gains
from fedzero.bench.stats import (CLASS_METRICS, Outcomes, decode_run, encode_records, encode_scores, outcome_metrics,
                                 prior_only, prior_shift)
from fedzero.evaluate import classification_metrics, metrics_from_counts

# -- class metrics ------------------------------------------------------------------------------------------


def test_balanced_accuracy_and_macro_f1_on_a_hand_made_confusion_matrix():
    # true 0 -> predicted 0,0,0,1,3; true 1 -> 1,1,2,2; true 2 -> 2,0; class 3 is predicted once, never true
    true = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 3, 1, 1, 2, 2, 2, 0])
    m = classification_metrics(np.eye(4)[pred], true)
    assert m["accuracy"] == pytest.approx(6 / 11)
    # recall 3/5, 2/4, 1/2 over the three classes in the truth (class 3 has no recall)
    assert m["balanced_accuracy"] == pytest.approx((3 / 5 + 2 / 4 + 1 / 2) / 3)
    # F1 = 2 tp / (predicted + true): 6/9, 4/7, 2/5, and 0/1 for class 3 (predicted, never true)
    assert m["macro_f1"] == pytest.approx((6 / 9 + 4 / 7 + 2 / 5 + 0) / 4)


def test_a_class_neither_true_nor_predicted_is_left_out_of_both_averages():
    true, pred = np.array([0, 0, 1]), np.array([0, 1, 1])
    m = classification_metrics(np.eye(3)[pred], true)            # class 2: absent everywhere
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)


def test_metrics_from_counts_batches_over_leading_axes():
    counts = np.array([[[2, 1, 0], [3, 1, 1], [2, 2, 1]],          # tp, predicted, true per class
                       [[0, 0, 1], [1, 1, 1], [1, 1, 1]]])
    out = metrics_from_counts(counts[:, 0], counts[:, 1], counts[:, 2])
    assert out["accuracy"] == pytest.approx([3 / 5, 1 / 3])
    assert out["balanced_accuracy"] == pytest.approx([(1 + 1 / 2 + 0) / 3, (0 + 0 + 1) / 3])
    assert out["macro_f1"] == pytest.approx([(4 / 5 + 2 / 3 + 0) / 3, (0 + 0 + 1) / 3])


# -- stored outcomes -----------------------------------------------------------------------------------------

LABELS3 = ["negative", "neutral", "positive"]


def _run(scores_by_client, *, train_labels=None, topics=("t0", "t1"), y=None, uids=None):
    """A run record as the bench's runners (fedzero.bench.methods) write it: clients c0.. with topics[k]
    as their own topic."""
    y = y if y is not None else {"t0": [0, 1, 2], "t1": [2, 2]}
    uids = uids if uids is not None else {t: [10 * i + j for j in range(len(y[t]))] for i, t in enumerate(topics)}
    test = {t: [{"uid": u, "label": LABELS3[c]} for u, c in zip(uids[t], y[t])] for t in topics}
    clients = []
    for k, scores in enumerate(scores_by_client):
        c = {"id": f"c{k}", "topics": [topics[k]], "test_scores": encode_scores(scores)}
        if train_labels is not None:
            c["train_labels"] = dict(zip(LABELS3, train_labels[k]))
        clients.append(c)
    return {"method": "m", "seed": 0, "test_records": encode_records(test, LABELS3), "clients": clients}


def test_outcomes_round_trip_through_the_stored_strings():
    rng = np.random.default_rng(0)
    scores = [{"t0": rng.normal(size=(3, 3)) * 5, "t1": rng.normal(size=(2, 3))} for _ in range(2)]
    run = _run(scores, train_labels=[[4, 1, 0], [0, 2, 7]])
    assert run["test_records"]["topics"]["t1"] == {"uids": "10 11", "y": "22"}
    out = decode_run(run)
    assert out.topics == ["t0", "t1"] and out.clients == ["c0", "c1"] and out.client_topics == [["t0"], ["t1"]]
    assert out.uids.tolist() == [0, 1, 2, 10, 11] and out.y.tolist() == [0, 1, 2, 2, 2]
    assert out.strata.tolist() == [0, 0, 0, 1, 1]
    expected = np.stack([np.concatenate([s["t0"], s["t1"]]) for s in scores])
    np.testing.assert_allclose(out.scores, expected, atol=0.5e-4 + 1e-12)       # 4 decimals
    assert out.train_labels.tolist() == [[4, 1, 0], [0, 2, 7]]
    assert out.units() == [("c0", "own"), ("c0", "unseen"), ("c0", "global"),
                           ("c1", "own"), ("c1", "unseen"), ("c1", "global")]
    unit_client, unit_strata = out.unit_layout()
    assert unit_client.tolist() == [0, 0, 0, 1, 1, 1]
    assert unit_strata.tolist() == [[True, False], [False, True], [True, True],
                                    [False, True], [True, False], [True, True]]
    assert encode_scores({"t": np.array([[-0.00001, 1.5, -2.25]])}) == {"t": "0 1.5 -2.25"}
    old = {k: v for k, v in run.items() if k != "test_records"}           # a run from before outcomes were stored
    assert decode_run(old) is None
    assert decode_run(_run(scores)).train_labels is None


def test_outcome_metrics_equal_classification_metrics_per_client_and_view():
    rng = np.random.default_rng(1)
    scores = [{"t0": rng.normal(size=(3, 3)), "t1": rng.normal(size=(2, 3))} for _ in range(2)]
    out = decode_run(_run(scores))
    y = {"t0": np.array([0, 1, 2]), "t1": np.array([2, 2])}

    def ref(view):
        per = []
        for k, own in enumerate(("t0", "t1")):
            topics = {"own": [own], "unseen": [t for t in ("t0", "t1") if t != own], "global": ["t0", "t1"]}[view]
            s = np.concatenate([out.scores[k][out.strata == ("t0", "t1").index(t)] for t in topics])
            per.append(classification_metrics(s, np.concatenate([y[t] for t in topics])))
        return per

    m = outcome_metrics(out)
    for view in ("own", "unseen", "global"):
        for metric in CLASS_METRICS:
            assert m[f"{view}.{metric}"] == pytest.approx(np.mean([r[metric] for r in ref(view)]))


# -- the prior-only control ------------------------------------------------------------------------------------


def test_prior_only_control_on_a_hand_made_example():
    # client 0 trained on labels 6 / 2 / 0, client 1 on 0 / 2 / 6: pooled 6 / 4 / 6. With +1 smoothing
    # client 0's prior is 7/11, 3/11, 1/11 and the pooled one 7/19, 5/19, 7/19, so its scores move by
    # log(11/19), log(55/57), log(77/19) = -0.547, -0.036, +1.399
    shift0 = np.log([11 / 19, 55 / 57, 77 / 19])
    shift1 = np.log([77 / 19, 55 / 57, 11 / 19])                 # the mirror image
    assert prior_shift(np.zeros(3), [6, 2, 0], [6, 4, 6]) == pytest.approx(shift0)
    s0 = {"t0": np.array([[0.0, -0.5, -1.5], [0.0, -2.0, -3.0], [-1.0, 0.0, -2.0]]), "t1": np.zeros((2, 3))}
    s1 = {"t0": np.array([[-1.5, -0.5, 0.0], [-3.0, -2.0, 0.0], [-2.0, 0.0, -1.0]]), "t1": np.zeros((2, 3))}
    local = decode_run(_run([s0, s1], train_labels=[[6, 2, 0], [0, 2, 6]]))
    control = prior_only(local)
    np.testing.assert_allclose(control.scores[0], local.scores[0] + shift0)
    np.testing.assert_allclose(control.scores[1], local.scores[1] + shift1)
    # client 0: [0, -0.5, -1.5] -> [-0.547, -0.536, -0.101]: its skewed prior alone had kept "negative";
    # [0, -2, -3] stays "negative", [-1, 0, -2] -> [-1.547, -0.036, -0.601] stays "neutral"
    assert local.predictions()[0].tolist() == [0, 0, 1, 0, 0]
    assert control.predictions()[0].tolist() == [2, 0, 1, 2, 2]
    assert control.predictions()[1].tolist() == [0, 2, 1, 0, 0]
    # nothing else changes: the records, the clients, the counts
    assert control.uids.tolist() == local.uids.tolist() and control.train_labels.tolist() == [[6, 2, 0], [0, 2, 6]]
    # a federation whose clients all hold the pooled prior: the control is the local model itself
    same = decode_run(_run([s0, s1], train_labels=[[3, 3, 3], [3, 3, 3]]))
    np.testing.assert_allclose(prior_only(same).scores, same.scores, atol=1e-12)
    with pytest.raises(ValueError, match="train label counts"):
        prior_only(decode_run(_run([s0, s1])))


# -- paired bootstrap ---------------------------------------------------------------------------------------------


def _outcomes(y, pred, topics_sizes, *, uids=None):
    """Outcomes of K clients with predictions pred [K, N] (one-hot scores), client k owning topic k."""
    pred = np.asarray(pred)
    topics = [f"t{i}" for i in range(len(topics_sizes))]
    strata = np.repeat(np.arange(len(topics)), topics_sizes)
    n_clients = pred.shape[0]
    return Outcomes(topics, LABELS3, np.arange(len(y)) if uids is None else uids, np.asarray(y), strata,
                    [f"c{k}" for k in range(n_clients)], [[topics[k % len(topics)]] for k in range(n_clients)],
                    np.eye(3)[pred] * 2.0)


def _interval(b, metric="accuracy", view="global", client=None):
    i = b.interval(metric, view, client)
    return i.point, i.low, i.high


def test_identical_method_and_control_give_exactly_zero():
    rng = np.random.default_rng(0)
    runs = {}
    for s in range(3):
        y = rng.integers(0, 3, 30)
        runs[s] = _outcomes(y, rng.integers(0, 3, (2, 30)), [10, 20])
    b = paired_bootstrap(runs, runs, n_boot=200, seed=1)
    for metric in CLASS_METRICS:
        for view in ("own", "unseen", "global"):
            assert _interval(b, metric, view) == (0.0, 0.0, 0.0)


def test_a_fixed_set_of_extra_correct_records_gives_the_exact_point_and_a_binomial_interval():
    def gain(n, n_boot=4000):
        y = np.zeros(n, dtype=int)
        control = np.where(np.arange(n) % 2 == 0, 0, 1)           # right on the even records
        method = np.where(np.arange(n) % 4 == 1, 0, control)      # ... and on every 4th odd one too
        b = paired_bootstrap({0: _outcomes(y, method[None], [n])}, {0: _outcomes(y, control[None], [n])},
                             n_boot=n_boot, seed=0)
        return _interval(b)

    point, low, high = gain(400)
    assert point == 0.25                                          # exactly the share of extra records
    # one seed: the gain is Binomial(400, 0.25) / 400 under resampling: 0.25 ± 1.96 · sqrt(0.25 · 0.75 / 400)
    half = 1.96 * math.sqrt(0.25 * 0.75 / 400)
    assert low == pytest.approx(0.25 - half, abs=0.006) and high == pytest.approx(0.25 + half, abs=0.006)
    wide, narrow = gain(100), gain(1600)
    assert wide[0] == narrow[0] == 0.25
    assert (narrow[2] - narrow[1]) == pytest.approx((wide[2] - wide[1]) / 4, rel=0.2)   # width ~ 1 / sqrt(n)


def test_seed_resampling_alone_on_a_known_distribution():
    # seed 0: the method is right everywhere and the control nowhere (gain 1 in every record resample);
    # seeds 1 and 2: identical (gain 0). The mean over 3 seed draws is k/3 with k ~ Binomial(3, 1/3):
    # P(0) = 8/27 > 2.5 % and P(1) = 1/27 > 2.5 %, so the interval is exactly [0, 1]
    y = np.array([0, 1, 2, 0])
    right, wrong = _outcomes(y, y[None], [4]), _outcomes(y, ((y + 1) % 3)[None], [4])
    b = paired_bootstrap({0: right, 1: right, 2: wrong}, {0: wrong, 1: right, 2: wrong}, n_boot=2000, seed=3)
    for metric in CLASS_METRICS:
        point, low, high = _interval(b, metric)
        assert point == pytest.approx(1 / 3) and (low, high) == (0.0, 1.0)
    assert b.seeds == [0, 1, 2]


def test_one_seed_resamples_records_only_and_pairs_only_common_seeds():
    y = np.array([0, 1, 2, 1, 0, 2])
    method = _outcomes(y, y[None], [6])
    control = _outcomes(y, np.array([[0, 1, 2, 0, 0, 0]]), [6])
    b = paired_bootstrap({0: method, 5: method}, {0: control}, n_boot=500, seed=0)
    assert b.seeds == [0] and b.slots["accuracy"].shape == (500, 1, 2)     # one topic: own and global only
    assert b.interval("accuracy", "unseen") is None
    point, low, high = _interval(b)
    assert point == pytest.approx(1 / 3) and 0 <= low < point < high <= 1      # control right on 4 of 6
    assert paired_bootstrap({0: method}, {1: control}) is None
    with pytest.raises(ValueError, match="different test records"):
        pair_outcomes(method, _outcomes(y, y[None], [6], uids=np.arange(6) + 1))


def test_the_same_seed_gives_the_same_interval():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 40)
    a, c = _outcomes(y, rng.integers(0, 3, (2, 40)), [20, 20]), _outcomes(y, rng.integers(0, 3, (2, 40)), [20, 20])
    first, again = paired_bootstrap({0: a}, {0: c}, n_boot=300, seed=7), paired_bootstrap({0: a}, {0: c}, n_boot=300, seed=7)
    other = paired_bootstrap({0: a}, {0: c}, n_boot=300, seed=8)
    assert _interval(first, "macro_f1") == _interval(again, "macro_f1") != _interval(other, "macro_f1")


def _reference_slot_gains(pairs, n_boot, seed):
    """The bootstrap as a plain loop over resamples and slots, drawing in the documented order
    (seeds [B, S]; then per seed, per stratum, [slots that drew it, n_t]), metrics from
    classification_metrics on explicitly resampled records."""
    rng = np.random.default_rng(seed)
    n_seeds = len(pairs)
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    draws = {}
    for s, p in enumerate(pairs):
        slots = list(zip(*np.nonzero(seeds == s)))
        members = [np.flatnonzero(p.strata == t) for t in range(p.unit_strata.shape[1])]
        per_stratum = [rng.integers(0, len(m), size=(len(slots), len(m))) for m in members]
        for j, slot in enumerate(slots):
            draws[slot] = np.concatenate([m[idx[j]] for m, idx in zip(members, per_stratum)])
    out = {k: np.zeros((n_boot, n_seeds, len(pairs[0].unit_client))) for k in CLASS_METRICS}
    for b in range(n_boot):
        for i in range(n_seeds):
            p = pairs[seeds[b, i]]
            rec = draws[(b, i)]
            for u, (k, strata) in enumerate(zip(p.unit_client, p.unit_strata)):
                sel = rec[strata[p.strata[rec]]]
                ma = classification_metrics(np.eye(3)[p.pred_a[k][sel]], p.y[sel])
                mb = classification_metrics(np.eye(3)[p.pred_b[k][sel]], p.y[sel])
                for metric in CLASS_METRICS:
                    out[metric][b, i, u] = ma[metric] - mb[metric]
    return out


def test_vectorised_bootstrap_equals_a_slow_loop_with_the_same_draws():
    rng = np.random.default_rng(4)
    pairs = []
    for _ in range(3):
        y = rng.integers(0, 3, 9)
        pairs.append(pair_outcomes(_outcomes(y, rng.integers(0, 3, (2, 9)), [5, 4]),
                                   _outcomes(y, rng.integers(0, 3, (2, 9)), [5, 4])))
    fast = slot_gains(pairs, draw_resamples(np.random.default_rng(11), [[5, 4]] * 3, 40))
    slow = _reference_slot_gains(pairs, 40, 11)
    for metric in CLASS_METRICS:
        np.testing.assert_allclose(fast[metric], slow[metric], atol=1e-12)
    # and the full-sample gains are the plain metrics' differences
    full = full_sample_gains(pairs)
    p = pairs[0]
    a = classification_metrics(np.eye(3)[p.pred_a[1]], p.y)
    c = classification_metrics(np.eye(3)[p.pred_b[1]], p.y)
    assert full["macro_f1"][0, 5] == pytest.approx(a["macro_f1"] - c["macro_f1"])    # unit 5: c1, global


def test_bootstrap_of_a_realistic_size_draws_every_view_client_and_metric_at_once():
    rng = np.random.default_rng(5)
    runs = {}
    for s in range(5):
        y = rng.integers(0, 3, 1000)
        runs[s] = (_outcomes(y, rng.integers(0, 3, (4, 1000)), [250] * 4),
                   _outcomes(y, rng.integers(0, 3, (4, 1000)), [250] * 4))
    b = paired_bootstrap({s: r[0] for s, r in runs.items()}, {s: r[1] for s, r in runs.items()}, n_boot=2000)
    assert b.slots["macro_f1"].shape == (2000, 5, 12)      # draws x seeds x (4 clients x 3 views)


# -- the report from stored outcomes ---------------------------------------------------------------------------

def _final(scores_by_topic, y_by_topic, own):
    """A client's final view metrics, as fedzero.bench.methods.view_metrics computes them."""
    views = {"own": [own], "unseen": [t for t in y_by_topic if t != own], "global": list(y_by_topic)}
    return {v: classification_metrics(np.concatenate([scores_by_topic[t] for t in ts]),
                                      np.concatenate([y_by_topic[t] for t in ts])) for v, ts in views.items()}


def _results_with_outcomes():
    """Two seeds of a local-only method and a federated one (near-perfect), two clients with opposite
    label skew, scores stored as the bench's runners store them."""
    y = {"t0": np.array([0, 0, 1, 2, 0, 0, 1, 0]), "t1": np.array([2, 2, 1, 0, 2, 2, 1, 2])}
    clients = [("c0", "t0", [8, 1, 1]), ("c1", "t1", [1, 1, 8])]
    rng = np.random.default_rng(0)
    runs = []
    for seed in (0, 1):
        test = {t: [{"uid": 100 * seed + 10 * i + j, "label": LABELS3[c]} for j, c in enumerate(y[t])]
                for i, t in enumerate(y)}
        for name, strategy, skill in (("local", "local", 0.0), ("fed", "fedit", 6.0)):
            recs = []
            for cid, topic, counts in clients:
                scores = {t: np.round(rng.normal(size=(len(y[t]), 3)) + skill * np.eye(3)[y[t]]
                                      + np.log(np.array(counts) + 1.0), 4) for t in y}
                recs.append({"id": cid, "backbone": "a", "topics": [topic], "rounds": [{"round": 0}],
                             "final": _final(scores, y, topic), "test_scores": encode_scores(scores),
                             "train_labels": dict(zip(LABELS3, counts)), "train_steps": 4, "train_seconds": 1.5 + seed})
            runs.append({"setting": "A", "method": name, "seed": seed, "runner": "lora", "clients": recs,
                         "comm": [{"round": 1, "upload_bytes": [0, 0], "download_bytes": [0, 0]}],
                         "first_round_cosine": None, "test_records": encode_records(test, LABELS3)})
    suite = {"name": "fake", "seeds": [0, 1], "rounds": 1, "train": {"local_steps": 4, "batch_size": 4},
             "lr": {"dema": 1e-3, "lora": 1e-3},
             "settings": {"A": {"clients": [{"id": c, "backbone": "a", "topics": [t]} for c, t, _ in clients],
                                "methods": [{"name": "local", "runner": "lora", "strategy": "local"},
                                            {"name": "fed", "runner": "lora", "strategy": "fedit"}]}}}
    return {"suite": suite, "runs": runs, "zero_shot": {}, "machine": {}}


def test_report_gains_prior_only_control_and_shares_from_stored_outcomes(tmp_path):
    from fedzero.bench import report
    from fedzero.bench.report import summary as report_summary

    results = _results_with_outcomes()
    entry = report.summarize(results)["A"]
    local = {r["seed"]: decode_run(r) for r in results["runs"] if r["method"] == "local"}
    prior = "prior-only control (local)"
    # the prior-only control's levels: its outcomes' metrics, mean over seeds
    expected = np.mean([outcome_metrics(prior_only(o))["global.macro_f1"] for o in local.values()])
    assert entry["priors"][prior]["global.macro_f1"][0] == pytest.approx(expected)
    assert entry["priors"][prior]["seeds"] == [0, 1]
    gains, transfer = entry["gains"], entry["transfer"]
    assert prior not in transfer                           # the control over itself is no row
    for view in ("own", "unseen", "global"):
        for k in CLASS_METRICS:
            g = gains["fed"]["mean"][view][k]
            finals = np.mean([report_summary.run_metric(r, view, k) * (1 if r["method"] == "fed" else -1)
                              for r in results["runs"]]) * 2       # mean over seeds of fed - local
            assert g.point == pytest.approx(finals) and g.low <= g.point <= g.high
            # transfer = gain over local minus the prior-only control's gain over local (same records)
            assert transfer["fed"]["mean"][view][k].point == pytest.approx(g.point - gains[prior]["mean"][view][k].point)
            share = entry["shares"]["fed"][view][k]
            if g.excludes_zero():
                assert share == pytest.approx(gains[prior]["mean"][view][k].point / g.point)
            else:
                assert share is None
    assert gains["fed"]["mean"]["global"]["macro_f1"].excludes_zero()        # near-perfect against skewed guesses
    assert entry["budget"]["fed"]["c0"]["steps"][0] == 4 and entry["budget"]["fed"]["c1"]["seconds"][0] == 2.0

    results["plots"] = report.plots(results, tmp_path)
    assert {"gain_over_local.png", "gain_over_prior.png"} <= {p.split("/")[-1] for p in results["plots"]}
    md = report.markdown(results)
    assert f"| {prior} | local | " in md and f"| {prior} | {prior} |" not in md
    assert f"| fed | {prior} | " in md
    g = gains["fed"]["mean"]["own"]["macro_f1"]
    assert f"| fed | local | {g.point * 100:+.1f} [{g.low * 100:+.1f}, {g.high * 100:+.1f}] |" in md
    assert "| fed | 4 / 2.0 s | 4 / 2.0 s |" in md


def test_prediction_spread_is_the_share_of_the_most_predicted_label_per_client_and_seed():
    from fedzero.bench import report
    from fedzero.bench.report import summary as report_summary

    y = {"t0": np.array([0, 1, 2, 0]), "t1": np.array([2, 2, 1, 0])}
    const = {t: np.tile([0.0, 5.0, 0.0], (4, 1)) for t in y}                # always label 1
    three_one = {t: np.eye(3)[[0, 0, 0, 2]] for t in y}                       # 6 of 8 records label 0
    runs = [_run([const, three_one], y=y), {**_run([three_one, const], y=y), "seed": 1}]
    assert report_summary.prediction_spread(runs, ["c0", "c1"]) == {"c0": [1.0, 0.75], "c1": [0.75, 1.0]}
    results = _results_with_outcomes()
    md = report.markdown(results)
    assert "Prediction spread" in md and "| local | " in md.split("Prediction spread")[1]


def test_report_falls_back_to_points_when_a_seed_lacks_outcomes():
    from fedzero.bench import report

    results = _results_with_outcomes()
    for r in results["runs"]:
        if r["method"] == "fed" and r["seed"] == 1:
            del r["test_records"]                     # as if recorded before outcomes were stored
    entry = report.summarize(results)["A"]
    g = entry["gains"]["fed"]
    assert not g["bootstrap"] and g["seeds"] == [0, 1] and g["mean"]["global"]["accuracy"].low is None
    assert entry["transfer"]["fed"]["seeds"] == [0]   # the prior-only comparison needs outcomes: seed 0 only
    assert all(v is None for shares in entry["shares"]["fed"].values() for v in shares.values())
    assert "| fed | local | " in report.markdown(results)


@pytest.mark.slow
def test_the_shipped_hetero_report_is_what_its_results_render():
    """docs/benchmarks.md quotes docs/benchmarks/hetero/report.md: the report code must still write it
    from its results.json, byte for byte (regenerate both when the report changes)."""
    import json
    from pathlib import Path

    from fedzero.bench import report

    folder = Path(__file__).parent.parent / "docs" / "benchmarks" / "hetero"
    results = json.loads((folder / "results.json").read_text())
    assert report.markdown(results) == (folder / "report.md").read_text()


@pytest.mark.parametrize("suite", ["full", "long", "depth30", "tune"])
def test_the_shipped_reports_results_still_render(suite):
    """docs/benchmarks/*/results.json predate per-record outcomes and balanced accuracy: "–" there."""
    import json
    from pathlib import Path

    from fedzero.bench import report

    path = Path(__file__).parent.parent / "docs" / "benchmarks" / suite / "results.json"
    if not path.exists():
        pytest.skip(f"{path} not shipped")
    results = json.loads(path.read_text())
    md = report.markdown(results)
    assert "## Setting" in md and "| own bal acc |" in md
    if suite == "depth30":   # runs of 2026-12-02 beside older ones without per-record scores: point gains only
        assert "| dema-shaped-fedavg | dema-local | +1.4 [–] |" in md
    else:
        assert "not recorded in these runs" in md


# -- the LM task's outcomes and bootstrap ------------------------------------------------------------------

def _lm_outcomes(nll, tokens, sizes, *, client_domains=None, nbytes=None):
    """LMOutcomes of K clients with per-record nll [K, N] and tokens [K, N] (bytes: 4 per token unless
    given), domains d0.. of the given sizes, client k owning domain k unless client_domains says."""
    nll, tokens = np.atleast_2d(np.asarray(nll, dtype=np.float64)), np.atleast_2d(np.asarray(tokens))
    domains = [f"d{i}" for i in range(len(sizes))]
    strata = np.repeat(np.arange(len(domains)), sizes)
    k = nll.shape[0]
    return stats.LMOutcomes(domains, np.array([f"{domains[s]}/{i}.0" for i, s in enumerate(strata)]), strata,
                            [f"c{j}" for j in range(k)], client_domains or [[domains[j % len(domains)]] for j in range(k)],
                            nll, tokens, 4 * tokens if nbytes is None else np.atleast_2d(nbytes))


def test_lm_outcomes_round_trip_through_the_stored_strings():
    test = {"computers": [{"uid": "computers/12.0"}, {"uid": "computers/12.1"}], "people": [{"uid": "people/3.0"}]}
    per_client = [{"computers": (np.array([10.25, 3.0]), np.array([4, 2]), np.array([15, 7])),
                   "people": (np.array([7.123456]), np.array([3]), np.array([11]))},
                  {"computers": (np.array([9.0, 2.5]), np.array([4, 2]), np.array([15, 7])),
                   "people": (np.array([6.0]), np.array([3]), np.array([11]))}]
    run = {"method": "m", "seed": 0, "test_records": stats.encode_lm_records(test),
           "clients": [{"id": f"c{k}", "domains": [d], "test_nll": stats.encode_lm_scores(s)}
                       for k, (d, s) in enumerate(zip(("computers", "people"), per_client))]}
    assert run["test_records"] == {"task": "lm", "domains": {"computers": {"uids": "12.0 12.1"}, "people": {"uids": "3.0"}}}
    assert run["clients"][0]["test_nll"]["people"] == {"nll": "7.1235", "tokens": "3", "bytes": "11"}
    out = decode_run(run)
    assert isinstance(out, stats.LMOutcomes) and out.topics == ["computers", "people"]
    assert out.uids.tolist() == ["computers/12.0", "computers/12.1", "people/3.0"] and out.strata.tolist() == [0, 0, 1]
    np.testing.assert_allclose(out.nll, [[10.25, 3.0, 7.1235], [9.0, 2.5, 6.0]])
    assert out.tokens.tolist() == [[4, 2, 3]] * 2 and out.bytes.tolist() == [[15, 7, 11]] * 2
    # levels: ratios of sums per client and view, then the mean over clients
    levels = stats.lm_outcome_metrics(out)
    assert levels["own.nll_per_token"] == pytest.approx((13.25 / 6 + 6.0 / 3) / 2)
    assert levels["unseen.nll_per_byte"] == pytest.approx((7.1235 / 11 + 11.5 / 22) / 2)
    assert levels["global.nll_per_token"] == pytest.approx((20.3735 / 9 + 17.5 / 9) / 2)
    by_view = stats.lm_view_metrics(per_client[0], {"own": ["computers"], "global": ["computers", "people"]},
                                    limit={"computers": 1, "people": 1})
    assert by_view["own"] == {"nll_per_token": 10.25 / 4, "nll_per_byte": 10.25 / 15, "tokens": 4, "bytes": 15, "n": 1}
    assert by_view["global"]["tokens"] == 7 and by_view["global"]["n"] == 2
    with pytest.raises(ValueError, match="not '<domain>/<index>.<part>'"):
        stats.encode_lm_records({"people": [{"uid": "computers/1.0"}]})


def test_lm_identical_arms_give_exactly_zero():
    rng = np.random.default_rng(0)
    runs = {s: _lm_outcomes(rng.uniform(1, 50, (2, 30)), rng.integers(1, 20, (2, 30)), [10, 20]) for s in range(3)}
    b = paired_bootstrap(runs, runs, n_boot=200, seed=1)
    assert b.metrics == ["nll_per_token"]
    for view in ("own", "unseen", "global"):
        assert _interval(b, "nll_per_token", view) == (0.0, 0.0, 0.0)


def test_lm_gain_is_the_relative_reduction_of_a_ratio_of_sums():
    # two records: the control's NLL 1 and 3, the method's 0.5 and 3 (one token each). On all records
    # the gain is 1 - 3.5 / 4 = 0.125 (a mean of per-record ratios would say 0.25). Resampling two of
    # two: {1, 1} -> 1 - 1 / 2 = 0.5 (p 1/4), {1, 2} -> 0.125 (p 1/2), {2, 2} -> 0 (p 1/4): so the
    # 95% interval is exactly [0, 0.5]
    method, control = _lm_outcomes([[0.5, 3.0]], [[1, 1]], [2]), _lm_outcomes([[1.0, 3.0]], [[1, 1]], [2])
    b = paired_bootstrap({0: method}, {0: control}, n_boot=2000, seed=0)
    assert _interval(b, "nll_per_token", "own") == (pytest.approx(0.125), 0.0, 0.5)
    # tokens weigh records: 2 and 6 tokens give per-token 3.5 / 8 against 4 / 8, the same 0.125
    weighted = paired_bootstrap({0: _lm_outcomes([[0.5, 3.0]], [[2, 6]], [2])}, {0: _lm_outcomes([[1.0, 3.0]], [[2, 6]], [2])},
                                n_boot=50, seed=0)
    assert weighted.interval("nll_per_token", "own").point == pytest.approx(0.125)
    # a method 10% lower on every record is 10% lower in every resample; per client, then the mean over clients
    rng = np.random.default_rng(1)
    base = rng.uniform(1, 40, (2, 12))
    tokens = rng.integers(1, 9, (2, 12))
    runs = {s: (_lm_outcomes(base * np.array([[0.9], [0.7]]), tokens, [6, 6]), _lm_outcomes(base, tokens, [6, 6]))
            for s in (0, 1)}
    b = paired_bootstrap({s: r[0] for s, r in runs.items()}, {s: r[1] for s, r in runs.items()}, n_boot=300, seed=2)
    for view in ("own", "unseen", "global"):
        point, low, high = _interval(b, "nll_per_token", view)
        assert (point, low, high) == (pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.2))
    assert b.interval("nll_per_token", "global", "c1").point == pytest.approx(0.3)
    with pytest.raises(ValueError, match="tokenised the test records differently"):
        pair_outcomes(runs[0][0], _lm_outcomes(base, tokens + 1, [6, 6]))
    with pytest.raises(ValueError, match="cannot pair"):
        pair_outcomes(runs[0][0], _outcomes(np.zeros(12, dtype=int), np.zeros((2, 12), dtype=int), [6, 6]))


def test_lm_vectorised_bootstrap_equals_a_slow_loop_with_the_same_draws():
    rng = np.random.default_rng(4)
    pairs = []
    for _ in range(3):
        tokens = rng.integers(1, 30, (2, 9))
        pairs.append(pair_outcomes(_lm_outcomes(rng.uniform(1, 90, (2, 9)), tokens, [5, 4]),
                                   _lm_outcomes(rng.uniform(1, 90, (2, 9)), tokens, [5, 4])))
    fast = slot_gains(pairs, draw_resamples(np.random.default_rng(11), [[5, 4]] * 3, 40))["nll_per_token"]
    # the same draws, in the documented order, metrics from explicitly resampled records
    draws = np.random.default_rng(11)
    seeds = draws.integers(0, 3, size=(40, 3))
    picks = {}
    for s, p in enumerate(pairs):
        slots = list(zip(*np.nonzero(seeds == s)))
        members = [np.flatnonzero(p.strata == t) for t in range(2)]
        per_stratum = [draws.integers(0, len(m), size=(len(slots), len(m))) for m in members]
        for j, slot in enumerate(slots):
            picks[slot] = np.concatenate([m[idx[j]] for m, idx in zip(members, per_stratum)])
    for (b, i), rec in picks.items():
        p = pairs[seeds[b, i]]
        for u, (k, strata) in enumerate(zip(p.unit_client, p.unit_strata)):
            sel = rec[strata[p.strata[rec]]]
            ratio = (p.nll_a[k][sel].sum() / p.tokens[k][sel].sum()) / (p.nll_b[k][sel].sum() / p.tokens[k][sel].sum())
            assert fast[b, i, u] == pytest.approx(1 - ratio, abs=1e-12)


def test_the_gate_passes_a_method_far_above_every_reference_and_names_why_others_fail():
    """fedzero.bench.report.gate on stored outcomes: 'strong' (near-perfect) beats dema-local, lora-local and
    fedit by far more than 5 points with intervals above 0, its transfer above 0, no client worse on its own
    topic: it passes; 'same' trains like dema-local (its own gains are noise around 0) and fails, naming the
    references; with fewer than 5 seeds nothing passes."""
    from fedzero.bench import report
    from fedzero.bench.report.gate import MIN_SEEDS, gate_table

    y = {"t0": np.array([0, 0, 1, 2, 0, 0, 1, 0, 2, 1]), "t1": np.array([2, 2, 1, 0, 2, 2, 1, 2, 0, 1])}
    clients = [("c0", "t0", [6, 2, 2]), ("c1", "t1", [2, 2, 6])]
    rng = np.random.default_rng(0)
    methods = [("dema-local", "dema", "local", 0.0), ("lora-local", "lora", "local", 0.0),
               ("fedit", "lora", "fedit", 0.5), ("strong", "dema", "fedavg", 8.0), ("same", "dema", "fedavg", 0.0)]
    runs = []
    for seed in range(MIN_SEEDS):
        test = {t: [{"uid": 100 * seed + 20 * i + j, "label": LABELS3[c]} for j, c in enumerate(y[t])]
                for i, t in enumerate(y)}
        for name, runner, strategy, skill in methods:
            recs = []
            for cid, topic, counts in clients:
                scores = {t: np.round(rng.normal(size=(len(y[t]), 3)) + skill * np.eye(3)[y[t]]
                                      + np.log(np.array(counts) + 1.0), 4) for t in y}
                recs.append({"id": cid, "backbone": "a", "topics": [topic], "rounds": [{"round": 0}],
                             "final": _final(scores, y, topic), "test_scores": encode_scores(scores),
                             "train_labels": dict(zip(LABELS3, counts)), "train_steps": 4, "train_seconds": 1.0})
            runs.append({"setting": "A", "method": name, "seed": seed, "runner": runner, "clients": recs,
                         "comm": [{"round": 1, "upload_bytes": [0, 0], "download_bytes": [0, 0]}],
                         "first_round_cosine": None, "test_records": encode_records(test, LABELS3)})
    specs = [{"name": n, "runner": r, "strategy": s, **({"dema": {"share": "experts-only"}} if r == "dema" else {})}
             for n, r, s, _ in methods]
    suite = {"name": "fake", "seeds": list(range(MIN_SEEDS)), "rounds": 1, "train": {"local_steps": 4, "batch_size": 4},
             "lr": {"dema": 1e-3, "lora": 1e-3},
             "settings": {"A": {"clients": [{"id": c, "backbone": "a", "topics": [t]} for c, t, _ in clients],
                                "methods": specs}}}
    results = {"suite": suite, "runs": runs, "zero_shot": {}, "machine": {}}
    gate = report.summarize(results)["A"]["gate"]
    assert list(gate) == ["strong", "same"]                  # DeMA methods other than the references
    strong, same = gate["strong"], gate["same"]
    assert strong["passes"] and strong["fails"] == []
    assert all(g.point >= 0.05 and g.low > 0 for g in strong["vs"].values()) and strong["transfer"].low > 0
    assert not same["passes"] and any("against dema-local" in f for f in same["fails"])
    assert any("against fedit" in f for f in same["fails"])
    lines = gate_table({"gate": gate}, False, lambda g, d: "x" if g is None else f"{g.point * 100:+.{d}f}")
    assert any(line.startswith("| strong |") and line.endswith("| passes |") for line in lines)
    assert any(line.startswith("| same |") and "fails: " in line for line in lines)

    results["runs"] = [r for r in runs if r["seed"] < 2]
    results["suite"]["seeds"] = [0, 1]
    few = report.summarize(results)["A"]["gate"]["strong"]
    assert not few["passes"] and few["fails"] == [f"2 seeds (< {MIN_SEEDS})"]
