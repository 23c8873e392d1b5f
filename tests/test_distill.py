"""Output distillation on public anchors: the server's leave-one-out teachers (mean, quality-weighted,
only from stronger clients), the KL term, the client's label distributions (one-token and
whole-completion routes) on tiny hand-made cases, the anchor order, the run config's `distill:`
section, and the store files that carry predictions (with their quality) and teachers (the
simulator, DeepSpeed client and MPI aggregator paths are tested in their own files)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fedzero.data import PROMPT_TEMPLATE, ByteTokenizer, build_examples, to_prompt
from fedzero.distill.distiller import AnchorDistiller, kl_to_teacher, label_branch
from fedzero.distill.publish import publish_teachers
from fedzero.distill.settings import DistillSettings
from fedzero.distill.teachers import leave_one_out_teachers, round_teachers
from fedzero.evaluate import label_scores
from fedzero.store import FederationStore, StoreIntegrityError


def test_leave_one_out_teachers_weighted_and_never_self():
    p = {"a": np.array([[1.0, 0.0]]), "b": np.array([[0.0, 1.0]]), "c": np.array([[0.5, 0.5]])}
    t = leave_one_out_teachers(p, {"a": 1, "b": 3, "c": 0})
    np.testing.assert_allclose(t["a"], [[0.0, 1.0]])          # c has weight 0
    np.testing.assert_allclose(t["b"], [[1.0, 0.0]])
    np.testing.assert_allclose(t["c"], [[0.25, 0.75]])
    assert leave_one_out_teachers({"a": p["a"]}, {"a": 1}) == {}
    with pytest.raises(ValueError, match="different shapes"):
        leave_one_out_teachers({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, {"a": 1, "b": 1})


def test_kl_to_teacher_equals_torch_kl_div_and_vanishes_at_the_teacher():
    logp = torch.log_softmax(torch.tensor([[0.2, -1.0, 0.5], [1.0, 0.0, 0.0]]), dim=-1)
    teacher = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.5, 0.3]])
    expected = F.kl_div(logp, teacher, reduction="batchmean")
    assert torch.allclose(kl_to_teacher(logp, teacher), expected, atol=1e-7)
    assert float(kl_to_teacher(logp, logp.exp())) == pytest.approx(0.0, abs=1e-7)


def _tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def test_label_branch_finds_the_token_that_tells_labels_apart():
    tok = ByteTokenizer()
    assert label_branch(tok, ["bad", "fine", "good"]) == ([32], [98, 102, 103])   # " " then b / f / g
    assert label_branch(tok, ["negative", "neutral", "positive"]) is None          # " n" twice


def test_anchor_predictions_one_token_route_matches_full_logits():
    model, tok = _tiny_model(), ByteTokenizer()
    prompts = ["Tweet: a\nSentiment:", "Tweet: longer text here\nSentiment:"]
    d = AnchorDistiller(tok, prompts, ["bad", "fine", "good"], weight=1.0, batch_size=2, max_length=64, seed=0)
    got = d.predict(model)
    for i, p in enumerate(prompts):          # reference: full logits at the end of prompt + " "
        ids = torch.tensor([[tok.bos_token_id, *tok.encode(p), 32]])
        ref = torch.softmax(model(input_ids=ids).logits[0, -1, [98, 102, 103]], dim=-1)
        np.testing.assert_allclose(got[i], ref.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_anchor_predictions_completion_route_matches_label_scores():
    model, tok = _tiny_model(), ByteTokenizer()
    labels = ["negative", "neutral", "positive"]
    prompts = ["Tweet: a\nSentiment:", "Tweet: longer text here\nSentiment:", "Tweet: b\nSentiment:"]
    d = AnchorDistiller(tok, prompts, labels, weight=1.0, batch_size=2, max_length=64, seed=0)
    ref = torch.log_softmax(torch.as_tensor(label_scores(model, tok, [{"prompt": p} for p in prompts], labels,
                                                        max_length=64)), dim=-1).exp().numpy()
    np.testing.assert_allclose(d.predict(model, batch_size=2), ref, rtol=1e-5, atol=1e-6)


def test_distillation_loss_is_off_until_a_teacher_arrives_and_pulls_the_model_to_it():
    model, tok = _tiny_model(), ByteTokenizer()
    prompts = [f"Tweet: anchor {i}\nSentiment:" for i in range(6)]
    d = AnchorDistiller(tok, prompts, ["bad", "fine", "good"], weight=2.0, batch_size=3, max_length=64, seed=0)
    assert d.loss(model, 0) is None
    teacher = np.tile([[0.8, 0.1, 0.1]], (6, 1))
    d.set_teacher(teacher)
    with pytest.raises(ValueError, match="teacher of shape"):
        d.set_teacher(np.zeros((5, 3)))

    def kl():
        return float(kl_to_teacher(torch.log(torch.as_tensor(d.predict(model))), torch.as_tensor(teacher)))

    before = kl()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    seen = []
    for step in range(8):           # 8 steps x 3 anchors: every anchor is visited (reshuffled epochs)
        loss = d.loss(model, step)
        seen.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kl() < 0.5 * before and seen[0] == pytest.approx(2.0 * before, rel=0.3)


def test_local_client_adds_the_distillation_term():
    from fedzero.adapters.dema import DeMAConfig, inject_dema
    from fedzero.client import LocalClient, TrainSettings

    tok = ByteTokenizer()
    records = [{"prompt": f"Tweet: t{i}\nSentiment:", "completion": " bad"} for i in range(4)]

    def client(distiller):
        handle = inject_dema(_tiny_model(), DeMAConfig(rank=4, num_experts=2, num_slots=1, seed=0))
        return LocalClient("c", handle, "fp", build_examples(records, tok, 64), [],
                           TrainSettings(local_steps=2, batch_size=2, lr=1e-2), pad_id=tok.pad_token_id, seed=0,
                           total_rounds=1, distiller=distiller)

    plain = client(None)
    d = AnchorDistiller(tok, ["Tweet: x\nSentiment:"], ["bad", "fine", "good"], weight=5.0, batch_size=1,
                        max_length=64, seed=0)
    with_teacher = client(d)
    start = plain.handle.shared_state_dict()
    d_plain, _ = plain.train_round(start)
    d_none, _ = client(AnchorDistiller(tok, ["Tweet: x\nSentiment:"], ["bad", "fine", "good"], weight=5.0,
                                       batch_size=1, max_length=64, seed=0)).train_round(start)
    assert all(torch.equal(d_plain[k], d_none[k]) for k in d_plain)     # no teacher yet: no extra term
    d.set_teacher(np.array([[0.0, 0.0, 1.0]]))
    d_distilled, _ = with_teacher.train_round(start)
    assert any(not torch.allclose(d_plain[k], d_distilled[k]) for k in d_plain)


def test_round_teachers_add_the_all_clients_mean_for_a_client_without_predictions():
    p = {"a": np.array([[1.0, 0.0]]), "b": np.array([[0.0, 1.0]])}
    t = round_teachers(p, {"a": 1, "b": 3})
    assert sorted(t) == ["*", "a", "b"] and all(v.dtype == torch.float32 for v in t.values())
    torch.testing.assert_close(t["a"], torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(t["b"], torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(t["*"], torch.tensor([[0.25, 0.75]]))
    assert round_teachers({}, {}) == {}
    # one client carrying weight: no teacher that is its own predictions, for it or (via "*") anyone
    assert round_teachers({"a": p["a"]}, {"a": 1}) == {}
    assert sorted(round_teachers(p, {"a": 1, "b": 0})) == ["b"]


def test_anchor_order_is_a_function_of_the_step():
    tok = ByteTokenizer()
    prompts = [f"p{i}:" for i in range(5)]

    def make():
        return AnchorDistiller(tok, prompts, ["bad", "good"], weight=1.0, batch_size=2, max_length=32, seed=3)

    sequential = make()
    steps = [sequential.anchors_at(s) for s in range(10)]        # 20 positions = 4 epochs of 5
    flat = [i for idx in steps for i in idx]
    assert all(sorted(flat[e * 5:(e + 1) * 5]) == list(range(5)) for e in range(4))   # each epoch a permutation
    assert flat[:5] != flat[5:10] or flat[5:10] != flat[10:15]                        # reshuffled
    late = make()                                   # a client resumed at step 7 picks the same anchors
    assert late.anchors_at(7) == steps[7] and late.anchors_at(3) == steps[3]


def test_distill_settings_frame_anchor_texts_like_the_task_and_refuse_bad_input(tmp_path):
    from fedzero.adapters.dema.anchors import load_anchor_texts

    s = DistillSettings.from_dict({"labels": ["negative", "neutral", "positive"], "template": PROMPT_TEMPLATE,
                                   "anchors": 3})
    assert s.prompts() == [to_prompt({"text": t, "label": ""})["prompt"] for t in load_anchor_texts(None, 3)]
    assert all(len(p) <= len("Tweet: \nSentiment:") + 10 for p in
               DistillSettings(labels=["a", "b"], template=PROMPT_TEMPLATE, anchors=3, max_chars=10).prompts())
    for bad, match in (({"labels": ["a", "b"]}, "needs 'labels'"),
                       ({"labels": ["a"], "template": "{text}"}, "at least two distinct"),
                       ({"labels": ["a", "b"], "template": "no slot"}, "must contain"),
                       ({"labels": ["a", "b"], "template": "{text}", "weight": 0}, "weight must be > 0"),
                       ({"labels": ["a", "b"], "template": "{text}", "anchor": 3}, "unknown distill setting")):
        with pytest.raises(ValueError, match=match):
            DistillSettings.from_dict(bad)


def test_store_carries_predictions_and_teachers_checked_and_optional(tmp_path):
    store = FederationStore(tmp_path / "store")
    assert store.read_anchor_predictions(0, "a") is None and store.read_teacher(1, "a") is None
    pa, pb = torch.tensor([[0.9, 0.1], [0.5, 0.5]]), torch.tensor([[0.2, 0.8], [0.4, 0.6]])
    store.write_anchor_predictions(0, "a", pa)
    store.write_anchor_predictions(0, "b", pb)
    store.write_anchor_predictions(0, "z", pb)              # sent, but its update is not aggregated
    torch.testing.assert_close(store.read_anchor_predictions(0, "a"), pa)
    assert publish_teachers(store, 0, {"a": 1, "b": 3}) == {"used": ["a", "b"], "dropped": {}}
    torch.testing.assert_close(store.read_teacher(1, "a"), pb)           # the other client's predictions
    torch.testing.assert_close(store.read_teacher(1, "b"), pa)
    torch.testing.assert_close(store.read_teacher(1, "newcomer"), 0.25 * pa + 0.75 * pb)
    assert publish_teachers(store, 1, {"a": 1}) == {"used": [], "dropped": {}} and store.read_teacher(2, "a") is None
    with pytest.raises(ValueError, match="2-d"):
        store.write_anchor_predictions(0, "a", torch.zeros(3))
    # a retried aggregation that now has no predictions removes an earlier attempt's teachers
    store.write_teachers(3, {"a": pa})
    assert publish_teachers(store, 2, {"a": 1, "b": 1}) == {"used": [], "dropped": {}}
    assert store.read_teacher(3, "a") is None
    path = store.round_dir(1) / "global" / "teachers.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StoreIntegrityError, match="checksum"):
        store.read_teacher(1, "a")


def test_malformed_or_foreign_predictions_are_left_out_not_fatal(tmp_path):
    store = FederationStore(tmp_path / "store")
    good = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    store.write_anchor_predictions(0, "a", good)
    store.write_anchor_predictions(0, "b", 1 - good)
    store.write_anchor_predictions(0, "nan", torch.tensor([[float("nan"), 1.0], [0.5, 0.5]]))
    store.write_anchor_predictions(0, "unnormalised", torch.tensor([[0.9, 0.9], [0.5, 0.5]]))
    store.write_anchor_predictions(0, "other-labels", torch.full((2, 3), 1 / 3))
    store.write_anchor_predictions(0, "corrupt", good)
    path = store.round_dir(0) / "updates" / "corrupt" / "anchor_predictions.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    out = publish_teachers(store, 0, {c: 1 for c in ("a", "b", "nan", "unnormalised", "other-labels", "corrupt")})
    assert out["used"] == ["a", "b"]
    assert sorted(out["dropped"]) == ["corrupt", "nan", "other-labels", "unnormalised"]
    assert "checksum" in out["dropped"]["corrupt"] and "(2, 3)" in out["dropped"]["other-labels"]
    torch.testing.assert_close(store.read_teacher(1, "a"), 1 - good)
    torch.testing.assert_close(store.read_teacher(1, "nan"), 0.5 * good + 0.5 * (1 - good))   # the "*" mean


# -- teacher rules: quality-weighted teachers and only_stronger (issue 12) ---------------------------

def _first_version_teachers(predictions, weights):
    """leave_one_out_teachers and round_teachers' "*" as first written: the "mean" rule must stay this, bit for bit."""
    out = {}
    for k in predictions:
        others = [c for c in predictions if c != k and weights.get(c, 0) > 0]
        total = sum(weights[c] for c in others)
        if total > 0:
            out[k] = sum(weights[c] * np.asarray(predictions[c], dtype=np.float64) for c in others) / total
    weighted = [c for c in predictions if weights.get(c, 0) > 0]
    if len(weighted) >= 2:
        total = sum(weights[c] for c in weighted)
        out["*"] = sum(weights[c] * np.asarray(predictions[c], dtype=np.float64) for c in weighted) / total
    return out


