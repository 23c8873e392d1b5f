"""The shared step loop (fedzero.client.steps) and the shared round (fedzero.federation_round):
every client kind runs the one loop, with exactly the numbers of the loops it replaced; `fedzero
simulate` (through the store) and the bench's DeMA transport (in memory) produce the same globals
from the same clients."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedzero.adapters.dema import DeMAConfig, inject_dema
from fedzero.client import LocalClient, TrainSettings
from fedzero.client import steps as steps_module
from fedzero.client.local import token_loss_sums
from fedzero.client.steps import lr_factor
from fedzero.data import ByteTokenizer, build_examples

SETTINGS = TrainSettings(local_steps=3, batch_size=2, lr=0.01, max_length=32, warmup_steps=1)


def _model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))


def _examples():
    return build_examples([{"prompt": f"item {i}:", "completion": " good" if i % 2 else " bad"} for i in range(8)],
                          ByteTokenizer(), 32)


def _dema_client():
    handle = inject_dema(_model(), DeMAConfig(rank=4, num_experts=2, num_slots=2, seed=0))
    return LocalClient("a", handle, "fp", _examples(), _examples()[:2], SETTINGS, pad_id=ByteTokenizer().pad_token_id,
                       seed=3, total_rounds=2)


def _reference_round(model, optimizer, params, batches, first_step, total_steps, penalty=None):
    """The step loop as each client wrote it before fedzero.client.steps (DeMA's with its penalty,
    the LoRA baseline's without)."""
    model.train()
    losses = []
    for step in range(first_step, first_step + SETTINGS.local_steps):
        for group in optimizer.param_groups:
            group["lr"] = SETTINGS.lr * group.get("lr_scale", 1.0) * lr_factor(step, total_steps, SETTINGS)
        loss_sum, count = token_loss_sums(model, next(batches))
        loss = loss_sum / max(count, 1)
        optimizer.zero_grad(set_to_none=True)
        (loss + penalty() + 0.0 if penalty is not None else loss).backward()
        torch.nn.utils.clip_grad_norm_(params, SETTINGS.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_local_client_trains_with_the_shared_loop_exactly_as_its_own_loop_did():
    ours, ref = _dema_client(), _dema_client()
    global_state = ours.handle.shared_state_dict()
    for _ in range(2):
        _, metrics = ours.train_round(global_state)
        ref.handle.load_shared_state_dict(global_state)
        losses = _reference_round(ref.handle.model, ref._optimizer(), ref.handle.trainable_parameters(), ref._batches,
                                  ref.step, ref.total_steps, penalty=ref.handle.regularization)
        ref.step += len(losses)
        assert metrics["train_loss"] == sum(losses) / len(losses)
        for key, value in ours.handle.model.state_dict().items():
            assert torch.equal(value, ref.handle.model.state_dict()[key]), key


def test_lora_client_trains_with_the_shared_loop_exactly_as_its_own_loop_did():
    from fedzero.baselines import LoRAClient, LoRASettings

    def client():
        return LoRAClient("a", _model(), "fp", _examples(), _examples()[:2], SETTINGS, LoRASettings(rank=2),
                          pad_id=ByteTokenizer().pad_token_id, seed=3, total_rounds=2)

    ours, ref = client(), client()
    for _ in range(2):
        state, metrics = ours.train_round(None)
        params = ref.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=SETTINGS.lr, weight_decay=SETTINGS.weight_decay)
        losses = _reference_round(ref.model, optimizer, params, ref._batches, ref.step, ref.total_steps)
        ref.step += len(losses)
        assert metrics["train_loss"] == sum(losses) / len(losses)
        assert all(torch.equal(v, ref.lora_state()[k]) for k, v in state.items())
    assert ours.evaluate() == ref.evaluate()


def test_every_client_kind_steps_through_train_steps(monkeypatch):
    """LocalClient and LoRAClient reach fedzero.client.steps.train_steps (through train_round_steps); the
    DeepSpeed client calls it with its engine step (its numbers against LocalClient's are the slow
    tests of tests/test_deepspeed_client.py)."""
    from fedzero.baselines import LoRAClient, LoRASettings
    from fedzero.client import deepspeed_client

    calls = []
    real = steps_module.train_steps

    def recording(step, *args, **kwargs):
        calls.append(kwargs["count"])
        return real(step, *args, **kwargs)

    monkeypatch.setattr(steps_module, "train_steps", recording)
    dema = _dema_client()
    dema.train_round(dema.handle.shared_state_dict())
    LoRAClient("b", _model(), "fp", _examples(), [], SETTINGS, LoRASettings(rank=2), pad_id=0, seed=0,
               total_rounds=1).train_round(None)
    assert calls == [SETTINGS.local_steps, SETTINGS.local_steps]
    assert deepspeed_client.train_steps is real


def test_train_steps_sets_the_schedule_per_group_and_reports_each_step():
    groups = [{"lr_scale": 0.5}, {}]
    seen, after = [], []
    batches = iter(range(10))
    done = steps_module.train_steps(lambda batch, n: seen.append((batch, n, [g["lr"] for g in groups])) or float(n),
                                    groups, batches.__next__, SETTINGS, first_step=2, count=2, total_steps=6,
                                    losses=[9.0], after_step=lambda j, losses: after.append((j, list(losses))))
    assert [(b, n) for b, n, _ in seen] == [(0, 2), (1, 3)]
    assert seen[0][2] == [SETTINGS.lr * 0.5 * lr_factor(2, 6, SETTINGS), SETTINGS.lr * 1.0 * lr_factor(2, 6, SETTINGS)]
    assert done.losses == [9.0, 2.0, 3.0] and len(done.seconds) == 2
    assert after == [(1, [9.0, 2.0]), (2, [9.0, 2.0, 3.0])]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "cmga", "local"])
