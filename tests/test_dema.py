"""DeMA adapters: config, injection, what is shared, save/load."""


import pytest
import torch

from fedzero.adapters.dema import DeMAConfig, inject_dema, shared_block
from fedzero.adapters.dema.io import load_part, read_part, save_part
from fedzero.backbones import fingerprint

from conftest import tiny_llama, tiny_llama_config

# experts-only: these tests pin the private-projector layout (shape-matched sharing: test_dema_sharing.py)
SMALL = dict(rank=8, num_experts=3, num_slots=4, share="experts-only")


# -- config -----------------------------------------------------------------------------------
def test_config_json_round_trip_and_defaults():
    cfg = DeMAConfig(rank=16, num_experts=2, num_slots=4, temperature=0.5, placement="side")
    again = DeMAConfig.from_json(cfg.to_json())
    assert again == cfg
    assert DeMAConfig().expert_hidden == 64  # h defaults to r


@pytest.mark.parametrize("bad, match", [
    (dict(rank=0), "rank"), (dict(num_experts=-1), "num_experts"), (dict(temperature=0), "temperature"),
    (dict(placement="serial"), "placement"), (dict(target="attn"), "target"), (dict(projector="x"), "projector"),
    (dict(rank=2.5), "rank"),
])
def test_config_refuses_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        DeMAConfig(**bad)


def test_config_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown DeMAConfig field"):
        DeMAConfig.from_dict({"rank": 4, "experts": 2})


