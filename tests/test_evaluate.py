import math

import numpy as np
import pytest
import torch

from fedzero.data import ByteTokenizer, build_examples, collate
from fedzero.evaluate import classification_metrics, evaluate_classification, label_scores

from conftest import tiny_llama


def test_metrics_on_hand_made_scores():
    scores = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.0]])
    true = np.array([0, 1, 1, 0])
    m = classification_metrics(scores, true)
    # predictions 0, 1, 0, 0 (ties -> first): 3/4 right
    assert m["accuracy"] == 0.75
    # class 0: tp 2 fp 1 fn 0 -> f1 0.8; class 1: tp 1 fp 0 fn 1 -> f1 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    nll = -np.mean([2 - math.log(math.exp(2) + 1), 1 - math.log(1 + math.e), -math.log(math.exp(3) + 1), math.log(0.5)])
    assert m["label_nll"] == pytest.approx(nll)


def test_metrics_refuse_bad_shapes():
    with pytest.raises(ValueError, match="scores must be"):
        classification_metrics(np.zeros((3, 2)), np.zeros(2, dtype=int))


def test_label_scores_equal_per_example_log_likelihood():
    model, tok = tiny_llama(vocab=259, hidden=16, layers=1, heads=2, kv_heads=2), ByteTokenizer()
    records = [{"prompt": "x:", "label": "yes"}, {"prompt": "longer prompt:", "label": "no"}]
    scores = label_scores(model, tok, records, ["yes", "no"], max_length=32, batch_size=3)
    for i, r in enumerate(records):
        for j, label in enumerate(["yes", "no"]):
            ex = build_examples([{"prompt": r["prompt"], "completion": f" {label}"}], tok, 32)
            batch = collate(ex, tok.pad_token_id)
            with torch.no_grad():
                logp = torch.log_softmax(model(batch["input_ids"]).logits[0, :-1], -1)
            tgt = batch["labels"][0, 1:]
            expected = sum(logp[t, int(tgt[t])] for t in range(len(tgt)) if tgt[t] != -100)
            assert scores[i, j] == pytest.approx(float(expected), abs=1e-4)


def test_evaluate_classification_refuses_unknown_labels():
    with pytest.raises(ValueError, match="no label"):
        evaluate_classification(tiny_llama(vocab=259), ByteTokenizer(), [{"prompt": "a", "label": "maybe"}],
                                ["yes", "no"], max_length=16)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma3_text", "phi3", "qwen3", "olmo2"])
def test_label_scores_run_each_prompt_once_and_equal_one_sequence_per_label(family):
    """The prompt's cache continued with each label equals scoring each (prompt, label) sequence
    on its own, for every family layout (left padding, position ids, cache copies); prompts that
    do not fit max_length with a label are cut and scored the plain way, like build_examples cuts them."""
    from fedzero.backbones import BackboneSpec, load_backbone
    from fedzero.evaluate import _per_label_scores

    from test_families import model_config

    model, _ = load_backbone(BackboneSpec(model_config=model_config(family), init_seed=3, tokenizer="byte"))
    tok = ByteTokenizer()
    labels = ["negative", "ok", "positive"]            # completions of different lengths
    records = [{"prompt": f"Tweet: {'abc ' * i}\nSentiment:"} for i in range(6)] + [{"prompt": "x" * 70}]
    scores = label_scores(model, tok, records, labels, max_length=48, batch_size=4)
    reference = _per_label_scores(model, tok, records, labels, 48, 32)
    np.testing.assert_allclose(scores, reference, rtol=1e-5, atol=1e-4)
    assert np.isfinite(scores).all()


def test_label_scores_refuse_a_label_that_cannot_fit():
    with pytest.raises(ValueError, match="do not fit max_length"):
        label_scores(tiny_llama(vocab=259), ByteTokenizer(), [{"prompt": "a"}], ["yes", "a much longer label"],
                     max_length=8)


def test_label_scores_of_a_model_without_a_kv_cache_score_each_label():
    """RWKV's layout fits, but its forward takes a recurrent state, no KV cache to continue (nor
    position ids, so left padding would reach its state): its prompts are scored per label."""
    from fedzero.backbones import BackboneSpec, load_backbone
    from fedzero.evaluate import _per_label_scores

    config = {"model_type": "rwkv", "hidden_size": 32, "num_hidden_layers": 2, "attention_hidden_size": 32,
              "intermediate_size": 64, "vocab_size": 259, "bos_token_id": 256, "eos_token_id": 257}
    model, _ = load_backbone(BackboneSpec(model_config=config, init_seed=3, tokenizer="byte"))
    tok, labels = ByteTokenizer(), ["negative", "ok", "positive"]
    records = [{"prompt": f"Tweet: {'abc ' * i}\nSentiment:"} for i in range(5)]
    scores = label_scores(model, tok, records, labels, max_length=48, batch_size=4)
    with torch.no_grad():
        reference = _per_label_scores(model, tok, records, labels, 48, 32)
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family, changes", [
    ("mistral", {"sliding_window": 6}),
    ("gemma3_text", {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]}),
])
def test_label_scores_continue_a_sliding_window_cache_shorter_than_the_prompt(family, changes):
    """Left-padded prompts longer than the window: the sliding layers' cache keeps only the window (a
    hybrid cache for Gemma 3), and each label continues it as one sequence per label sees it."""
    from fedzero.backbones import BackboneSpec, load_backbone
    from fedzero.evaluate import _per_label_scores

    from test_families import model_config

    model, _ = load_backbone(BackboneSpec(model_config=model_config(family, **changes), init_seed=3, tokenizer="byte"))
    tok, labels = ByteTokenizer(), ["negative", "ok", "positive"]
    records = [{"prompt": f"Tweet: {'abc ' * i}\nSentiment:"} for i in range(7)]
    scores = label_scores(model, tok, records, labels, max_length=64, batch_size=4)
    with torch.no_grad():
        reference = _per_label_scores(model, tok, records, labels, 64, 32)
        wide, _ = load_backbone(BackboneSpec(model_config=model_config(family, **{**changes, "sliding_window": 64}),
                                             init_seed=3, tokenizer="byte"))
    np.testing.assert_allclose(scores, reference, rtol=1e-5, atol=1e-4)
    assert np.abs(scores - label_scores(wide, tok, records, labels, max_length=64)).max() > 1e-2   # the window acts


def test_label_scores_of_an_empty_prompt_without_bos_equal_one_sequence_per_label():
    """Without a bos token an empty prompt leaves nothing to predict the completion's first token from:
    build_examples' sequence does not score it, and no padding position may stand in for it."""
    from fedzero.evaluate import _per_label_scores

    class NoBos(ByteTokenizer):
        bos_token_id = None

    model, tok = tiny_llama(vocab=259, hidden=16, layers=1, heads=2, kv_heads=2), NoBos()
    for records in ([{"prompt": ""}, {"prompt": "abc"}], [{"prompt": ""}]):
        scores = label_scores(model, tok, records, ["yes", "no"], max_length=32)
        with torch.no_grad():
            np.testing.assert_allclose(scores, _per_label_scores(model, tok, records, ["yes", "no"], 32, 32),
                                       rtol=1e-5, atol=1e-5)
