"""Aggregation strategies: exact values on tiny hand-made arrays (arrange / act / assert)."""

import numpy as np
import pytest
import torch

from fedzero.strategies import CMGA, ClientUpdate, FedAvg, ServerOptimizer, make_strategy
from fedzero.strategies import coefficients as sm


def gram(X):
    X = np.asarray(X, dtype=np.float64)
    return X @ X.T


def upd(cid, group, n=1, slot_use=None, **delta):
    return ClientUpdate(cid, {k: torch.tensor(v, dtype=torch.float32) for k, v in delta.items()}, n, group, slot_use)


def by_slot(key):
    return key.split(".")[0]


# ---------------------------------------------------------------- math: FedAvg / CMGA coefficients

def test_fedavg_two_clients_hand_computed():
    state = {"w": torch.zeros(2)}
    updates = [upd("a", "fa", n=1, w=[4.0, 0.0]), upd("b", "fb", n=3, w=[0.0, 4.0])]

    new, metrics = FedAvg().aggregate(state, updates, round=0, block_of=lambda k: "all")

    assert metrics["blocks"]["all"]["beta"] == [0.25, 0.75]
    assert torch.equal(new["w"], torch.tensor([1.0, 3.0]))
    assert metrics["clients"] == ["a", "b"]
    assert metrics["blocks"]["all"]["n_conflicts"] == 0 and metrics["blocks"]["all"]["mean_cos_before"] == 0.0


def test_group_matrix_drops_zero_weight_groups():
    P, names, W = sm.group_matrix(np.array([1.0, 3.0, 0.0, 2.0]), ["x", "x", "z", "y"])

    assert names == ["x", "y"]
    np.testing.assert_array_equal(W, [4.0, 2.0])
    np.testing.assert_array_equal(P, [[0.25, 0.75, 0, 0], [0, 0, 0, 1.0]])


def test_cmga_one_group_equals_fedavg_exactly():
    X = np.random.default_rng(0).normal(size=(4, 6))      # conflicting clients, but one group
    w = np.array([1.0, 2.0, 3.0, 5.0])

    beta, stats = sm.cmga_coefficients(gram(X), w, ["g"] * 4, seed=0)

    np.testing.assert_array_equal(beta, w / w.sum())
    assert stats["n_pairs"] == 0 and stats["mean_cos_before"] is None


def test_cmga_without_conflicts_equals_fedavg_exactly():
    X = np.abs(np.random.default_rng(1).normal(size=(5, 4)))   # non-negative -> all Q_ac >= 0
    w = np.array([3.0, 1.0, 7.0, 2.0, 2.0])
    groups = ["a", "b", "a", "c", "b"]

    beta, stats = sm.cmga_coefficients(gram(X), w, groups, seed=3)
    fedavg, _ = sm.fedavg_coefficients(gram(X), w, groups)

    np.testing.assert_array_equal(beta, fedavg)
    assert stats["n_conflicts"] == 0 and stats["mean_cos_after"] == stats["mean_cos_before"]


def test_cmga_two_conflicting_groups_hand_computed():
    # g_a = [1, 0], g_b = [-1, 1]; <g_a, g_b> = -1.
    # g'_a = g_a + (1/2) g_b = [0.5, 0.5]; g'_b = g_b + g_a = [0, 1]; Δ = ([0.5, 0.5] + [0, 1]) / 2.
    X = np.array([[1.0, 0.0], [-1.0, 1.0]])

    beta, stats = sm.cmga_coefficients(gram(X), np.ones(2), ["a", "b"], seed=0)
    result = beta @ X

    np.testing.assert_allclose(beta, [1.0, 0.75], rtol=0, atol=1e-15)
    np.testing.assert_allclose(result, [0.25, 0.75], rtol=0, atol=1e-15)
    assert result @ X[0] >= 0 and result @ X[1] >= 0
    assert stats["n_pairs"] == 1 and stats["n_conflicts"] == 1
    assert stats["mean_cos_before"] == pytest.approx(-2 ** -0.5)
    assert stats["mean_cos_after"] == pytest.approx(2 ** -0.5)


