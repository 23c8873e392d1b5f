"""The server step θ ← θ + lr·m with m ← momentum·m + Δ, used by both aggregation paths.

`ServerOptimizer.apply` is the step as a function of (θ, Δ, buffers): the in-process path keeps
the buffers in the optimizer (`step`), the sharded aggregator passes each rank's slices of θ, Δ
and the buffers read from the store. The step is elementwise, so slicing changes nothing.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class ServerOptimizer:
    """θ ← θ + lr·m with m ← momentum·m + Δ (momentum = 0: plain θ + lr·Δ).

    The math runs in at least float32 (a bf16 global state is not stepped in bf16) and the result is
    cast back to each parameter's dtype. Keys absent from `delta` are left as they are, buffer included.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.0):
        if not _real(lr) or not math.isfinite(lr) or lr <= 0:    # a NaN lr would publish a NaN global
            raise ValueError(f"server lr must be a finite number > 0, got {lr!r}")
        if not _real(momentum) or not 0 <= momentum < 1:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
        self.lr, self.momentum = float(lr), float(momentum)
        self._buf: dict[str, Tensor] = {}

    def apply(self, global_state: dict[str, Tensor], delta: dict[str, Tensor],
              buffers: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One step from the given momentum buffers; returns (new state, new buffers). `buffers` is
        not modified; the new buffers are the given ones plus every key of `delta` (none without momentum)."""
        unknown = sorted(set(delta) - set(global_state))
        if unknown:
            raise ValueError(f"server step: delta has keys not in the global state: {unknown}")
        new, buf = {}, dict(buffers)
        for key, theta in global_state.items():
            if key not in delta:
                new[key] = theta.clone()
                continue
            dtype = torch.promote_types(theta.dtype, torch.float32)
            d = delta[key].to(device=theta.device, dtype=dtype)
            if self.momentum:
                prev = buf.get(key)
                d = d.clone() if prev is None else self.momentum * prev.to(dtype) + d
                buf[key] = d
            new[key] = (theta.to(dtype) + self.lr * d).to(theta.dtype)
        return new, buf

    def step(self, global_state: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
        """`apply` with the buffers this optimizer holds, which it then keeps."""
        new, self._buf = self.apply(global_state, delta, self._buf)
        return new

    def state_dict(self) -> dict[str, Tensor]:
        """The momentum buffers (tensors only, so they save with safetensors); empty without momentum."""
        return {k: v.clone() for k, v in self._buf.items()}

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        self._buf = {k: v.clone() for k, v in sd.items()}


def _nonfinite(tensors: dict[str, Tensor]) -> str | None:
    for key in sorted(tensors):
        t = tensors[key]
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            nan = int(torch.isnan(t).sum())
            return f"tensor {key!r} holds {nan} NaN and {int((~torch.isfinite(t)).sum()) - nan} Inf values"
    return None


def publish_refusal(round: int, strategy, state: dict[str, Tensor], buffers: dict[str, Tensor], *,
                    state_from_round: int | None, loaded_state_finite: bool = True,
                    beta=None) -> str | None:
    """Why the new global of round+1 (and the server state after round) must not be published, or
    None if every value is finite. Both aggregation paths call it before writing anything: a
    published global is write-once, so a NaN one would end the run. The message names what can
    have produced it: the server lr, the momentum state carried in, non-finite coefficients
    (e.g. CMGA's c_max), given that the updates were checked finite."""
    found = [f"the new global's {why}" for why in [_nonfinite(state)] if why]
    found += [f"the new server momentum's {why}" for why in [_nonfinite(buffers or {})] if why]
    if not found:
        return None
    opt = strategy.server_opt
    causes = [f"server_lr {opt.lr:g} (the step is lr x the aggregate, in float32 or wider)"]
    if opt.momentum:
        carried = ("none carried in" if state_from_round is None else
                   f"the momentum state of round {state_from_round}"
                   + ("" if loaded_state_finite else ", which itself holds non-finite values"))
        causes.append(f"server_momentum {opt.momentum:g} ({carried})")
    if beta is not None:
        import numpy as np

        beta = np.asarray(beta)
        if not np.isfinite(beta).all():
            causes.append("non-finite aggregation coefficients (beta)"
                          + (f"; CMGA c_max {strategy.c_max:g}" if hasattr(strategy, "c_max") else ""))
    return (f"refusing to publish the global of round {round + 1}: {'; '.join(found)}. Possible causes: "
            f"{'; '.join(causes)}. The client updates were checked finite. Nothing was written.")
