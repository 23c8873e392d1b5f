"""Shape-matched sharing, anchor projectors and diagnostics (what makes federation able to pay)."""

import math

import pytest
import torch

from fedzero.adapters.dema import DeMAConfig, global_blocks, inject_dema, shared_block
from fedzero.adapters.dema.layer import AnchorInProjector
from fedzero.data import ByteTokenizer
from fedzero.diagnostics import gate_entropy, update_diagnostics
from fedzero.strategies import ClientUpdate, make_strategy

from conftest import tiny_llama

TOK = ByteTokenizer()
SMALL = dict(rank=4, num_experts=2, num_slots=2, num_anchors=12)


def byte_llama(**kw):
    return tiny_llama(vocab=259, **kw)


# -- anchor projector -------------------------------------------------------------------------
def test_anchor_codes_are_cosines_and_invariant_to_rescaling():
    torch.manual_seed(0)
    pooled, x = torch.randn(10, 6), torch.randn(3, 6)
    proj = AnchorInProjector(6, 4)
    proj.set_anchors(pooled)
    mu = pooled.mean(0)
    expected = torch.stack([torch.nn.functional.cosine_similarity(x - mu, (pooled[j] - mu).expand_as(x), dim=-1)
                            for j in range(4)], dim=-1)
    assert torch.allclose(proj(x), expected, atol=1e-6)
    scaled = AnchorInProjector(6, 4)
    scaled.set_anchors(pooled * 7.5)
    assert torch.allclose(scaled(x * 7.5), proj(x), atol=1e-6)


def test_same_backbone_and_anchors_give_same_codes_and_shared_shapes_match_across_widths():
    cfg = DeMAConfig(projector="anchor", **SMALL)
    a = inject_dema(byte_llama(seed=3), cfg, tokenizer=TOK)
    b = inject_dema(byte_llama(seed=3), cfg, tokenizer=TOK)
    for pa, pb in zip(a.private.layers, b.private.layers):
        assert torch.equal(pa.in_proj.weight, pb.in_proj.weight) and torch.equal(pa.in_proj.mu, pb.in_proj.mu)
    wide = inject_dema(byte_llama(hidden=48, heads=6, kv_heads=3, layers=4), cfg, tokenizer=TOK)
    assert {k: v.shape for k, v in a.shared_state_dict().items()} == {k: v.shape for k, v in wide.shared_state_dict().items()}
    # frozen anchor projector: no in-projector parameters, anchor buffers never in the private state
    assert all(".in_proj." not in k for k in a.private_state_dict())


@pytest.mark.parametrize("placement", ["parallel", "side"])
@pytest.mark.parametrize("projector, anchor_out", [("anchor", False), ("anchor", True), ("anchor+learned", True)])
def test_anchor_variants_leave_logits_unchanged_at_injection(placement, projector, anchor_out):
    model = byte_llama()
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        handle = inject_dema(model, DeMAConfig(projector=projector, anchor_out=anchor_out, placement=placement, **SMALL),
                             tokenizer=TOK)
        assert torch.equal(model(ids).logits, before)
    if anchor_out:
        assert all(k.endswith("gain") for k in handle.private_state_dict() if "out_proj" in k)


def test_anchor_plus_learned_trains_slower_and_is_pulled_back():
    handle = inject_dema(byte_llama(), DeMAConfig(projector="anchor+learned", anchor_lr_scale=0.1, anchor_penalty=2.0, **SMALL),
                         tokenizer=TOK)
    groups = handle.param_groups(1e-2)
    assert [g["lr"] for g in groups] == [1e-2, pytest.approx(1e-3)]
    assert sum(len(g["params"]) for g in groups) == len(handle.trainable_parameters())
    assert float(handle.regularization()) == 0.0  # plain float when untouched
    proj = handle.private.layers[0].in_proj
    with torch.no_grad():
        proj.weight.add_(0.1 * proj.weight0)   # moves the anchors' own codes: W0 a_hat -> 1.1 W0 a_hat
    expected = 2.0 * float(((0.1 * proj.weight0) @ proj.weight0.T).pow(2).sum()) / len(handle.private.layers)
    assert float(handle.regularization()) == pytest.approx(expected)