def test_cmga_group_means_are_weighted_within_groups():
    # Group a = clients 0, 1 with weights 1, 3: g_a = ([4, 0] + 3 * [0, 0]) / 4 = [1, 0]; as above.
    X = np.array([[4.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    w = np.array([1.0, 3.0, 4.0])

    result = sm.cmga_explicit(X, w, ["a", "a", "b"], seed=0)

    np.testing.assert_allclose(result, [0.25, 0.75], rtol=0, atol=1e-15)


@pytest.mark.parametrize("harmonize", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_gram_coefficients_match_explicit_vectors(seed, harmonize):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(3, 8))
    X = rng.normal(size=(K, 5)) * rng.uniform(0.1, 10, size=(K, 1))   # uneven norms: clamps engage
    w = rng.integers(0, 5, size=K).astype(float)
    w[0] = max(w[0], 1.0)
    groups = [["a", "b", "c"][k % 3] for k in rng.permutation(K)]

    beta, _ = sm.cmga_coefficients(gram(X), w, groups, seed=seed, harmonize_norms=harmonize, c_max=1.5)
    explicit = sm.cmga_explicit(X, w, groups, seed=seed, harmonize_norms=harmonize, c_max=1.5)

    np.testing.assert_allclose(beta @ X, explicit, rtol=0, atol=1e-10)


def test_visit_order_is_seeded():
    # a conflicts with both b and c; a's result depends on which it is projected against first
    # (b then c: [0.48, -0.24]; c then b: [0.48, 0.24]).
    X = np.array([[1.0, 0.0], [-1.0, 2.0], [-1.0, -2.0]])
    args = (gram(X), np.ones(3), ["a", "b", "c"])

    same = [sm.cmga_coefficients(*args, seed=sm.block_seed(7, 2, "slot0"))[0] for _ in range(2)]
    results = {tuple(np.round(sm.cmga_coefficients(*args, seed=s)[0] @ X, 12)) for s in range(20)}

    np.testing.assert_array_equal(same[0], same[1])
    assert len(results) > 1


def test_block_seed_is_deterministic_and_block_specific():
    draw = lambda *a: sm.block_seed(*a).integers(0, 2**31, size=4).tolist()  # noqa: E731

    assert draw(0, 1, "slot0") == draw(0, 1, "slot0")
    assert draw(0, 1, "slot0") != draw(0, 1, "slot1")
    assert draw(0, 1, "slot0") != draw(0, 2, "slot0")


def test_harmonisation_factors_clamped():
    # Orthogonal groups (no projection), norms 1, 1, 10, equal weights: mean norm 4, so the raw
    # factors 4, 4, 0.4 clamp to 2, 2, 0.5; Δ = (2 g_a + 2 g_b + 0.5 g_c) / 3.
    X = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 10.0]])

    beta, stats = sm.cmga_coefficients(gram(X), np.ones(3), ["a", "b", "c"], seed=0,
                                       harmonize_norms=True, c_max=2.0)

    assert stats["harmonize_factors"] == [2.0, 2.0, 0.5]
    np.testing.assert_allclose(beta @ X, [2 / 3, 2 / 3, 5 / 3], rtol=1e-15)


def test_harmonisation_unclamped_and_zero_norm_group():
    # Norms 1, 4, 4, 0: mean norm 9/4; factors 2 (clamped from 2.25), 0.5625, 0.5625; zero group keeps 1.
    X = np.array([[1.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0], [0, 0, 0]])

    _, stats = sm.cmga_coefficients(gram(X), np.ones(4), ["a", "b", "c", "d"], seed=0,
                                    harmonize_norms=True, c_max=2.0)

    assert stats["harmonize_factors"] == [2.0, 0.5625, 0.5625, 1.0]


def test_invalid_weights_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        sm.cmga_coefficients(np.eye(2), np.array([1.0, -1.0]), ["a", "b"], seed=0)


# ---------------------------------------------------------------- Strategy.aggregate

