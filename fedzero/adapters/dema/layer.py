"""DeMA modules.

Shapes: x [..., d] is a backbone hidden state (d differs per client), z [..., r] lives in the
shared space (r agreed by all clients), M experts, h expert hidden size.

    z     = P(x)                              private in-projector     d -> r
    alpha = softmax(G(rmsnorm(z)) / tau)      shared gate of the slot  r -> M
    y     = sum_m alpha_m * B_m silu(A_m z)   shared experts (dense)   r -> r
    out   = U(y)                              private out-projector    r -> d, zero-initialised
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms_normalise(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # Parameter-free: the gate must see z at unit scale, else its logits are tiny and the
    # mixture stays uniform (seen in the first prototype).
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)


class SlotMixture(nn.Module):
    """The shared part of one depth slot: a gate and M expert MLPs in the r-space.

    Same shapes on every client whatever its backbone, which is what makes cross-architecture
    aggregation plain arithmetic.
    """

    def __init__(self, rank: int, num_experts: int, expert_hidden: int, temperature: float):
        super().__init__()
        self.temperature = temperature
        self.gate = nn.Linear(rank, num_experts, bias=False)          # G: [M, r]
        self.expert_a = nn.Parameter(torch.empty(num_experts, expert_hidden, rank))  # A_m: r -> h
        self.expert_b = nn.Parameter(torch.empty(num_experts, rank, expert_hidden))  # B_m: h -> r

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        # Every client builds the same initial shared state from the same generator seed.
        r = self.expert_a.shape[-1]
        h = self.expert_a.shape[1]
        for p, std in ((self.gate.weight, r**-0.5), (self.expert_a, r**-0.5), (self.expert_b, h**-0.5)):
            p.copy_(torch.randn(p.shape, generator=generator) * std)

    def gate_probs(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.gate(_rms_normalise(z)) / self.temperature, dim=-1)  # [..., M]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        alpha = self.gate_probs(z)                                              # [..., M]
        hidden = F.silu(torch.einsum("...r,mhr->...mh", z, self.expert_a))       # [..., M, h]
        per_expert = torch.einsum("...mh,mrh->...mr", hidden, self.expert_b)    # [..., M, r]
        return torch.einsum("...m,...mr->...r", alpha, per_expert)              # [..., r]


class Projectors(nn.Module):
    """Private bridge between one backbone width d and the shared rank r."""

    def __init__(self, hidden_size: int, rank: int, *, with_in: bool = True, with_out: bool = True):
        super().__init__()
        self.in_proj = nn.Linear(hidden_size, rank, bias=False) if with_in else None     # P: d -> r
        self.out_proj = nn.Linear(rank, hidden_size, bias=False) if with_out else None   # U: r -> d
        if self.out_proj is not None:
            # Zero U: at round 0 the adapted model computes exactly what the backbone computes.
            nn.init.zeros_(self.out_proj.weight)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        if self.in_proj is not None:
            d = self.in_proj.weight.shape[1]
            self.in_proj.weight.copy_(torch.randn(self.in_proj.weight.shape, generator=generator) * d**-0.5)
        if self.out_proj is not None:
            self.out_proj.weight.zero_()


class DeMAParallelMLP(nn.Module):
    """Wraps a decoder layer's MLP: returns mlp(x) + U · mixture(P · x)."""

    def __init__(self, base_layer: nn.Module, projectors: Projectors, mixture: SlotMixture):
        super().__init__()
        self.base_layer = base_layer
        # Adapter modules are owned by the model-level containers (DeMAShared, DeMAPrivate), which
        # declare what is exchanged; a slot's mixture is also used by several layers. Keep plain
        # references (not submodules) so every parameter is registered exactly once. Calling them
        # as modules still fires ZeRO-3's gather hooks.
        object.__setattr__(self, "projectors", projectors)
        object.__setattr__(self, "mixture", mixture)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        dtype = self.projectors.in_proj.weight.dtype
        z = self.projectors.in_proj(x.to(dtype))
        delta = self.projectors.out_proj(self.mixture(z))
        return out + delta.to(out.dtype)


class SideStream:
    """Side placement: the adapters form a stream in the r-space beside a backbone that keeps no
    activations for backward.

        s_0 = 0;  s_{l+1} = s_l + mixture_{slot(l)}(s_l + P_l(stopgrad(x_l)));  h_final += U s_L

    Implemented with hooks so the backbone's own forward is untouched: a pre-hook on every decoder
    layer reads its input x_l, and a hook on the final norm adds U s_L before the LM head. Nothing
    that requires grad enters the backbone, so autograd stores none of its activations.
    """

    def __init__(self, layers, in_projectors, mixtures, out_proj: nn.Linear, final_norm: nn.Module):
        self.in_projectors = in_projectors
        self.mixtures = mixtures
        self.out_proj = out_proj
        self.state = None
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._make_layer_hook(index), with_kwargs=True))
        self.handles.append(final_norm.register_forward_hook(self._final_hook))

    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            proj = self.in_projectors[index]
            z = proj(x.detach().to(proj.weight.dtype))
            s = torch.zeros_like(z) if index == 0 else self.state
            self.state = s + self.mixtures[index](s + z)
        return hook

    def _final_hook(self, module, args, output):
        if self.state is None:
            return output
        delta = self.out_proj(self.state).to(output.dtype)
        self.state = None
        return output + delta

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class DeMAShared(nn.Module):
    """Everything that travels: one SlotMixture per depth slot. Keys: slots.{s}.{gate.weight,expert_a,expert_b}."""

    exchange = "shared"

    def __init__(self, rank: int, num_experts: int, expert_hidden: int, num_slots: int, temperature: float):
        super().__init__()
        self.slots = nn.ModuleList(
            SlotMixture(rank, num_experts, expert_hidden, temperature) for _ in range(num_slots)
        )


class DeMAPrivate(nn.Module):
    """Everything that stays on the client: per-layer projectors (and, for side placement, the
    single out-projector of the side stream). Keys: layers.{l}.in_proj.weight, layers.{l}.out_proj.weight, out_proj.weight."""

    exchange = "private"

    def __init__(self, hidden_size: int, rank: int, num_layers: int, placement: str):
        super().__init__()
        side = placement == "side"
        self.layers = nn.ModuleList(
            Projectors(hidden_size, rank, with_out=not side) for _ in range(num_layers)
        )
        self.out_proj = Projectors(hidden_size, rank, with_in=False).out_proj if side else None