def _random_predictions(clients, n=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.dirichlet(np.ones(c), size=n) for k in clients}


def test_mean_teacher_is_the_first_version_bit_for_bit():
    from fedzero.distill.teachers import TeacherRule

    p = _random_predictions("abcd", seed=1)
    w = {"a": 7, "b": 3, "c": 0, "d": 11}
    first = _first_version_teachers(p, w)
    for rule in (None, TeacherRule(), TeacherRule("mean", False)):
        got = leave_one_out_teachers(p, w, rule)
        assert sorted(got) == ["a", "b", "c", "d"] and all(np.array_equal(got[k], first[k]) for k in got)
        published = round_teachers(p, w, rule)
        assert all(torch.equal(published[k], torch.as_tensor(first[k], dtype=torch.float32)) for k in published)
        assert sorted(published) == sorted(first)


# three clients, two anchors, two labels; sample weights 1 and held-out losses 0, ln 2, ln 4: q = 1, 1/2, 1/4
HAND_P = {"a": np.array([[0.8, 0.2], [0.5, 0.5]]),
          "b": np.array([[0.4, 0.6], [1.0, 0.0]]),
          "c": np.array([[0.5, 0.5], [0.2, 0.8]])}
HAND_L = {"a": 0.0, "b": float(np.log(2)), "c": float(np.log(4))}


