"""One client of a LoRA baseline: PEFT LoRA on a frozen backbone, trained and evaluated locally.

The round logic (loss, learning-rate schedule, fresh optimizer each round) is the DeMA client's
(fedzero.client.steps), so the baselines differ from DeMA only in the adapter and the aggregation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

from fedzero.backbones import attention_projections
from fedzero.client.local import TrainSettings, mean_token_loss
from fedzero.client.steps import train_round_steps
from fedzero.data import batches

from .base import LoRAAggregate, lora_modules
from .factors import Pair


LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LoRASettings:
    rank: int = 16
    alpha: float | None = None     # None: 2 × rank, so the scaling alpha / r is 2 at every rank and
                                   # factors of different ranks mean the same (HetLoRA, FlexLoRA)
    targets: tuple[str, ...] | None = None   # PEFT target names; None: the model's attention projections
    dropout: float = 0.0
    init_seed: int = 0             # seeds A's init; equal on all clients, so FedIT starts from one point

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if self.targets is not None:
            self.targets = tuple(self.targets)

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank

    def resolved(self, model: nn.Module) -> "LoRASettings":
        """These settings with the targets fixed: the given ones, else every nn.Linear of `model`'s
        attention blocks (fedzero.backbones.attention_projections)."""
        return self if self.targets else dataclasses.replace(self, targets=attention_projections(model))

    def peft_config(self, model: nn.Module | None = None) -> LoraConfig:
        """Targets as `resolved(model)` gives them, or LLaMA's q,k,v,o when no model is given."""
        targets = self.resolved(model).targets if model is not None else (self.targets or LLAMA_ATTENTION)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(targets),
                          lora_dropout=self.dropout, bias="none", task_type="CAUSAL_LM")


class LoRAClient:
    """Wraps `model` (a frozen HF causal LM, changed in place) with PEFT LoRA."""

    def __init__(self, client_id: str, model: nn.Module, fingerprint: str, train_examples, eval_examples,
                 settings: TrainSettings, lora: LoRASettings, *, pad_id: int, seed: int, total_rounds: int):
        if not train_examples:
            raise ValueError(f"client {client_id!r} has no training examples")
        # Resolved here, so the settings say which modules this client adapts.
        lora = lora.resolved(model)
        self.client_id, self.fingerprint, self.lora = client_id, fingerprint, lora
        self.settings, self.pad_id = settings, pad_id
        self.eval_examples = eval_examples[: settings.max_eval_examples] if settings.max_eval_examples else eval_examples
        self.num_samples = len(train_examples)
        self.total_steps = total_rounds * settings.local_steps
        self.step = 0
        self._resets = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(lora.init_seed)      # PEFT draws A from the global RNG
            self.model = get_peft_model(model, lora.peft_config())
        self.model.eval()
        self._batches = batches(train_examples, settings.batch_size, seed=seed, pad_id=pad_id)
        self._keys = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(self.model).items()}

    @property
    def rank(self) -> int:
        return self.lora.rank

    @property
    def scaling(self) -> float:
        return self.lora.scaling

    # -- what travels ----------------------------------------------------------------------------
    def lora_state(self) -> dict[str, Tensor]:
        """{"<module>.lora_A.weight": [r, in], "<module>.lora_B.weight": [out, r]} (copies)."""
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_lora_state(self, state: dict[str, Tensor]) -> None:
        """Load a full LoRA state; missing, unexpected or mis-shaped keys are errors, not skipped."""
        missing, unexpected = sorted(set(self._keys) - set(state)), sorted(set(state) - set(self._keys))
        if missing or unexpected:
            raise KeyError(f"client {self.client_id!r}: LoRA state does not match the model "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        for key, shape in self._keys.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"client {self.client_id!r}, {key!r}: shape {tuple(state[key].shape)} "
                                 f"in the state, {shape} in the model")
        result = set_peft_model_state_dict(self.model, state)
        if result.unexpected_keys:
            raise KeyError(f"PEFT did not place {result.unexpected_keys[:3]}")

    def apply(self, aggregate: LoRAAggregate, index: int) -> None:
        """Take this client's share of an aggregation (index: its position among the clients)."""
        if aggregate.reinit:
            self.merge_and_reinit(aggregate.merge)
        else:
            self.load_lora_state(aggregate.states[index])

    @torch.no_grad()
    def merge_and_reinit(self, merge: dict[str, Pair]) -> None:
        """W += B @ A (scaling 1) for every module in `merge`, then fresh LoRA everywhere (FLoRA).

        merge: {module: (A [R, in], B [out, R])}, module names as in lora_state's keys. The fresh
        LoRA has B = 0, so right after this the model computes exactly base + ΔW.
        """
        unknown = sorted(set(merge) - set(lora_modules(self.lora_state())))
        if unknown:
            raise KeyError(f"client {self.client_id!r}: no LoRA module {unknown[:3]}")
        for name, (A, B) in merge.items():
            weight = self.model.get_submodule(name).base_layer.weight      # [out, in], frozen
            delta = B.to(torch.float32) @ A.to(torch.float32)
            if delta.shape != weight.shape:
                raise ValueError(f"{name}: ΔW {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
            weight.copy_((weight.float() + delta).to(weight.dtype))
        self._resets += 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.lora.init_seed + 1_000_003 * self._resets)   # same fresh A on every client
            for module in self.model.modules():
                if hasattr(module, "reset_lora_parameters") and "default" in getattr(module, "lora_A", {}):
                    module.reset_lora_parameters("default", True)

    # -- training --------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train_round(self, state: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], dict]:
        """Load `state` (None: keep the current LoRA), train local_steps, return (new LoRA state, metrics)."""
        if state is not None:
            self.load_lora_state(state)
        params = self.trainable_parameters()
        # Fresh AdamW each round, as the DeMA client does: the factors jump at aggregation.
        optimizer = torch.optim.AdamW(params, lr=self.settings.lr, weight_decay=self.settings.weight_decay)
        losses = train_round_steps(self.model, optimizer, params, self._batches.__next__, self.settings,
                                   first_step=self.step, total_steps=self.total_steps)
        self.step += len(losses)
        return self.lora_state(), {"train_loss": sum(losses) / len(losses)}

    def evaluate(self) -> float:
        """Mean token loss on the client's held-out examples (labelled tokens only)."""
        self.model.eval()
        return mean_token_loss(self.model, self.eval_examples, batch_size=self.settings.eval_batch_size,
                               pad_id=self.pad_id)
