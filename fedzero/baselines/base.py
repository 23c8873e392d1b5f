"""What a LoRA baseline strategy sees (PEFT LoRA state dicts) and what it returns (LoRAAggregate).

Unlike fedzero.strategies (one shared state, one delta per client), these baselines act on each
client's own LoRA factors, module by module, and may hand every client something different
(HetLoRA/FlexLoRA: its own rank) or nothing but a weight update to merge (FLoRA).

Keys follow PEFT's get_peft_model_state_dict: "<module>.lora_A.weight" [r, in] and
"<module>.lora_B.weight" [out, r], the adapter name already stripped.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .factors import Pair

_A, _B = ".lora_A.weight", ".lora_B.weight"


def lora_modules(state: dict[str, Tensor]) -> dict[str, Pair]:
    """PEFT LoRA state -> {module: (A [r, in], B [out, r])}, in key order. Anything else is refused."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        for suffix, part in ((_A, "A"), (_B, "B")):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            raise ValueError(f"{key!r} is not a PEFT LoRA factor (expected '…{_A}' or '…{_B}'; "
                             "pass get_peft_model_state_dict output: adapter name stripped, no DoRA/bias)")
    for name, parts in modules.items():
        if set(parts) != {"A", "B"}:
            raise ValueError(f"LoRA module {name!r} has only lora_{''.join(parts)}; both A and B are needed")
        A, B = parts["A"], parts["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"LoRA module {name!r}: A {tuple(A.shape)} and B {tuple(B.shape)} are not [r, in] and [out, r]")
    return {name: (parts["A"], parts["B"]) for name, parts in modules.items()}


def lora_state(modules: dict[str, Pair], dtype: torch.dtype) -> dict[str, Tensor]:
    """Inverse of lora_modules, casting every factor to `dtype`."""
    state = {}
    for name, (A, B) in modules.items():
        # copy=True: clients never share storage (FedIT hands every client the same tensors).
        state[name + _A] = A.to(dtype=dtype, copy=True).contiguous()
        state[name + _B] = B.to(dtype=dtype, copy=True).contiguous()
    return state


def same_backbone_groups(fingerprints: list[str]) -> dict[str, list[int]]:
    """{fingerprint: client indices}: the groups FedIT may federate within (one per backbone)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for k, fp in enumerate(fingerprints):
        groups[fp].append(k)
    return dict(groups)


@dataclass
class LoRAAggregate:
    """The result of one aggregation.

    states: per client, its new LoRA state (same keys and dtypes as it sent; shapes at its rank), or
            None when `reinit` is set.
    merge:  {module: (A [R, in], B [out, R])} when `reinit` is set: every client adds B @ A (scaling 1)
            to that module's frozen base weight, then restarts with fresh LoRA (FLoRA).
    metrics: JSON-friendly; "upload_params" / "download_params" [K] count what each client sent/receives.
    """

    states: list[dict[str, Tensor]] | None
    merge: dict[str, Pair] | None = None
    reinit: bool = False
    metrics: dict = field(default_factory=dict)


class LoRAStrategy(ABC):
    """Aggregation of PEFT LoRA factors across clients on one backbone.

    A subclass implements `combine` for one module; `aggregate` validates, loops over modules and
    assembles the result. `merges = True` means combine returns one ΔW = B @ A for every client.
    """

    name = "lora"
    merges = False

    @abstractmethod
    def combine(self, As: list[Tensor], Bs: list[Tensor], w: Tensor, ranks: list[int],
                scalings: list[float]) -> tuple[list[Pair] | Pair, dict[str, list[float]]]:
        """One module: As[k] [r_k, in], Bs[k] [out, r_k], w [K] normalised (float64).

        Returns (per-client [(A_k', B_k')], or one (A, B) to merge if `merges`) and per-client stats
        ({name: [K floats]}, averaged over modules into the metrics).
        """

    def check(self, ranks: list[int], scalings: list[float]) -> None:
        """Refuse inputs the method does not define (hook; FedIT needs equal ranks)."""

    def aggregate(self, client_states: list[dict[str, Tensor]], weights, ranks: list[int], round: int, *,
                  fingerprints: list[str], scalings: list[float] | None = None) -> LoRAAggregate:
        """client_states: K PEFT LoRA states; weights [K] (e.g. sample counts, ≥ 0, Σ > 0); ranks [K];
        round: unused by these deterministic methods, kept for the interface; fingerprints [K]: all
        equal (the methods assume one base model); scalings [K]: PEFT's alpha / r (default 1).
        """
        K = len(client_states)
        scalings = [1.0] * K if scalings is None else [float(s) for s in scalings]
        w = _check_inputs(self.name, K, weights, ranks, fingerprints, scalings)
        self.check(ranks, scalings)
        per_client = [lora_modules(s) for s in client_states]
        _check_modules(per_client, ranks)

        new: list[dict[str, Pair]] = [{} for _ in range(K)]
        merge: dict[str, Pair] = {}
        stats: dict[str, list[list[float]]] = defaultdict(list)
        dtype = next(iter(client_states[0].values())).dtype
        for name in per_client[0]:
            As = [m[name][0] for m in per_client]
            Bs = [m[name][1] for m in per_client]
            result, module_stats = self.combine(As, Bs, w, list(ranks), scalings)
            for key, values in module_stats.items():
                stats[key].append(values)
            if self.merges:
                merge[name] = (result[0].to(dtype), result[1].to(dtype))
            else:
                for k in range(K):
                    new[k][name] = result[k]

        upload = [sum(t.numel() for t in s.values()) for s in client_states]
        if self.merges:
            sent = sum(A.numel() + B.numel() for A, B in merge.values())
            download = [sent] * K
            states = None
        else:
            states = [lora_state(m, next(iter(s.values())).dtype) for m, s in zip(new, client_states)]
            download = [sum(t.numel() for t in s.values()) for s in states]
        metrics = {"method": self.name, "upload_params": upload, "download_params": download,
                   **{key: [float(sum(col) / len(col)) for col in zip(*rows)] for key, rows in stats.items()}}
        return LoRAAggregate(states, merge if self.merges else None, self.merges, metrics)


def _check_inputs(method: str, K: int, weights, ranks, fingerprints, scalings) -> Tensor:
    if K == 0:
        raise ValueError(f"{method}: no client states")
    for label, seq in (("weights", weights), ("ranks", ranks), ("fingerprints", fingerprints), ("scalings", scalings)):
        if len(seq) != K:
            raise ValueError(f"{method}: got {len(seq)} {label} for {K} client states")
    if len(set(fingerprints)) > 1:
        raise ValueError(f"{method} federates LoRA on one backbone only, got clients on {sorted(set(fingerprints))}; "
                         "aggregate each same-backbone group on its own (same_backbone_groups) or use DeMA")
    if any(not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 1 for r in ranks):
        raise ValueError(f"{method}: ranks must be positive integers, got {list(ranks)}")
    if any(not (math.isfinite(s) and s > 0) for s in scalings):
        raise ValueError(f"{method}: scalings must be finite and > 0, got {scalings}")
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"{method}: weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w / w.sum()


def _check_modules(per_client: list[dict[str, Pair]], ranks: list[int]) -> None:
    names = list(per_client[0])
    for k, modules in enumerate(per_client):
        if sorted(modules) != sorted(names):
            missing, extra = sorted(set(names) - set(modules)), sorted(set(modules) - set(names))
            raise ValueError(f"client {k}: LoRA modules differ from client 0's (missing {missing[:3]}, extra {extra[:3]})")
        for name, (A, B) in modules.items():
            A0, B0 = per_client[0][name]
            if A.shape[0] != ranks[k]:
                raise ValueError(f"client {k}, module {name!r}: A has rank {A.shape[0]}, ranks[{k}] = {ranks[k]}")
            if (A.shape[1], B.shape[0]) != (A0.shape[1], B0.shape[0]):
                raise ValueError(f"client {k}, module {name!r}: in/out {A.shape[1]}/{B.shape[0]} differ from "
                                 f"client 0's {A0.shape[1]}/{B0.shape[0]}")
