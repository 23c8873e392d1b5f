"""Any decoder family can be a client: the layout (decoder layers, each layer's MLP, the final norm,
the attention block) is found from the model's structure, for a tiny random model of every family
transformers ships that fedzero covers; what does not fit gets an error naming what is missing."""

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from fedzero.adapters.dema import DeMAConfig, inject_dema
from fedzero.backbones import BackboneSpec, attention_projections, decoder_layout, fingerprint, load_backbone
from fedzero.distill.distiller import AnchorDistiller, label_branch
from fedzero.data import ByteTokenizer, HFTokenizer

BYTE_TOKENS = {"vocab_size": 259, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
COMMON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
          "max_position_embeddings": 64, **BYTE_TOKENS}
GQA = {"num_key_value_heads": 1}
# model_config per family: tiny, random, the byte tokenizer's vocabulary.
FAMILIES = {
    "llama": GQA, "mistral": GQA, "qwen2": GQA, "qwen3": {**GQA, "head_dim": 16},
    "gemma": {**GQA, "head_dim": 16}, "gemma2": {**GQA, "head_dim": 16}, "gemma3_text": {**GQA, "head_dim": 16},
    "phi3": GQA, "olmo": GQA, "olmo2": GQA, "gpt_neox": {},
}
# What each family's layout looks like (layers, MLP, final norm, attention) and its LoRA targets.
LAYOUTS = {"gpt_neox": ("layers", "mlp", "final_layer_norm", "attention")}
# The layers' norm on the MLP's output (before the residual add): the parallel adapter adds after it.
POST_MLP_NORM = {"gemma2": "post_feedforward_layernorm", "gemma3_text": "post_feedforward_layernorm",
                 "olmo2": "post_feedforward_layernorm"}
ATTENTION = {"phi3": ("self_attn.o_proj", "self_attn.qkv_proj"),
             "gpt_neox": ("attention.query_key_value", "attention.dense")}


def model_config(family: str, **changes) -> dict:
    return {"model_type": family, **COMMON, **FAMILIES[family], **changes}


def build(family: str, seed: int = 1):
    return load_backbone(BackboneSpec(model_config=model_config(family), init_seed=seed, tokenizer="byte"))


