"""A canonical shared space fitted on public anchor texts: generalised CCA (MAXVAR) from statistics only.

The shared experts read z = P_k(x) on every client k, so coordinate j of z must mean the same thing
on every backbone. Here it does by construction on the anchors: the clients agree on N target codes
G [N, r] for N public anchor texts, and each client fits its own linear map from its hidden states
to those codes. G is the MAXVAR generalised CCA of the clients' anchor states:

    client k:  H_k [N, d_k] its anchor states at a layer, centred by their mean mu_k;
               Q_k [N, m]   = U_m of the SVD H_k = U S V^T: the anchors' top-m whitened principal
                              component scores (orthonormal columns). The only thing that leaves it.
    server:    G [N, r]     = sqrt(N) * the top-r eigenvectors of sum_k w_k Q_k Q_k^T
                              (w_k sum to 1; G^T G = N I, so each code has unit mean square)
    client k:  W_k [d_k, r] = argmin ||H_k W - G||^2 + lambda_k ||W||^2;   P_k(x) = (x - mu_k) W_k

Q_k Q_k^T projects onto the span of client k's leading anchor directions, seen from the N texts: G
spans the directions of R^N that lie closest to every client's span at once (the eigenvalue of a
coordinate, in [0, 1], is the w-weighted mean of its squared cosine with the clients' spans: 1 means
every client represents it exactly). Keeping m < N components is the regularisation that makes
this mean anything: with m = N - 1 every client's span is the whole centred R^N (states of width
d >= N - 1 in general position span it) and every direction is "shared" by all of them.

What travels: Q_k, N x m numbers about public texts read by the client's frozen backbone, never
a private example; mu_k, W_k and the states H_k themselves stay on the client (Q_k does not
determine them: it lacks S and V). docs/method.md, "A canonical shared space".

Pure functions on tensors first (client_basis, canonical_targets, fit_projection), then the
per-slot fit across clients of different depths (fit_canonical) and the client's forward pass that
reads its anchor states (anchor_states).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from fedzero.backbones import decoder_layout

from .anchors import pooled_hidden_states

# Singular values below this fraction of the largest are numerical zeros (float64 SVD of float32
# states: the last singular value of a centred [N, d >= N] matrix is ~1e-16 of the first, not 0).
RANK_TOL = 1e-9


# =========================================================================== the three pure steps

def client_basis(states: torch.Tensor, components: int) -> torch.Tensor:
    """Q [N, m]: an orthonormal basis of the top-`components` principal directions of the anchor
    states [N, d], centred by their own mean, as seen from the N texts (U[:, :m] of the SVD): each
    text's whitened principal-component scores. What a client sends; float64."""
    if states.ndim != 2:
        raise ValueError(f"anchor states of shape {tuple(states.shape)}: expected [N texts, d]")
    n, d = states.shape
    limit = min(n - 1, d)     # centring removes one dimension of the N-space
    if not 1 <= components <= limit:
        raise ValueError(f"canonical components m={components}: must be in 1..{limit} "
                         f"(min(N - 1, d) for N={n} anchor texts of width d={d})")
    centred = _centred(states)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    if s[components - 1] <= RANK_TOL * s[0]:
        spanned = int((s > RANK_TOL * s[0]).sum())
        raise ValueError(f"the anchor states span only {spanned} dimension(s); canonical components m={components} "
                         "needs that many distinct directions (more, or more varied, anchor texts)")
    return u[:, :components]


