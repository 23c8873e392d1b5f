"""docs/your_data.md, walked through verbatim: its `# run.yaml` block is written as run.yaml, its bash
blocks run in order in one directory, on data (with the page's two example records) and a tiny
local HF model directory (word-level tokenizer, LLaMA layout) that this test creates."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "your_data.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)


def make_data(work: Path) -> None:
    examples = [json.loads(line) for line in blocks("json")[0].splitlines()]
    assert {e["topic"] for e in examples} == {"books", "audio"}
    rng = random.Random(0)
    words = {"books": (["plot", "pages", "characters", "ending"], ["drags", "bores", "shines", "grips"]),
             "audio": (["sound", "bass", "battery", "fit"], ["crackles", "fails", "sings", "lasts"])}
    records = list(examples)
    for topic, (nouns, verbs) in words.items():
        for i in range(40):
            verb = rng.randrange(4)
            label = "negative" if verb < 2 else "positive"
            records.append({"prompt": f"Review: the {rng.choice(nouns)} {verbs[verb]}\nSentiment:",
                            "completion": f" {label}", "label": label, "topic": topic})
    with open(work / "all.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def make_model(work: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = (work / "all.jsonl").read_text() + " lovely great value crisp"
    vocab = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + sorted(set(re.findall(r"\w+|[^\w\s]", text)))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                  unk_token="[UNK]")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(work / "models" / "my-model")
    tok.save_pretrained(work / "models" / "my-model")


@pytest.mark.slow
def test_the_bring_your_own_data_page_runs_verbatim(tmp_path):
    work = tmp_path
    make_data(work)
    make_model(work)
    (yaml_block,) = [b for b in blocks("yaml") if b.startswith("# run.yaml\n")]
    (work / "run.yaml").write_text(yaml_block)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    outputs = []
    for block in blocks("bash"):
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"{block}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    split, memory, runs, used = outputs
    assert "client0:" in split and (work / "parts" / "client1.test.jsonl").is_file()
    for part, topic in (("client0", "audio"), ("client1", "books")):       # as the page's run.yaml says
        lines = (work / "parts" / f"{part}.train.jsonl").read_text().splitlines()
        assert {json.loads(line)["topic"] for line in lines} == {topic}
    assert memory.startswith("my-model: ")
    for run in ("mine", "mine-local"):
        summary = json.loads((work / "runs" / run / "summary.json").read_text())
        assert [row["id"] for row in summary["final"]] == ["audio", "books"]
        assert all("accuracy_after" in row for row in summary["final"])     # the records' labels were scored
    assert "books" in runs and "audio" in runs
    assert (work / "adapters" / "books" / "adapter_config.json").is_file()
    assert "accuracy" in used
