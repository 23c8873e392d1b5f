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
