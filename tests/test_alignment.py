"""`fedzero align`: is the shared r-space aligned across clients before any training
(fedzero/adapters/dema/alignment.py)."""

import json
import math

import pytest
import torch
import yaml

from fedzero.adapters.dema import DeMAConfig, inject_dema
from fedzero.adapters.dema.alignment import (alignment_report, chance_alignment, coordinate_alignment,
                                             coordinate_correlations, effective_dimensions, format_report,
                                             projected_states)
from fedzero.adapters.dema.anchors import load_anchor_texts
from fedzero.backbones import BackboneSpec, decoder_layout, load_backbone
from fedzero.cli import main
from fedzero.data import ByteTokenizer

from test_families import model_config
from test_simulate import tiny_run

TOK = ByteTokenizer()
SMALL = dict(rank=4, num_experts=2, num_slots=2, share="experts-only", num_anchors=12)
TEXTS = ["a", "hello world", "the quick brown fox", "zz top", "federated tuning", "of the union", "x y"]


def byte_llama(layers=3, seed=1):
    config = {"hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 64, "vocab_size": 259, "max_position_embeddings": 128}
    return load_backbone(BackboneSpec(llama_config=config, init_seed=seed, tokenizer="byte"))[0]


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# -- the statistic ------------------------------------------------------------------------------
def test_identical_z_align_at_one_and_negated_at_minus_one():
    z = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    assert coordinate_alignment(z, z) == pytest.approx(1.0, abs=1e-12)
    assert coordinate_alignment(z, -z) == pytest.approx(-1.0, abs=1e-12)
    assert coordinate_alignment(z, 3 * z + 7) == pytest.approx(1.0, abs=1e-12)   # Pearson: affine-invariant


def test_a_hand_computed_correlation():
    # centred [-1, 0, 1] and [-1, 1, 0]: covariance 1, norms sqrt(2) each -> 1/2
    assert coordinate_alignment(t([[1], [2], [3]]), t([[1], [3], [2]])) == pytest.approx(0.5, abs=1e-12)


def test_permuted_coordinates_with_noise_score_the_fixed_points_share():
    """z_b = z_a with coordinates 2 and 3 swapped, plus independent noise of the same variance: the two
    fixed coordinates correlate 1/sqrt(1 + 1) each, the swapped ones 0 (independent coordinates), so the
    mean over 4 is (2/4) / sqrt(2) = 0.354."""
    g = torch.Generator().manual_seed(1)
    za = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    zb = za[:, [0, 1, 3, 2]] + torch.randn(20000, 4, generator=g, dtype=torch.float64)
    expected = 0.5 / math.sqrt(2)
    assert coordinate_alignment(za, zb) == pytest.approx(expected, abs=0.02)
    per = coordinate_correlations(za, zb)
    assert per[:2].tolist() == pytest.approx([1 / math.sqrt(2)] * 2, abs=0.02)
    assert per[2:].abs().max() < 0.03
    # Coordinates paired at random: 1 in 4 pairings of a coordinate hits its own (noisy) copy.
    mean, sd = chance_alignment(za, zb)
    assert mean == pytest.approx(0.25 / math.sqrt(2), abs=0.03) and 0 < sd < 0.3


def test_a_constant_coordinate_contributes_zero_and_is_counted():
    za = t([[1, 5], [2, 5], [3, 5]])
    zb = t([[1, 0], [2, 1], [3, 2]])
    assert coordinate_correlations(za, zb).tolist() == [pytest.approx(1.0), 0.0]
    assert coordinate_alignment(za, zb) == pytest.approx(0.5)
    # 0.1 does not survive centring exactly in floating point; still constant, not noise blown up to +-1.
    tenth = torch.tensor([[1.0, 0.1], [2.0, 0.1], [4.0, 0.1]], dtype=torch.float32)
    assert coordinate_alignment(tenth, tenth) == pytest.approx(0.5)
    assert coordinate_alignment(torch.zeros(5, 3), torch.randn(5, 3)) == 0.0


def test_the_statistic_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="same N and r"):
        coordinate_alignment(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="at least 3"):
        coordinate_alignment(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        coordinate_alignment(torch.full((4, 2), float("nan")), torch.randn(4, 2))


def test_effective_dimensions_count_independent_directions():
    u, v = [1, -1, 0, 0], [0, 0, 1, -1]                                    # centred, orthogonal
    columns = lambda *cols: t(list(zip(*cols)))
    assert effective_dimensions(columns([1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1])) == pytest.approx(3.0)
    assert effective_dimensions(columns(u, [-1, 1, 0, 0], [3, -3, 0, 0])) == pytest.approx(1.0)    # one factor
    # two groups of copies (an affine copy is a copy): C = [[1,1,0,0],[1,1,0,0],[0,0,1,1],[0,0,1,1]], 4^2 / 8
    assert effective_dimensions(columns(u, u, v, [3, 3, 5, 1])) == pytest.approx(2.0)
    assert effective_dimensions(columns(u, v, [5, 5, 5, 5])) == pytest.approx(2.0)       # a constant adds nothing
    assert effective_dimensions(torch.ones(4, 3)) == 0.0
    with pytest.raises(ValueError, match=r"expected \[N >= 3 inputs, r\]"):
        effective_dimensions(torch.randn(2, 3))


# -- z at the last real token, per slot -------------------------------------------------------------
def hand_slot_states(handle, texts, max_length):
    """Each text alone (no padding), truncated on the left as documented, z = P(x) at its last token
    with x read independently: side placement's layer input from output_hidden_states, parallel
    placement's MLP input at the backbone's own MLP (inside DeMA's wrapper); then the slot mean."""
    layout = decoder_layout(handle.model)
    projectors = [handle.private.layers[l].in_proj for l in range(handle.num_layers)]   # experts-only: one per layer
    seen = []
    hooks = [] if handle.config.placement == "side" else [
        layout.mlp(layer).base_layer.register_forward_pre_hook(lambda m, args: seen.append(args[0][0, -1]))
        for layer in layout.layers]
    per_text = []
    with torch.no_grad():
        for text in texts:
            ids = [TOK.bos_token_id] + TOK.encode(text)[-(max_length - 1):]
            seen.clear()
            out = handle.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            xs = seen if hooks else [out.hidden_states[l][0, -1] for l in range(handle.num_layers)]
            per_text.append(torch.stack([p(x) for p, x in zip(projectors, xs)]))   # [L, r]
    for hook in hooks:
        hook.remove()
    z = torch.stack(per_text, dim=1)                                                      # [L, N, r]
    slots = handle.slot_of_layer()
    return {s: z[[l for l in range(len(slots)) if slots[l] == s]].mean(0) for s in sorted(set(slots))}


@pytest.mark.parametrize("max_length", [64, 8])
@pytest.mark.parametrize("placement", ["parallel", "side"])
def test_projected_states_match_a_hand_computation(placement, max_length):
    handle = inject_dema(byte_llama(layers=3), DeMAConfig(**SMALL, placement=placement))
    # A trained state: nonzero out-projectors, so later layers' inputs depend on the adapters upstream.
    with torch.no_grad():
        for seed, p in enumerate(handle.private_parameters().values()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    measured = projected_states(handle, TOK, TEXTS, batch_size=3, max_length=max_length)   # padded batches
    expected = hand_slot_states(handle, TEXTS, max_length)
    assert handle.slot_of_layer() == [0, 0, 1] and set(measured) == {0, 1}
    for slot in expected:
        assert measured[slot].shape == (len(TEXTS), 4)
        torch.testing.assert_close(measured[slot], expected[slot], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("projector", ["learned", "anchor"])
def test_the_same_backbone_and_seed_align_at_one(projector):
    config = DeMAConfig(**SMALL, projector=projector)
    handles = {cid: inject_dema(byte_llama(seed=5), config, tokenizer=TOK) for cid in ("x", "y")}
    report = alignment_report(handles, {"x": TOK, "y": TOK}, TEXTS)
    assert [row["slot"] for row in report["rows"]] == [0, 1]
    assert all(row["alignment"] == pytest.approx(1.0, abs=1e-6) for row in report["rows"])
    assert all(row["chance_mean"] < 0.9 for row in report["rows"])   # coordinates paired at random do not
    assert all(row["dims_a"] == pytest.approx(row["dims_b"]) and 1 <= row["dims_a"] <= 4 for row in report["rows"])


@pytest.mark.parametrize("placement", ["parallel", "side"])
def test_two_families_of_different_depths_run_through_the_report(placement):
    """A 2-layer LLaMA and a 3-layer GPT-NeoX with 3 slots: the LLaMA holds no layer in slot 2."""
    llama = load_backbone(BackboneSpec(model_config=model_config("llama"), init_seed=1, tokenizer="byte"))[0]
    neox = load_backbone(BackboneSpec(model_config=model_config("gpt_neox", num_hidden_layers=3), init_seed=2,
                                      tokenizer="byte"))[0]
    config = DeMAConfig(rank=4, num_experts=2, num_slots=3, share="experts-only", placement=placement)
    handles = {"llama": inject_dema(llama, config), "neox": inject_dema(neox, config)}
    report = alignment_report(handles, {"llama": TOK, "neox": TOK}, TEXTS)
    assert report["clients"]["llama"]["layers_per_slot"] == [1, 1, 0]
    assert report["clients"]["neox"]["layers_per_slot"] == [1, 1, 1]
    rows = report["rows"]
    assert [(r["a"], r["b"], r["slot"]) for r in rows] == [("llama", "neox", s) for s in range(3)]
    assert all(-1 <= r["alignment"] <= 1 and r["chance_sd"] >= 0 for r in rows[:2])
    assert rows[2]["alignment"] is None and rows[2]["depth"] == [pytest.approx(2 / 3), 1.0]
    assert rows[2]["dims_a"] is None and all(0 < r["dims_a"] <= 4 and 0 < r["dims_b"] <= 4 for r in rows[:2])
    json.dumps(report)                                                        # JSON-ready
    assert "(llama: no layer in this slot)" in format_report(report)


def test_the_report_refuses_what_it_cannot_compare():
    handle = inject_dema(byte_llama(), DeMAConfig(**SMALL))
    with pytest.raises(ValueError, match="give two or more"):
        alignment_report({"x": handle}, {"x": TOK}, TEXTS)
    other = inject_dema(byte_llama(), DeMAConfig(**{**SMALL, "rank": 8}))
    with pytest.raises(ValueError, match="client y's shared space"):
        alignment_report({"x": handle, "y": other}, {"x": TOK, "y": TOK}, TEXTS)
    with pytest.raises(ValueError, match=r"no tokenizer given for client\(s\) \['y'\]"):
        alignment_report({"x": handle, "y": other}, {"x": TOK}, TEXTS)
    with pytest.raises(ValueError, match="at least 3"):
        alignment_report({"x": handle, "y": other}, {"x": TOK, "y": TOK}, TEXTS[:2])


# -- fedzero align ------------------------------------------------------------------------------
def test_cli_measures_a_run_config_and_writes_json(tmp_path, capsys):
    config = tiny_run(tmp_path)
    out = tmp_path / "reports" / "align.json"
    assert main(["align", "--config", str(config), "--max-texts", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "a ~ b" in printed and "sotu.jsonl (the bundled anchors)" in printed
    report = json.loads(out.read_text())
    assert report["texts"] == 10 and report["config"] == str(config)
    assert [(r["a"], r["b"], r["slot"]) for r in report["rows"]] == [("a", "b", 0), ("a", "b", 1)]
    assert report["clients"]["b"]["num_layers"] == 3 and report["clients"]["a"]["projector"] == "learned"


def test_cli_reads_prompts_and_leaves_out_the_anchor_directions(tmp_path, capsys):
    config = tiny_run(tmp_path)
    assert main(["align", "--config", str(config), "--texts", str(tmp_path / "data" / "a.test.jsonl"),
                 "--out", str(tmp_path / "prompts.json")]) == 0
    report = json.loads((tmp_path / "prompts.json").read_text())
    assert report["texts"] == 12                                           # the file's 12 prompts

    directions = load_anchor_texts(None, 4)                                 # rank 4: the first 4 anchors
    texts = tmp_path / "mixed.jsonl"
    texts.write_text("".join(json.dumps({"text": x}) + "\n" for x in directions + TEXTS[:3]))
    assert main(["align", "--config", str(config), "--projector", "anchor", "--texts", str(texts),
                 "--out", str(tmp_path / "anchor.json")]) == 0
    report = json.loads((tmp_path / "anchor.json").read_text())
    assert report["texts"] == 3 and "less the 4 that define anchor directions" in report["texts_source"]
    assert report["clients"]["a"]["projector"] == "anchor"


@pytest.mark.parametrize("args, message", [
    (["--texts", "missing.jsonl"], "no texts file at missing.jsonl (--texts)"),
    (["--texts", "TWO"], "2 usable text(s); a correlation across texts needs at least 3"),
    (["--max-texts", "2"], "--max-texts 2: a correlation across texts needs at least 3"),
])
def test_cli_errors_say_what_to_fix(tmp_path, capsys, args, message):
    config = tiny_run(tmp_path)
    (tmp_path / "two.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    args = [str(tmp_path / "two.jsonl") if a == "TWO" else a for a in args]
    assert main(["align", "--config", str(config), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_names_the_client_whose_backbone_fails(tmp_path, capsys):
    config = tiny_run(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["clients"][1]["backbone"]["tokenizer"] = str(tmp_path / "no-such-tokenizer")
    config.write_text(yaml.safe_dump(data))
    assert main(["align", "--config", str(config), "--max-texts", "3"]) == 2
    assert "client b: " in capsys.readouterr().err
