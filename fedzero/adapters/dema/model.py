"""Injecting DeMA into a frozen HF decoder model, and the handle that names its parameters.

"Shared" and "private" are not guessed from parameter names: they come from the container that
declares them (DeMAShared.exchange == "shared", DeMAPrivate.exchange == "private").
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fedzero.backbones import check_supported, decoder_layers, final_norm

from .config import DeMAConfig
from .layer import DeMAParallelMLP, DeMAPrivate, DeMAShared, SideStream

_SLOT_KEY = re.compile(r"^slots\.(\d+)\.")


def shared_block(key: str) -> str:
    """The aggregation block of a shared key: one block per depth slot (CMGA aligns each slot on its own)."""
    match = _SLOT_KEY.match(key)
    if not match:
        raise ValueError(f"{key!r} is not a DeMA shared key (expected 'slots.<s>.…')")
    return f"slot{match.group(1)}"


class DeMAModel:
    """Handle over a backbone with DeMA injected. Holds no tensors of its own."""

    def __init__(self, model: nn.Module, config: DeMAConfig, shared: DeMAShared, private: DeMAPrivate,
                 side_stream: SideStream | None):
        self.model = model
        self.config = config
        self.shared = shared
        self.private = private
        self.side_stream = side_stream
        self.num_layers = len(private.layers)
        self.hidden_size = model.config.hidden_size

    # -- what trains and what travels ------------------------------------------------------------
    def shared_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.shared.named_parameters())

    def private_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.private.named_parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.parameters()) + list(self.private.parameters())

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.shared_parameters().items()}

    def private_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.private_parameters().items()}

    def load_shared_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _copy_checked(self.shared_parameters(), state, "shared")

    def load_private_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _copy_checked(self.private_parameters(), state, "private")

    # -- aggregation bookkeeping -----------------------------------------------------------------
    def slot_of_layer(self) -> list[int]:
        return [self.config.slot_of_layer(l, self.num_layers) for l in range(self.num_layers)]

    def slot_use(self) -> dict[str, int]:
        """How many of this client's layers use each slot's shared block (0 for unused slots)."""
        use = {f"slot{s}": 0 for s in range(self.config.num_slots)}
        for s in self.slot_of_layer():
            use[f"slot{s}"] += 1
        return use

    def num_shared_parameters(self) -> int:
        return sum(p.numel() for p in self.shared.parameters())


def _copy_checked(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor], part: str) -> None:
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(f"{part} DeMA state does not match the model: missing {missing[:5]}"
                       f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    for key, param in params.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise ValueError(f"{part} DeMA tensor {key!r}: shape {tuple(state[key].shape)} in the state, "
                             f"{tuple(param.shape)} in the model")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])


def inject_dema(model: nn.Module, config: DeMAConfig, *, dtype: torch.dtype = torch.float32) -> DeMAModel:
    """Freeze `model` and add DeMA adapters in place. Returns the handle.

    The initial shared state depends only on config.seed (identical on every client); private
    projectors are seeded from config.seed too but their values never leave the client.
    """
    check_supported(model)
    if hasattr(model, "dema_shared"):
        raise ValueError("this model already has DeMA adapters injected")
    layers = decoder_layers(model)
    num_layers, hidden = len(layers), model.config.hidden_size
    model.requires_grad_(False)

    shared = DeMAShared(config.rank, config.num_experts, config.expert_hidden, config.num_slots, config.temperature)
    private = DeMAPrivate(hidden, config.rank, num_layers, config.placement)
    generator = torch.Generator().manual_seed(config.seed)
    for mixture in shared.slots:
        mixture.reset_parameters(generator)
    generator = torch.Generator().manual_seed(config.seed + 1)
    for projectors in private.layers:
        projectors.reset_parameters(generator)
    shared.to(dtype)
    private.to(dtype)
    model.dema_shared = shared    # registered submodules: moved/partitioned with the model
    model.dema_private = private

    slots = [config.slot_of_layer(l, num_layers) for l in range(num_layers)]
    side = None
    if config.placement == "parallel":
        for l, layer in enumerate(layers):
            layer.mlp = DeMAParallelMLP(layer.mlp, private.layers[l], shared.slots[slots[l]])
    else:
        side = SideStream(
            layers, [p.in_proj for p in private.layers], [shared.slots[s] for s in slots],
            private.out_proj, final_norm(model),
        )
    return DeMAModel(model, config, shared, private, side)
