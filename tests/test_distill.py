"""Output distillation on public anchors: the server's leave-one-out teachers, the KL term, and the
client's label distributions (one-token and whole-completion routes) on tiny hand-made cases."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fedzero.client.distill import AnchorDistiller, label_branch
from fedzero.data import ByteTokenizer, build_examples
from fedzero.evaluate import label_scores
from fedzero.strategies.distill import kl_to_teacher, leave_one_out_teachers


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
    assert d.loss(model) is None
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
    for _ in range(8):              # 8 steps x 3 anchors: every anchor is visited (reshuffled epochs)
        loss = d.loss(model)
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
