"""LoRA baselines: exact aggregation math on tiny matrices, the strategies' contracts, the PEFT client."""

import pytest
import torch

from conftest import tiny_llama
from fedzero.baselines import (FLoRA, FedIT, FlexLoRA, HetLoRA, LORA_STRATEGIES, Local, LoRAClient, LoRASettings,
                               lora_modules, make_lora_strategy, same_backbone_groups)
from fedzero.baselines import factors as bm
from fedzero.client.local import TrainSettings

T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
W2 = T([0.5, 0.5])


def rand_factors(ranks, out=7, inp=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, inp, generator=g, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(out, r, generator=g, dtype=torch.float64) for r in ranks]
    return As, Bs


def one(r, out=7, inp=5):
    As, Bs = rand_factors([r], out=out, inp=inp)
    return As[0], Bs[0]


def state(A, B, module="m.q_proj", dtype=torch.float32):
    return {f"{module}.lora_A.weight": torch.as_tensor(A, dtype=dtype),
            f"{module}.lora_B.weight": torch.as_tensor(B, dtype=dtype)}


def best_rank(M, r):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


# ---------------------------------------------------------------- math, exact on tiny matrices

def test_fedavg_lora_hand_computed():
    A, B = bm.fedavg_lora([T([[1, 2]]), T([[3, 4]])], [T([[2], [0]]), T([[0], [4]])], T([0.25, 0.75]))

    assert torch.equal(A, T([[2.5, 3.5]])) and torch.equal(B, T([[0.5], [3.0]]))


def test_pad_rank_keeps_the_product_and_refuses_to_shrink():
    A, B = rand_factors([2])

    Ap, Bp = bm.pad_rank(A[0], B[0], 5)

    assert Ap.shape == (5, 5) and Bp.shape == (7, 5)
    assert torch.equal(Ap[2:], torch.zeros(3, 5)) and torch.equal(Bp[:, 2:], torch.zeros(7, 3))
    assert torch.equal(Bp @ Ap, B[0] @ A[0])
    with pytest.raises(ValueError, match="cannot pad"):
        bm.pad_rank(A[0], B[0], 1)


def test_hetlora_hand_computed():
    As = [T([[2, 0]]), T([[0, 2], [4, 0]])]
    Bs = [T([[1], [0]]), T([[0, 2], [2, 0]])]

    (A1, B1), (A2, B2) = bm.hetlora(As, Bs, W2, [1, 2], [1.0, 1.0])

    # padded client 1: A [[2,0],[0,0]], B [[1,0],[0,0]]; the averages, truncated to each rank
    assert torch.equal(A2, T([[1, 1], [2, 0]])) and torch.equal(B2, T([[0.5, 1], [1, 0]]))
    assert torch.equal(A1, T([[1, 1]])) and torch.equal(B1, T([[0.5], [1]]))


def test_hetlora_scalings_hand_computed():
    # s = [4, 1]: client 1 enters as 2·A1, 2·B1 and leaves divided by 2 again.
    As = [T([[2, 0]]), T([[0, 2], [4, 0]])]
    Bs = [T([[1], [0]]), T([[0, 2], [2, 0]])]

    (A1, B1), (A2, B2) = bm.hetlora(As, Bs, W2, [1, 2], [4.0, 1.0])

    assert torch.equal(A2, T([[2, 1], [2, 0]])) and torch.equal(B2, T([[1, 1], [1, 0]]))
    assert torch.equal(A1, T([[1, 0.5]])) and torch.equal(B1, T([[0.5], [0.5]]))