def test_aggregate_blocks_are_separate():
    # slot0 conflicts ([1, 0] vs [-1, 1]); slot1 does not ([1, 0] vs [0, 1]).
    state = {"slot0.w": torch.zeros(2), "slot1.w": torch.zeros(2)}
    updates = [upd("a", "fa", **{"slot0.w": [1.0, 0.0], "slot1.w": [1.0, 0.0]}),
               upd("b", "fb", **{"slot0.w": [-1.0, 1.0], "slot1.w": [0.0, 1.0]})]

    cmga, metrics = CMGA().aggregate(state, updates, round=0, block_of=by_slot)
    fedavg, _ = FedAvg().aggregate(state, updates, round=0, block_of=by_slot)

    assert torch.equal(cmga["slot0.w"], torch.tensor([0.25, 0.75]))
    assert torch.equal(cmga["slot1.w"], fedavg["slot1.w"])
    assert metrics["blocks"]["slot0"]["n_conflicts"] == 1 and metrics["blocks"]["slot1"]["n_conflicts"] == 0


def test_block_weights_follow_slot_use():
    updates = [upd("a", "fa", n=10, slot_use={"slot0": 1}), upd("b", "fb", n=5, slot_use={"slot0": 1, "slot1": 3}),
               upd("c", "fc", n=2)]

    W = FedAvg().block_weights(updates, ["slot0", "slot1"])

    np.testing.assert_array_equal(W, [[10, 0], [5, 15], [2, 2]])


def test_aggregate_client_without_slot_contributes_nothing_there():
    state = {"slot0.w": torch.zeros(2), "slot1.w": torch.zeros(2), "slot2.w": torch.ones(2)}
    updates = [upd("a", "fa", n=10, slot_use={"slot0": 1, "slot1": 0},
                   **{"slot0.w": [2.0, 0.0], "slot1.w": [9.0, 9.0], "slot2.w": [5.0, 5.0]}),
               upd("b", "fb", n=10, slot_use={"slot0": 1, "slot1": 3},
                   **{"slot0.w": [0.0, 2.0], "slot1.w": [1.0, 2.0], "slot2.w": [5.0, 5.0]})]

    new, metrics = CMGA().aggregate(state, updates, round=0, block_of=by_slot)

    assert torch.equal(new["slot0.w"], torch.tensor([1.0, 1.0]))
    assert torch.equal(new["slot1.w"], torch.tensor([1.0, 2.0]))     # b's update alone
    assert torch.equal(new["slot2.w"], torch.ones(2))                # nobody uses slot2: unchanged
    assert metrics["blocks"]["slot2"]["skipped"] is True


def test_aggregate_preserves_dtype():
    state = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "b": torch.zeros(1, dtype=torch.float64)}
    updates = [upd("a", "fa", w=[0.5, 0.0], b=[1.0]), upd("b", "fb", w=[0.0, -0.5], b=[2.0])]

    new, _ = CMGA().aggregate(state, updates, round=0, block_of=lambda k: "all")

    assert new["w"].dtype == torch.bfloat16 and new["b"].dtype == torch.float64
    assert torch.equal(new["w"], torch.tensor([1.25, 1.75], dtype=torch.bfloat16))
    assert new["b"].item() == 1.5


@pytest.mark.parametrize("delta, match", [
    ({"w": [1.0, 0.0], "extra": [1.0]}, r"client 'b'.*unexpected \['extra'\]"),
    ({}, r"client 'b'.*missing \['w'\]"),
    ({"w": [1.0, 0.0, 0.0]}, r"client 'b', key 'w'.*shape"),
])
def test_aggregate_rejects_mismatched_updates(delta, match):
    state = {"w": torch.zeros(2)}
    updates = [upd("a", "fa", w=[1.0, 0.0]), upd("b", "fb", **delta)]

    with pytest.raises(ValueError, match=match):
        FedAvg().aggregate(state, updates, round=0, block_of=lambda k: "all")


def test_aggregate_rejects_empty_and_negative():
    state = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="no client updates"):
        FedAvg().aggregate(state, [], round=0, block_of=lambda k: "all")
    with pytest.raises(ValueError, match="client 'a'.*>= 0"):
        FedAvg().aggregate(state, [upd("a", "fa", n=-1, w=[1.0, 0.0])], round=0, block_of=lambda k: "all")