def test_quality_teacher_on_a_hand_made_case():
    from fedzero.distill.teachers import TeacherRule, quality_weights

    t = leave_one_out_teachers(HAND_P, {"a": 1, "b": 1, "c": 1}, TeacherRule("quality"), HAND_L)
    # a's teacher, w_jn = q_j * max_c P_j[n]: anchor 0: b 1/2 * 0.6 = 0.3, c 1/4 * 0.5 = 0.125;
    #                                         anchor 1: b 1/2 * 1.0 = 0.5, c 1/4 * 0.8 = 0.2
    np.testing.assert_allclose(t["a"], [[(0.3 * 0.4 + 0.125 * 0.5) / 0.425, (0.3 * 0.6 + 0.125 * 0.5) / 0.425],
                                        [(0.5 * 1.0 + 0.2 * 0.2) / 0.7, (0.5 * 0.0 + 0.2 * 0.8) / 0.7]], rtol=1e-12)
    # c's teacher: anchor 0: a 1 * 0.8, b 0.3; anchor 1: a 1 * 0.5, b 0.5
    np.testing.assert_allclose(t["c"], [[(0.8 * 0.8 + 0.3 * 0.4) / 1.1, (0.8 * 0.2 + 0.3 * 0.6) / 1.1],
                                        [(0.5 * 0.5 + 0.5 * 1.0) / 1.0, (0.5 * 0.5 + 0.5 * 0.0) / 1.0]], rtol=1e-12)
    # sample weights multiply in: 1, 2, 4 cancel q = 1, 1/2, 1/4 exactly, leaving the confidences
    alpha = quality_weights(HAND_P, {"a": 1, "b": 2, "c": 4}, HAND_L)
    conf = np.array([[0.8, 0.5], [0.6, 1.0], [0.5, 0.8]])
    np.testing.assert_allclose(alpha, conf / conf.sum(axis=0), rtol=1e-12)
    # only differences between losses count: the same weights 700 nats further up (exp(-700) alone underflows)
    np.testing.assert_allclose(quality_weights(HAND_P, {"a": 1, "b": 2, "c": 4}, {k: v + 700 for k, v in HAND_L.items()}),
                               alpha, rtol=1e-12)


