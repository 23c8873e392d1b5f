"""Injecting DeMA into a frozen HF decoder model, and the handle that names its parameters.

"Shared" and "private" are not guessed from parameter names: they come from the container that
declares them: a DeMAShared module's parameters travel, a DeMAPrivate module's stay on the client.
"""

from __future__ import annotations

import torch
from torch import nn

from fedzero.backbones import DecoderLayout, decoder_layout

from .anchors import load_anchor_texts, pooled_hidden_states
from .blocks import bank_block, bank_name, declared_blocks, is_bank_key, side_out_block, slot_block
from .config import DeMAConfig
from .depth import depth_tag, layer_depths, slot_ranges
from .layer import (AnchorInProjector, DeMAParallelMLP, DeMAPrivate, DeMAShared, PostNormDelta,
                    ProjectorBank, SideStream)


class DeMAModel:
    """Handle over a backbone with DeMA injected. Holds no tensors of its own."""

    def __init__(self, model: nn.Module, config: DeMAConfig, shared: DeMAShared, private: DeMAPrivate,
                 side_stream: SideStream | None, num_layers: int, depth_ranges: list | None = None):
        self.model = model
        self.config = config
        self.shared = shared
        self.private = private
        self.side_stream = side_stream
        self.num_layers = num_layers
        self.hidden_size = model.config.get_text_config().hidden_size
        # share 'depth-aware': per slot, the union of its layers' ranges on the common depth axis (depth.py)
        self.depth_ranges = depth_ranges
        self.bank = (bank_name(self.hidden_size, depth_tag(depth_ranges) if depth_ranges is not None else None)
                     if config.shares_projectors else None)

    # -- what trains and what travels ------------------------------------------------------------
    def shared_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.shared.named_parameters())

    def private_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.private.named_parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.parameters()) + list(self.private.parameters())

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: fine-tuned anchor projectors ('anchor+learned') train at a smaller lr."""
        anchored = {id(m.weight) for m in self._anchor_projectors() if isinstance(m.weight, nn.Parameter)}
        rest = [p for p in self.trainable_parameters() if id(p) not in anchored]
        groups = [{"params": rest, "lr": lr, "lr_scale": 1.0}]
        if anchored:
            params = [p for p in self.trainable_parameters() if id(p) in anchored]
            scale = self.config.anchor_lr_scale
            groups.append({"params": params, "lr": lr * scale, "lr_scale": scale})
        return groups

    def regularization(self) -> torch.Tensor | float:
        """Penalty added to the training loss ('anchor+learned': keep the anchors' codes in place)."""
        learned = [m for m in self._anchor_projectors() if isinstance(m.weight, nn.Parameter)]
        if not learned:
            return 0.0
        return self.config.anchor_penalty * sum(m.penalty() for m in learned) / len(learned)

    def _anchor_projectors(self) -> list[AnchorInProjector]:
        return [m for m in self.private.modules() if isinstance(m, AnchorInProjector)]

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.shared_parameters().items()}

    def private_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.private_parameters().items()}

    def select_shared(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This client's part of a global state, which may also hold other widths' projector banks."""
        own = self.shared_parameters()
        foreign = [k for k in state if k not in own and not is_bank_key(k)]
        if foreign:
            raise KeyError(f"shared DeMA state does not match the model: unexpected {foreign[:5]}")
        return {k: v for k, v in state.items() if k in own}

    def load_shared_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _copy_checked(self.shared_parameters(), self.select_shared(state), "shared")

    def load_private_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _copy_checked(self.private_parameters(), state, "private")

    # -- aggregation bookkeeping -----------------------------------------------------------------
    def slot_of_layer(self) -> list[int]:
        return [self.config.slot_of_layer(l, self.num_layers) for l in range(self.num_layers)]

    def shared_blocks(self) -> dict[str, str]:
        """Shared key -> aggregation block, as the shared container declares them (blocks.py)."""
        return declared_blocks(self.shared)

    def slot_use(self) -> dict[str, int]:
        """How many of this client's layers use each shared block (0 for unused slots): its
        aggregation weight per block is samples × use."""
        use = {slot_block(s): 0 for s in range(self.config.num_slots)}
        for s in self.slot_of_layer():
            use[slot_block(s)] += 1
        if self.config.shares_projectors:
            bank = self.bank
            use.update({bank_block(s, bank): use[slot_block(s)] for s in range(self.config.num_slots)})
            if self.config.placement == "side":
                use[side_out_block(bank)] = 1
        return use

    def depth_declaration(self) -> dict | None:
        """What a depth-aware client sends with its update (the manifest's `depth`, checked by
        fedzero.strategies.depth.check_declaration): the least overlap, and per projector-bank block
        its family and depth ranges (the side out-projector reads the final state, the same place
        in every model: [0, 1]). None unless share is 'depth-aware'."""
        if not self.config.depth_aware:
            return None
        family = bank_name(self.hidden_size)
        blocks = {bank_block(s, self.bank): {"family": bank_block(s, family), "ranges": self.depth_ranges[s]}
                  for s in range(self.config.num_slots)}
        if self.config.placement == "side":
            blocks[side_out_block(self.bank)] = {"family": side_out_block(family), "ranges": [[0.0, 1.0]]}
        return {"overlap_min": float(self.config.depth_overlap_min), "blocks": blocks}

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


def inject_dema(model: nn.Module, config: DeMAConfig, *, dtype: torch.dtype = torch.float32,
                tokenizer=None, canonical: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DeMAModel:
    """Freeze `model` and add DeMA adapters in place. Returns the handle.

    The initial shared state depends only on config.seed (and, for shape-matched projectors, the
    width): identical on every client that holds it. Anchor projectors need the client's
    `tokenizer` to run the backbone on the public anchor texts. Canonical projectors need
    `canonical`: per decoder layer, the (mu [d], W [d, r]) of the fit across clients
    (fedzero/adapters/dema/canonical.py: anchor_states on every client, then fit_canonical), which
    this client cannot compute alone.
    """
    layout = decoder_layout(model)
    if hasattr(model, "dema_shared"):
        raise ValueError("this model already has DeMA adapters injected")
    if config.uses_anchors and tokenizer is None:
        raise ValueError(f"projector {config.projector!r} needs the backbone's tokenizer (inject_dema(..., tokenizer=))")
    layers = layout.layers
    num_layers, hidden = len(layers), model.config.get_text_config().hidden_size
    _check_canonical(config, canonical, num_layers)
    model.requires_grad_(False)
    shape_matched = config.shares_projectors
    slots = [config.slot_of_layer(l, num_layers) for l in range(num_layers)]
    depth_ranges = (slot_ranges(layer_depths(model.config, num_layers), slots, config.num_slots)
                    if config.depth_aware else None)

    shared = DeMAShared(config.rank, config.num_experts, config.expert_hidden, config.num_slots, config.temperature)
    bank = ProjectorBank(config.num_slots if shape_matched else num_layers, hidden, config.rank,
                         config.placement, config.projector, config.anchor_out, config.anchor_whiten)
    generator = torch.Generator().manual_seed(config.seed)
    for mixture in shared.slots:
        mixture.reset_parameters(generator)
    # Shape-matched banks must start identical on every client of the same width (depth-aware banks
    # of one width too, whatever their depth tag: the aggregator mixes them).
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + (hidden if shape_matched else 1))
    for projectors in bank.slots:
        projectors.reset_parameters(generator)
    if shape_matched:
        shared.proj[bank_name(hidden, depth_tag(depth_ranges) if depth_ranges is not None else None)] = bank
        private = DeMAPrivate(None)
    else:
        private = DeMAPrivate(bank)
    layer_projectors = [bank.slots[slots[l]] if shape_matched else bank.slots[l] for l in range(num_layers)]

    if config.uses_anchors:
        _set_anchors(model, tokenizer, config, layout, layer_projectors, bank)
    if canonical is not None:
        for layer, (projectors, (mu, projection)) in enumerate(zip(layer_projectors, canonical)):
            try:
                projectors.in_proj.set_projection(mu, projection)
            except ValueError as err:
                raise ValueError(f"canonical, layer {layer}: {err}") from None
    shared.to(dtype)
    private.to(dtype)
    model.dema_shared = shared    # registered submodules: moved/partitioned with the model
    model.dema_private = private

    side = None
    if config.placement == "parallel":
        for l, layer in enumerate(layers):
            # The adapter reads the MLP's input and adds to what the residual stream receives from the
            # feed-forward branch: after the layer's post-feed-forward norm where it has one.
            norm = layout.post_mlp_norm(layer)
            after = PostNormDelta(layer, norm, layout.post_mlp_norm_name) if norm is not None else None
            wrapped = DeMAParallelMLP(layout.mlp(layer), layer_projectors[l], shared.slots[slots[l]], after)
            setattr(layer, layout.mlp_name, wrapped)
    else:
        side = SideStream(layers, [p.in_proj for p in layer_projectors], [shared.slots[s] for s in slots],
                          bank.out_proj, layout.final_norm)
    return DeMAModel(model, config, shared, private, side, num_layers, depth_ranges)


def _check_canonical(config: DeMAConfig, canonical, num_layers: int) -> None:
    if not config.uses_canonical:
        if canonical is not None:
            raise ValueError(f"inject_dema(canonical=) is for projector 'canonical' or 'canonical+learned', "
                             f"not {config.projector!r}")
        return
    if canonical is None:
        # The fit needs every client's anchor bases: no single client can make these up. The round-0
        # exchange carries them through the store (fedzero/client/canonical.py, docs/method.md).
        raise ValueError(f"projector {config.projector!r} needs the canonical fit across clients, per decoder layer "
                         "(inject_dema(..., canonical=[(mu, W), ...]); fedzero/adapters/dema/canonical.py)")
    if len(canonical) != num_layers:
        raise ValueError(f"canonical holds {len(canonical)} (mu, W) pairs; this model has {num_layers} decoder layers")


def _set_anchors(model, tokenizer, config: DeMAConfig, layout: DecoderLayout, layer_projectors,
                 bank: ProjectorBank) -> None:
    """Run the frozen backbone on the anchor texts and set each layer's anchor projector from them."""
    texts = load_anchor_texts(config.anchor_file, config.num_anchors)
    # The adapter's input: the MLP input for parallel placement, the layer input for side placement.
    layers = layout.layers
    modules = [layout.mlp(layer) for layer in layers] if config.placement == "parallel" else list(layers)
    with_final = hasattr(bank, "final_anchors")
    pooled = pooled_hidden_states(model, tokenizer, texts, modules, capture="input")
    for projectors, states in zip(layer_projectors, pooled):
        projectors.in_proj.set_anchors(states)
    if with_final:
        final = pooled_hidden_states(model, tokenizer, texts, [layout.final_norm], capture="output")[0]
        bank.final_anchors.set_anchors(final)