def canonical_targets(bases: Sequence[torch.Tensor], rank: int,
                      weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(G [N, r], shared [r]): the top-`rank` eigenvectors of sum_i w_i Q_i Q_i^T, scaled so that
    G^T G = N I, and their eigenvalues (with the w_i normalised to sum 1: in [0, 1], how much of
    each code every basis holds; descending). The server's step.

    Computed as the left singular vectors of [sqrt(w_1) Q_1, ..., sqrt(w_K) Q_K], whose squared
    singular values are those eigenvalues, without forming the N x N sum. Each code's sign is fixed
    (its largest-magnitude entry positive) so the same bases always give the same G."""
    if not bases:
        raise ValueError("canonical_targets needs at least one client basis")
    weights = [1.0] * len(bases) if weights is None else list(weights)
    if len(weights) != len(bases) or any(not w > 0 for w in weights):
        raise ValueError(f"weights {weights}: one positive weight per basis ({len(bases)})")
    n = bases[0].shape[0]
    for i, q in enumerate(bases):
        _check_basis(q, n, i)
    total = sum(weights)
    stacked = torch.cat([q.double() * (w / total) ** 0.5 for q, w in zip(bases, weights)], dim=1)
    limit = min(n - 1, stacked.shape[1])
    if not 1 <= rank <= limit:
        raise ValueError(f"rank r={rank}: the canonical space has at most {limit} dimensions here "
                         f"(min(N - 1, total components) for N={n} anchor texts and bases of "
                         f"{[q.shape[1] for q in bases]} components)")
    u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    g = u[:, :rank]
    peak = g.abs().argmax(0)
    g = g * torch.sign(g[peak, torch.arange(rank)])
    return g * n ** 0.5, s[:rank] ** 2


def fit_projection(states: torch.Tensor, targets: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu [d], W [d, r]): mu the states' mean, W = argmin ||(states - mu) W - targets||^2 + lambda ||W||^2,
    the client's private map onto the agreed codes. float64.

    lambda = ridge * ||states - mu||_F^2 / min(N, d), the mean squared singular value of the centred
    states, so the fit does not depend on their scale (backbones differ by orders of magnitude):
    states scaled by c give W / c and the same z. Solved through the SVD H = U S V^T as
    W = V diag(s / (s^2 + lambda)) U^T targets; ridge = 0 gives the minimum-norm least-squares
    solution (numerically zero singular values dropped)."""
    if states.ndim != 2 or targets.ndim != 2 or states.shape[0] != targets.shape[0]:
        raise ValueError(f"states {tuple(states.shape)} and targets {tuple(targets.shape)}: expected [N, d] and [N, r]")
    if not ridge >= 0:
        raise ValueError(f"canonical ridge must be >= 0, got {ridge!r}")
    mu = states.double().mean(0)
    u, s, vh = torch.linalg.svd(states.double() - mu, full_matrices=False)
    lam = ridge * s.pow(2).mean()
    alive = s > RANK_TOL * s[0]
    gain = torch.where(alive, s / (s.pow(2) + lam), torch.zeros_like(s))
    return mu, vh.T @ (gain[:, None] * (u.T @ targets.double()))


def _centred(states: torch.Tensor) -> torch.Tensor:
    states = states.double()     # float32 Gram products over hundreds of texts lose the small directions
    return states - states.mean(0)


def _check_basis(q: torch.Tensor, n: int, index: int) -> None:
    if q.ndim != 2 or q.shape[0] != n:
        raise ValueError(f"basis {index} has shape {tuple(q.shape)}: every basis must be [N={n} anchor texts, m]")
    gram = q.double().T @ q.double()
    if not torch.allclose(gram, torch.eye(q.shape[1], dtype=torch.float64), atol=1e-6):
        raise ValueError(f"basis {index} does not have orthonormal columns: send client_basis's output")


# =========================================================================== across clients, per slot

def fit_canonical(states: dict[str, list[torch.Tensor]], slots: dict[str, list[int]], *, rank: int,
                  components: int, ridge: float) -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor]]], dict[int, torch.Tensor]]:
    """Every client's per-layer (mu, W), fitted in one process: ({client: [(mu [d], W [d, r]) per layer]},
    {slot: shared [r]}).

    states: {client: [H_l [N, d] per decoder layer]}, all on the same N anchor texts in the same
    order; slots: {client: [slot of each layer]} (DeMAModel.slot_of_layer). The slot is what clients
    share, so each slot gets one G, from the bases of every layer mapped to it, each client weighted
    1 in total (1/n per layer when it has n layers in the slot: a deep client does not outvote a
    shallow one); every layer then fits its own W onto its slot's G. This is the protocol run in
    one place: the same three calls, with the bases and G as the only things crossing clients."""
    if not states:
        raise ValueError("fit_canonical needs at least one client's anchor states")
    layers_of: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for cid, layer_slots in slots.items():
        if cid not in states or len(states[cid]) != len(layer_slots):
            raise ValueError(f"client {cid}: {len(states.get(cid, []))} layers of anchor states, "
                             f"{len(layer_slots)} slot assignments")
        for layer, slot in enumerate(layer_slots):
            layers_of[slot].append((cid, layer))
    fitted = {cid: [None] * len(layer_slots) for cid, layer_slots in slots.items()}
    shared = {}
    for slot, members in sorted(layers_of.items()):
        per_client = defaultdict(int)
        for cid, _ in members:
            per_client[cid] += 1
        bases = [client_basis(states[cid][layer], components) for cid, layer in members]
        targets, shared[slot] = canonical_targets(bases, rank, [1 / per_client[cid] for cid, _ in members])
        for cid, layer in members:
            fitted[cid][layer] = fit_projection(states[cid][layer], targets, ridge)
    return fitted, shared


# =========================================================================== the client's forward pass

def adapter_input_modules(model: nn.Module, placement: str) -> list[nn.Module]:
    """Per decoder layer, the module whose input is the adapter's x: the feed-forward block for
    parallel placement, the decoder layer for side placement. Works before and after inject_dema (a
    wrapped block reads the same input)."""
    layout = decoder_layout(model)
    return [layout.mlp(layer) for layer in layout.layers] if placement == "parallel" else list(layout.layers)


def anchor_states(model: nn.Module, tokenizer, texts: list[str], *, placement: str = "parallel",
                  max_length: int = 64, batch_size: int = 16) -> list[torch.Tensor]:
    """Per decoder layer, the adapter's input x at each text's last real token: [H_l [N, d]].

    The last token because it is the one that predicts a label, and the one `fedzero align`
    measures. Read from the frozen backbone (before inject_dema, or at round 0 when every
    out-projector is zero: the adapters then change no layer's input)."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and limit >= 2:
        max_length = min(max_length, limit)
    return pooled_hidden_states(model, tokenizer, texts, adapter_input_modules(model, placement), capture="input",
                                max_length=max_length, batch_size=batch_size, pool="last")