def test_only_stronger_the_strongest_gets_no_teacher_the_weakest_gets_the_others():
    from fedzero.distill.teachers import TeacherRule

    w = {"a": 1, "b": 3, "c": 1}
    mean = leave_one_out_teachers(HAND_P, w, TeacherRule("mean", only_stronger=True), HAND_L)
    assert sorted(mean) == ["b", "c"]                                       # a has the lowest loss
    np.testing.assert_array_equal(mean["b"], HAND_P["a"])                   # b learns from a alone
    np.testing.assert_allclose(mean["c"], (1 * HAND_P["a"] + 3 * HAND_P["b"]) / 4)
    quality = leave_one_out_teachers(HAND_P, w, TeacherRule("quality", only_stronger=True), HAND_L)
    assert sorted(quality) == ["b", "c"]
    np.testing.assert_array_equal(quality["b"], HAND_P["a"])
    # c is the weakest: every other client is stronger, so its teacher is the plain quality teacher
    np.testing.assert_array_equal(quality["c"], leave_one_out_teachers(HAND_P, w, TeacherRule("quality"), HAND_L)["c"])
    # equal losses teach neither way; no "*" teacher, which the strongest would fall back to
    tied = leave_one_out_teachers(HAND_P, w, TeacherRule(only_stronger=True), {"a": 1.0, "b": 1.0, "c": 2.0})
    assert sorted(tied) == ["c"]
    assert sorted(round_teachers(HAND_P, w, TeacherRule(only_stronger=True), HAND_L)) == ["b", "c"]