DEMA = {"rank": 4, "num_experts": 2, "num_slots": 2}
x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_is_found_from_structure(family):
    model, _ = build(family)
    layout = decoder_layout(model)
    expected = LAYOUTS.get(family, ("layers", "mlp", "norm", "self_attn"))
    assert (layout.layers_name, layout.mlp_name, layout.norm_name, layout.attention_name) == expected
    assert layout.post_mlp_norm_name == POST_MLP_NORM.get(family)
    norms = [layout.post_mlp_norm(layer) for layer in layout.layers]
    assert all((n is None) == (family not in POST_MLP_NORM) for n in norms)
    assert len(layout.layers) == 2 and "norm" in type(layout.final_norm).__name__.lower()
    default = tuple(f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert attention_projections(model) == ATTENTION.get(family, default)


def test_the_post_feed_forward_norm_is_found_by_name_then_by_rule():
    """Names first; else the one …Norm child whose name has the tokens post and mlp/ffn/ff/feedforward
    (post_attention_layernorm never: LLaMA's is the norm before its MLP). Per layer, one name for all."""
    model, _ = build("llama")
    layers = decoder_layout(model).layers
    assert decoder_layout(model).post_mlp_norm_name is None
    layers[1].ffn_post_rmsnorm = nn.LayerNorm(32)          # only in layer 1 (as in hybrid models)
    layers[1].post_ffn_gate = nn.Linear(32, 32)            # not a norm
    layout = decoder_layout(model)
    assert layout.post_mlp_norm_name == "ffn_post_rmsnorm"
    assert layout.post_mlp_norm(layers[0]) is None and layout.post_mlp_norm(layers[1]) is layers[1].ffn_post_rmsnorm
    layers[1].post_mlp_layernorm = nn.LayerNorm(32)        # a listed name wins over the rule
    assert decoder_layout(model).post_mlp_norm_name == "post_mlp_layernorm"
    layers[0].post_feedforward_layernorm = nn.LayerNorm(32)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM: its decoder layers name their post-feed-forward norms "
                                         r"differently \(\['post_feedforward_layernorm', 'post_mlp_layernorm'\]\)"):
        decoder_layout(model)
    layers[0].post_mlp_layernorm = nn.LayerNorm(32)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM: needs at most one post-feed-forward norm in decoder layer 0 "
                                         r"\(LlamaDecoderLayer; children: .*\); found several \(\['post_feedforward_"
                                         r"layernorm', 'post_mlp_layernorm'\]\)"):
        decoder_layout(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_final_norm_found_is_what_the_lm_head_reads(family):
    """The side stream adds its output to the final norm's: that output must be the hidden state the LM
    head turns into logits (Gemma 2's soft-capping, tanh, follows the head)."""
    model, _ = build(family)
    layout = decoder_layout(model)
    seen = []
    handle = layout.final_norm.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        logits = model(input_ids=x).logits
        direct = model.get_output_embeddings()(seen[0])
    handle.remove()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        direct = torch.tanh(direct / cap) * cap
    torch.testing.assert_close(logits, direct)


@pytest.mark.parametrize("placement", ["parallel", "side"])
@pytest.mark.parametrize("family", FAMILIES)
def test_injection_leaves_the_forward_unchanged_and_the_adapter_trains(family, placement):
    model, _ = build(family)
    backbone = [(p, p.detach().clone()) for p in model.parameters()]
    with torch.no_grad():
        reference = model(input_ids=x).logits
    handle = inject_dema(model, DeMAConfig(**DEMA, placement=placement, share="experts-only"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, reference)

    params = {**{f"shared.{k}": p for k, p in handle.shared_parameters().items()},
              **{f"private.{k}": p for k, p in handle.private_parameters().items()}}
    optimizer = torch.optim.Adam(handle.trainable_parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):      # U starts at zero: only from the second step do gradients reach P and the experts
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    no_grad = [k for k, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient reached {no_grad}"
    assert not any(p.requires_grad or p.grad is not None for p, _ in backbone)    # the backbone is frozen
    assert all(torch.equal(p, value) for p, value in backbone)


def _layer0_output_change(family: str, scales) -> tuple[list[float], object, object, list]:
    """Inject parallel DeMA, give layer 0 a random U, and return the change of layer 0's output (the
    residual stream it hands on) for U scaled by each factor, with (model, handle, outputs)."""
    model, _ = build(family)
    layout = decoder_layout(model)
    seen = []
    layout.layers[0].register_forward_hook(lambda module, args, output: seen.append(
        (output[0] if isinstance(output, tuple) else output).detach().clone()))
    handle = inject_dema(model, DeMAConfig(**DEMA, share="experts-only"))
    u = handle.private.layers[0].out_proj.weight
    base = torch.randn(u.shape, generator=torch.Generator().manual_seed(3)) * 0.5
    outputs = []
    for scale in (0, *scales):
        with torch.no_grad():
            u.copy_(base * scale)
            seen.clear()
            model(input_ids=x)
        outputs.append(seen[0])
    return [float((o - outputs[0]).norm()) for o in outputs[1:]], model, handle, outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_the_parallel_adapters_contribution_is_linear_in_its_out_projector(family):
    """The adapter adds to what the residual stream receives from the feed-forward branch: after the
    post-feed-forward norm where the layer has one (Gemma 2/3, OLMo2). Added inside it, the norm would
    rescale mlp(x) + delta and the change would saturate as U grows (Gemma3: 31.9/31.9/31.9 then)."""
    change, *_ = _layer0_output_change(family, (1, 10, 100))
    assert change[0] > 1e-3
    assert change[1] == pytest.approx(10 * change[0], rel=1e-3) and change[2] == pytest.approx(100 * change[0], rel=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "olmo2"])
def test_the_parallel_adapter_adds_its_delta_where_the_residual_stream_receives_the_feed_forward_output(family):
    """LLaMA: the wrapped MLP returns mlp(x) + U·mixture(P·x), bit for bit as before post-norms were
    handled. Gemma3, OLMo2: the MLP's output is untouched and layer 0 hands on exactly what it did at
    U = 0, plus delta (x: the MLP's input, as the MLP reads it: OLMo2's is the raw residual)."""
    model, _ = build(family)
    layout = decoder_layout(model)
    layer = layout.layers[0]
    handle = inject_dema(model, DeMAConfig(**DEMA, share="experts-only"))
    wrapped = layout.mlp(layer)
    with torch.no_grad():
        handle.private.layers[0].out_proj.weight.normal_(generator=torch.Generator().manual_seed(4))
    seen = {}
    hooks = [wrapped.register_forward_hook(lambda m, args, out: seen.update(x=args[0], mlp=out)),
             layer.register_forward_hook(lambda m, args, out: seen.update(layer=out[0] if isinstance(out, tuple) else out))]
    with torch.no_grad():
        model(input_ids=x)
        projectors, mixture = handle.private.layers[0], handle.shared.slots[0]
        delta = projectors.out_proj(mixture(projectors.in_proj(seen["x"])))
        base_mlp = wrapped.base_layer(seen["x"])
        assert delta.abs().max() > 1e-2
        if family == "llama":
            assert layout.post_mlp_norm(layer) is None
            assert torch.equal(seen["mlp"], base_mlp + delta)
            return
        assert torch.equal(seen["mlp"], base_mlp)
        layer_with_adapter = seen["layer"]
        projectors.out_proj.weight.zero_()
        model(input_ids=x)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(layer_with_adapter, seen["layer"] + delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_delta_after_the_post_feed_forward_norm(reentrant):
    """Checkpointing re-runs each layer's forward in backward; the non-reentrant kind stops once it has
    what backward needs (inside the post-feed-forward norm, before its hook adds the delta), leaving
    that delta pending. The gradients equal those without checkpointing, also for a second backward
    through the same graph (a second re-run) and in the next step."""
    grads, losses = [], []
    for checkpointing in (False, True):
        model, _ = build("gemma3_text")
        handle = inject_dema(model, DeMAConfig(**DEMA, share="experts-only"))
        with torch.no_grad():
            for layer in handle.private.layers:
                layer.out_proj.weight.normal_(std=0.3, generator=torch.Generator().manual_seed(5))
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
        for _ in range(2):
            model.zero_grad()
            loss = model(input_ids=x, labels=x).loss
            loss.backward(retain_graph=True)
            loss.backward()
        losses.append(loss.item())
        grads.append({k: p.grad.clone() for k, p in handle.private_parameters().items()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-7)


class PostNormLayer(nn.Module):
    """A decoder layer with a post-feed-forward norm, calling its parts in the order given."""

    def __init__(self, order: str):
        super().__init__()
        self.order = order
        self.mlp = nn.Linear(8, 8)
        self.post_feedforward_layernorm = nn.LayerNorm(8)

    def forward(self, h):
        if self.order == "norm-before-mlp":
            return h + self.mlp(self.post_feedforward_layernorm(h))
        if self.order == "no-norm":
            return h + self.mlp(h)
        return h + self.post_feedforward_layernorm(self.mlp(h))


@pytest.mark.parametrize("order, error", [
    ("norm-before-mlp", r"post_feedforward_layernorm \(LayerNorm\) ran without a DeMA delta pending: it is not applied "
                        r"after the layer's feed-forward block"),
    ("no-norm", r"PostNormLayer returned without applying its post_feedforward_layernorm after the feed-forward "
                r"block: DeMA's delta, added after that norm, would be lost"),
])
def test_a_post_feed_forward_norm_not_used_as_the_layout_takes_it_is_refused(order, error):
    from fedzero.adapters.dema.layer import DeMAParallelMLP, PostNormDelta, Projectors, SlotMixture

    torch.manual_seed(0)
    layer = PostNormLayer("mlp-then-norm")
    projectors, mixture = Projectors(8, 4), SlotMixture(4, 2, 4, 1.0)
    mixture.reset_parameters(torch.Generator().manual_seed(0))
    nn.init.normal_(projectors.out_proj.weight)
    reference = layer(torch.ones(3, 8))
    after = PostNormDelta(layer, layer.post_feedforward_layernorm, "post_feedforward_layernorm")
    layer.mlp = DeMAParallelMLP(layer.mlp, projectors, mixture, after)
    assert "delta added after post_feedforward_layernorm" in repr(layer)
    h = torch.ones(3, 8)
    delta = projectors.out_proj(mixture(projectors.in_proj(h)))
    torch.testing.assert_close(layer(h), reference + delta)
    # A delta left pending outside a layer call (a forward that raised midway) is dropped, never added.
    layer.mlp(h * 7)
    torch.testing.assert_close(layer(h), reference + delta)
    assert after.pending is None
    layer.order = order
    with pytest.raises(RuntimeError, match=error):
        layer(h)
    assert after.pending is None
    layer.order = "mlp-then-norm"
    torch.testing.assert_close(layer(h), reference + delta)


@pytest.mark.parametrize("share", ["experts-only", "shape-matched"])
def test_shared_state_is_the_same_across_families(share):
    """Equal r, M, S (and width, for shape-matched projectors): equal keys, shapes and initial values,
    so clients of different families aggregate."""
    states = {}
    for family in FAMILIES:
        model, _ = build(family)
        states[family] = inject_dema(model, DeMAConfig(**DEMA, share=share)).shared_state_dict()
    reference = states["llama"]
    assert any(k.startswith("proj.h32.") for k in reference) == (share == "shape-matched")
    for family, state in states.items():
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}, family
        assert all(torch.equal(state[k], reference[k]) for k in state), family


def test_fingerprints_differ_across_families_and_keep_the_llama_ones():
    from transformers import AutoConfig

    prints = {family: build(family)[1] for family in FAMILIES}
    assert len(set(prints.values())) == len(FAMILIES)
    # LLaMA's fingerprint hashes the same fields as before families were found structurally.
    llama = AutoConfig.for_model(**model_config("llama"))
    legacy = {key: llama.to_dict().get(key) for key in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings",
        "hidden_act", "rms_norm_eps")}
    legacy["identity"] = "random-init-seed-1"
    assert prints["llama"] == hashlib.sha256(json.dumps(legacy, sort_keys=True, default=str).encode()).hexdigest()[:12]
    # Within a family, a field only that family has still tells two backbones apart.
    a = AutoConfig.for_model(**model_config("gemma2"))
    b = AutoConfig.for_model(**model_config("gemma2", final_logit_softcapping=10.0))
    assert fingerprint(a) != fingerprint(b)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox"])
def test_lora_baseline_targets_the_attention_projections_and_trains(family):
    from fedzero.baselines import LoRAClient, LoRASettings
    from fedzero.client.local import TrainSettings

    model, fp = build(family)
    ids = torch.arange(12) * 5 % 64
    examples = [{"input_ids": ids, "labels": ids.clone()} for _ in range(4)]
    settings = TrainSettings(local_steps=3, batch_size=2, lr=1e-2, schedule="constant")
    client = LoRAClient("c", model, fp, examples, examples, settings, LoRASettings(rank=2), pad_id=258,
                        seed=0, total_rounds=1)
    targets = ATTENTION.get(family, tuple(f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")))
    assert client.lora.targets == targets
    before = client.lora_state()
    assert {k.split(".layers.")[1].split(".", 1)[1].rsplit(".lora_", 1)[0] for k in before} == set(targets)
    after, metrics = client.train_round()
    assert np.isfinite(metrics["train_loss"])
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_lora_settings_without_a_model_keep_llamas_targets():
    from fedzero.baselines import LoRASettings

    assert LoRASettings(rank=2).peft_config().target_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])


def test_a_model_that_does_not_fit_is_refused_with_what_is_missing():
    from transformers import AutoConfig, AutoModelForMaskedLM

    with pytest.raises(ValueError, match=r"Toy: not a transformers model \(no config or get_decoder\(\)\)"):
        inject_dema(Toy(), DeMAConfig(**DEMA))
    # An encoder's layers are found, but no norm follows them (post-LN): nothing for the side stream.
    encoder = AutoModelForMaskedLM.from_config(AutoConfig.for_model(
        "bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=259))
    with pytest.raises(ValueError, match=r"BertForMaskedLM: needs exactly one final norm \(a …Norm module registered "
                                         r"after the layers\) in BertEncoder \(children: layer \(ModuleList\)\); "
                                         r"found none \(how layouts are found: docs/backbones.md\)"):
        inject_dema(encoder, DeMAConfig(**DEMA))
    # A config that disagrees with the structure: no layer list of that length.
    model, _ = build("qwen3")
    model.config.num_hidden_layers = 5
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM: needs exactly one decoder layer list of length "
                                         r"num_hidden_layers=5 in Qwen3Model \(children: embed_tokens \(Embedding\), "
                                         r"layers \(ModuleList\), norm \(Qwen3RMSNorm\).*\); found none"):
        decoder_layout(model)
    # load_backbone refuses before building the weights
    with pytest.raises(ValueError, match="BertLMHeadModel: needs exactly one final norm"):
        load_backbone(BackboneSpec(model_config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                                                 "num_attention_heads": 2, "vocab_size": 259, "pad_token_id": 0}))


class TupleMLP(nn.Module):
    def forward(self, x):
        return x, None          # e.g. a mixture-of-experts block that also returns its router logits


def test_a_feed_forward_block_that_returns_no_hidden_state_is_refused_at_the_first_forward():
    model, _ = build("llama")
    layout = decoder_layout(model)
    for layer in layout.layers:
        layer.mlp = TupleMLP()
    inject_dema(model, DeMAConfig(**DEMA))
    with pytest.raises(TypeError, match=r"TupleMLP \(the decoder layer's feed-forward block\) returns a tuple for an "
                                        r"input of shape \(2, 10, 32\); DeMA's parallel placement needs a hidden state"):
        model(input_ids=x)


@pytest.mark.parametrize("fields, message", [
    ({"hidden_size": 32}, r"model_config.model_type: None is not a transformers model type with a causal LM"),
    ({"model_type": "nope"}, r"model_config.model_type: 'nope' is not"),
    ({"model_type": "qwen3", "hiden_size": 32}, r"model_config: Qwen3Config has no field\(s\) \['hiden_size'\]"),
    ({"model_type": "phi3", "vocab_size": 259}, r"model_config.pad_token_id: 32000 is outside vocab_size 259"),
    ({"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4},
     r"model_config \(LlamaConfig\): The hidden size \(30\) is not a multiple of the number of attention heads"),
])
def test_model_config_errors_name_the_field_and_the_reason(fields, message):
    with pytest.raises(ValueError, match=message):
        BackboneSpec(model_config=fields)


def test_a_backbone_is_given_one_way():
    with pytest.raises(ValueError, match="exactly one of 'path'.*got \\['llama_config', 'model_config'\\]"):
        BackboneSpec(llama_config={}, model_config=model_config("llama"))


def word_tokenizer(tmp_path) -> HFTokenizer:
    """A word-level HF tokenizer (a vocabulary unlike the byte tokenizer's), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "Tweet", ":", "Sentiment", "anchor", "negative", "neutral",
             "positive"] + [str(i) for i in range(6)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                 unk_token="[UNK]")
    hf.save_pretrained(tmp_path / "words")
    from fedzero.data import load_tokenizer

    return load_tokenizer(str(tmp_path / "words"))


def test_label_distillation_across_vocabularies(tmp_path):
    """Each client scores the label words with its own tokenizer: the byte tokenizer needs whole
    completions (" neutral" and " negative" share " ne"), the word tokenizer one token; both send
    [anchors, labels] and learn from the other's predictions."""
    labels = ["negative", "neutral", "positive"]
    prompts = [f"Tweet: anchor {i}\nSentiment:" for i in range(4)]
    words = word_tokenizer(tmp_path)
    assert label_branch(ByteTokenizer(), labels) is None and label_branch(words, labels) == ([], [8, 9, 10])
    clients = []
    for family, tok in (("llama", ByteTokenizer()), ("gpt_neox", words)):
        tokens = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                  "pad_token_id": tok.pad_token_id}
        model, _ = load_backbone(BackboneSpec(model_config=model_config(family, **tokens), init_seed=1))
        handle = inject_dema(model, DeMAConfig(**DEMA))
        distiller = AnchorDistiller(tok, prompts, labels, weight=1.0, batch_size=2, max_length=32, seed=0)
        clients.append((handle, distiller))
    predictions = [d.predict(h.model) for h, d in clients]
    assert all(p.shape == (4, 3) and np.allclose(p.sum(1), 1) for p in predictions)
    for (handle, distiller), teacher in zip(clients, predictions[::-1]):
        distiller.set_teacher(teacher)
        loss = distiller.loss(handle.model, 0)
        loss.backward()
        assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0
                                            for p in handle.trainable_parameters())


def test_simulate_federates_clients_of_two_families(tmp_path):
    from fedzero.cli import main
    from test_simulate import tiny_run

    cfg = yaml.safe_load(tiny_run(tmp_path, strategy="cmga", rounds=1).read_text())
    cfg["clients"][1]["backbone"] = {"model_config": model_config("gpt_neox", hidden_size=24, num_hidden_layers=3,
                                                                  num_attention_heads=3, intermediate_size=48),
                                     "init_seed": 2, "tokenizer": "byte"}
    path = tmp_path / "families.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["simulate", "--config", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [c["num_layers"] for c in summary["clients"]] == [2, 3]
    assert len({c["fingerprint"] for c in summary["clients"]}) == 2
    assert all(np.isfinite(c["train_loss"]) for c in summary["rounds"][0]["clients"])


def test_a_multimodal_checkpoints_text_decoder_takes_dema():
    """AutoModelForCausalLM builds a model_type 'gemma3' checkpoint (Gemma 3 4B and up) as
    Gemma3ForConditionalGeneration: its config keeps the text sizes in text_config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text = {**COMMON, **GQA, "head_dim": 16, "vocab_size": 300}
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "image_size": 28, "patch_size": 14}
    config = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                  boi_token_index=297, eoi_token_index=298, image_token_index=299)
    for placement in ("parallel", "side"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            reference = model(input_ids=x).logits
        handle = inject_dema(model, DeMAConfig(**DEMA, placement=placement))
        assert handle.hidden_size == 32 and handle.num_layers == 2
        with torch.no_grad():
            assert torch.equal(model(input_ids=x).logits, reference)


def test_fingerprints_read_sizes_under_each_familys_own_names_and_in_text_config():
    """GPT-2 keeps its width and depth as n_embd and n_layer, MPT as d_model and n_layers, Bloom its
    depth as n_layer; a multimodal Gemma 3 keeps them in text_config: backbones of different sizes
    must not share a fingerprint (FedIT federates, CMGA groups, clients by it)."""
    from transformers import AutoConfig

    pairs = [({"model_type": "gpt2", "n_embd": 768, "n_layer": 12}, {"model_type": "gpt2", "n_embd": 1024, "n_layer": 24}),
             ({"model_type": "mpt", "d_model": 256, "n_layers": 2}, {"model_type": "mpt", "d_model": 512, "n_layers": 2}),
             ({"model_type": "bloom", "n_layer": 2}, {"model_type": "bloom", "n_layer": 4}),
             ({"model_type": "gemma3", "text_config": {"hidden_size": 32}},
              {"model_type": "gemma3", "text_config": {"hidden_size": 64}})]
    for a, b in pairs:
        assert fingerprint(AutoConfig.for_model(**a)) != fingerprint(AutoConfig.for_model(**b)), a


def test_lora_baseline_on_gpt2_targets_its_conv1d_projections():
    """GPT-2's attention projections are transformers Conv1D modules (PEFT adapts them), not nn.Linear."""
    from fedzero.baselines import LoRAClient, LoRASettings
    from fedzero.client.local import TrainSettings

    config = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, **BYTE_TOKENS}
    model, fp = load_backbone(BackboneSpec(model_config=config, init_seed=1, tokenizer="byte"))
    assert attention_projections(model) == ("attn.c_attn", "attn.c_proj")
    ids = torch.arange(12) * 5 % 64
    examples = [{"input_ids": ids, "labels": ids.clone()} for _ in range(4)]
    settings = TrainSettings(local_steps=3, batch_size=2, lr=1e-2, schedule="constant")
    client = LoRAClient("c", model, fp, examples, examples, settings, LoRASettings(rank=2), pad_id=258,
                        seed=0, total_rounds=1)
    before = client.lora_state()
    assert len(before) == 2 * 2 * 2            # layers x projections x (A, B)
    after, metrics = client.train_round()
    assert np.isfinite(metrics["train_loss"])
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_lora_defaults_on_a_model_without_attention_in_every_layer_say_what_to_give():
    from fedzero.baselines import LoRAClient, LoRASettings
    from fedzero.client.local import TrainSettings

    model, fp = build("llama")
    del decoder_layout(model).layers[1].self_attn      # as in hybrid models: some layers hold no attention
    ids = torch.arange(12) * 5 % 64
    examples = [{"input_ids": ids, "labels": ids.clone()}]
    with pytest.raises(ValueError, match=r"LlamaForCausalLM: no attention block found in every decoder layer "
                                         r"\(layer 1: mlp \(LlamaMLP\), .*\); the LoRA baselines need their "
                                         r"targets given: LoRASettings\(targets=\.\.\.\)"):
        LoRAClient("c", model, fp, examples, examples, TrainSettings(local_steps=1, batch_size=1), LoRASettings(rank=2),
                   pad_id=258, seed=0, total_rounds=1)
