"""DeMA inside a DeepSpeed ZeRO engine: injecting it on a partitioned backbone, its penalty, and its
state in and out of the engine.

Under ZeRO-3 a parameter of the handle is a shard (shape [0], real shape in `ds_shape`), and under
every stage with mixed precision the optimizer holds an fp32 master copy that the next step writes
back. So the handle's own state dicts cannot be read or loaded directly: values are gathered from
the master copy, and loading sets both the parameter and the master. DeepSpeed is imported lazily:
nothing here runs without an engine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import DeMAConfig
from .io import read_checked_part, save_part
from .model import DeMAModel, inject_dema


def inject_dema_for_engine(model, dema: DeMAConfig, *, dtype, tokenizer, ds_config: dict) -> DeMAModel:
    """inject_dema on a backbone that an engine will wrap. DeMA modules are created outside
    zero.Init, with their real shapes; deepspeed.initialize converts every parameter that is not yet
    a ZeRO parameter, so they are partitioned (and hooked) like the backbone.

    Anchor projectors are set by running the frozen backbone on the public anchor texts. On a
    partitioned backbone that needs ZeRO-3's gather hooks before the training engine exists: a
    temporary engine without optimizer (DeepSpeed's ZeRO inference) installs them for the injection
    and is destroyed afterwards."""
    if dema.uses_canonical:     # zero maps until the round-0 exchange (fedzero/client/canonical.py) sets them
        from .canonical_exchange import inject_awaiting_map

        return inject_awaiting_map(model, dema, dtype=dtype, tokenizer=tokenizer)
    if not (dema.uses_anchors and any(hasattr(p, "ds_id") for p in model.parameters())):
        return inject_dema(model, dema, dtype=dtype, tokenizer=tokenizer)
    import deepspeed

    inference = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    engine, _, _, _ = deepspeed.initialize(model=model, config=inference)
    try:
        return inject_dema(model, dema, dtype=dtype, tokenizer=tokenizer)
    finally:
        engine.destroy()


class ZeroPenalty(torch.nn.Module):
    """handle.regularization() (the anchor+learned penalty; 0 otherwise) as a module call, so that
    ZeRO-3 gathers the weights it reads (registered as external parameters of this module)."""

    def __init__(self, handle: DeMAModel):
        super().__init__()
        object.__setattr__(self, "handle", handle)     # not a submodule: registers no parameters
        self.params = [m.weight for m in handle._anchor_projectors() if isinstance(m.weight, torch.nn.Parameter)]

    def forward(self):
        value = self.handle.regularization()
        return value if torch.is_tensor(value) else torch.zeros(())

    def __call__(self):
        return super().__call__() if self.params else 0.0


def penalty_for_engine(handle: DeMAModel, stage: int) -> ZeroPenalty:
    """The penalty module of `handle`, attached to its model before deepspeed.initialize.

    The anchor+learned penalty reads in-projector weights outside their module's forward: under
    ZeRO-3 they are shards there. A module that owns the computation and declares them as external
    parameters gets them gathered (and their gradients reduced)."""
    penalty = ZeroPenalty(handle)
    if stage == 3 and penalty.params:
        import deepspeed

        handle.model.dema_penalty = penalty
        for param in penalty.params:
            deepspeed.zero.register_external_parameter(penalty, param)
    return penalty


def gather_fp32(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Full fp32 values on the CPU (the optimizer's master copy where there is one). Collective."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in params.items():          # same order on every rank
        value = safe_get_full_fp32_param(p)
        if value is None:                   # ZeRO-0 in fp32: the parameter is the master
            with deepspeed.zero.GatheredParameters([p]):
                value = p.detach().clone()
        out[name] = value.detach().float().cpu().reshape(tuple(getattr(p, "ds_shape", p.shape))).clone()
    return out


def load_fp32(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor], device) -> None:
    """Load values into a running engine: the (possibly partitioned, low-precision) parameter and the
    optimizer's fp32 master copy (on `device`). Setting only the parameter is undone by the next
    step. Collective; every rank passes the same values."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    missing, unexpected = sorted(set(params) - set(values)), sorted(set(values) - set(params))
    if missing or unexpected:
        raise KeyError(f"DeMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in params.items():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(values[name].shape) != shape:
            raise ValueError(f"DeMA tensor {name!r}: shape {tuple(values[name].shape)} given, {shape} in the model")
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        with torch.no_grad():
            for name, p in params.items():
                p.data.copy_(values[name].to(device=p.device, dtype=p.dtype))
    for name, p in params.items():
        safe_set_full_fp32_param(p, values[name].float().to(device))


def save_private(handle: DeMAModel, private: dict[str, torch.Tensor], path: str | Path, *, fingerprint: str) -> Path:
    """Save gathered private values (gather_fp32 of the private parameters) in save_part's format."""
    return save_part(handle, path, "private", fingerprint=fingerprint, tensors=private)


def read_private(handle: DeMAModel, path: str | Path, *, fingerprint: str) -> dict[str, torch.Tensor]:
    """A saved private part's tensors, checked to belong to `handle`'s model and backbone (load them
    with load_fp32)."""
    tensors, _ = read_checked_part(handle, path, "private", fingerprint=fingerprint)
    return tensors
