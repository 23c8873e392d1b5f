"""Token-level output distillation (distill.level: token) on tiny hand-made cases: the top-k encoding,
the sparse leave-one-out teachers (mean and quality rules, union of supports, never the client's own
predictions, rows summing to one), the loss's closed form and gradient, the scored positions and
predictions of the client's TokenDistiller, the store files and their checks, the aggregator's step
(mixed tokenizers refused naming the clients, other positions left out), the config keys, and a
`fedzero simulate` run end to end."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from fedzero.data import ByteTokenizer
from fedzero.distill.publish import publish_teachers
from fedzero.distill.settings import DistillSettings
from fedzero.distill.teachers import TeacherRule
from fedzero.distill.token_distiller import TokenDistiller
from fedzero.distill.tokens import (PAD_ID, check_one_tokenizer, check_sparse, leave_one_out_token_teachers,
                                    mix_sparse, round_token_teachers, sparse_kl, tokenizer_fingerprint, top_k_encode)
from fedzero.store import FederationStore, StoreIntegrityError


def dense(ids, probs, vocab=10) -> np.ndarray:
    """A sparse row set as [P, vocab] probabilities (padding ignored)."""
    ids, probs = np.asarray(ids), np.asarray(probs, dtype=np.float64)
    out = np.zeros((ids.shape[0], vocab))
    for n in range(ids.shape[0]):
        for v, p in zip(ids[n], probs[n]):
            if v != PAD_ID:
                out[n, v] += p
    return out


def sparse(ids, probs):
    return np.array(ids, dtype=np.int32), np.array(probs, dtype=np.float32)


# three clients, two positions, k = 2
HAND = {"a": sparse([[1, 2], [0, 3]], [[0.75, 0.25], [0.5, 0.5]]),
        "b": sparse([[2, 5], [3, 4]], [[0.5, 0.5], [0.8, 0.2]]),
        "c": sparse([[7, 1], [0, 4]], [[0.6, 0.4], [0.9, 0.1]])}


def test_top_k_encoding_keeps_the_k_most_likely_renormalised():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    ids, probs = top_k_encode(logits, 2)
    assert ids.dtype == torch.int32 and probs.dtype == torch.float32
    assert ids.tolist() == [[0, 1], [3, 2]]
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375], [4 / 7, 3 / 7]]))
    # a head wider than the tokenizer: ids past vocab_size are never sent
    ids, probs = top_k_encode(torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])), 2, vocab_size=3)
    assert ids.tolist() == [[2, 1]]
    torch.testing.assert_close(probs, torch.tensor([[0.6, 0.4]]))
    with pytest.raises(ValueError, match="top_k"):
        top_k_encode(logits, 5)


def test_mean_teacher_on_a_hand_made_case_is_the_union_of_the_others_supports():
    t = leave_one_out_token_teachers(HAND, {"a": 1, "b": 3, "c": 1})
    ids, probs = t["a"]        # (3 b + 1 c) / 4
    assert ids.tolist() == [[2, 5, 7, 1], [3, 0, 4, PAD_ID]]          # by decreasing probability, then id
    np.testing.assert_allclose(probs, [[0.375, 0.375, 0.15, 0.1], [0.6, 0.225, 0.175, 0.0]], atol=1e-7)
    # b's teacher: (a + c) / 2, token 1 in both supports
    np.testing.assert_allclose(dense(*t["b"]), 0.5 * dense(*HAND["a"]) + 0.5 * dense(*HAND["c"]), atol=1e-7)
    # a client of weight 0 teaches no one but still gets a teacher
    t0 = leave_one_out_token_teachers(HAND, {"a": 1, "b": 3, "c": 0})
    np.testing.assert_allclose(dense(*t0["a"]), dense(*HAND["b"]), atol=1e-7)
    np.testing.assert_allclose(dense(*t0["c"]), 0.25 * dense(*HAND["a"]) + 0.75 * dense(*HAND["b"]), atol=1e-7)
    assert leave_one_out_token_teachers({"a": HAND["a"]}, {"a": 1}) == {}


def test_token_teachers_sum_to_one_and_never_hold_the_clients_own_predictions():
    rng = np.random.default_rng(0)

    def client(k):
        ids = np.stack([rng.choice(50, size=k, replace=False) for _ in range(6)]).astype(np.int32)
        p = rng.dirichlet(np.ones(k), size=6).astype(np.float32)
        return ids, p

    preds = {c: client(4) for c in "abcd"}
    preds["d"] = client(3)                     # another k mixes too
    weights = {"a": 5, "b": 1, "c": 2, "d": 3}
    losses = {"a": 0.5, "b": 2.0, "c": 1.0, "d": 0.7}
    for rule in (TeacherRule("mean"), TeacherRule("quality"), TeacherRule("quality", True)):
        teachers = leave_one_out_token_teachers(preds, weights, rule, losses)
        for c, (ids, probs) in teachers.items():
            assert check_sparse(ids, probs, allow_pad=True) is None
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
            changed = dict(preds, **{c: client(4)})          # c's own predictions replaced: same teacher
            again = leave_one_out_token_teachers(changed, weights, rule, losses)[c]
            np.testing.assert_array_equal(again[0], ids)
            np.testing.assert_array_equal(again[1], probs)
            # its support lies in the union of the others' supports, never in c's alone
            others = {int(v) for j in preds if j != c for v in preds[j][0].ravel()}
            assert {int(v) for v in ids.ravel() if v != PAD_ID} <= others
    published = round_token_teachers(preds, weights)
    assert sorted(published) == ["*", "a", "b", "c", "d"]
    assert all(i.dtype == torch.int32 and p.dtype == torch.float32 for i, p in published.values())


def test_quality_teacher_on_a_hand_made_case():
    """Teacher of a from b (loss 0, confidence 0.8) and c (loss log 2, confidence 0.5), equal samples:
    w_b = 1 * 0.8, w_c = 0.5 * 0.5."""
    preds = {"a": sparse([[9, 8]], [[0.5, 0.5]]), "b": sparse([[1, 2]], [[0.8, 0.2]]),
             "c": sparse([[2, 3]], [[0.5, 0.5]])}
    losses = {"a": 3.0, "b": 0.0, "c": math.log(2)}
    ids, probs = leave_one_out_token_teachers(preds, {"a": 1, "b": 1, "c": 1}, TeacherRule("quality"), losses)["a"]
    wb, wc = 0.8, 0.25
    expected = {1: wb * 0.8, 2: wb * 0.2 + wc * 0.5, 3: wc * 0.5}
    assert ids.tolist() == [[1, 2, 3]]
    np.testing.assert_allclose(probs[0], [expected[v] / (wb + wc) for v in (1, 2, 3)], rtol=1e-6)   # float32 inputs
    # only_stronger: b (the strongest) gets none, c only b's, a both
    t = leave_one_out_token_teachers(preds, {"a": 1, "b": 1, "c": 1}, TeacherRule("quality", True), losses)
    assert sorted(t) == ["a", "c"]
    np.testing.assert_allclose(dense(*t["c"]), dense(*preds["b"]), atol=1e-7)
    assert "*" not in round_token_teachers(preds, {"a": 1, "b": 1, "c": 1}, TeacherRule("quality", True), losses)


def test_mix_sparse_ignores_a_teachers_padding():
    ids, probs = mix_sparse([(np.array([[3, PAD_ID]]), np.array([[1.0, 0.0]])), (np.array([[3, 4]]), np.array([[0.5, 0.5]]))],
                            np.array([[0.5], [0.5]]))
    assert ids.tolist() == [[3, 4]]
    np.testing.assert_allclose(probs, [[0.75, 0.25]])


def test_sparse_kl_equals_its_closed_form_and_its_gradient_is_softmax_minus_teacher():
    logits = torch.tensor([[0.2, -1.0, 0.5, 0.0, 1.0], [1.0, 0.0, 0.0, -2.0, 0.3]], requires_grad=True)
    t_ids = torch.tensor([[1, 3, PAD_ID], [0, 2, 4]])
    t_probs = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.5, 0.3]])
    teacher = torch.tensor(dense(t_ids, t_probs, vocab=5), dtype=torch.float32)
    logp = torch.log_softmax(logits, dim=-1)
    loss = sparse_kl(logp, t_ids, t_probs)
    # closed form: mean over rows of sum_v T log T - T log p  (= CE(T, p) - H(T)); torch's KL agrees
    entropy = sum(float(p) * math.log(float(p)) for p in t_probs.flatten() if p > 0) / 2
    cross = -float((teacher * logp.detach()).sum()) / 2
    assert float(loss.detach()) == pytest.approx(entropy + cross, abs=1e-6)
    torch.testing.assert_close(loss, F.kl_div(logp, teacher, reduction="batchmean"))
    loss.backward()
    torch.testing.assert_close(logits.grad, (torch.softmax(logits, dim=-1) - teacher).detach() / 2)
    # zero at the teacher (a model that puts nothing off the support)
    at_teacher = torch.log(teacher.clamp_min(1e-30))
    assert float(sparse_kl(at_teacher, t_ids, t_probs)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="different vocabularies"):
        sparse_kl(logp, torch.tensor([[1, 7, PAD_ID], [0, 2, 4]]), t_probs)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


RECORDS = [{"text": "ab"}, {"prompt": "Q: hi\nA:"}, {"prompt": "Q:", "completion": " xy"}, {"text": "hello there"}]


def test_token_distiller_scores_the_completion_positions_and_matches_full_logits():
    tok, model = ByteTokenizer(), _tiny_model()
    d = TokenDistiller(tok, RECORDS, weight=1.0, batch_size=2, max_length=64, seed=0, top_k=4)
    # text "ab": [bos a b eos] -> 3 positions; a prompt: its last; " xy" + eos: 4; "hello there": 12
    assert d.offsets.tolist() == [0, 3, 4, 8, 20] and d.num_positions == 20
    ids, probs = d.predict(model, batch_size=3)
    assert ids.shape == (20, 4) and ids.dtype == np.int32 and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    rows = []
    for ex in d.examples:      # the reference: one sequence at a time, full logits
        full = model(input_ids=ex["input_ids"][None]).logits[0]
        rows.append(full[(ex["labels"] != -100).nonzero().flatten()])
    ref_ids, ref_probs = top_k_encode(torch.cat(rows), 4, 259)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(probs, ref_probs.numpy(), rtol=1e-5, atol=1e-6)
    q = d.examples[2]          # the pair: the positions that predict " ", "x", "y" and eos, not the prompt's
    scored = (q["labels"] != -100).nonzero().flatten().tolist()
    assert [int(q["input_ids"][i + 1]) for i in scored] == [ord(" "), ord("x"), ord("y"), tok.eos_token_id]
    assert scored == [2, 3, 4, 5]              # [bos Q : " " x y eos]: from ":" on
    assert d.tokenizer == tokenizer_fingerprint(ByteTokenizer()) and len(d.anchors_digest) == 64
    other = TokenDistiller(tok, RECORDS, weight=1.0, batch_size=2, max_length=8, seed=0, top_k=4)
    assert other.anchors_digest != d.anchors_digest          # another max_length: other positions


def test_token_distillation_loss_equals_sparse_kl_and_pulls_the_model_to_the_teacher():
    tok, model = ByteTokenizer(), _tiny_model()
    d = TokenDistiller(tok, RECORDS, weight=2.0, batch_size=2, max_length=64, seed=0, top_k=3)
    assert d.loss(model, 0) is None
    teacher = mix_sparse([d.predict(_tiny_model(seed=5))], np.ones((1, d.num_positions)))
    d.set_teacher(teacher)
    with pytest.raises(ValueError, match="positions"):
        d.set_teacher((teacher[0][:5], teacher[1][:5]))
    idx = d.anchors_at(0)
    logits = torch.cat([model(input_ids=d.examples[i]["input_ids"][None]).logits[0][
        (d.examples[i]["labels"] != -100).nonzero().flatten()] for i in idx])
    rows = np.concatenate([np.arange(d.offsets[i], d.offsets[i + 1]) for i in idx])
    expected = 2.0 * sparse_kl(torch.log_softmax(logits, -1), torch.as_tensor(teacher[0][rows]),
                               torch.as_tensor(teacher[1][rows], dtype=torch.float32))
    torch.testing.assert_close(d.loss(model, 0), expected, rtol=1e-5, atol=1e-6)

    def total():
        with torch.no_grad():
            return sum(float(d.loss(model, s)) for s in range(2))      # steps 0, 1: every anchor once

    before = total()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(20):
        opt.zero_grad()
        d.loss(model, step).backward()
        opt.step()
    model.eval()
    assert total() < 0.7 * before


def test_store_round_trips_token_predictions_and_teachers_and_checks_them(tmp_path):
    store = FederationStore(tmp_path / "s")
    ids, probs = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32), torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    store.write_token_predictions(0, "a", ids, probs, tokenizer="fp1", anchors="0" * 64, quality=1.5)
    got = store.read_token_predictions(0, "a")
    assert torch.equal(got["ids"], ids) and torch.equal(got["probs"], probs)
    assert (got["tokenizer"], got["anchors"], got["quality"]) == ("fp1", "0" * 64, 1.5)
    assert store.read_token_predictions(0, "b") is None
    with pytest.raises(StoreIntegrityError, match="token-level"):
        store.read_anchor_predictions(0, "a")
    with pytest.raises(ValueError, match="anchors must be the hex sha256"):
        store.write_token_predictions(0, "a", ids, probs, tokenizer="fp1", anchors="x")
    with pytest.raises(ValueError, match="ids must be integer"):
        store.write_token_predictions(0, "a", probs, probs, tokenizer="fp1", anchors="0" * 64)
    # a manifest with a wrong field is refused naming it
    manifest = store.layout.predictions_files(0, "a").manifest
    text = manifest.read_text()
    manifest.write_text(text.replace('"level": "token"', '"level": "word"'))
    with pytest.raises(StoreIntegrityError, match="'level'"):
        store.read_token_predictions(0, "a")
    manifest.write_text(text.replace('"top_k": 2', '"top_k": 3'))
    with pytest.raises(StoreIntegrityError, match="top_k"):
        store.read_token_predictions(0, "a")
    store.write_anchor_predictions(0, "c", torch.tensor([[0.5, 0.5]]))
    with pytest.raises(StoreIntegrityError, match="label-level"):
        store.read_token_predictions(0, "c")

    t_ids = torch.tensor([[3, PAD_ID]], dtype=torch.int32)
    store.write_token_teachers(1, {"a": (t_ids, torch.tensor([[1.0, 0.0]])),
                                   "*": (torch.tensor([[1, 2]], dtype=torch.int32), torch.tensor([[0.5, 0.5]]))})
    assert torch.equal(store.read_token_teacher(1, "a")[0], t_ids)
    assert store.read_token_teacher(1, "zz")[0].tolist() == [[1, 2]]           # the all-clients mixture
    with pytest.raises(StoreIntegrityError, match="token-level"):
        store.read_teacher(1, "a")
    store.write_teachers(2, {"a": torch.tensor([[0.5, 0.5]])})
    with pytest.raises(StoreIntegrityError, match="label-level"):
        store.read_token_teacher(2, "a")
    assert store.read_token_teacher(3, "a") is None


def _send(store, rnd, cid, pair, tokenizer="fp", anchors="a" * 64, quality=None):
    store.write_token_predictions(rnd, cid, torch.as_tensor(pair[0]), torch.as_tensor(pair[1]), tokenizer=tokenizer,
                                  anchors=anchors, quality=quality)


def test_publish_token_teachers_refuses_mixed_tokenizers_and_leaves_out_other_positions(tmp_path):
    rule = TeacherRule(level="token")
    store = FederationStore(tmp_path / "s")
    for c in "abc":
        _send(store, 0, c, HAND[c])
    result = publish_teachers(store, 0, {"a": 1, "b": 3, "c": 1}, rule)
    assert result == {"used": ["a", "b", "c"], "dropped": {}, "level": "token", "tokenizer": "fp"}
    expected = round_token_teachers(HAND, {"a": 1, "b": 3, "c": 1})
    for key in ("a", "b", "c", "*"):
        got = store.read_token_teacher(1, key)
        assert torch.equal(got[0], expected[key][0]) and torch.equal(got[1], expected[key][1])

    _send(store, 1, "a", HAND["a"])
    _send(store, 1, "b", HAND["b"], tokenizer="other")
    _send(store, 1, "c", HAND["c"], tokenizer="other")
    with pytest.raises(ValueError, match=r"one tokenizer.*tokenizer fp: clients \['a'\].*"
                                         r"tokenizer other: clients \['b', 'c'\]"):
        publish_teachers(store, 1, {"a": 1, "b": 1, "c": 1}, rule)

    _send(store, 2, "a", HAND["a"])
    _send(store, 2, "b", HAND["b"])
    _send(store, 2, "c", HAND["c"], anchors="b" * 64)                       # other anchors or max_length
    store.write_token_predictions(2, "d", torch.tensor([[1, 1]], dtype=torch.int32), torch.tensor([[0.5, 0.5]]),
                                  tokenizer="fp", anchors="a" * 64)       # a token twice
    store.write_anchor_predictions(2, "e", torch.tensor([[0.5, 0.5]]))     # label level
    result = publish_teachers(store, 2, {c: 1 for c in "abcde"}, rule)
    assert result["used"] == ["a", "b"] and sorted(result["dropped"]) == ["c", "d", "e"]
    assert "other anchor positions" in result["dropped"]["c"] and "twice" in result["dropped"]["d"]
    assert "label-level" in result["dropped"]["e"]
    np.testing.assert_allclose(dense(*[t.numpy() for t in store.read_token_teacher(3, "a")]), dense(*HAND["b"]),
                               atol=1e-7)

    quality = TeacherRule("quality", level="token")
    _send(store, 3, "a", HAND["a"], quality=0.5)
    _send(store, 3, "b", HAND["b"])
    result = publish_teachers(store, 3, {"a": 1, "b": 1}, quality)
    assert result["used"] == ["a"] and "sent no quality" in result["dropped"]["b"]
    assert store.read_token_teacher(4, "a") is None                        # one client: no teacher


def test_check_one_tokenizer_names_the_clients():
    assert check_one_tokenizer({"a": "x", "b": "x"}) == "x"
    with pytest.raises(ValueError, match=r"tokenizer x: clients \['a'\]; tokenizer y: clients \['b'\]"):
        check_one_tokenizer({"a": "x", "b": "y"})


def test_distill_settings_token_level_keys(tmp_path):
    from test_config import problems_of, write_run

    s = DistillSettings.from_dict({"level": "token", "top_k": 4, "anchors": 2})
    assert s.teacher_rule == TeacherRule("mean", False, "token") and s.template == "{text}"
    assert s.token_records(["a  b", "c"]) == [{"text": "a b"}, {"text": "c"}]
    framed = DistillSettings.from_dict({"level": "token", "template": "T: {text}\nA:", "anchors": 1})
    assert framed.token_records(["x"]) == [{"prompt": "T: x\nA:"}]
    assert isinstance(s.make_distiller(ByteTokenizer(), max_length=32, seed=0, texts=["ab", "cd"]), TokenDistiller)
    with pytest.raises(ValueError, match="needs 'labels'"):
        DistillSettings.from_dict({"template": "{text}"})
    text = str(problems_of(write_run(tmp_path, distill={"level": "word", "top_k": 0})))
    assert "distill.level must be one of ['label', 'token'], got 'word'" in text
    assert "distill.top_k" in text
    text = str(problems_of(write_run(tmp_path, distill={"level": "label"})))
    assert "distill.labels is required" in text and "distill.template is required" in text


def test_simulate_with_token_level_distillation(tmp_path, monkeypatch):
    """`distill.level: token` through `fedzero simulate`: each client sends its top-k next-token rows on
    every position of the anchor texts; round 1's teacher of each is the other's predictions (equal
    sample counts); round 0 trains as without distillation, round 1 does not; clients of different
    tokenizers are refused before training, naming them."""
    from test_simulate import tiny_run

    from fedzero.config import parse_run_config
    from fedzero.simulate import simulate

    cfg = yaml.safe_load(tiny_run(tmp_path, strategy="fedavg").read_text())
    plain = simulate(parse_run_config(cfg, tmp_path), tmp_path / "plain", progress=False)
    cfg["distill"] = {"level": "token", "top_k": 5, "anchors": 4, "batch_size": 2, "weight": 2.0, "max_chars": 30}
    summary = simulate(parse_run_config(cfg, tmp_path), tmp_path / "tok", progress=False)
    assert summary["distill"]["level"] == "token"
    s_plain = FederationStore(tmp_path / "plain" / "store", create=False)
    store = FederationStore(tmp_path / "tok" / "store", create=False)
    sent = {(r, c): store.read_token_predictions(r, c) for r in (0, 1) for c in ("a", "b")}
    positions = sent[0, "a"]["ids"].shape[0]
    for (rnd, cid), p in sent.items():
        assert p["ids"].shape == (positions, 5) and positions > 4            # many positions per anchor
        assert check_sparse(p["ids"].numpy(), p["probs"].numpy()) is None
        assert p["tokenizer"] == tokenizer_fingerprint(ByteTokenizer())
    for cid in ("a", "b"):
        d0, d0_plain = store.read_update(0, cid)[0], s_plain.read_update(0, cid)[0]
        assert all(torch.equal(d0[k], d0_plain[k]) for k in d0)
        d1, d1_plain = store.read_update(1, cid)[0], s_plain.read_update(1, cid)[0]
        assert any(not torch.allclose(d1[k], d1_plain[k]) for k in d1)
    assert store.read_token_teacher(0, "a") is None
    for rnd, cid, other in ((1, "a", "b"), (2, "b", "a")):
        t_ids, t_probs = store.read_token_teacher(rnd, cid)
        p = sent[rnd - 1, other]
        np.testing.assert_allclose(dense(t_ids.numpy(), t_probs.numpy(), 259),
                                   dense(p["ids"].numpy(), p["probs"].numpy(), 259), atol=1e-6)
    assert store.read_result(0)["distill"]["level"] == "token"
    extra = [d["uploaded_bytes"] - p["uploaded_bytes"] for d, p in zip(summary["rounds"], plain["rounds"])]
    assert all(2 * positions * 5 * 8 < e < 2 * positions * 5 * 8 + 4000 for e in extra)   # ids + probs, + headers

    import fedzero.distill.token_distiller as td
    fingerprints = iter(["fp-one", "fp-two"])
    monkeypatch.setattr(td, "tokenizer_fingerprint", lambda tok: next(fingerprints))
    with pytest.raises(ValueError, match=r"tokenizer fp-one: clients \['a'\]; tokenizer fp-two: clients \['b'\]"):
        simulate(parse_run_config(cfg, tmp_path), tmp_path / "mixed", progress=False)