def test_cmga_client_groups_split_one_backbone():
    # Same fingerprint, opposing updates: one group (plain mean) vs each client its own group.
    state = {"w": torch.zeros(2)}
    updates = [upd("a", "same", w=[1.0, 0.0]), upd("b", "same", w=[-1.0, 1.0])]

    by_fp, _ = CMGA().aggregate(state, updates, round=0, block_of=lambda k: "all")
    by_client, m = CMGA(groups="client").aggregate(state, updates, round=0, block_of=lambda k: "all")
    beta, _ = CMGA(groups="client").coefficients(gram([[1.0, 0.0], [-1.0, 1.0]]), np.ones(2), ["same", "same"],
                                                 block="all", round=0)

    assert torch.equal(by_fp["w"], torch.tensor([0.0, 0.5]))
    assert torch.equal(by_client["w"], torch.tensor([0.25, 0.75]))
    assert m["blocks"]["all"]["groups"] == ["a", "b"]
    np.testing.assert_allclose(beta, [1.0, 0.75], rtol=0, atol=1e-15)


# ---------------------------------------------------------------- Strategy.block_coefficients (shared by both paths)

def _coefficients_one_block_at_a_time(strategy, grams, updates, blocks, covered, round):
    """The per-block step as Strategy.aggregate and the sharded aggregator each wrote it inline:
    weights × covered, the strategy's coefficients, a block of total weight 0 skipped."""
    weights = strategy.block_weights(updates, blocks) * covered
    groups = strategy.group_labels(updates)
    betas, skipped, stats = [], [], []
    for b, block in enumerate(blocks):
        beta, st = strategy.coefficients(grams[b], weights[:, b], groups, block=block, round=round)
        st = {"beta": [float(x) for x in beta], **st}
        if weights[:, b].sum() == 0:
            st["skipped"] = True
        betas.append(np.asarray(beta, dtype=np.float64))
        skipped.append(weights[:, b].sum() == 0)
        stats.append(st)
    return np.stack(betas), np.array(skipped), stats


@pytest.mark.parametrize("strategy", [FedAvg(), CMGA(seed=3), CMGA(seed=3, harmonize_norms=True, c_max=1.5),
                                      CMGA(seed=1, groups="client")], ids=["fedavg", "cmga", "cmga-harm", "cmga-client"])
def test_block_coefficients_equal_the_per_block_step_exactly(strategy):
    # three blocks: a conflict (slot0), a client lacking a block (c has no slot1), nobody using slot2
    X = {"slot0": [[1.0, 0.0, 0.5], [-1.0, 1.0, 0.0], [0.2, -0.3, 2.0]],
         "slot1": [[0.5, 0.5], [1.0, -2.0], [0.0, 0.0]],
         "slot2": [[1.0], [2.0], [3.0]]}
    blocks = list(X)
    grams = np.stack([gram(X[b]) for b in blocks])
    covered = np.array([[True, True, True], [True, True, True], [True, False, True]])
    updates = [upd("a", "fa", n=10, slot_use={"slot0": 2, "slot1": 1}), upd("b", "fb", n=30, slot_use={"slot0": 1, "slot1": 1}),
               upd("c", "fb", n=20, slot_use={"slot0": 1, "slot1": 1})]

    got = strategy.block_coefficients(grams, updates, blocks, covered, round=4)
    beta, skipped, stats = _coefficients_one_block_at_a_time(strategy, grams, updates, blocks, covered, 4)

    assert np.array_equal(got.beta, beta) and got.beta.dtype == np.float64 and got.beta.shape == (3, 3)
    assert got.skipped.tolist() == skipped.tolist() == [False, False, True]
    assert got.stats == stats
    assert got.beta[1, 2] == 0.0                              # c lacks slot1: weight 0 there


def test_aggregate_takes_the_blocks_as_a_mapping():
    state = {"a.w": torch.zeros(2), "b.w": torch.zeros(2)}
    updates = [upd("a", "fa", **{"a.w": [1.0, 0.0], "b.w": [1.0, 0.0]}), upd("b", "fb", **{"a.w": [-1.0, 1.0], "b.w": [0.0, 1.0]})]

    by_map = CMGA().aggregate(state, updates, round=0, block_of={"a.w": "x", "b.w": "y"})
    by_fn = CMGA().aggregate(state, updates, round=0, block_of=lambda k: {"a": "x", "b": "y"}[k[0]])

    assert all(torch.equal(by_map[0][k], by_fn[0][k]) for k in state) and by_map[1] == by_fn[1]
    with pytest.raises(ValueError, match="tensor 'b.w' of the global state is in no aggregation block"):
        CMGA().aggregate(state, updates, round=0, block_of={"a.w": "x"})