def test_quality_teachers_sum_to_one_and_never_hold_the_clients_own_predictions():
    from fedzero.distill.teachers import TeacherRule, quality_weights

    p = _random_predictions("abcd", n=7, c=4, seed=2)
    w, losses = {"a": 5, "b": 1, "c": 2, "d": 9}, {"a": 0.3, "b": 2.5, "c": 1.1, "d": 0.9}
    rule = TeacherRule("quality")
    np.testing.assert_allclose(quality_weights(p, w, losses).sum(axis=0), np.ones(7), atol=1e-12)
    teachers = leave_one_out_teachers(p, w, rule, losses)
    published = round_teachers(p, w, rule, losses)
    assert sorted(published) == ["*", "a", "b", "c", "d"]
    for k, t in teachers.items():
        np.testing.assert_allclose(t.sum(axis=1), np.ones(7), atol=1e-12)
        changed = {**p, k: _random_predictions("x", n=7, c=4, seed=9)["x"]}     # k's own predictions change ...
        np.testing.assert_array_equal(leave_one_out_teachers(changed, w, rule, losses)[k], t)   # ... its teacher not
        np.testing.assert_allclose(leave_one_out_teachers(changed, w, rule, {**losses, k: 50.0})[k], t, rtol=1e-12)
    with pytest.raises(ValueError, match=r"held-out loss.*\['b'\]"):
        leave_one_out_teachers(p, w, rule, {**losses, "b": float("nan")})
    with pytest.raises(ValueError, match=r"held-out loss.*\['d'\]"):
        leave_one_out_teachers(p, w, TeacherRule(only_stronger=True), {k: v for k, v in losses.items() if k != "d"})


def test_teacher_rule_settings_are_checked_once_for_clients_and_aggregator():
    from fedzero.aggregator import aggregator_settings
    from fedzero.distill.teachers import TeacherRule

    base = {"labels": ["a", "b"], "template": "{text}"}
    s = DistillSettings.from_dict({**base, "teacher": "quality", "only_stronger": True})
    assert s.teacher_rule == TeacherRule("quality", True) and s.teacher_rule.needs_quality
    assert not DistillSettings.from_dict(base).teacher_rule.needs_quality
    for bad, match in ((dict(teacher="best"), "distill.teacher must be one of"),
                       (dict(only_stronger="yes"), "only_stronger must be true or false")):
        with pytest.raises(ValueError, match=match):
            DistillSettings.from_dict({**base, **bad})
        with pytest.raises(ValueError, match=match):
            aggregator_settings({"distill": {**base, **bad}})
    assert aggregator_settings({}).teacher_rule == TeacherRule()
    assert aggregator_settings({"distill": {**base, "teacher": "quality"}}).teacher_rule == TeacherRule("quality")
    # the client reports its quality exactly when the rule needs it
    tok = ByteTokenizer()
    assert s.make_distiller(tok, max_length=64, seed=0, texts=["x", "y", "z"] * 22).reports_quality
    assert not DistillSettings.from_dict(base).make_distiller(tok, max_length=64, seed=0).reports_quality