def test_anchor_projector_needs_tokenizer_and_enough_anchors():
    with pytest.raises(ValueError, match="tokenizer"):
        inject_dema(byte_llama(), DeMAConfig(projector="anchor", **SMALL))
    with pytest.raises(ValueError, match="num_anchors"):
        DeMAConfig(projector="anchor", rank=8, num_anchors=4)
    with pytest.raises(ValueError, match="anchor_out"):
        DeMAConfig(anchor_out=True)


# -- shape-matched sharing --------------------------------------------------------------------
def test_shape_matched_sharing_moves_projectors_into_the_shared_part():
    cfg = DeMAConfig(share="shape-matched", **SMALL)
    deep = inject_dema(byte_llama(hidden=32, layers=4), cfg)
    shallow = inject_dema(byte_llama(hidden=32, layers=2, seed=9), cfg)
    wide = inject_dema(byte_llama(hidden=48, heads=6, kv_heads=3, layers=3), cfg)
    assert deep.private_state_dict() == {}
    sd, ss, sw = deep.shared_state_dict(), shallow.shared_state_dict(), wide.shared_state_dict()
    assert sd.keys() == ss.keys() and all(torch.equal(sd[k], ss[k]) for k in sd)   # same width: same start
    assert "proj.h32.slots.1.in_proj.weight" in sd and "proj.h48.slots.1.in_proj.weight" in sw
    assert {k for k in sd if k.startswith("slots.")} == {k for k in sw if k.startswith("slots.")}
    assert shared_block("proj.h32.slots.1.out_proj.weight") == "slot1.h32"
    assert deep.slot_use() == {"slot0": 2, "slot1": 2, "slot0.h32": 2, "slot1.h32": 2}
    # A client loads the global union of all widths, taking its own part.
    union = {**sd, **sw}
    wide.load_shared_state_dict(union)
    with pytest.raises(KeyError, match="unexpected"):
        wide.load_shared_state_dict({**union, "bogus.weight": torch.zeros(1)})


def _train_one_round(handle, seed):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(handle.trainable_parameters(), lr=0.5)
    for _ in range(2):
        ids = torch.randint(0, 256, (2, 6))
        loss = handle.model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_identical_backbones_sharing_everything_fedavg_equals_average_of_whole_adapters():
    cfg = DeMAConfig(share="shape-matched", **SMALL)
    clients = [inject_dema(byte_llama(seed=1), cfg) for _ in range(2)]
    start = clients[0].shared_state_dict()
    with torch.no_grad():  # non-zero out-projectors so every tensor moves in training
        for h in clients:
            for k, p in h.shared_parameters().items():
                if "out_proj" in k:
                    p.fill_(0.01)
        start = clients[0].shared_state_dict()
    samples = [30, 10]
    updates = []
    for i, (h, n) in enumerate(zip(clients, samples)):
        _train_one_round(h, seed=i)
        trained = h.shared_state_dict()
        assert h.private_state_dict() == {}          # the whole adapter is in the shared part
        updates.append(ClientUpdate(f"c{i}", {k: trained[k] - start[k] for k in trained}, n, "same", h.slot_use()))
    new, _ = make_strategy("fedavg").aggregate(start, updates, round=0, block_of=shared_block)
    whole = [h.shared_state_dict() for h in clients]
    for key in start:
        expected = (30 * whole[0][key] + 10 * whole[1][key]) / 40
        assert torch.allclose(new[key], expected, atol=1e-6), key
        assert not torch.equal(whole[0][key], whole[1][key]), key


def test_aggregation_skips_blocks_a_client_does_not_hold_and_refuses_partial_blocks():
    g = {"slots.0.w": torch.zeros(2), "proj.h8.slots.0.in_proj.weight": torch.zeros(2),
         "proj.h16.slots.0.in_proj.weight": torch.zeros(2)}
    a = ClientUpdate("a", {"slots.0.w": torch.tensor([1.0, 0.0]), "proj.h8.slots.0.in_proj.weight": torch.tensor([2.0, 2.0])}, 1, "A")
    b = ClientUpdate("b", {"slots.0.w": torch.tensor([0.0, 1.0]), "proj.h16.slots.0.in_proj.weight": torch.tensor([4.0, 0.0])}, 3, "B")
    new, metrics = make_strategy("fedavg").aggregate(g, [a, b], round=0, block_of=shared_block)
    assert torch.equal(new["slots.0.w"], torch.tensor([0.25, 0.75]))
    assert torch.equal(new["proj.h8.slots.0.in_proj.weight"], torch.tensor([2.0, 2.0]))   # a alone
    assert torch.equal(new["proj.h16.slots.0.in_proj.weight"], torch.tensor([4.0, 0.0]))  # b alone
    assert metrics["blocks"]["slot0.h8"]["beta"] == [1.0, 0.0]
    g2 = {"slots.0.w": torch.zeros(2), "slots.0.v": torch.zeros(1)}
    with pytest.raises(ValueError, match="only in part"):
        make_strategy("fedavg").aggregate(g2, [ClientUpdate("a", {"slots.0.w": torch.zeros(2)}, 1, "A")],
                                         round=0, block_of=shared_block)