# ---------------------------------------------------------------- ServerOptimizer

def test_server_optimizer_lr():
    opt = ServerOptimizer(lr=0.5)

    new = opt.step({"w": torch.tensor([1.0, 2.0]), "v": torch.ones(1)}, {"w": torch.tensor([2.0, 2.0])})

    assert torch.equal(new["w"], torch.tensor([2.0, 3.0]))
    assert torch.equal(new["v"], torch.ones(1))               # absent from delta: unchanged
    assert opt.state_dict() == {}


def test_server_optimizer_momentum():
    opt = ServerOptimizer(lr=1.0, momentum=0.5)
    state = {"w": torch.zeros(1)}

    for _ in range(3):                                        # m: 1, 1.5, 1.75 -> θ: 1, 2.5, 4.25
        state = opt.step(state, {"w": torch.ones(1)})

    assert state["w"].item() == 4.25
    assert opt.state_dict()["w"].item() == 1.75


def test_server_optimizer_state_dict_round_trip():
    first = ServerOptimizer(lr=0.5, momentum=0.9)
    state = first.step({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, -2.0])})
    restarted = ServerOptimizer(lr=0.5, momentum=0.9)
    sd = first.state_dict()
    restarted.load_state_dict(sd)
    sd["w"].zero_()                                           # the loaded copy must not alias

    a = first.step(state, {"w": torch.tensor([0.3, 0.1])})
    b = restarted.step(state, {"w": torch.tensor([0.3, 0.1])})

    assert torch.equal(a["w"], b["w"])
    assert torch.equal(first.state_dict()["w"], restarted.state_dict()["w"])


def test_server_optimizer_apply_is_step_from_given_buffers():
    opt = ServerOptimizer(lr=0.5, momentum=0.9)
    state = {"w": torch.tensor([1.0, 2.0]), "v": torch.ones(1, dtype=torch.bfloat16), "u": torch.zeros(1)}
    buffers = {"w": torch.tensor([0.2, -0.4]), "u": torch.tensor([3.0])}
    stepper = ServerOptimizer(lr=0.5, momentum=0.9)
    stepper.load_state_dict(buffers)

    new, new_buf = opt.apply(state, {"w": torch.tensor([1.0, 1.0]), "v": torch.ones(1)}, buffers)
    expected = stepper.step(state, {"w": torch.tensor([1.0, 1.0]), "v": torch.ones(1)})

    assert all(torch.equal(new[k], expected[k]) and new[k].dtype == state[k].dtype for k in state)
    assert sorted(new_buf) == sorted(stepper.state_dict()) == ["u", "v", "w"]
    assert all(torch.equal(new_buf[k], stepper.state_dict()[k]) for k in new_buf)
    assert new_buf["v"].dtype == torch.float32                 # a bf16 parameter's buffer: float32
    assert torch.equal(buffers["w"], torch.tensor([0.2, -0.4])) and opt.state_dict() == {}   # nothing kept


# ---------------------------------------------------------------- registry

def test_make_strategy():
    s = make_strategy("cmga", harmonize_norms=True, c_max=3.0, seed=4, server_lr=0.5)

    assert isinstance(s, CMGA) and s.harmonize_norms and s.c_max == 3.0 and s.seed == 4
    assert s.server_opt.lr == 0.5
    assert isinstance(make_strategy("fedavg"), FedAvg)
    with pytest.raises(ValueError, match=r"unknown strategy 'fedprox'.*\['cmga', 'fedavg', 'local'\]"):
        make_strategy("fedprox")
    with pytest.raises(TypeError, match="harmonize_norms"):
        make_strategy("fedavg", harmonize_norms=True)
    with pytest.raises(ValueError, match="groups"):
        make_strategy("cmga", groups="layer")
