"""Communication accounting: computed counts equal what PEFT and torch actually build."""

import pytest

from fedzero.adapters.dema import DeMAConfig, inject_dema
from fedzero.comm import dema_shared_params, full_model_params, lora_params

from conftest import tiny_llama


@pytest.mark.parametrize("placement", ["parallel", "side"])
@pytest.mark.parametrize("share", ["experts-only", "shape-matched"])
def test_dema_count_matches_built_adapter_and_method_example(share, placement):
    cfg = DeMAConfig(rank=8, num_experts=3, num_slots=4, share=share, placement=placement)
    model = tiny_llama()
    assert dema_shared_params(cfg, model.config.hidden_size) == inject_dema(model, cfg).num_shared_parameters()
    # method.md: defaults r=64, M=4, S=8 -> experts and gates 8*4*2*64*64 + 8*4*64 = 264,192, plus
    # (shape-matched, the default) the width's projector bank 8 slots x 2 x d x 64
    assert dema_shared_params(DeMAConfig(share="experts-only")) == 264_192
    assert dema_shared_params(DeMAConfig(), 4096) == 264_192 + 8 * 2 * 4096 * 64
    with pytest.raises(ValueError, match="hidden_size"):
        dema_shared_params(DeMAConfig())


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_lora_count_matches_peft(kv_heads):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(hidden=32, layers=3, heads=4, kv_heads=kv_heads)
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(model.config, 16) == trainable


def test_full_model_count_matches_torch():
    model = tiny_llama(hidden=32, layers=3, heads=4, kv_heads=2)
    assert full_model_params(model.config) == sum(p.numel() for p in model.parameters())


def test_unknown_lora_target_is_refused():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora_params(tiny_llama().config, 4, targets=("wq",))
