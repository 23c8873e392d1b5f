"""The canonical projector's round-0 exchange: the protocol of canonical.py split between clients and
the aggregator, so that it runs through the store (docs/method.md, "A canonical shared space").

    client k:    H_l = anchor states of each decoder layer l     (read_anchor_states; stays here)
                 Q_l = client_basis(H_l, m)                       (client_bases) -> the store
    aggregator:  G_s = canonical_targets(every Q_l of slot s, weights 1/n per client's n layers in s)
                                                                  (slot_targets) -> the store, write-once
    client k:    (mu_l, W_l) = fit_projection(H_l, G_slot(l), ridge)   (fit_client) -> its private map

slot_targets and fit_client are fit_canonical's two halves: on the same states, in client-id order,
they give its (mu, W) bit for bit (tests/test_canonical_exchange.py). The (mu, W) are saved beside the
client's private part (save_map / load_map: `canonical.safetensors` in the directory of its private
parts), so a restarted client, and `fedzero export`, need no exchange.

Until its map is set, a model injected for the exchange (inject_awaiting_map) holds zero maps and
refuses every forward except the reading of its anchor states (its out-projectors are zero then, so the
adapters change nothing the backbone computes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fedzero.backbones import decoder_layout

from .anchors import DEFAULT_ANCHOR_FILE, load_anchor_texts, pooled_hidden_states
from .canonical import adapter_input_modules, canonical_targets, client_basis, fit_projection
from .config import DeMAConfig
from .model import DeMAModel, inject_dema

MAP_FILE = "canonical.safetensors"      # beside the client's private parts
MAP_FORMAT = "fedzero-dema-canonical"
MAX_LENGTH = 64                         # tokens read per anchor text (the anchor projector's too)

Map = list[tuple[torch.Tensor, torch.Tensor]]     # per decoder layer (mu [d], W [d, r])


# =========================================================================== the anchor set

@dataclass(frozen=True)
class AnchorSet:
    texts: list[str]
    digest: str           # sha256 of the texts (JSON list, UTF-8): what every client must agree on
    source: str           # the file they came from (dema.anchor_file, or the bundled set)


def anchor_set(config: DeMAConfig) -> AnchorSet:
    """The first dema.num_anchors texts of dema.anchor_file (or the bundled set), and their digest."""
    path = Path(config.anchor_file) if config.anchor_file else DEFAULT_ANCHOR_FILE
    texts = load_anchor_texts(path, config.num_anchors)
    source = str(path) if config.anchor_file else f"the bundled anchors ({path.name})"
    return AnchorSet(texts, texts_digest(texts), source)


def texts_digest(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()


# =========================================================================== the client's reading

def read_anchor_states(model, tokenizer, texts: list[str], *, placement: str, device=None,
                       batch_size: int = 16) -> list[torch.Tensor]:
    """Per decoder layer, the adapter's input at each text's last real token: [H_l [N, d]] on the CPU
    (canonical.anchor_states, with the inputs moved to `device` for a model on an accelerator). `model`
    may be a DeepSpeed engine (its forward gathers ZeRO-3's partitioned parameters: every rank calls)."""
    module = getattr(model, "module", model)
    limit = getattr(module.config.get_text_config(), "max_position_embeddings", None)
    max_length = min(MAX_LENGTH, limit) if isinstance(limit, int) and limit >= 2 else MAX_LENGTH
    runner = model if device is None else _OnDevice(model, device)
    with reading_allowed(module):
        states = pooled_hidden_states(runner, tokenizer, texts, adapter_input_modules(module, placement),
                                      capture="input", max_length=max_length, batch_size=batch_size, pool="last")
    return [h.detach().cpu() for h in states]


class _OnDevice:
    """A model called with its inputs moved to `device` (pooled_hidden_states builds them on the CPU)."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self):
        self.model.eval()

    def train(self, mode: bool = True):
        self.model.train(mode)

    def __call__(self, **inputs):
        return self.model(**{k: v.to(self.device) for k, v in inputs.items()})


def client_bases(states: list[torch.Tensor], components: int, *, client_id: str = "") -> list[torch.Tensor]:
    """Q_l = client_basis(H_l, m) per layer: what the client sends."""
    out = []
    for layer, h in enumerate(states):
        try:
            out.append(client_basis(h, components))
        except ValueError as err:
            who = f"client {client_id}, " if client_id else ""
            raise ValueError(f"{who}layer {layer}: {err}") from None
    return out


# =========================================================================== the aggregator's step

def slot_targets(bases: dict[str, list[torch.Tensor]], slots: dict[str, list[int]], rank: int
                 ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """({slot: G [N, r]}, {slot: shared eigenvalues [r]}) from every client's per-layer bases, as
    fit_canonical computes them: per slot the bases of every layer mapped to it, in client order (the
    order of `slots`: the aggregator sorts by client id) and layer order, each client weighing 1 in
    total (1/n per layer when it has n layers in the slot)."""
    members: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for cid, layer_slots in slots.items():
        if len(bases[cid]) != len(layer_slots):
            raise ValueError(f"client {cid}: {len(bases[cid])} bases, {len(layer_slots)} slot assignments")
        for layer, slot in enumerate(layer_slots):
            members[slot].append((cid, layer))
    targets, shared = {}, {}
    for slot, held in sorted(members.items()):
        per_client = defaultdict(int)
        for cid, _ in held:
            per_client[cid] += 1
        try:
            targets[slot], shared[slot] = canonical_targets([bases[cid][layer] for cid, layer in held], rank,
                                                            [1 / per_client[cid] for cid, _ in held])
        except ValueError as err:
            raise ValueError(f"slot {slot} (clients {', '.join(sorted(per_client))}): {err}") from None
    return targets, shared


# =========================================================================== the client's fit

def fit_client(states: list[torch.Tensor], slots: list[int], targets: dict[int, torch.Tensor], ridge: float, *,
               client_id: str = "") -> Map:
    """(mu_l, W_l) = fit_projection(H_l, G_slot(l), ridge) per layer."""
    missing = sorted({s for s in slots if s not in targets})
    if missing:
        raise ValueError(f"client {client_id}: the canonical targets hold no slot {missing} (slots "
                         f"{sorted(targets)}): no client whose bases went into them has a layer there")
    return [fit_projection(h, targets[s], ridge) for h, s in zip(states, slots)]


# =========================================================================== the model before and after

class _AwaitingMap:
    """A forward pre-hook that refuses to run a canonical model whose map is not set yet."""

    def __init__(self):
        self.reading = False
        self.hook = None

    def __call__(self, module, args, kwargs=None):
        if not self.reading:
            raise RuntimeError("this model's canonical projectors have no map yet: the round-0 canonical exchange "
                               "(fedzero/client/canonical.py) sets it before any training or evaluation")


def inject_awaiting_map(model, config: DeMAConfig, *, tokenizer=None, dtype: torch.dtype = torch.float32) -> DeMAModel:
    """inject_dema; for canonical projectors with zero maps and every forward refused until
    apply_map sets the real ones (read_anchor_states may run meanwhile). Other projectors: inject_dema."""
    if not config.uses_canonical:
        return inject_dema(model, config, tokenizer=tokenizer, dtype=dtype)
    num_layers = len(decoder_layout(model).layers)
    hidden = model.config.get_text_config().hidden_size
    placeholder = [(torch.zeros(hidden), torch.zeros(hidden, config.rank))] * num_layers
    handle = inject_dema(model, config, tokenizer=tokenizer, dtype=dtype, canonical=placeholder)
    guard = _AwaitingMap()
    guard.hook = model.register_forward_pre_hook(guard)
    model._fedzero_awaiting_canonical = guard
    return handle


@contextlib.contextmanager
def reading_allowed(model):
    guard = getattr(model, "_fedzero_awaiting_canonical", None)
    if guard is None:
        yield
        return
    guard.reading = True
    try:
        yield
    finally:
        guard.reading = False


def awaits_map(handle: DeMAModel) -> bool:
    return getattr(handle.model, "_fedzero_awaiting_canonical", None) is not None


def apply_map(handle: DeMAModel, fitted: Map) -> None:
    """Set every layer's canonical buffers (mu, W) and lift the guard. The residual of
    'canonical+learned' is left as it is (zero at injection; a loaded private part sets it)."""
    if len(fitted) != handle.num_layers:
        raise ValueError(f"canonical map of {len(fitted)} layers; this model has {handle.num_layers}")
    projectors = [p.in_proj for p in handle.private.layers]
    for layer, (proj, (mu, w)) in enumerate(zip(projectors, fitted)):
        rank, hidden = proj.weight.shape
        if tuple(mu.shape) != (hidden,) or tuple(w.shape) != (hidden, rank):
            raise ValueError(f"canonical map, layer {layer}: (mu, W) of shapes {tuple(mu.shape)}, {tuple(w.shape)}; "
                             f"this layer needs [{hidden}] and [{hidden}, {rank}]")
        if not (torch.isfinite(mu).all() and torch.isfinite(w).all()):
            raise ValueError(f"canonical map, layer {layer}: non-finite values")
        with torch.no_grad():
            proj.mu.copy_(mu.to(proj.mu.device))
            proj.weight.copy_(w.T.to(proj.weight.device))
    guard = getattr(handle.model, "_fedzero_awaiting_canonical", None)
    if guard is not None:
        guard.hook.remove()
        del handle.model._fedzero_awaiting_canonical


# =========================================================================== the saved map

def map_header(handle_or_config, *, client_id: str, fingerprint: str, anchors: AnchorSet, targets_sha256: str,
               num_layers: int, hidden_size: int) -> dict:
    config = handle_or_config.config if isinstance(handle_or_config, DeMAModel) else handle_or_config
    return {"format": MAP_FORMAT, "client": client_id, "fingerprint": fingerprint, "anchors": anchors.digest,
            "anchor_source": anchors.source, "targets_sha256": targets_sha256, "num_layers": num_layers,
            "hidden_size": hidden_size, "rank": config.rank, "components": config.canonical_dims,
            "ridge": config.canonical_ridge, "placement": config.placement}


def save_map(path: str | Path, fitted: Map, header: dict) -> Path:
    """The client's (mu, W) per layer, float64, with `header` (map_header) in the file's metadata."""
    from fedzero.store.atomic import atomic_save_safetensors, ensure_dir

    path = Path(path)
    ensure_dir(path.parent)
    tensors = {}
    for layer, (mu, w) in enumerate(fitted):
        tensors[f"layers.{layer}.mu"] = mu.detach().double().cpu().contiguous()
        tensors[f"layers.{layer}.W"] = w.detach().double().cpu().contiguous()
    atomic_save_safetensors(path, tensors, metadata={"fedzero": json.dumps(header)})
    return path


def read_map(path: str | Path) -> tuple[Map, dict]:
    """(map, header) of a saved map; refuses a file fedzero did not write as one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no canonical map at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        header = json.loads(meta["fedzero"])
    except (KeyError, ValueError):
        raise ValueError(f"{path} has no fedzero canonical header: not a canonical map file") from None
    if header.get("format") != MAP_FORMAT or not isinstance(header.get("num_layers"), int):
        raise ValueError(f"{path}: not a canonical map (header {header})")
    n = header["num_layers"]
    expected = {f"layers.{l}.{k}" for l in range(n) for k in ("mu", "W")}
    if set(tensors) != expected:
        raise ValueError(f"{path}: tensors {sorted(tensors)[:4]}... do not match its {n} layers")
    return [(tensors[f"layers.{l}.mu"], tensors[f"layers.{l}.W"]) for l in range(n)], header


def check_map_header(header: dict, path: str | Path, *, config: DeMAConfig, fingerprint: str, num_layers: int,
                     anchors: AnchorSet | None = None) -> None:
    """Refuse a saved map that is not this client's: another backbone, layer count, rank, fit settings
    or anchor set (each named)."""
    wanted = {"fingerprint": fingerprint, "num_layers": num_layers, "rank": config.rank,
              "components": config.canonical_dims, "ridge": config.canonical_ridge, "placement": config.placement}
    if anchors is not None:
        wanted["anchors"] = anchors.digest
    wrong = [f"{k} {header.get(k)!r} in the file, {v!r} now" for k, v in wanted.items() if header.get(k) != v]
    if wrong:
        raise ValueError(f"canonical map {path} of client {header.get('client')!r} does not belong to this client's "
                         f"model and settings: " + "; ".join(wrong)
                         + " (delete it to run the round-0 exchange again, in a new run)")
