"""Memory a client needs, from a backbone's config.json alone (no weights): DeMA-only training
under ZeRO-3 (with and without CPU offload) next to full fine-tuning and LoRA.

Model states (parameters, gradients, optimizer state), per GPU and per node
------------------------------------------------------------------------------
Full fine-tuning is DeepSpeed's own estimate (deepspeed.runtime.zero.stage3.
estimate_zero3_model_states_mem_needs, zero_init=True, buffer factor 1.5): 18 bytes per parameter
(bf16 parameter and gradient, fp32 master, Adam m and v), partitioned over all GPUs or, with offload,
held in CPU memory, plus 4 bytes per parameter of the largest layer on the GPU while it is gathered.

With adapters only, the same estimator is applied to the trainable parameters, and the frozen
backbone adds just its bf16 weights (2 bytes per parameter: no gradient, no optimizer state):
    ZeRO-3:          2·P/G bytes per GPU (G = all GPUs), plus the gathered largest layer (2 bytes
                     per parameter: no gradient for a frozen layer);
    ZeRO-3+offload:  2·P/nodes bytes of CPU memory per node (× the buffer factor), nothing on the GPU
                     but the gathered layer.

Activations, per GPU, for one micro-batch (b sequences of s tokens, bf16), stated roughly (±30%)
-----------------------------------------------------------------------------------------------
Per decoder layer and token the backward pass keeps about (8·d + 3·d_kv + 4·i) values (layer input,
normed inputs, q/k/v before and after rotary, attention output, gate/up/SiLU/product of the MLP),
assuming SDPA/flash attention (no s×s score matrix stored). The loss adds b·s·V·10 bytes (bf16
logits, their fp32 copy and its gradient).
- DeMA `parallel` (and LoRA, and full fine-tuning): the gradient of every adapter flows down
  through the frozen layers above it, so every layer keeps its activations, as in full fine-tuning.
- With activation checkpointing: only each layer's input (2·d bytes per token) plus one layer's
  full set.
- DeMA `side`: the backbone runs without autograd; only the r-wide side stream is kept
  (~4·r values per token and layer), plus the loss.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedzero.adapters.dema import DeMAConfig
from fedzero.comm import full_model_params, lora_params

GIB = 1 << 30


def load_model_config(path: str | Path) -> dict:
    """A backbone's config: a local HF model directory (its config.json; no weights are read) or a
    config.json file itself."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: a model directory needs a config.json (none there)")
        path = path / "config.json"
    elif not path.is_file():
        raise FileNotFoundError(f"no model directory or config.json at {path}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a model config.json must be a JSON object")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
               if k not in cfg]
    if missing:
        raise ValueError(f"{path}: needs {', '.join(repr(k) for k in missing)} (a Hugging Face config.json of a "
                         "decoder with the usual key names)")
    if "model_type" not in cfg:
        raise ValueError(f"{path}: needs 'model_type' (e.g. \"llama\"): it names the architecture to count DeMA on")
    return cfg


def model_name(path: str | Path) -> str:
    """What a table calls the model: the directory's name, or the config file's name without .json."""
    path = Path(path).expanduser()
    if path.is_dir() or path.name == "config.json":
        return (path if path.is_dir() else path.parent).resolve().name
    return path.stem


def _dims(cfg: dict) -> tuple[int, int, int, int, int, int]:
    d, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or d // heads
    return d, layers, heads * head_dim, kv * head_dim, cfg["intermediate_size"], cfg["vocab_size"]


def largest_layer_params(cfg: dict) -> int:
    """Parameters of the largest single module (what ZeRO-3 gathers at once): usually the embedding."""
    d, _, q, _, inter, vocab = _dims(cfg)
    return max(vocab * d, d * inter, d * q)