def test_slot_mapping_is_proportional_depth():
    cfg = DeMAConfig(num_slots=4)
    assert [cfg.slot_of_layer(l, 8) for l in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [cfg.slot_of_layer(l, 2) for l in range(2)] == [0, 2]
    assert [cfg.slot_of_layer(l, 5) for l in range(5)] == [0, 0, 1, 2, 3]


# -- injection --------------------------------------------------------------------------------
def _models_of_each_type():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return {"llama": tiny_llama(), "mistral": MistralForCausalLM(MistralConfig(**common)).eval(),
            "qwen2": Qwen2ForCausalLM(Qwen2Config(**common)).eval()}


@pytest.mark.parametrize("placement", ["parallel", "side"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_injection_leaves_logits_unchanged(model_type, placement):
    model = _models_of_each_type()[model_type]
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        inject_dema(model, DeMAConfig(placement=placement, **SMALL))
        after = model(ids).logits
    assert torch.equal(before, after)


def test_layout_is_found_by_structure_not_by_model_type():
    """GPT-2 (transformer.h[i].mlp, transformer.ln_f) is no covered family, but its layout fits; what
    does not fit is refused naming what is missing (tests/test_families.py)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32)).eval()
    x = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        reference = model(input_ids=x).logits
    inject_dema(model, DeMAConfig(**SMALL))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, reference)


def test_double_injection_is_refused(tiny_model):
    inject_dema(tiny_model, DeMAConfig(**SMALL))
    with pytest.raises(ValueError, match="already"):
        inject_dema(tiny_model, DeMAConfig(**SMALL))


@pytest.mark.parametrize("placement", ["parallel", "side"])
def test_only_adapters_train_and_parts_partition_them(tiny_model, placement):
    handle = inject_dema(tiny_model, DeMAConfig(placement=placement, **SMALL))
    trainable = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    shared = {id(p) for p in handle.shared_parameters().values()}
    private = {id(p) for p in handle.private_parameters().values()}
    assert shared and private and not (shared & private)
    assert trainable == shared | private


def test_heterogeneous_backbones_share_identical_keys_and_shapes():
    a = inject_dema(tiny_llama(hidden=32, layers=3, heads=4, kv_heads=2), DeMAConfig(**SMALL))
    b = inject_dema(tiny_llama(hidden=48, layers=5, heads=6, kv_heads=3), DeMAConfig(**SMALL))
    sa, sb = a.shared_state_dict(), b.shared_state_dict()
    assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in sb.items()}
    # same seed -> same initial shared state on every client, whatever the backbone
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # r=8, M=3, h=8, S=4: S*(M*2*r*h + M*r) parameters
    assert a.num_shared_parameters() == 4 * (3 * 2 * 8 * 8 + 3 * 8)
    # private parts differ in shape with the backbone
    assert a.private_state_dict()["layers.0.in_proj.weight"].shape == (8, 32)
    assert b.private_state_dict()["layers.0.in_proj.weight"].shape == (8, 48)


def test_shared_keys_map_to_slot_blocks_and_slot_use_counts_layers():
    handle = inject_dema(tiny_llama(layers=3), DeMAConfig(**SMALL))
    assert sorted({shared_block(k) for k in handle.shared_state_dict()}) == ["slot0", "slot1", "slot2", "slot3"]
    assert handle.slot_use() == {"slot0": 1, "slot1": 1, "slot2": 1, "slot3": 0}
    with pytest.raises(ValueError, match="not a DeMA shared key"):
        shared_block("layers.0.in_proj.weight")


@pytest.mark.parametrize("placement", ["parallel", "side"])
def test_gradients_reach_shared_experts_once_out_projector_is_nonzero(tiny_model, placement):
    handle = inject_dema(tiny_model, DeMAConfig(placement=placement, **SMALL))
    with torch.no_grad():
        for p in handle.private_parameters().values():
            if p.dim() == 2 and p.shape[1] == SMALL["rank"]:  # out-projectors r -> d
                p.normal_(0, 0.1)
    ids = torch.randint(0, 64, (2, 6))
    tiny_model(ids, labels=ids).loss.backward()
    grads = {k: p.grad for k, p in handle.shared_parameters().items()}
    used = {f"slots.{s}." for s in handle.slot_of_layer()}
    for key, grad in grads.items():
        if any(key.startswith(u) for u in used):
            assert grad is not None and grad.abs().sum() > 0, key
    assert all(p.grad is None for n, p in tiny_model.named_parameters() if not p.requires_grad)


def test_side_placement_keeps_no_backbone_graph(tiny_model):
    """Side placement: the backbone's hidden states never require grad, so autograd keeps none of them."""
    inject_dema(tiny_model, DeMAConfig(placement="side", **SMALL))
    seen = []
    tiny_model.model.layers[-1].register_forward_hook(lambda m, a, out: seen.append(out if torch.is_tensor(out) else out[0]))
    ids = torch.randint(0, 64, (1, 5))
    logits = tiny_model(ids).logits
    assert not seen[0].requires_grad
    assert logits.requires_grad  # through the side stream only


# -- save / load ------------------------------------------------------------------------------
def test_save_load_round_trip_and_header(tmp_path, tiny_model):
    cfg = DeMAConfig(**SMALL)
    handle = inject_dema(tiny_model, cfg)
    fp = fingerprint(tiny_model.config)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(0.01)
    save_part(handle, tmp_path / "shared.safetensors", "shared", fingerprint=fp)
    save_part(handle, tmp_path / "private.safetensors", "private", fingerprint=fp)
    _, header = read_part(tmp_path / "shared.safetensors")
    assert header["part"] == "shared" and header["fingerprint"] == fp and header["config"] == cfg.to_dict()
    assert "fedzero_version" in header

    other = inject_dema(tiny_llama(seed=5), cfg)
    load_part(other, tmp_path / "shared.safetensors", "shared", fingerprint=fp)
    load_part(other, tmp_path / "private.safetensors", "private", fingerprint=fp)
    for mine, theirs in ((handle.shared_state_dict(), other.shared_state_dict()),
                         (handle.private_state_dict(), other.private_state_dict())):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_load_refuses_wrong_part_backbone_shape_and_foreign_files(tmp_path, tiny_model):
    from safetensors.torch import save_file

    handle = inject_dema(tiny_model, DeMAConfig(**SMALL))
    fp = fingerprint(tiny_model.config)
    save_part(handle, tmp_path / "private.safetensors", "private", fingerprint=fp)
    with pytest.raises(ValueError, match="holds the private part"):
        load_part(handle, tmp_path / "private.safetensors", "shared", fingerprint=fp)
    with pytest.raises(ValueError, match="saved for backbone"):
        load_part(handle, tmp_path / "private.safetensors", "private", fingerprint="000000000000")

    wider = inject_dema(tiny_llama(hidden=48, heads=6, kv_heads=3), DeMAConfig(**SMALL))
    save_part(wider, tmp_path / "wide.safetensors", "shared", fingerprint="x")
    load_part(handle, tmp_path / "wide.safetensors", "shared", fingerprint=fp)  # shared: fine across widths
    other_space = inject_dema(tiny_llama(), DeMAConfig(rank=4, num_experts=3, num_slots=4, share="experts-only"))
    save_part(other_space, tmp_path / "r4.safetensors", "shared", fingerprint=fp)
    with pytest.raises(ValueError, match="shared space"):
        load_part(handle, tmp_path / "r4.safetensors", "shared", fingerprint=fp)

    save_file({"a": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="no fedzero header"):
        read_part(tmp_path / "foreign.safetensors")


def test_load_state_checks_missing_unexpected_and_shapes(tiny_model):
    handle = inject_dema(tiny_model, DeMAConfig(**SMALL))
    state = handle.shared_state_dict()
    missing = dict(state)
    missing.pop("slots.0.expert_a")
    with pytest.raises(KeyError, match="missing.*slots.0.expert_a"):
        handle.load_shared_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected.*bogus"):
        handle.load_shared_state_dict({**state, "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        handle.load_shared_state_dict({**state, "slots.0.gate.weight": torch.zeros(2, 2)})


def test_fingerprint_ignores_volatile_fields_but_not_architecture():
    a, b = tiny_llama_config(), tiny_llama_config()
    b._name_or_path = "/somewhere/else"
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(tiny_llama_config(layers=4))
    assert fingerprint(a, "seed-1") != fingerprint(a, "seed-2")
