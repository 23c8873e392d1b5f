"""Is the shared space aligned? A cheap signal, measured before any training.

Only the r-space experts travel, so averaging them across clients only makes sense if coordinate j
of z = P(x) means the same thing on every client. This measures it directly, with forward passes
only: every client's DeMA-injected model reads the same texts; z is taken at the last real token
(the one that predicts a label) and the clients' z are correlated coordinate by coordinate across
the texts. 1 = coordinate j rises and falls with the input alike on both clients; 0 = unrelated.
docs/method.md, "Is the shared space aligned? (`fedzero align`)".
"""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedzero.backbones import decoder_layout

from .anchors import DEFAULT_ANCHOR_FILE, load_anchor_texts, pooled_hidden_states
from .canonical import adapter_input_modules, anchor_states, fit_canonical
from .config import DeMAConfig
from .layer import DeMAParallelMLP
from .model import DeMAModel, inject_dema

if TYPE_CHECKING:
    from fedzero.config import RunConfig

MIN_TEXTS = 3          # with 2 inputs every Pearson correlation is +-1 or undefined: no signal
DEFAULT_MAX_LENGTH = 256


# =========================================================================== the statistic

def cross_correlations(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """C[i, j]: the Pearson correlation across the N inputs of za[:, i] and zb[:, j]: [r, r].

    A coordinate that is constant on the N inputs carries nothing to correlate (its correlation is
    0/0): its row or column is 0."""
    if za.ndim != 2 or za.shape != zb.shape:
        raise ValueError(f"z of shapes {tuple(za.shape)} and {tuple(zb.shape)}: both must be [N, r], same N and r")
    if za.shape[0] < MIN_TEXTS:
        raise ValueError(f"{za.shape[0]} inputs: a correlation across inputs needs at least {MIN_TEXTS}")
    if not (torch.isfinite(za).all() and torch.isfinite(zb).all()):
        raise ValueError("z holds non-finite values (NaN or inf): a backbone or projector overflowed")
    a, b = _unit_columns(za), _unit_columns(zb)
    return (a.T @ b).clamp(-1.0, 1.0)


def coordinate_correlations(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """Per coordinate j, the Pearson correlation across inputs of za[:, j] and zb[:, j]: [r] (0 where
    either side is constant)."""
    return cross_correlations(za, zb).diagonal()


def coordinate_alignment(za: torch.Tensor, zb: torch.Tensor) -> float:
    """Mean over the r coordinates of their Pearson correlation across inputs. A constant coordinate
    contributes 0 and is still counted: the experts cannot agree on anything through a dead coordinate."""
    return float(coordinate_correlations(za, zb).mean())


def chance_alignment(za: torch.Tensor, zb: torch.Tensor, *, pairings: int = 200, seed: int = 0) -> tuple[float, float]:
    """(mean, sd) of the alignment when a's coordinates are paired with b's at random: over `pairings`
    seeded permutations p, mean_j C[j, p(j)]. The yardstick for the alignment: z of the same texts
    correlate somewhat whatever the coordinates (random projections of related hidden states do, and
    coordinates that share a common factor all correlate), so only a figure well above this says that
    coordinate j means the same thing on both clients."""
    corr = cross_correlations(za, zb)
    r = corr.shape[0]
    generator = torch.Generator().manual_seed(seed)
    values = torch.stack([corr[torch.arange(r), torch.randperm(r, generator=generator)].mean() for _ in range(pairings)])
    return float(values.mean()), float(values.std())


def effective_dimensions(z: torch.Tensor) -> float:
    """How many independent directions the r coordinates of z [N, r] carry across the inputs: the
    participation ratio (sum lambda)^2 / sum lambda^2 of the eigenvalues of their correlation matrix C,
    = tr(C)^2 / ||C||_F^2. r when the coordinates are uncorrelated, 1 when they are all one factor,
    k for k uncorrelated groups of copies; constant coordinates count for nothing (0 when all are).

    The alignment's companion: it averages over coordinates, so r noisy copies of a few shared
    factors score as high as r distinct shared directions, while the experts can tell apart only
    what varies independently."""
    if z.ndim != 2 or z.shape[0] < MIN_TEXTS:
        raise ValueError(f"z of shape {tuple(z.shape)}: expected [N >= {MIN_TEXTS} inputs, r]")
    unit = _unit_columns(z)
    corr = unit.T @ unit
    total = corr.pow(2).sum()
    return float(corr.trace() ** 2 / total) if total > 0 else 0.0


def _unit_columns(z: torch.Tensor) -> torch.Tensor:
    """Each coordinate centred across inputs and scaled to norm 1 (a constant one to 0)."""
    z = z.double()     # float32 sums over a few hundred inputs lose digits the test cases check
    centred = z - z.mean(0)
    norm = centred.norm(dim=0)
    # Centring N equal values leaves rounding residue ~1e-16 of their size, not exactly 0: compare
    # the spread with the values' own scale (an all-zero coordinate is constant too: 0 <= 0).
    dead = centred.abs().amax(0) <= 1e-9 * z.abs().amax(0)
    return torch.where(dead, 0.0, centred / torch.where(dead, 1.0, norm))


# =========================================================================== z per layer and slot

def layer_in_projectors(handle: DeMAModel) -> list[nn.Module]:
    """Each decoder layer's in-projector P, in layer order, as the adapter calls it (under
    shape-matched sharing the layers of one slot hold the same module)."""
    if handle.side_stream is not None:
        return list(handle.side_stream.in_projectors)
    layout = decoder_layout(handle.model)
    wrapped = [layout.mlp(layer) for layer in layout.layers]
    if not all(isinstance(m, DeMAParallelMLP) for m in wrapped):
        raise ValueError(f"{layout.model_class}: its feed-forward blocks are not DeMA-wrapped; "
                         "measure a model returned by inject_dema")
    return [m.projectors.in_proj for m in wrapped]


def _adapter_inputs(handle: DeMAModel) -> list[nn.Module]:
    """The modules whose input x the adapter reads: the (wrapped) MLP for parallel placement, the
    decoder layer for side placement (as inject_dema's anchors read them)."""
    return adapter_input_modules(handle.model, handle.config.placement)


def context_limit(handle: DeMAModel, max_length: int) -> int:
    """max_length, capped at the backbone's own context (a learned position table has no row past it)."""
    limit = getattr(handle.model.config.get_text_config(), "max_position_embeddings", None)
    return min(max_length, limit) if isinstance(limit, int) and limit >= 2 else max_length


@torch.no_grad()
def layer_states(handle: DeMAModel, tokenizer, texts: list[str], *, batch_size: int = 16,
                 max_length: int = DEFAULT_MAX_LENGTH) -> list[torch.Tensor]:
    """Per decoder layer, z = P(x) at each text's last real token: a list of L tensors [N, r] (float32).

    x is read by forward hooks where the adapter reads it, so z is what the adapter's mixture sees in
    the handle's current state (round 0 after inject_dema). A text longer than max_length tokens
    (bos included) loses its beginning, so the token read is still its last."""
    inputs = pooled_hidden_states(handle.model, tokenizer, texts, _adapter_inputs(handle), capture="input",
                                  max_length=context_limit(handle, max_length), batch_size=batch_size, pool="last")
    # Cast as DeMAParallelMLP and SideStream do before calling P.
    return [proj(x.to(proj.weight.dtype)).float() for proj, x in zip(layer_in_projectors(handle), inputs)]


def projected_states(handle: DeMAModel, tokenizer, texts: list[str], *, batch_size: int = 16,
                     max_length: int = DEFAULT_MAX_LENGTH) -> dict[int, torch.Tensor]:
    """Per depth slot s, the mean over the layers mapped to s (slot_of_layer) of their z: {s: [N, r]}.

    Averaged per slot because the slot is what two clients share: its experts read every one of
    those layers' z, and clients of different depths hold different numbers of layers in a slot, so
    there is no one-to-one pairing of layers. A slot with no layer (fewer layers than slots) is absent."""
    per_layer = layer_states(handle, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    by_slot: dict[int, list[torch.Tensor]] = defaultdict(list)
    for z, slot in zip(per_layer, handle.slot_of_layer()):
        by_slot[slot].append(z)
    return {slot: torch.stack(zs).mean(0) for slot, zs in sorted(by_slot.items())}


# =========================================================================== every pair, every slot

def alignment_report(handles_by_client: dict[str, DeMAModel], tokenizers: dict[str, object], texts: list[str], *,
                     batch_size: int = 16, max_length: int = DEFAULT_MAX_LENGTH, canonical: dict | None = None) -> dict:
    """Coordinate alignment of every client pair at every depth slot, on `texts`. JSON-ready.

    rows: one per (pair, slot): `alignment`, `chance_mean`, `chance_sd` (chance_alignment: the
    alignment with coordinates paired at random) and `dims_a`, `dims_b` (effective_dimensions of each
    client's z); None where either client has no layer in the slot.
    canonical: build_handles' account of a canonical fit, reported as it is."""
    clients = list(handles_by_client)
    _check_comparable(handles_by_client, tokenizers, texts)
    num_slots = handles_by_client[clients[0]].config.num_slots
    states = {cid: projected_states(handles_by_client[cid], tokenizers[cid], texts, batch_size=batch_size,
                                    max_length=max_length) for cid in clients}
    rows = []
    for a, b in combinations(clients, 2):
        for slot in range(num_slots):
            row = {"a": a, "b": b, "slot": slot, "depth": [slot / num_slots, (slot + 1) / num_slots],
                   "alignment": None, "chance_mean": None, "chance_sd": None, "dims_a": None, "dims_b": None}
            if slot in states[a] and slot in states[b]:
                za, zb = states[a][slot], states[b][slot]
                chance = chance_alignment(za, zb)
                row.update(alignment=coordinate_alignment(za, zb), chance_mean=chance[0], chance_sd=chance[1],
                           dims_a=effective_dimensions(za), dims_b=effective_dimensions(zb))
            rows.append(row)
    report = {
        "texts": len(texts),
        "token": "last real token",
        "statistic": "mean over r-space coordinates of the Pearson correlation across texts",
        "shared_space": handles_by_client[clients[0]].config.shared_signature(),
        "clients": {cid: _client_summary(handles_by_client[cid], tokenizers[cid], texts, max_length) for cid in clients},
        "rows": rows,
    }
    if canonical is not None:
        report["canonical"] = canonical
    return report


def _check_comparable(handles: dict[str, DeMAModel], tokenizers: dict[str, object], texts: list[str]) -> None:
    if len(handles) < 2:
        raise ValueError(f"alignment compares clients' z; got {len(handles)} client(s) {list(handles)}: give two or more")
    missing = [cid for cid in handles if cid not in tokenizers]
    if missing:
        raise ValueError(f"no tokenizer given for client(s) {missing}")
    if len(texts) < MIN_TEXTS:
        raise ValueError(f"{len(texts)} text(s): a correlation across texts needs at least {MIN_TEXTS}")
    first, reference = next(iter(handles.items()))
    for cid, handle in handles.items():
        if handle.config.shared_signature() != reference.config.shared_signature():
            raise ValueError(f"client {cid}'s shared space {handle.config.shared_signature()} differs from client "
                             f"{first}'s {reference.config.shared_signature()}: they cannot federate")


def _client_summary(handle: DeMAModel, tokenizer, texts: list[str], max_length: int) -> dict:
    limit = context_limit(handle, max_length)
    layers_per_slot = [0] * handle.config.num_slots
    for slot in handle.slot_of_layer():
        layers_per_slot[slot] += 1
    return {
        "hidden_size": handle.hidden_size, "num_layers": handle.num_layers, "layers_per_slot": layers_per_slot,
        "projector": handle.config.projector, "placement": handle.config.placement, "max_length": limit,
        # Long texts lose their beginning; clients with different tokenizers then see different spans.
        "truncated_texts": sum(len(tokenizer.encode(t)) > limit - 1 for t in texts),
    }


# =========================================================================== from a run config

def measurement_texts(config: DeMAConfig, texts_file: str | Path | None = None,
                      max_texts: int | None = None, fit_texts: list[str] | None = None) -> tuple[list[str], str]:
    """(texts, where they came from). A JSONL file's records give their "text", or their "prompt" (whose
    last token predicts the completion); default: the DeMA config's anchor file (the bundled public
    anchors unless dema.anchor_file is set). Left out wherever they appear: with anchor projectors the
    first `rank` anchor texts (they define the anchor directions, so each reads high on its own
    coordinate on every backbone by construction, an agreement no other input shares); with a
    canonical projector its `fit_texts` (every client's map was fitted to send them to the same
    codes: on them the alignment is the fit's, not the space's)."""
    from fedzero.data import read_jsonl

    path = Path(texts_file) if texts_file else Path(config.anchor_file or DEFAULT_ANCHOR_FILE)
    setting = "--texts" if texts_file else ("dema.anchor_file" if config.anchor_file else "the bundled anchors")
    if not path.is_file():
        raise FileNotFoundError(f"no texts file at {path} ({setting})")
    texts = [r["text"] if "text" in r else r["prompt"] for r in read_jsonl(path)]
    source = f"{path} ({setting})"
    if config.uses_anchors:
        texts, source = _left_out(texts, source, load_anchor_texts(config.anchor_file, config.rank, "dema.rank"),
                                  "that define anchor directions")
    if fit_texts is not None:
        texts, source = _left_out(texts, source, fit_texts, "the canonical space was fitted on")
    if max_texts is not None:
        if max_texts < MIN_TEXTS:
            raise ValueError(f"--max-texts {max_texts}: a correlation across texts needs at least {MIN_TEXTS}")
        texts = texts[:max_texts]
    if len(texts) < MIN_TEXTS:
        raise ValueError(f"{source}: {len(texts)} usable text(s); a correlation across texts needs at least {MIN_TEXTS}")
    return texts, source


def _left_out(texts: list[str], source: str, excluded: list[str], why: str) -> tuple[list[str], str]:
    excluded = set(excluded)
    kept = [t for t in texts if t not in excluded]
    if len(kept) < len(texts):
        source += f", less the {len(texts) - len(kept)} {why}"
    return kept, source


def canonical_fit_texts(config: DeMAConfig, fit_file: str | Path | None = None) -> tuple[list[str], str]:
    """(texts, where they came from): the first dema.num_anchors texts of `fit_file` (--fit-texts), or
    of the DeMA config's anchor file: the public texts the canonical space is fitted on."""
    setting = "--fit-texts" if fit_file else ("dema.anchor_file" if config.anchor_file else "the bundled anchors")
    path = Path(fit_file or config.anchor_file or DEFAULT_ANCHOR_FILE)
    try:
        texts = load_anchor_texts(path, config.num_anchors, "dema.num_anchors")
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{err} ({setting})") from None
    return texts, f"the first {len(texts)} texts of {path} ({setting})"


def build_handles(run: "RunConfig", *, fit_texts: list[str] | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                  batch_size: int = 16) -> tuple[dict[str, DeMAModel], dict[str, object], dict | None]:
    """Every client's backbone and tokenizer, loaded as `fedzero simulate` loads them, with DeMA
    injected as configured: round 0's state, nothing trained. (handles, tokenizers, canonical), the
    last None unless the projector is canonical: then every client reads `fit_texts` first, the
    canonical space is fitted across them in this process (fit_canonical: what the round-0 exchange
    would compute), and `canonical` accounts for the fit."""
    from fedzero.backbones import load_backbone
    from fedzero.data import load_tokenizer

    if run.dema.uses_canonical and not fit_texts:
        raise ValueError(f"projector {run.dema.projector!r}: give the texts to fit the canonical space on")
    models, tokenizers = {}, {}
    for cfg in run.clients:
        try:
            models[cfg.id], _ = load_backbone(cfg.backbone)
            tokenizers[cfg.id] = load_tokenizer(cfg.backbone.tokenizer, cfg.backbone.path)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"client {cfg.id}: {err}") from err
    fitted, summary = {}, None
    if run.dema.uses_canonical:
        fitted, summary = _fit_canonical(run.dema, models, tokenizers, fit_texts, max_length, batch_size)
    handles = {}
    for cid, model in models.items():
        try:
            handles[cid] = inject_dema(model, run.dema, tokenizer=tokenizers[cid], canonical=fitted.get(cid))
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"client {cid}: {err}") from err
    return handles, tokenizers, summary


def _fit_canonical(config: DeMAConfig, models: dict, tokenizers: dict, texts: list[str], max_length: int,
                   batch_size: int) -> tuple[dict, dict]:
    states, slots = {}, {}
    for cid, model in models.items():
        states[cid] = anchor_states(model, tokenizers[cid], texts, placement=config.placement,
                                    max_length=max_length, batch_size=batch_size)
        slots[cid] = [config.slot_of_layer(l, len(states[cid])) for l in range(len(states[cid]))]
    try:
        fitted, shared = fit_canonical(states, slots, rank=config.rank, components=config.canonical_dims,
                                       ridge=config.canonical_ridge)
    except ValueError as err:
        raise ValueError(f"canonical fit (dema.rank {config.rank}, dema.canonical_components {config.canonical_dims}, "
                         f"{len(texts)} fit texts): {err}") from None
    summary = {"fit_texts": len(texts), "components": config.canonical_dims, "ridge": config.canonical_ridge,
               "token": "last real token",
               "shared": {str(slot): [round(float(v), 6) for v in values] for slot, values in shared.items()}}
    return fitted, summary


def format_report(report: dict) -> str:
    """The report as a table: pair, slot, relative depth, alignment."""
    first = next(iter(report["clients"].values()))
    space = report["shared_space"]
    lines = [f"coordinate alignment of z = P(x) (r={space['rank']}, projector {first['projector']}, placement "
             f"{first['placement']}) at the last real token of {report['texts']} texts:",
             "mean over coordinates of the Pearson correlation across texts (1 aligned, 0 unrelated); "
             "chance: the same with coordinates paired at random (mean +- sd); dims: the independent directions "
             f"each client's {space['rank']} coordinates carry (participation ratio)",
             "", f"{'pair':<28}{'slot':>5}  {'depth':<10}{'alignment':>10}{'chance':>17}{'dims':>14}"]
    for row in report["rows"]:
        pair = f"{row['a']} ~ {row['b']}"
        depth = f"{row['depth'][0]:.0%}-{row['depth'][1]:.0%}"
        lines.append(f"{pair:<28}{row['slot']:>5}  {depth:<10}{_cell(row, report['clients'])}")
    if "canonical" in report:
        fit = report["canonical"]
        lines.append(f"canonical space fitted on {fit['fit_texts']} other texts ({fit['components']} components per "
                     f"layer, ridge {fit['ridge']}); per slot, the mean over the r codes of how much of each code "
                     "the clients' own components hold (1 every client's, 0 none): " + ", ".join(
                         f"{slot}: {sum(v) / len(v):.2f}" for slot, v in fit["shared"].items()))
    for cid, client in report["clients"].items():
        if client["truncated_texts"]:
            lines.append(f"note: {cid}: {client['truncated_texts']} text(s) longer than {client['max_length']} tokens "
                         "were read without their beginning")
    return "\n".join(lines)


def _cell(row: dict, clients: dict) -> str:
    if row["alignment"] is not None:
        dims = f"{row['dims_a']:.1f} / {row['dims_b']:.1f}"
        return f"{row['alignment']:>10.3f}{row['chance_mean']:>10.3f} +- {row['chance_sd']:.3f}{dims:>14}"
    empty = [c for c in (row["a"], row["b"]) if clients[c]["layers_per_slot"][row["slot"]] == 0]
    return f"{'-':>10}{'-':>10}{'':>7}  ({', '.join(empty)}: no layer in this slot)"


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
