"""`fedzero memory-estimate --model` on a local model directory, and docs/cluster.md's memory table
and activation figures regenerated from the command (they cannot drift from the code)."""

import json
import re
from pathlib import Path

from fedzero.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODELS = [str(ROOT / f"configs/models/llama-2-{s}.json") for s in ("7b", "13b", "70b")]


def test_docs_memory_table_is_the_commands_output(capsys):
    assert main(["memory-estimate", "--model", *MODELS, "--gpus", "8", "--nodes", "1", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    assert table.count("\n") == 2 + 9 - 1          # header, separator, 3 rows per model
    assert table in (ROOT / "docs" / "cluster.md").read_text()


def test_docs_activation_figures_are_the_commands(capsys):
    assert main(["memory-estimate", "--model", *MODELS, "--gpus", "8", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    gib = [[round(v / 2**30, 1) for v in results[name]["activations"].values()]
           for name in ("llama-2-7b", "llama-2-13b", "llama-2-70b")]
    doc = " ".join((ROOT / "docs" / "cluster.md").read_text().split())
    whole, ckpt, side = ([round(g[i]) if i == 0 else g[i] for g in gib] for i in range(3))
    assert f"{whole[0]} / {whole[1]} / {whole[2]} GiB" in doc
    assert f"{ckpt[0]} / {ckpt[1]} / {ckpt[2]} GiB with activation checkpointing" in doc
    assert f"{side[0]} / {side[1]} / {side[2]} GiB for DeMA `side`" in doc


def test_a_model_directory_is_read_like_its_config_json(tmp_path, capsys):
    from transformers import Qwen2Config

    model_dir = tmp_path / "my-qwen"
    Qwen2Config(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=512, vocab_size=1000).save_pretrained(model_dir)   # no weights needed
    assert main(["memory-estimate", "--model", str(model_dir), "--gpus", "2", "--json"]) == 0
    from_dir = json.loads(capsys.readouterr().out)
    assert main(["memory-estimate", "--model-config", str(model_dir / "config.json"), "--gpus", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_dir
    assert from_dir["dema_shared"] > 0 and from_dir["params"] > 256 * 1000
    assert main(["memory-estimate", "--model", str(model_dir), "--gpus", "2"]) == 0
    assert capsys.readouterr().out.startswith("my-qwen: ")


def test_model_mistakes_are_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["memory-estimate", "--model", str(tmp_path / "empty"), "--gpus", "1"]) == 2
    assert f"{tmp_path / 'empty'}: a model directory needs a config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert main(["memory-estimate", "--model", str(tmp_path), "--gpus", "1"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"config\.json: needs 'num_hidden_layers', 'num_attention_heads', 'intermediate_size', 'vocab_size'", err)
