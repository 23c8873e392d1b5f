import pytest
import torch


def tiny_llama_config(hidden=32, layers=3, heads=4, kv_heads=2, vocab=64, inter=None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter or 2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=128)


def tiny_llama(seed=0, **kwargs):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**kwargs))
    model.eval()
    return model


@pytest.fixture
def tiny_model():
    return tiny_llama()


def with_random_adapter(model, adapter: str):
    """`model` with an adapter whose output is not zero, so it changes what the model computes:
    "none", "dema-parallel" / "dema-side" (DeMA with random out-projectors) or "lora" (PEFT LoRA r=2
    with random B). Returns the model to score (the PEFT wrapper for "lora")."""
    from fedzero.adapters.dema import DeMAConfig, inject_dema

    if adapter.startswith("dema"):
        handle = inject_dema(model, DeMAConfig(rank=4, num_experts=2, num_slots=2, placement=adapter.split("-")[1]))
        with torch.no_grad():
            for p in handle.private_parameters().values():
                p.normal_(0, 0.5)
    elif adapter == "lora":
        from peft import get_peft_model

        from fedzero.baselines import LoRASettings
        model = get_peft_model(model, LoRASettings(rank=2).peft_config())
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    return model