# -- aggregation blocks -----------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["parallel", "side"])
@pytest.mark.parametrize("share", ["experts-only", "shape-matched"])
def test_declared_blocks_equal_the_key_name_rule(share, placement):
    cfg = DeMAConfig(share=share, placement=placement, **SMALL)
    narrow = inject_dema(byte_llama(hidden=32, layers=3), cfg)
    wide = inject_dema(byte_llama(hidden=48, heads=6, kv_heads=3, layers=4), cfg)
    union: dict[str, str] = {}
    for handle in (narrow, wide):
        declared = handle.shared_blocks()
        state = handle.shared_state_dict()
        assert list(declared) == list(state)                              # every shared tensor, in order
        assert declared == {k: shared_block(k) for k in state}
        assert set(declared.values()) == set(handle.slot_use())          # weights exist for exactly these blocks
        union.update(declared)
    if share == "shape-matched":
        assert {"slot1.h32", "slot1.h48"} <= set(union.values())
        assert ("side_out.h48" in union.values()) == (placement == "side")
    else:
        assert set(union.values()) == {"slot0", "slot1"}
    assert global_blocks(union, None) == union                            # a global without declared blocks
    assert global_blocks(sorted(union), union) == {k: union[k] for k in sorted(union)}
    with pytest.raises(ValueError, match="declared blocks do not match its tensors"):
        global_blocks([*union, "slots.9.gate.weight"], union)


def test_anchor_projectors_declare_only_the_expert_blocks():
    handle = inject_dema(byte_llama(), DeMAConfig(projector="anchor", **SMALL), tokenizer=TOK)
    assert set(handle.shared_blocks().values()) == {"slot0", "slot1"}


# -- diagnostics ------------------------------------------------------------------------------
def test_update_diagnostics_on_hand_made_updates():
    ups = [ClientUpdate("a", {"slots.0.x": torch.tensor([1.0, 0.0]), "slots.1.x": torch.tensor([0.0, 0.0])}, 1, "g"),
           ClientUpdate("b", {"slots.0.x": torch.tensor([1.0, 1.0]), "slots.1.x": torch.tensor([3.0, 4.0])}, 1, "g"),
           ClientUpdate("c", {"slots.0.x": torch.tensor([-2.0, 0.0]), "slots.1.x": torch.tensor([0.0, 1.0])}, 1, "g")]
    d = update_diagnostics(ups, shared_block)
    s = 1 / math.sqrt(2)
    assert d["slot0"]["cosines"] == pytest.approx({"a|b": s, "a|c": -1.0, "b|c": -s})
    assert d["slot0"]["mean_cosine"] == pytest.approx(-1.0 / 3)
    assert d["slot1"]["norms"] == {"a": 0.0, "b": 5.0, "c": 1.0}
    assert d["slot1"]["cosines"] == pytest.approx({"b|c": 0.8})   # a's zero update has no cosine


def test_gate_entropy_is_log_m_for_a_uniform_gate_and_lower_otherwise():
    handle = inject_dema(byte_llama(layers=2), DeMAConfig(rank=4, num_experts=3, num_slots=2))
    batch = {"input_ids": torch.randint(0, 256, (2, 5)), "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])}
    with torch.no_grad():
        for mixture in handle.shared.slots:
            mixture.gate.weight.zero_()
    assert gate_entropy(handle, batch) == pytest.approx({"slot0": math.log(3), "slot1": math.log(3)})
    with torch.no_grad():
        handle.shared.slots[1].gate.weight.normal_(0, 5)
    ent = gate_entropy(handle, batch)
    assert ent["slot0"] == pytest.approx(math.log(3)) and ent["slot1"] < math.log(3) - 0.05