def dema_params(cfg: dict, dema: DeMAConfig) -> tuple[int, int]:
    """(shared, private) DeMA parameter counts for this backbone: inject_dema on the backbone built on
    the meta device (no memory, no weights). Anchor projectors need a forward pass on real weights,
    so they are counted as learned ones (an upper bound: a frozen anchor projector has no parameters)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedzero.adapters.dema import inject_dema

    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        handle = inject_dema(model, dema.learned_stand_in())
    return (sum(p.numel() for p in handle.shared_parameters().values()),
            sum(p.numel() for p in handle.private_parameters().values()))


@dataclass
class Line:
    method: str
    trainable: int
    zero3_gpu: int          # bytes per GPU, ZeRO-3
    zero3_cpu: int          # bytes per node (CPU), ZeRO-3
    offload_gpu: int        # bytes per GPU, ZeRO-3 + offload of parameters and optimizer
    offload_cpu: int        # bytes per node (CPU), ZeRO-3 + offload


def _ds_estimate(total: int, largest: int, gpus: int, nodes: int, offload: bool, factor: float) -> tuple[int, int]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, num_nodes=nodes,
                                                        cpu_offload=offload, cpu_offload_params=offload,
                                                        zero_init=True, additional_buffer_factor=factor)
    return gpu, cpu


def _adapter_line(method: str, trainable: int, total: int, largest: int, gpus: int, nodes: int, factor: float) -> Line:
    frozen = total
    gathered = 2 * largest                               # bf16 weights of the largest frozen layer
    g3, c3 = _ds_estimate(trainable, 0, gpus, nodes, False, factor)
    go, co = _ds_estimate(trainable, 0, gpus, nodes, True, factor)
    # ZeRO-3 without offload stages a gathered layer in CPU memory while loading (DeepSpeed's rule).
    load_buffer = int(largest * 4 * gpus * factor)
    return Line(method, trainable,
                zero3_gpu=g3 + gathered + 2 * frozen // (gpus * nodes), zero3_cpu=c3 + load_buffer,
                offload_gpu=go + gathered, offload_cpu=co + int(2 * frozen / nodes * factor))


def activation_bytes(cfg: dict, *, seq_len: int, micro_batch: int, dema: DeMAConfig) -> dict[str, int]:
    d, layers, _, kv, inter, vocab = _dims(cfg)
    tokens = seq_len * micro_batch
    per_layer = 2 * tokens * (8 * d + 3 * kv + 4 * inter)
    loss = 10 * tokens * vocab
    return {
        "all layers (full FT, LoRA, DeMA parallel)": layers * per_layer + loss,
        "with activation checkpointing": layers * 2 * tokens * d + per_layer + loss,
        "DeMA side placement": layers * 2 * tokens * 4 * dema.rank + per_layer + loss,
    }


def estimate(cfg: dict, *, gpus_per_node: int, nodes: int = 1, dema: DeMAConfig | None = None, lora_rank: int = 16,
             seq_len: int = 4096, micro_batch: int = 1, buffer_factor: float = 1.5) -> dict:
    if gpus_per_node < 1 or nodes < 1:
        raise ValueError(f"--gpus and --nodes must be >= 1, got {gpus_per_node}, {nodes}")
    dema = dema or DeMAConfig()
    total, largest = full_model_params(cfg), largest_layer_params(cfg)
    shared, private = dema_params(cfg, dema)
    lora = lora_params(cfg, lora_rank)
    g3, c3 = _ds_estimate(total, largest, gpus_per_node, nodes, False, buffer_factor)
    go, co = _ds_estimate(total, largest, gpus_per_node, nodes, True, buffer_factor)
    lines = [
        Line("full fine-tuning", total, g3, c3, go, co),
        _adapter_line(f"LoRA r={lora_rank} (q,k,v,o)", lora, total, largest, gpus_per_node, nodes, buffer_factor),
        _adapter_line(f"DeMA r={dema.rank} M={dema.num_experts} S={dema.num_slots} ({dema.placement})",
                      shared + private, total, largest, gpus_per_node, nodes, buffer_factor),
    ]
    return {"params": total, "largest_layer": largest, "dema_shared": shared, "dema_private": private,
            "lora": lora, "gpus_per_node": gpus_per_node, "nodes": nodes, "seq_len": seq_len,
            "micro_batch": micro_batch, "lines": [asdict(line) for line in lines],
            "activations": activation_bytes(cfg, seq_len=seq_len, micro_batch=micro_batch, dema=dema)}


def _gib(n: int) -> str:
    return f"{n / GIB:9.1f}"


def format_estimate(est: dict, name: str = "") -> str:
    g, n = est["gpus_per_node"], est["nodes"]
    out = [f"{name or 'model'}: {est['params'] / 1e9:.2f}B parameters (largest layer {est['largest_layer'] / 1e6:.0f}M); "
           f"{n} node(s) x {g} GPU(s); DeMA {est['dema_shared']:,} shared + {est['dema_private']:,} private, "
           f"LoRA {est['lora']:,} trainable",
           "",
           "model states (params, grads, optimizer), GiB       ZeRO-3              ZeRO-3 + offload (params+optim)",
           f"{'method':<40}{'trainable':>12}{'per GPU':>10}{'CPU/node':>10}{'per GPU':>12}{'CPU/node':>10}"]
    for line in est["lines"]:
        out.append(f"{line['method']:<40}{line['trainable']:>12,}{_gib(line['zero3_gpu']):>10}"
                   f"{_gib(line['zero3_cpu']):>10}{_gib(line['offload_gpu']):>12}{_gib(line['offload_cpu']):>10}")
    out += ["",
            f"activations per GPU, micro-batch {est['micro_batch']} x {est['seq_len']} tokens, bf16, SDPA/flash "
            f"attention (rough, ±30%; add them to the per-GPU figures above):"]
    for what, value in est["activations"].items():
        out.append(f"  {what:<44}{_gib(value)} GiB")
    out.append("Full fine-tuning: DeepSpeed's estimator (zero_init, buffer factor 1.5). Adapters: the same estimator "
               "on the trainable parameters + 2 bytes per frozen parameter (see fedzero/memory.py).")
    return "\n".join(out)


def markdown_rows(est: dict, name: str) -> list[str]:
    """docs/cluster.md's table rows for one backbone (model states in GiB)."""
    rows = []
    for i, line in enumerate(est["lines"]):
        t = line["trainable"]
        trainable = f"{t / 1e9:.2f}B" if t >= 1e9 else f"{t / 1e6:.2f}M"
        rows.append(f"| {name if i == 0 else ''} | {line['method']} | {trainable} | {line['zero3_gpu'] / GIB:.1f} | "
                    f"{line['zero3_cpu'] / GIB:.1f} | {line['offload_gpu'] / GIB:.1f} | {line['offload_cpu'] / GIB:.1f} |")
    return rows


MARKDOWN_HEADER = ["| backbone | method | trainable | ZeRO-3 per GPU | ZeRO-3 CPU/node | offload per GPU | offload CPU/node |",
                   "|---|---|---|---|---|---|---|"]
