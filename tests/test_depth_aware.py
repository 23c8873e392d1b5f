"""Depth-aware projector sharing (DeMA share 'depth-aware'): depth ranges, overlap weights, the
aggregate's closed form, its reduction to shape-matched FedAvg, a far client keeping its own, the
declaration checks, and simulate end to end on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from fedzero.adapters.dema import DeMAConfig, shared_block
from fedzero.adapters.dema.blocks import bank_family
from fedzero.adapters.dema.depth import (LAYER_DEPTHS_KEY, cut_layer_depths, depth_tag, layer_depths, merge,
                                         relative_layer_depths, slot_ranges)
from fedzero.strategies import ClientUpdate, make_strategy
from fedzero.strategies.depth import check_declaration, overlap


# ---------------------------------------------------------------------------------- depth ranges

def test_overlap_is_intersection_over_union_on_hand_made_ranges():
    assert overlap([[0.0, 0.5]], [[0.25, 0.75]]) == 0.25 / 0.75
    assert overlap([[0.0, 0.5]], [[0.0, 0.25]]) == 0.5                      # nested: 0.25 / 0.5
    assert overlap([[0.0, 0.25], [0.5, 0.75]], [[0.0, 0.75]]) == 0.5 / 0.75  # a union of two intervals
    assert overlap([[0.0, 0.5]], [[0.5, 1.0]]) == 0.0                        # touching: no overlap
    assert overlap([[0.1, 0.3]], [[0.1, 0.3]]) == 1.0
    assert overlap([], []) == 1.0 and overlap([], [[0.0, 1.0]]) == 0.0
    assert overlap([[0.0, 0.5]], [[0.25, 0.75]]) == overlap([[0.25, 0.75]], [[0.0, 0.5]])


def test_slot_ranges_relative_default_and_a_declared_cut():
    cfg = DeMAConfig(num_slots=2)
    # 4 layers, 2 slots: slot 0 = layers 0, 1 -> [0, 0.5]; slot 1 = [0.5, 1]
    rel = relative_layer_depths(4)
    assert slot_ranges(rel, [cfg.slot_of_layer(l, 4) for l in range(4)], 2) == [[[0.0, 0.5]], [[0.5, 1.0]]]
    # 3 of 6 source layers kept (0, 2, 5): each spans to the next kept one, the last its own layer
    cut = cut_layer_depths([0, 2, 5], relative_layer_depths(6))
    assert cut == [(0.0, 2 / 6), (2 / 6, 5 / 6), (5 / 6, 1.0)]
    # a cut of the first 2 of 8 layers covers [0, 0.25] only, whatever the slots
    first = cut_layer_depths([0, 1], relative_layer_depths(8))
    assert merge(first) == [[0.0, 0.25]]
    assert slot_ranges([(0.0, 0.25), (0.5, 0.75)], [0, 0], 2) == [[[0.0, 0.25], [0.5, 0.75]], []]


def test_keep_decoder_layers_records_the_cut_in_the_config_and_inject_reads_it(tmp_path):
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from fedzero.adapters.dema import inject_dema
    from fedzero.backbones.layout import keep_decoder_layers

    cfg = LlamaConfig(hidden_size=16, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=32, vocab_size=64)
    model = LlamaForCausalLM(cfg)
    keep_decoder_layers(model, [0, 2, 5])
    assert getattr(model.config, LAYER_DEPTHS_KEY) == [[0.0, 2 / 6], [2 / 6, 5 / 6], [5 / 6, 1.0]]
    model.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert layer_depths(again, 3) == [(0.0, 2 / 6), (2 / 6, 5 / 6), (5 / 6, 1.0)]

    handle = inject_dema(model, DeMAConfig(rank=4, num_experts=2, num_slots=2, share="depth-aware"))
    # slot of layer l of 3 = floor(2l/3): layers 0, 1 -> slot 0, layer 2 -> slot 1
    assert handle.depth_ranges == [[[0.0, round(5 / 6, 12)]], [[round(5 / 6, 12), 1.0]]]   # rounded: one digest everywhere
    assert handle.bank == f"h16_{depth_tag(handle.depth_ranges)}"
    decl = handle.depth_declaration()
    check_declaration("cut", decl)
    assert decl["blocks"][f"slot1.{handle.bank}"] == {"family": "slot1.h16", "ranges": [[round(5 / 6, 12), 1.0]]}
    assert bank_family(f"slot1.{handle.bank}") == "slot1.h16"
    assert all(shared_block(k) in decl["blocks"] for k in handle.shared_parameters() if k.startswith("proj."))

    with pytest.raises(ValueError, match=r"fedzero_layer_depths\[1\] must be \[start, end\] with 0 <= start < end"):
        layer_depths(LlamaConfig(num_hidden_layers=2, fedzero_layer_depths=[[0, 0.5], [0.7, 0.6]]), 2)
    with pytest.raises(ValueError, match=r"one \[start, end\] per decoder layer \(3\)"):
        layer_depths(LlamaConfig(num_hidden_layers=3, fedzero_layer_depths=[[0, 0.5], [0.5, 1]]), 3)


def test_config_switch_and_threshold():
    assert not DeMAConfig().depth_aware and DeMAConfig(share="depth-aware").depth_aware
    assert DeMAConfig(share="depth-aware").shares_projectors
    assert not DeMAConfig(share="depth-aware", projector="anchor").depth_aware    # anchor projectors stay private
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="depth_overlap_min must be in \\(0, 1\\]"):
            DeMAConfig(share="depth-aware", depth_overlap_min=bad)


# ---------------------------------------------------------------------------------- the aggregate

A, B = "h4_aaaa", "h4_bbbb"
SHAPES = {"slots.0.x": (3,), f"proj.{A}.slots.0.in_proj.weight": (2, 3), f"proj.{A}.slots.0.out_proj.weight": (3, 2),
          f"proj.{B}.slots.0.in_proj.weight": (2, 3), f"proj.{B}.slots.0.out_proj.weight": (3, 2)}
RANGES = {A: [[0.0, 0.5]], B: [[0.25, 0.75]]}           # IoU 1/3


def _global(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in sorted(SHAPES.items())}


def _decl(bank, overlap_min, ranges=None):
    return {"overlap_min": overlap_min,
            "blocks": {f"slot0.{bank}": {"family": "slot0.h4", "ranges": ranges or RANGES[bank]}}}


def _update(cid, bank, n, seed, overlap_min=0.3, use=1, depth=True):
    g = torch.Generator().manual_seed(seed)
    delta = {k: torch.randn(s, generator=g) for k, s in SHAPES.items() if k.startswith("slots.") or f".{bank}." in k}
    return ClientUpdate(cid, delta, n, cid, {"slot0": use, f"slot0.{bank}": use},
                        _decl(bank, overlap_min) if depth else None)


def _closed_form(theta, updates, bank, overlap_min):
    """θ_a + Σ_b β_ab (Δ_b + θ_g(b) − θ_a) in float64, β_ab ∝ IoU·n_b·use_b over IoU >= overlap_min."""
    keys = sorted(k for k in SHAPES if f".{bank}." in k)
    c, rows = [], []
    for u in updates:
        other = A if f"slot0.{A}" in u.slot_use else B
        iou = overlap(RANGES[bank], RANGES[other])
        c.append(iou * u.num_samples * u.slot_use[f"slot0.{other}"] if iou >= overlap_min else 0.0)
        rows.append({k: (u.delta[k.replace(bank, other)].double() + theta[k.replace(bank, other)].double()
                         - theta[k].double()) for k in keys})
    c = np.array(c) / sum(c)
    return {k: theta[k].double() + sum(ci * r[k] for ci, r in zip(c, rows)) for k in keys}


def test_aggregate_equals_its_closed_form_and_a_far_bank_keeps_its_own():
    theta = _global()
    updates = [_update("a1", A, 10, 1, use=2), _update("a2", A, 30, 2), _update("b", B, 20, 3)]
    new, metrics = make_strategy("fedavg").aggregate(theta, updates, round=0, block_of=shared_block)
    for bank in (A, B):
        for k, v in _closed_form(theta, updates, bank, 0.3).items():
            torch.testing.assert_close(new[k].double(), v, rtol=1e-6, atol=1e-6)
    st = metrics["blocks"][f"slot0.{A}"]
    assert st["depth"]["overlap"] == [1.0, 1.0, 1 / 3]
    np.testing.assert_allclose(st["beta"], np.array([20, 30, 20 / 3]) / (50 + 20 / 3), rtol=1e-15)
    # the experts' block is today's FedAvg over everyone
    expected = theta["slots.0.x"] + (2 * 10 * updates[0].delta["slots.0.x"].double() + 30 * updates[1].delta["slots.0.x"].double()
                                     + 20 * updates[2].delta["slots.0.x"].double()) / 70
    torch.testing.assert_close(new["slots.0.x"].double(), expected, rtol=1e-6, atol=1e-6)

    # threshold above 1/3: B overlaps nobody and keeps its own client's projector, bit for bit;
    # A is the FedAvg of a1 and a2 alone
    updates = [_update("a1", A, 10, 1, 0.5, use=2), _update("a2", A, 30, 2, 0.5), _update("b", B, 20, 3, 0.5)]
    new, metrics = make_strategy("fedavg").aggregate(theta, updates, round=0, block_of=shared_block)
    alone, _ = make_strategy("fedavg").aggregate(theta, [updates[2]], round=0, block_of=shared_block)
    pair, _ = make_strategy("fedavg").aggregate(theta, updates[:2], round=0, block_of=shared_block)
    for k in SHAPES:
        if f".{B}." in k:
            assert torch.equal(new[k], alone[k]) and torch.equal(new[k], theta[k] + updates[2].delta[k]), k
        if f".{A}." in k:
            assert torch.equal(new[k], pair[k]), k
    assert metrics["blocks"][f"slot0.{B}"]["beta"] == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("strategy", ["fedavg", "cmga"])
def test_full_overlap_is_shape_matched_fedavg_bit_for_bit(strategy):
    """Every client with the same ranges: one bank, and the depth-aware rule is FedAvg on it exactly
    (two rounds, server lr and momentum) against today's untagged shape-matched bank `h4`; under
    CMGA the bank is FedAvg'd, the experts CMGA'd."""
    def plain(d):
        return {k.replace(f".{A}.", ".h4."): v for k, v in d.items()}

    theta_d = {k: v for k, v in _global(4).items() if f".{B}." not in k}
    theta_p = theta_f = plain(theta_d)
    opts = {"server_lr": 0.7, "server_momentum": 0.5}
    sd, sp, sf = make_strategy(strategy, **opts), make_strategy(strategy, **opts), make_strategy("fedavg", **opts)
    for r in range(2):
        ups = [_update(c, A, n, 10 * r + s) for c, n, s in (("a1", 10, 1), ("a2", 30, 2), ("a3", 20, 3))]
        today = [ClientUpdate(u.client_id, plain(u.delta), u.num_samples, u.group, {"slot0": 1, "slot0.h4": 1})
                 for u in ups]
        theta_d, md = sd.aggregate(theta_d, ups, round=r, block_of=shared_block)
        theta_p, _ = sp.aggregate(theta_p, today, round=r, block_of=shared_block)
        theta_f, _ = sf.aggregate(theta_f, today, round=r, block_of=shared_block)
        assert md["blocks"][f"slot0.{A}"]["depth"]["overlap"] == [1.0, 1.0, 1.0]
    for k, v in plain(theta_d).items():
        want = theta_f[k] if ".h4." in k else theta_p[k]
        assert torch.equal(v, want), k


def test_declarations_are_checked_naming_the_client():
    theta = _global()
    fedavg = make_strategy("fedavg")

    def run(updates):
        fedavg.aggregate(theta, updates, round=0, block_of=shared_block)

    with pytest.raises(ValueError, match=r"client 'b': depth.overlap_min 0.5 differs from client 'a1''s 0.3"):
        run([_update("a1", A, 10, 1), _update("b", B, 20, 3, overlap_min=0.5)])
    with pytest.raises(ValueError, match=r"client 'a2' holds the depth-aware block 'slot0.h4_aaaa' but its update "
                                         r"declares no depth ranges"):
        run([_update("a1", A, 10, 1), _update("a2", A, 10, 2, depth=False)])
    with pytest.raises(ValueError, match=r"client 'a1' holds the depth-aware block 'slot0.h4_aaaa' but its update "
                                         r"declares no depth ranges"):     # nobody declares: refused, not averaged per bank
        run([_update("a1", A, 10, 1, depth=False), _update("b", B, 10, 2, depth=False)])
    bad = _update("a2", A, 10, 2)
    bad.depth = _decl(A, 0.3, [[0.0, 0.4]])
    with pytest.raises(ValueError, match=r"client 'a2': depth.blocks\['slot0.h4_aaaa'\] declares family 'slot0.h4', "
                                         r"ranges \[\[0.0, 0.4\]\]; another client holding it declared"):
        run([_update("a1", A, 10, 1), bad])
    bad.depth = {"overlap_min": 0.3, "blocks": {"slot0.h4_bbbb": {"family": "slot0.h4", "ranges": [[0.0, 0.5]]}}}
    with pytest.raises(ValueError, match=r"client 'a2': depth.blocks names 'slot0.h4_bbbb', which its update does not hold"):
        run([bad])
    with pytest.raises(ValueError, match=r"client 'x': depth.blocks\['s'\].ranges must be a list of \[lo, hi\] with "
                                         r"0 <= lo < hi <= 1, sorted and disjoint"):
        check_declaration("x", {"overlap_min": 0.5, "blocks": {"s": {"family": "f", "ranges": [[0.5, 0.2]]}}})
    with pytest.raises(ValueError, match=r"client 'x': depth.overlap_min must be a number in \(0, 1\]"):
        check_declaration("x", {"overlap_min": 0, "blocks": {"s": {"family": "f", "ranges": []}}})


def test_the_store_refuses_a_bad_declaration_and_keeps_a_good_one(tmp_path):
    from fedzero.store import FederationStore

    store = FederationStore(tmp_path)
    store.publish_global(0, _global())
    u = _update("a1", A, 10, 1)
    with pytest.raises(ValueError, match=r"client 'a1': depth.overlap_min must be a number in \(0, 1\]"):
        store.write_update(0, "a1", u.delta, fingerprint="f", num_samples=10, depth={**u.depth, "overlap_min": 2})
    store.write_update(0, "a1", u.delta, fingerprint="f", num_samples=10, slot_use=u.slot_use, depth=u.depth)
    assert store.list_updates(0)[0]["depth"] == u.depth


# ---------------------------------------------------------------------------------- simulate end to end

def _run(tmp_path, share="depth-aware", overlap_min=0.5, rounds=2):
    from test_simulate import _llama

    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("deep", "cut", "shallow"):
        for split in ("train", "test"):
            with open(data / f"{name}.{split}.jsonl", "w") as f:
                for i in range(8):
                    f.write(json.dumps({"prompt": f"item {i}:", "completion": f" {['good', 'bad'][i % 2]}"}) + "\n")
    cut = _llama(16, 2, 2, 3)
    cut["llama_config"][LAYER_DEPTHS_KEY] = [[0.0, 0.25], [0.25, 0.5]]       # the first half of a deeper model
    cfg = {"seed": 0,
           "dema": {"rank": 4, "num_experts": 2, "num_slots": 2, "share": share, "depth_overlap_min": overlap_min},
           "federation": {"rounds": rounds, "strategy": "fedavg"},
           "train": {"local_steps": 2, "batch_size": 4, "lr": 0.01, "max_length": 32},
           "clients": [{"id": n, "backbone": bb, "data": {"train": f"data/{n}.train.jsonl", "test": f"data/{n}.test.jsonl"}}
                       for n, bb in (("deep", _llama(16, 4, 2, 1)), ("shallow", _llama(16, 2, 2, 2)), ("cut", cut))]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_simulate_depth_aware_end_to_end(tmp_path):
    from fedzero.config import load_run_config
    from fedzero.simulate import simulate
    from fedzero.store import FederationStore

    simulate(load_run_config(_run(tmp_path)), tmp_path / "out", progress=False)
    store = FederationStore(tmp_path / "out" / "store", create=False)
    g0, m0 = store.read_global(0)
    # deep (4 layers) and shallow (2 layers) have the same relative ranges: one bank; the cut its own
    banks = sorted({k.split(".")[1] for k in g0 if k.startswith("proj.")})
    assert len(banks) == 2 and all(b.startswith("h16_") for b in banks)
    man = {m["client_id"]: m for m in store.list_updates(1)}
    assert man["deep"]["depth"]["blocks"] == man["shallow"]["depth"]["blocks"]
    cut_blocks = man["cut"]["depth"]["blocks"]
    assert [e["ranges"] for e in cut_blocks.values()] == [[[0.0, 0.25]], [[0.25, 0.5]]]
    result = store.read_result(1)
    deep_bank = next(iter(man["deep"]["depth"]["blocks"]))                     # slot0.<deep's bank>
    st = result["blocks"][deep_bank]
    clients = result["clients"]
    # slot 0: deep/shallow [0, 0.5] vs the cut's [0, 0.25]: IoU 0.5 >= 0.5, so the cut enters at half weight
    assert dict(zip(clients, st["depth"]["overlap"])) == {"cut": 0.5, "deep": 1.0, "shallow": 1.0}
    slot1 = result["blocks"][next(b for b in man["deep"]["depth"]["blocks"] if b.startswith("slot1."))]
    # slot 1: [0.5, 1] vs [0.25, 0.5]: no overlap, the cut does not enter; nor deep/shallow the cut's
    assert dict(zip(clients, slot1["depth"]["overlap"]))["cut"] == 0.0
    assert dict(zip(clients, slot1["beta"]))["cut"] == 0.0
    cut_slot1 = result["blocks"][next(b for b in cut_blocks if b.startswith("slot1."))]
    assert dict(zip(clients, cut_slot1["beta"])) == {"cut": 1.0, "deep": 0.0, "shallow": 0.0}
    # the cut's slot-1 projector after round 1 is its own, bit for bit (global 1 + its delta, server lr 1)
    g1, g2 = store.read_global(1)[0], store.read_global(2)[0]
    delta, _ = store.read_update(1, "cut")
    cut_bank = next(iter(cut_blocks)).split(".")[1]
    own = [k for k in delta if k.startswith(f"proj.{cut_bank}.slots.1.")]
    assert len(own) == 2                                   # in_proj and out_proj
    for k in own:
        assert torch.equal(g2[k], g1[k] + delta[k]), k
    # slot 0 of the deep/shallow bank moved toward the cut's: not their own mean
    assert not torch.equal(g2[f"proj.{banks[0]}.slots.0.in_proj.weight"], g1[f"proj.{banks[0]}.slots.0.in_proj.weight"])


def test_simulate_full_overlap_equals_shape_matched(tmp_path):
    """With every client on one bank (the cut left out), depth-aware simulate gives shape-matched's
    globals bit for bit (the bank only renamed)."""
    from fedzero.config import load_run_config
    from fedzero.simulate import simulate
    from fedzero.store import FederationStore

    out = {}
    for share in ("depth-aware", "shape-matched"):
        cfg = yaml.safe_load(_run(tmp_path / share).read_text())
        cfg["clients"] = [c for c in cfg["clients"] if c["id"] != "cut"]
        cfg["dema"]["share"] = share
        (tmp_path / share / "run.yaml").write_text(yaml.safe_dump(cfg))
        simulate(load_run_config(tmp_path / share / "run.yaml"), tmp_path / share / "out", progress=False)
        out[share] = FederationStore(tmp_path / share / "out" / "store", create=False).read_global(2)[0]
    rename = {k: ".".join(["proj", "h16"] + k.split(".")[2:]) if k.startswith("proj.") else k for k in out["depth-aware"]}
    assert sorted(rename.values()) == sorted(out["shape-matched"])
    for k, v in out["depth-aware"].items():
        assert torch.equal(v, out["shape-matched"][rename[k]]), k
