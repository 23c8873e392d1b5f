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


class AnchorInProjector(nn.Module):
    """z_j = cos(x - mu, a_j - mu): a relative representation over public anchors.

    mu [d] is the mean of the anchors' pooled hidden states at this layer, a_1..a_r the first r of
    them. Similar inputs get similar similarity profiles on different backbones, whatever their
    width, and z does not change when all hidden states are rescaled. Frozen (buffers) unless
    `learned`, in which case W starts at the unit anchor directions W0 and `penalty()` keeps the
    anchors' own codes near their initial values.

    `whiten`: W0 = K^-1/2 A_hat instead, K = A_hat A_hat^T the anchors' Gram matrix (their cosines), so
    z = K^-1/2 (the relative codes). Anchors of one domain all share a large common direction, so
    every raw code rises and falls with it together; the whitened codes are decorrelated over the
    anchor directions (W0 W0^T = I, up to the ridge). Still invariant to a rescaling or rotation of
    the hidden states, as K is.
    """

    WHITEN_RIDGE = 1e-3     # relative to K's mean eigenvalue (1): near-collinear anchors do not blow up

    def __init__(self, hidden_size: int, rank: int, *, learned: bool = False, whiten: bool = False,
                 eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.whiten = whiten
        self.register_buffer("mu", torch.zeros(hidden_size))
        self.register_buffer("anchors_centered", torch.zeros(rank, hidden_size))  # a_j - mu   [r, d]
        self.register_buffer("weight0", torch.zeros(rank, hidden_size))           # unit rows (whitened: orthonormal) [r, d]
        if learned:
            self.weight = nn.Parameter(torch.zeros(rank, hidden_size))
        else:
            self.register_buffer("weight", torch.zeros(rank, hidden_size))

    @torch.no_grad()
    def set_anchors(self, pooled: torch.Tensor) -> None:
        """pooled [N, d]: the anchor texts' mean hidden states at this layer (N >= r)."""
        rank = self.weight.shape[0]
        self.mu.copy_(pooled.mean(0))
        centered = pooled[:rank] - self.mu
        self.anchors_centered.copy_(centered)
        unit = centered / centered.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        self.weight0.copy_(_whitened(unit, self.WHITEN_RIDGE) if self.whiten else unit)
        self.weight.copy_(self.weight0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered = x - self.mu
        return (centered @ self.weight.T) / centered.norm(dim=-1, keepdim=True).clamp_min(self.eps)

    def penalty(self) -> torch.Tensor:
        # The anchors' codes are W a_hat with a_hat the rows of W0: keep (W - W0) W0^T small.
        return ((self.weight - self.weight0) @ self.weight0.T).pow(2).sum()


def _whitened(rows: torch.Tensor, ridge: float) -> torch.Tensor:
    """(K + ridge I)^-1/2 rows, K = rows rows^T: the rows' symmetric orthogonalisation (the
    orthonormal rows closest to them), computed in float64."""
    gram = rows.double() @ rows.double().T
    values, vectors = torch.linalg.eigh(gram + ridge * torch.eye(len(gram), dtype=torch.float64))
    return ((vectors * values.clamp_min(ridge).rsqrt()) @ vectors.T @ rows.double()).to(rows.dtype)


class CanonicalInProjector(nn.Module):
    """z = (x - mu) W: a fixed linear map onto the canonical shared space (fedzero/adapters/dema/canonical.py).

    mu [d] and W (stored as `weight` [r, d], nn.Linear's layout) come from the canonical fit across
    clients, which one client cannot do alone: inject_dema(..., canonical=) sets them. Buffers:
    never trained, never exchanged. `learned` adds a private residual R [r, d], zero-initialised, so
    z = (x - mu)(W + R^T) starts exactly on the canonical map and the client may move off it.
    """

    def __init__(self, hidden_size: int, rank: int, *, learned: bool = False):
        super().__init__()
        self.register_buffer("mu", torch.zeros(hidden_size))
        self.register_buffer("weight", torch.zeros(rank, hidden_size))
        self.residual = nn.Parameter(torch.zeros(rank, hidden_size)) if learned else None

    @torch.no_grad()
    def set_projection(self, mu: torch.Tensor, projection: torch.Tensor) -> None:
        """mu [d], projection W [d, r] (fit_projection's output)."""
        rank, hidden = self.weight.shape
        if tuple(mu.shape) != (hidden,) or tuple(projection.shape) != (hidden, rank):
            raise ValueError(f"canonical (mu, W) of shapes {tuple(mu.shape)}, {tuple(projection.shape)}: "
                             f"this layer needs [{hidden}] and [{hidden}, {rank}]")
        if not (torch.isfinite(mu).all() and torch.isfinite(projection).all()):
            raise ValueError("canonical (mu, W) hold non-finite values")
        self.mu.copy_(mu)
        self.weight.copy_(projection.T)
        if self.residual is not None:
            self.residual.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.residual is None else self.weight + self.residual
        return (x - self.mu) @ weight.T


class AnchorOutProjector(nn.Module):
    """U = (A - mu)^T diag(g): the output side defined by the same anchors, with a learned gain g [r]
    (zero-initialised, so the backbone's outputs are unchanged at the start)."""

    def __init__(self, anchors: "AnchorInProjector"):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(anchors.anchors_centered.shape[0]))
        # Read the anchors from their owner at call time (`.to()` replaces buffer tensors).
        object.__setattr__(self, "_anchors", anchors)

    @property
    def weight(self) -> torch.Tensor:
        return self.gain

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return (y * self.gain) @ self._anchors.anchors_centered.to(y.dtype)


class Projectors(nn.Module):
    """Bridge between one backbone width d and the shared rank r: P (d -> r) and U (r -> d)."""

    def __init__(self, hidden_size: int, rank: int, *, with_in: bool = True, with_out: bool = True,
                 kind: str = "learned", anchor_out: bool = False, whiten: bool = False):
        super().__init__()
        if not with_in:
            self.in_proj = None
        elif kind == "learned":
            self.in_proj = nn.Linear(hidden_size, rank, bias=False)                     # P: d -> r
        elif kind.startswith("canonical"):
            self.in_proj = CanonicalInProjector(hidden_size, rank, learned=kind == "canonical+learned")
        else:
            self.in_proj = AnchorInProjector(hidden_size, rank, learned=kind == "anchor+learned", whiten=whiten)
        if not with_out:
            self.out_proj = None
        elif anchor_out:
            self.out_proj = AnchorOutProjector(self.in_proj)
        else:
            self.out_proj = nn.Linear(rank, hidden_size, bias=False)                    # U: r -> d
            # Zero U: at round 0 the adapted model computes exactly what the backbone computes.
            nn.init.zeros_(self.out_proj.weight)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        if isinstance(self.in_proj, nn.Linear):
            d = self.in_proj.weight.shape[1]
            self.in_proj.weight.copy_(torch.randn(self.in_proj.weight.shape, generator=generator) * d**-0.5)
        if self.out_proj is not None:
            self.out_proj.weight.zero_()


class DeMAParallelMLP(nn.Module):
    """Wraps a decoder layer's MLP: the adapter reads the MLP's input x and adds
    delta = U · mixture(P · x) to what the residual stream receives from the feed-forward branch.

    Without a post-feed-forward norm (LLaMA, GPT-NeoX, …) that is the MLP's output: returns mlp(x) + delta.
    With one (Gemma 2/3, OLMo2: residual + post_norm(mlp(x))), adding delta to the MLP's output would
    put it inside the norm, which rescales the sum: the adapter's effect would saturate instead of
    growing with U. Then `after_norm` (a PostNormDelta) carries delta past the norm: the wrapper returns
    mlp(x) unchanged and the norm's output gets delta, so the layer computes residual + post_norm(mlp(x)) + delta.
    """

    def __init__(self, base_layer: nn.Module, projectors: Projectors, mixture: SlotMixture,
                 after_norm: "PostNormDelta | None" = None):
        super().__init__()
        self.base_layer = base_layer
        # Adapter modules are owned by the model-level containers (DeMAShared, DeMAPrivate), which
        # declare what is exchanged; a slot's mixture is also used by several layers. Keep plain
        # references (not submodules) so every parameter is registered exactly once. Calling them
        # as modules still fires ZeRO-3's gather hooks.
        object.__setattr__(self, "projectors", projectors)
        object.__setattr__(self, "mixture", mixture)
        self.after_norm = after_norm       # not a module: holds no parameters

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not torch.is_tensor(out) or out.shape != x.shape:
            # Found by its place in the layer (fedzero.backbones.decoder_layout), not by what it returns.
            raise TypeError(f"{type(self.base_layer).__name__} (the decoder layer's feed-forward block) returns "
                            f"{_described(out)} for an input of shape {tuple(x.shape)}; DeMA's parallel placement "
                            "needs a hidden state of the input's shape (try placement 'side')")
        dtype = self.projectors.in_proj.weight.dtype
        z = self.projectors.in_proj(x.to(dtype))
        delta = self.projectors.out_proj(self.mixture(z))
        if self.after_norm is not None:
            self.after_norm.put(delta)
            return out
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return f"delta added after {self.after_norm.norm_name}" if self.after_norm is not None else ""


class PostNormDelta:
    """Carries one decoder layer's parallel-adapter delta from its MLP wrapper to the output of the
    norm the layer applies to the MLP's output (its post-feed-forward norm), by hooks, so the backbone's
    modules stay as they are (the norm keeps its parameter names; ZeRO-3 hooks it as before).

    Within one call of the layer, the MLP wrapper puts delta and the norm's forward hook takes it (the
    pending delta is cleared when taken: it is added once) and returns norm output + delta. Refused
    rather than computed silently wrong: the norm called with no delta pending (it does not follow the
    MLP), a delta still pending when the layer returns (the norm was not applied: the delta would be
    lost), and a norm output of another shape.

    A delta is never added to another call's norm output. A layer call starts with none pending, one
    that raises drops its own, and a new put replaces any left: transformers' gradient checkpointing
    re-runs the layer's forward in backward without the layer's own hooks, and PyTorch's non-reentrant
    checkpointing stops that re-run, by raising, once it has what backward needs (inside the norm,
    before its hook), so a re-run may leave its delta pending; a later re-run, or the next call,
    computes and carries its own.
    """

    def __init__(self, layer: nn.Module, norm: nn.Module, norm_name: str):
        self.norm_name = norm_name
        self.pending: torch.Tensor | None = None
        self.handles = [layer.register_forward_pre_hook(self._layer_starts),
                        norm.register_forward_hook(self._add_after_norm),
                        layer.register_forward_hook(self._layer_ends, always_call=True)]

    def put(self, delta: torch.Tensor) -> None:
        self.pending = delta

    def _layer_starts(self, module, args) -> None:
        self.pending = None

    def _add_after_norm(self, module, args, output):
        delta, self.pending = self.pending, None
        if delta is None:
            raise RuntimeError(f"{self.norm_name} ({type(module).__name__}) ran without a DeMA delta pending: it is "
                               "not applied after the layer's feed-forward block, as the layout takes it to be")
        if not torch.is_tensor(output) or output.shape != delta.shape:
            raise TypeError(f"{self.norm_name} ({type(module).__name__}) returns {_described(output)}; DeMA's parallel "
                            f"placement adds a hidden state of shape {tuple(delta.shape)} there")
        return output + delta.to(output.dtype)

    def _layer_ends(self, module, args, output) -> None:
        # Also called when the layer's forward raised (always_call), then with output None: just drop.
        pending, self.pending = self.pending, None
        if pending is not None and output is not None:
            raise RuntimeError(f"{type(module).__name__} returned without applying its {self.norm_name} after the "
                               "feed-forward block: DeMA's delta, added after that norm, would be lost")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _described(value) -> str:
    return f"shape {tuple(value.shape)}" if torch.is_tensor(value) else f"a {type(value).__name__}"


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
        delta = self.out_proj(self.state)
        self.state = None
        if not torch.is_tensor(output) or output.shape != delta.shape:
            raise TypeError(f"{type(module).__name__} (the final norm) returns {_described(output)}; DeMA's side "
                            f"placement adds a hidden state of shape {tuple(delta.shape)} there")
        return output + delta.to(output.dtype)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class DeMAShared(nn.Module):
    """Everything that travels. Keys: slots.{s}.{gate.weight,expert_a,expert_b}; with
    share='shape-matched' also the width-d projector bank: proj.h{d}.slots.{s}.{in_proj,out_proj}.weight
    (and proj.h{d}.out_proj.weight for side placement), which only clients of width d hold."""

    def __init__(self, rank: int, num_experts: int, expert_hidden: int, num_slots: int, temperature: float):
        super().__init__()
        self.slots = nn.ModuleList(
            SlotMixture(rank, num_experts, expert_hidden, temperature) for _ in range(num_slots)
        )
        self.proj = nn.ModuleDict()


class ProjectorBank(nn.Module):
    """Projectors for one width: one per layer (private) or one per slot (shape-matched sharing),
    plus the side stream's single out-projector for side placement."""

    def __init__(self, count: int, hidden_size: int, rank: int, placement: str, kind: str, anchor_out: bool,
                 whiten: bool = False):
        super().__init__()
        side = placement == "side"
        self.slots = nn.ModuleList(
            Projectors(hidden_size, rank, with_out=not side, kind=kind, anchor_out=anchor_out, whiten=whiten)
            for _ in range(count)
        )
        self.out_proj = None
        if side:
            if anchor_out:
                # Anchors of the final hidden state (set later from the anchors' final-norm outputs).
                self.final_anchors = AnchorInProjector(hidden_size, rank)
                self.out_proj = AnchorOutProjector(self.final_anchors)
            else:
                self.out_proj = Projectors(hidden_size, rank, with_in=False).out_proj


class DeMAPrivate(nn.Module):
    """Everything that stays on the client. Keys: layers.{l}.in_proj.weight, layers.{l}.out_proj.weight
    (anchor out-projector: layers.{l}.out_proj.gain; canonical+learned: layers.{l}.in_proj.residual),
    out_proj.weight for side placement. Empty of projectors under shape-matched sharing (they live in
    DeMAShared then); anchor and canonical buffers (mu, anchor directions, W) are never exchanged."""

    def __init__(self, bank: ProjectorBank | None):
        super().__init__()
        self.layers = bank.slots if bank is not None else nn.ModuleList()
        if bank is not None and bank.out_proj is not None:
            self.out_proj = bank.out_proj
            if hasattr(bank, "final_anchors"):
                self.final_anchors = bank.final_anchors