def test_quality_teacher_needs_every_client_to_have_held_out_examples(tmp_path):
    from fedzero.config import parse_run_config

    (tmp_path / "d.jsonl").write_text('{"prompt": "x:", "completion": " good"}\n')
    client = {"backbone": {"llama_config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                            "num_key_value_heads": 2, "intermediate_size": 32, "vocab_size": 259}},
              "data": {"train": "d.jsonl", "test": "d.jsonl"}}
    cfg = {"clients": [{"id": "a", **client}, {"id": "b", **client, "train": {"max_eval_examples": 0}}],
           "distill": {"labels": ["good", "bad"], "template": "{text}", "teacher": "quality"}}
    with pytest.raises(ValueError, match=r"client 'b': train.max_eval_examples is 0, but distill.teacher 'quality'"):
        parse_run_config(cfg, tmp_path)
    cfg["distill"] = {**cfg["distill"], "teacher": "mean"}
    parse_run_config(cfg, tmp_path)                        # the mean teacher needs no held-out loss


def test_store_round_trips_the_quality_and_refuses_a_bad_one_naming_client_and_file(tmp_path):
    import json

    store = FederationStore(tmp_path / "store")
    p = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    store.write_anchor_predictions(0, "a", p, quality=0.75)
    store.write_anchor_predictions(0, "old", p)                       # no quality: as files before the field
    got, quality = store.read_anchor_predictions_with_quality(0, "a")
    torch.testing.assert_close(got, p)
    assert quality == 0.75 and store.read_anchor_predictions_with_quality(0, "old")[1] is None
    torch.testing.assert_close(store.read_anchor_predictions(0, "a"), p)
    assert store.read_anchor_predictions_with_quality(0, "nobody") is None
    for bad in (float("nan"), float("inf"), -0.1, True, "1.0"):
        with pytest.raises(ValueError, match="client a in round 0: quality must be a finite number >= 0"):
            store.write_anchor_predictions(0, "a", p, quality=bad)
    mpath = store.round_dir(0) / "updates" / "old" / "anchor_predictions.manifest.json"
    manifest = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**manifest, "quality": -1.0}))
    with pytest.raises(StoreIntegrityError, match=r"client old in round 0 \(.*anchor_predictions.manifest.json\): "
                                                  r"manifest field 'quality'"):
        store.read_anchor_predictions_with_quality(0, "old")


def test_publish_teachers_under_the_quality_rule_drops_predictions_without_quality(tmp_path):
    from fedzero.distill.teachers import TeacherRule

    store = FederationStore(tmp_path / "store")
    for c in "abc":
        store.write_anchor_predictions(0, c, torch.as_tensor(HAND_P[c], dtype=torch.float32), quality=HAND_L[c])
    store.write_anchor_predictions(0, "noq", torch.as_tensor(HAND_P["a"], dtype=torch.float32))
    weights = {"a": 1, "b": 1, "c": 1, "noq": 1}
    rule = TeacherRule("quality", only_stronger=True)
    out = publish_teachers(store, 0, weights, rule)
    assert out["used"] == ["a", "b", "c"] and list(out["dropped"]) == ["noq"]
    assert "sent no quality" in out["dropped"]["noq"] and "distill.teacher 'quality'" in out["dropped"]["noq"]
    assert out["teacher"] == "quality" and out["only_stronger"] and out["without_teacher"] == ["a"]
    assert out["quality"] == pytest.approx(HAND_L, rel=1e-12)
    expected = round_teachers({c: store.read_anchor_predictions(0, c).numpy() for c in "abc"}, weights, rule,
                              out["quality"])
    assert store.read_teacher(1, "a") is None and store.read_teacher(1, "newcomer") is None   # no "*" fallback
    for c in "bc":
        assert torch.equal(store.read_teacher(1, c), expected[c])
    # the mean rule ignores qualities and keeps its result fields
    assert publish_teachers(store, 0, weights) == {"used": ["a", "b", "c", "noq"], "dropped": {}}