def test_simulate_and_the_bench_transport_give_the_same_globals(tmp_path, strategy):
    """The same clients (simulate.build_client of one run config) federated by FederationRound through
    the store (fedzero simulate) and in memory (the bench's MemoryTransport with its strategy exchange)
    end every round with the same shared states, to the bit. The bench's runner itself builds its
    clients otherwise (its split's data, a batch seed per client, the val split as held-out examples),
    so its whole runs are not simulate's; the round they go through is."""
    from test_simulate import tiny_run

    from fedzero.bench.methods.dema import MemoryTransport
    from fedzero.bench.methods.exchange import Aggregation, make_exchange
    from fedzero.config import load_run_config
    from fedzero.federation_round import FederationRound
    from fedzero.simulate import build_client, simulate
    from fedzero.store import FederationStore

    run = load_run_config(tiny_run(tmp_path, strategy))
    simulate(run, tmp_path / "out", progress=False, report_to="none")
    store = FederationStore(tmp_path / "out" / "store", create=False)

    torch.manual_seed(run.seed)
    clients = [build_client(c, run) for c in run.clients]
    exchange = (make_exchange("local", {}, seed=run.seed) if strategy == "local"
                else Aggregation(run.federation.make_strategy(seed=run.seed)))
    exchange.begin(clients)
    records = [{"rounds": [], "train_steps": 0, "train_seconds": 0.0} for _ in clients]
    federation = FederationRound(clients, MemoryTransport(exchange, clients, records, run.clients[0].train.local_steps,
                                                          distill=None))
    for rnd in range(run.federation.rounds):
        outcome = federation.run(rnd)
        for client, delta in zip(clients, outcome.sent):      # every client trained alike on both paths
            stored, _ = store.read_update(rnd, client.client_id)
            assert set(stored) == set(delta) and all(torch.equal(stored[k], delta[k]) for k in delta), rnd
        if strategy != "local":                               # and the strategy made the same global of them
            stored, _ = store.read_global(rnd + 1)
            assert set(stored) == set(exchange.global_state)
            assert all(torch.equal(stored[k], exchange.global_state[k]) for k in stored), rnd
