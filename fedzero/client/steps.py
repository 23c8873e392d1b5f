"""The optimizer-step loop every client kind runs: DeMA's LocalClient, the LoRA baselines' LoRAClient
and the DeepSpeed client.

`train_steps` owns what is the same for all of them: the learning-rate schedule (set on every
parameter group before each step, times the group's `lr_scale` where it has one), drawing the next
batch of the client's seeded stream, collecting each step's mean token loss, timing each step and
the hook after it. What one optimizer step does is the `step` function it is given: `torch_step`
for a plain torch optimizer (mean token loss, plus the adapter's penalty and the distillation
term where given, backward, clipping, step), or the DeepSpeed client's engine step (micro-batches
over ranks and accumulation, `engine.backward`/`engine.step`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# step(batch, step) -> the batch's mean token loss; `step` counts optimizer steps from the start of the federation
StepFn = Callable[[dict, int], float]


def lr_factor(step: int, total_steps: int, settings) -> float:
    """The schedule's factor at optimizer step `step` of `total_steps` (settings: a TrainSettings):
    linear warm-up, then constant or cosine down to 10%."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "constant" or total_steps <= 1:
        return 1.0
    progress = min(1.0, (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine down to 10%


@dataclass
class Steps:
    """What a run of `train_steps` did: each step's mean token loss (after any given in `losses`) and
    its seconds (drawing the batch and the step)."""
    losses: list[float]
    seconds: list[float] = field(default_factory=list)


def train_steps(step: StepFn, param_groups, next_batch: Callable[[], dict], settings, *, first_step: int,
                count: int, total_steps: int, losses: list[float] | None = None,
                after_step: Callable[[int, list[float]], None] | None = None) -> Steps:
    """`count` optimizer steps, numbered first_step, first_step + 1, ... in the federation's schedule
    of `total_steps`. Before each: every group of `param_groups` gets lr = settings.lr x its lr_scale
    (1 if it has none) x lr_factor. after_step(steps done in this call, losses so far) runs after each."""
    done = Steps(list(losses) if losses is not None else [])
    for j in range(count):
        started = time.perf_counter()
        number = first_step + j
        for group in param_groups:
            group["lr"] = settings.lr * group.get("lr_scale", 1.0) * lr_factor(number, total_steps, settings)
        done.losses.append(step(next_batch(), number))
        done.seconds.append(time.perf_counter() - started)
        if after_step is not None:
            after_step(j + 1, done.losses)
    return done


def torch_step(model, optimizer: torch.optim.Optimizer, params, grad_clip: float, *,
               penalty: Callable[[], torch.Tensor] | None = None,
               distill: Callable[[object, int], torch.Tensor | None] | None = None) -> StepFn:
    """One optimizer step of a single-process client: loss = the batch's mean token loss (+ penalty()
    + distill(model, step) where given and not None), backward, gradient clipping at `grad_clip`
    (0: none), optimizer step. Returns the mean token loss alone."""
    from fedzero.client.local import token_loss_sums

    def run(batch: dict, number: int) -> float:
        loss_sum, count = token_loss_sums(model, batch)
        loss = loss_sum / max(count, 1)
        objective = loss
        if penalty is not None:
            objective = objective + penalty()
        term = distill(model, number) if distill is not None else None
        if term is not None:
            objective = objective + term
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return loss.item()

    return run


def train_round_steps(model, optimizer: torch.optim.Optimizer, params, next_batch: Callable[[], dict], settings, *,
                      first_step: int, total_steps: int, penalty=None, distill=None) -> list[float]:
    """A single-process client's round: the model in train mode for settings.local_steps `torch_step`s
    from step `first_step`, then back in eval mode. Returns the steps' losses."""
    model.train()
    steps = train_steps(torch_step(model, optimizer, params, settings.grad_clip, penalty=penalty, distill=distill),
                        optimizer.param_groups, next_batch, settings, first_step=first_step,
                        count=settings.local_steps, total_steps=total_steps)
    model.eval()
    return steps.losses