def test_flora_stack_product_is_the_weighted_sum_of_products():
    As, Bs = rand_factors([1, 3, 2])
    w, s = T([0.2, 0.5, 0.3]), [2.0, 1.0, 0.5]

    A, B = bm.flora_stack(As, Bs, w, s)

    assert A.shape == (6, 5) and B.shape == (7, 6)
    expected = sum(wk * sk * Bk @ Ak for wk, sk, Ak, Bk in zip(w, s, As, Bs))
    torch.testing.assert_close(B @ A, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("out,inp", [(40, 30), (4, 30), (40, 3)])   # Σr = 9 above a dimension too
def test_flexlora_equals_dense_best_rank_approximation(out, inp):
    ranks, s = [2, 3, 4], [1.0, 2.0, 0.5]
    As, Bs = rand_factors(ranks, out=out, inp=inp, seed=1)
    w = T([0.5, 0.3, 0.2])
    dense = sum(wk * sk * Bk @ Ak for wk, sk, Ak, Bk in zip(w, s, As, Bs))       # [out, in]

    pairs, S = bm.flexlora(As, Bs, w, ranks, s)

    torch.testing.assert_close(S[: min(out, inp)], torch.linalg.svdvals(dense)[: len(S)], rtol=0, atol=1e-10)
    for (A, B), r, sk in zip(pairs, ranks, s):
        assert A.shape == (r, inp) and B.shape == (out, r)
        torch.testing.assert_close(sk * B @ A, best_rank(dense, r), rtol=0, atol=1e-10)
        # balanced split: both factors carry sqrt(S_r / s_k)
        torch.testing.assert_close(torch.linalg.norm(A, dim=1), torch.linalg.norm(B, dim=0), rtol=0, atol=1e-10)


def test_flexlora_rank_beyond_the_update_is_zero_filled():
    As, Bs = rand_factors([1, 1], out=6, inp=6)

    pairs, S = bm.flexlora(As, Bs, W2, [4, 4], [1.0, 1.0])

    A, B = pairs[0]
    assert A.shape == (4, 6) and torch.equal(A[2:], torch.zeros(2, 6)) and torch.equal(B[:, 2:], torch.zeros(6, 2))
    torch.testing.assert_close(B @ A, 0.5 * (Bs[0] @ As[0] + Bs[1] @ As[1]), rtol=0, atol=1e-12)
    assert bm.energy_kept(S, 1) < 1.0 and bm.energy_kept(S, 2) == pytest.approx(1.0)


def test_energy_kept_hand_computed():
    assert bm.energy_kept(T([3, 4]), 1) == pytest.approx(9 / 25)
    assert bm.energy_kept(T([0, 0]), 1) == 1.0


# ---------------------------------------------------------------- strategies on PEFT-named states

def test_fedit_averages_states_and_keeps_keys_and_dtypes():
    s1, s2 = state([[1, 2]], [[2], [0]]), state([[3, 4]], [[0], [4]])

    agg = FedIT().aggregate([s1, s2], [1, 3], [1, 1], 0, fingerprints=["fp", "fp"])

    assert not agg.reinit and agg.merge is None and len(agg.states) == 2
    for new in agg.states:
        assert list(new) == list(s1) and all(v.dtype == torch.float32 for v in new.values())
        assert torch.equal(new["m.q_proj.lora_A.weight"], torch.tensor([[2.5, 3.5]]))
        assert torch.equal(new["m.q_proj.lora_B.weight"], torch.tensor([[0.5], [3.0]]))
    assert agg.metrics["upload_params"] == [4, 4] and agg.metrics["download_params"] == [4, 4]
    assert agg.states[0]["m.q_proj.lora_A.weight"].data_ptr() != agg.states[1]["m.q_proj.lora_A.weight"].data_ptr()


def test_fedit_refuses_mixed_backbones_and_mixed_ranks():
    s1, s2 = state([[1, 2]], [[2], [0]]), state([[3, 4]], [[0], [4]])
    with pytest.raises(ValueError, match=r"one backbone only.*\['fpA', 'fpB'\].*same_backbone_groups"):
        FedIT().aggregate([s1, s2], [1, 1], [1, 1], 0, fingerprints=["fpA", "fpB"])
    with pytest.raises(ValueError, match="fedit averages LoRA factors of one shape"):
        FedIT().aggregate([s1, state(*one(2, out=2, inp=2))], [1, 1], [1, 2], 0, fingerprints=["f", "f"])
    with pytest.raises(ValueError, match="scalings"):
        FedIT().aggregate([s1, s2], [1, 1], [1, 1], 0, fingerprints=["f", "f"], scalings=[1.0, 2.0])


def test_every_federated_method_refuses_mixed_backbones():
    s1, s2 = state([[1, 2]], [[2], [0]]), state([[3, 4]], [[0], [4]])
    for cls in (HetLoRA, FLoRA, FlexLoRA):
        with pytest.raises(ValueError, match="one backbone only"):
            cls().aggregate([s1, s2], [1, 1], [1, 1], 0, fingerprints=["a", "b"])


def test_same_backbone_groups():
    assert same_backbone_groups(["a", "b", "a"]) == {"a": [0, 2], "b": [1]}


def test_hetlora_strategy_gives_each_client_its_rank():
    As, Bs = rand_factors([2, 4])
    states = [state(A, B, dtype=torch.float64) | state(A, B, module="m.v_proj", dtype=torch.float64)
              for A, B in zip(As, Bs)]

    agg = HetLoRA().aggregate(states, [1, 1], [2, 4], 0, fingerprints=["f", "f"])

    (A1, B1), (A2, B2) = bm.hetlora(As, Bs, W2, [2, 4], [1.0, 1.0])
    for new, (A, B) in zip(agg.states, [(A1, B1), (A2, B2)]):
        assert torch.equal(new["m.v_proj.lora_A.weight"], A) and torch.equal(new["m.q_proj.lora_B.weight"], B)
    assert agg.metrics["download_params"] == [2 * 2 * 12, 2 * 4 * 12]


def test_flora_strategy_asks_for_merge_and_reinit():
    As, Bs = rand_factors([1, 3])
    states = [state(A, B, dtype=torch.float64) for A, B in zip(As, Bs)]

    agg = FLoRA().aggregate(states, [3, 1], [1, 3], 0, fingerprints=["f", "f"], scalings=[2.0, 0.5])

    assert agg.reinit and agg.states is None and list(agg.merge) == ["m.q_proj"]
    A, B = agg.merge["m.q_proj"]
    expected = 0.75 * 2.0 * Bs[0] @ As[0] + 0.25 * 0.5 * Bs[1] @ As[1]
    torch.testing.assert_close(B @ A, expected, rtol=0, atol=1e-14)
    assert agg.metrics["download_params"] == [4 * 12, 4 * 12]


def test_flexlora_strategy_reports_energy_kept():
    As, Bs = rand_factors([2, 4])
    states = [state(A, B, dtype=torch.float64) for A, B in zip(As, Bs)]

    agg = FlexLoRA().aggregate(states, [1, 1], [2, 4], 0, fingerprints=["f", "f"], scalings=[2.0, 2.0])

    assert [s["m.q_proj.lora_A.weight"].shape[0] for s in agg.states] == [2, 4]
    assert 0 < agg.metrics["energy_kept"][0] < agg.metrics["energy_kept"][1] <= 1
    dense = 0.5 * 2.0 * (Bs[0] @ As[0] + Bs[1] @ As[1])
    new = agg.states[0]
    torch.testing.assert_close(2.0 * new["m.q_proj.lora_B.weight"] @ new["m.q_proj.lora_A.weight"],
                               best_rank(dense, 2), rtol=0, atol=1e-10)


def test_local_keeps_everything_and_sends_nothing():
    s1, s2 = state([[1, 2]], [[2], [0]]), state(*one(3))

    agg = Local().aggregate([s1, s2], [1, 1], [1, 3], 0, fingerprints=["a", "b"])

    assert all(torch.equal(agg.states[0][k], s1[k]) for k in s1) and agg.states[0] is not s1
    assert agg.metrics["upload_params"] == [0, 0]


@pytest.mark.parametrize("bad,match", [
    ({"m.lora_A.default.weight": torch.zeros(1, 2), "m.lora_B.default.weight": torch.zeros(2, 1)}, "not a PEFT LoRA factor"),
    ({"m.lora_A.weight": torch.zeros(1, 2)}, "only lora_A"),
    ({"m.lora_A.weight": torch.zeros(1, 2), "m.lora_B.weight": torch.zeros(2, 3)}, "are not"),
])
def test_lora_modules_refuses_malformed_states(bad, match):
    with pytest.raises(ValueError, match=match):
        lora_modules(bad)


def test_aggregate_validates_weights_ranks_and_modules():
    s1, s2 = state([[1, 2]], [[2], [0]]), state([[3, 4]], [[0], [4]])
    with pytest.raises(ValueError, match="not all 0"):
        HetLoRA().aggregate([s1, s2], [0, 0], [1, 1], 0, fingerprints=["f", "f"])
    with pytest.raises(ValueError, match=r"A has rank 1, ranks\[1\] = 2"):
        HetLoRA().aggregate([s1, s2], [1, 1], [1, 2], 0, fingerprints=["f", "f"])
    with pytest.raises(ValueError, match="modules differ"):
        HetLoRA().aggregate([s1, state([[3, 4]], [[0], [4]], module="m.k_proj")], [1, 1], [1, 1], 0, fingerprints=["f", "f"])
    with pytest.raises(ValueError, match="got 1 weights for 2"):
        HetLoRA().aggregate([s1, s2], [1], [1, 1], 0, fingerprints=["f", "f"])


def test_make_lora_strategy():
    assert sorted(LORA_STRATEGIES) == ["fedit", "flexlora", "flora", "hetlora", "local"]
    assert isinstance(make_lora_strategy("FlexLoRA"), FlexLoRA)
    with pytest.raises(ValueError, match="unknown LoRA baseline"):
        make_lora_strategy("fedprox")
    with pytest.raises(TypeError, match="unknown option"):
        make_lora_strategy("fedit", mu=0.1)


# ---------------------------------------------------------------- the PEFT client on a tiny LLaMA

def examples(n=8, length=12):
    # One sequence to memorise: learnable by attention-only LoRA on a random tiny model within a round.
    ids = torch.arange(length) * 5 % 64
    return [{"input_ids": ids, "labels": ids.clone()} for _ in range(n)]


def make_client(rank=4, steps=5, seed=0, lr=1e-2):
    settings = TrainSettings(local_steps=steps, batch_size=4, lr=lr, schedule="constant", eval_batch_size=8)
    return LoRAClient("c0", tiny_llama(seed=seed), "fp", examples(), examples(), settings,
                      LoRASettings(rank=rank), pad_id=0, seed=seed, total_rounds=3)


def test_client_state_round_trip_is_strict():
    client = make_client(rank=4)
    state = client.lora_state()
    assert len(state) == 3 * 4 * 2 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    new = {k: torch.randn_like(v) for k, v in state.items()}

    client.load_lora_state(new)

    assert all(torch.equal(client.lora_state()[k], new[k]) for k in new)
    with pytest.raises(KeyError, match="missing"):
        client.load_lora_state(dict(list(new.items())[1:]))
    key = next(iter(new))
    with pytest.raises(ValueError, match="shape"):
        client.load_lora_state(new | {key: torch.zeros(5, 32)})


def test_client_round_trains_lora_only_and_reduces_loss():
    client = make_client(rank=4, steps=15)
    base = {k: v.clone() for k, v in client.model.named_parameters() if not v.requires_grad}
    before = client.evaluate()

    state, metrics = client.train_round()

    assert client.evaluate() < before - 0.2 and metrics["train_loss"] > 0
    assert all(torch.equal(p, base[k]) for k, p in client.model.named_parameters() if not p.requires_grad)
    assert all(torch.equal(state[k], v) for k, v in client.lora_state().items())


def test_merge_then_fresh_lora_equals_base_plus_delta():
    client = make_client(rank=4)
    client.load_lora_state({k: torch.randn_like(v) for k, v in client.lora_state().items()})   # B ≠ 0
    g = torch.Generator().manual_seed(3)
    merge = {m: (torch.randn(6, A.shape[1], generator=g), torch.randn(B.shape[0], 6, generator=g))
             for m, (A, B) in lora_modules(client.lora_state()).items()}
    reference = tiny_llama(seed=0)
    with torch.no_grad():
        for m, (A, B) in merge.items():
            reference.get_submodule(m.removeprefix("base_model.model.")).weight += B @ A
    ids = torch.randint(0, 64, (2, 10), generator=g)

    client.merge_and_reinit(merge)

    fresh = lora_modules(client.lora_state())
    assert all(torch.equal(B, torch.zeros_like(B)) and A.abs().sum() > 0 for A, B in fresh.values())
    with torch.no_grad():
        torch.testing.assert_close(client.model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_two_clients_federate_one_round_with_each_method():
    for name in ("fedit", "hetlora", "flora", "flexlora"):
        ranks = [4, 4] if name == "fedit" else [2, 4]
        clients = [make_client(rank=r, steps=2, seed=0) for r in ranks]   # same backbone seed: one fingerprint
        states = [c.train_round()[0] for c in clients]

        agg = make_lora_strategy(name).aggregate(states, [c.num_samples for c in clients], ranks, 0,
                                                 fingerprints=[c.fingerprint for c in clients],
                                                 scalings=[c.scaling for c in clients])
        for k, c in enumerate(clients):
            c.apply(agg, k)
            new = c.lora_state()
            assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in states[k].items()}
            if name == "flora":     # merged and restarted: fresh B = 0
                assert all(B.abs().sum() == 0 for _, B in lora_modules(new).values())
