"""The bench's token-level distillation round (fedzero/bench/methods/token_distill.py) on tiny clients:
each client's teacher is the leave-one-out mixture of the others' predictions, the bytes are ids +
probabilities, the quality rule records each client's val loss, and clients of different tokenizers
are refused naming them."""

import numpy as np
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from fedzero.adapters.dema import DeMAConfig, inject_dema
from fedzero.bench.methods.spec import DistillSpec
from fedzero.bench.methods.token_distill import exchange_token_predictions
from fedzero.client import LocalClient, TrainSettings
from fedzero.data import ByteTokenizer, build_examples
from fedzero.distill.tokens import leave_one_out_token_teachers

TEXTS = ["a fortune", "another one here", "be kind"]


def token_distill_settings(record):
    """A bench method's token-level "distill" record as its clients' DistillSettings."""
    return DistillSpec.parse({**record, "level": "token"}, "method 't'").settings([], "")


def _client(cid, seed, samples, settings):
    import torch

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    tok = ByteTokenizer()
    handle = inject_dema(model, DeMAConfig(rank=4, num_experts=2, num_slots=1, seed=0))
    train = build_examples([{"text": f"t{i}"} for i in range(samples)], tok, 32)
    distiller = settings.make_distiller(tok, max_length=32, seed=0, texts=TEXTS)
    return LocalClient(cid, handle, "fp", train, train[:2], TrainSettings(local_steps=1, batch_size=2),
                       pad_id=tok.pad_token_id, seed=0, total_rounds=1, distiller=distiller)


def test_exchange_token_predictions_sets_leave_one_out_teachers_and_counts_bytes():
    settings = token_distill_settings({"weight": 1.0, "anchors": 3, "batch_size": 2, "top_k": 4})
    clients = [_client("a", 1, 2, settings), _client("b", 2, 6, settings), _client("c", 3, 4, settings)]
    records = [{"rounds": [{}], "train_seconds": 0.0} for _ in clients]
    sent = exchange_token_predictions(clients, records)
    preds = {c.client_id: c.distiller.predict(c.handle.model) for c in clients}
    expected = leave_one_out_token_teachers(preds, {"a": 2, "b": 6, "c": 4})
    positions = clients[0].distiller.num_positions
    assert sent["upload"] == [positions * 4 * 8] * 3
    for c, down in zip(clients, sent["download"]):
        np.testing.assert_array_equal(c.distiller.teacher[0].numpy(), expected[c.client_id][0])
        np.testing.assert_allclose(c.distiller.teacher[1].numpy(), expected[c.client_id][1], atol=1e-7)
        assert down == expected[c.client_id][0].size * 8
    quality = token_distill_settings({"weight": 1.0, "anchors": 3, "batch_size": 2, "top_k": 4, "teacher": "quality"})
    exchange_token_predictions(clients, records, quality.teacher_rule)
    assert all(r["rounds"][-1]["val_loss"] > 0 for r in records)


def test_exchange_token_predictions_refuses_clients_of_different_tokenizers():
    settings = token_distill_settings({"weight": 1.0, "anchors": 3, "batch_size": 2})
    clients = [_client("a", 1, 2, settings), _client("b", 2, 2, settings)]
    clients[1].distiller.tokenizer = "another"
    with pytest.raises(ValueError, match=r"clients \['b'\]"):
        exchange_token_predictions(clients, [{"rounds": [{}], "train_seconds": 0.0}] * 2)
