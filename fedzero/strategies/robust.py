"""Robust aggregation and differential privacy at aggregation (docs/security.md; docs/config.md,
`federation.robust` and `federation.dp`).

Both act on the round's client deltas through what both aggregation paths already share
(Strategy.block_coefficients on the blocks' Grams, then a combination per block), so the in-process
path and the sharded MPI aggregator apply them identically:

- **Norm clipping.** A client's update norm is ||Δ_k|| over all its blocks, read off the Grams'
  diagonals. `clip_to_median: k` scales every update longer than k × the median norm of the round's
  clients down to that length; `dp.clip: C` scales it down to at most C. Scaling client k by s_k
  turns the Gram into S G S, and the combination Σ β_k (s_k Δ_k) into Σ (β_k s_k) Δ_k: the strategy
  (FedAvg or CMGA) computes its coefficients on the clipped Grams and the scales fold into β.
- **Coordinate-wise trimmed mean / median** (`aggregate: trimmed_mean | median`, FedAvg only):
  per element, over the clients holding the block, of the (clipped) deltas, unweighted (a claimed
  sample count is exactly what an attacker controls). Each rank of the MPI aggregator holds every
  client's values for its rows, so it computes them for its slice.
- **Differential privacy** (`dp`, FedAvg only): every update clipped to L2 norm C, the unweighted
  mean over the block's holders (sensitivity C/K_b for add/remove of one client), then Gaussian
  noise of standard deviation sigma = noise_multiplier × C / K_b per element of block b. The privacy
  loss over the rounds run is accounted with Google's `dp-accounting` RDP accountant (a Gaussian
  mechanism per round, every client taking part: no subsampling amplification).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["AGGREGATES", "RobustSettings", "DPSettings", "read_robust", "read_dp", "clip_scales", "coordinate_stat",
           "dp_epsilon", "check_composition", "noise_generator"]

AGGREGATES = ("mean", "trimmed_mean", "median")


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class RobustSettings:
    """`federation.robust`."""
    clip_to_median: float | None = None      # k >= 1: clip every update norm to k x the round's median norm
    aggregate: str = "mean"                  # mean | trimmed_mean | median (coordinate-wise)
    trim: float = 0.1                        # trimmed_mean: the fraction cut from each end, in [0, 0.5)

    @property
    def coordinatewise(self) -> bool:
        return self.aggregate != "mean"

    @property
    def active(self) -> bool:
        return self.clip_to_median is not None or self.coordinatewise


@dataclass(frozen=True)
class DPSettings:
    """`federation.dp`. `noise_seed` is for tests only (predictable noise protects nothing); it is
    not a config key."""
    clip: float                              # C > 0: every update's L2 norm is clipped to C
    noise_multiplier: float                  # z > 0: sigma = z C / K on the mean
    delta: float = 1e-5                      # the delta of the reported (epsilon, delta)
    noise_seed: int | None = None


def _problems_of(data, known: dict, path: str, add) -> dict | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        add(path, f"must be a mapping, got {type(data).__name__}")
        return None
    for key in data:
        if key not in known:
            add(f"{path}.{key}", f"is not a key of {path} (known: {', '.join(known)})")
    return {k: v for k, v in data.items() if k in known}


def read_robust(data, add, path: str = "federation.robust") -> RobustSettings | None:
    """`federation.robust` (a mapping or None); `add(path, message)` records each problem."""
    data = _problems_of(data, {"clip_to_median": 0, "aggregate": 0, "trim": 0}, path, add)
    if not data:
        return None
    ok = True
    k = data.get("clip_to_median")
    if k is not None and (not _real(k) or k < 1):
        add(f"{path}.clip_to_median", f"must be a finite number >= 1 (k x the median update norm), got {k!r}")
        ok = False
    agg = data.get("aggregate", "mean")
    if agg not in AGGREGATES:
        add(f"{path}.aggregate", f"must be one of {list(AGGREGATES)}, got {agg!r}")
        ok = False
    trim = data.get("trim", 0.1)
    if not _real(trim) or not 0 <= trim < 0.5:
        add(f"{path}.trim", f"must be a number in [0, 0.5) (the fraction cut from each end), got {trim!r}")
        ok = False
    elif "trim" in data and agg != "trimmed_mean":
        add(f"{path}.trim", f"applies to aggregate: trimmed_mean only (aggregate is {agg!r})")
        ok = False
    if not ok:
        return None
    return RobustSettings(None if k is None else float(k), agg, float(trim))


def read_dp(data, add, path: str = "federation.dp") -> DPSettings | None:
    data = _problems_of(data, {"clip": 0, "noise_multiplier": 0, "delta": 0}, path, add)
    if not data:
        return None
    ok = True
    for key in ("clip", "noise_multiplier"):
        v = data.get(key)
        if v is None:
            add(f"{path}.{key}", "is required")
            ok = False
        elif not _real(v) or v <= 0:
            add(f"{path}.{key}", f"must be a finite number > 0, got {v!r}")
            ok = False
    delta = data.get("delta", 1e-5)
    if not _real(delta) or not 0 < delta < 1:
        add(f"{path}.delta", f"must be a number in (0, 1), got {delta!r}")
        ok = False
    if ok:
        try:
            import dp_accounting  # noqa: F401
        except ImportError:
            add(path, "needs the dp-accounting package for its epsilon (pip install dp-accounting)")
            ok = False
    return DPSettings(float(data["clip"]), float(data["noise_multiplier"]), float(delta)) if ok else None


def check_composition(strategy: str, robust: RobustSettings | None, dp: DPSettings | None) -> str | None:
    """Why these options cannot go together with ``strategy`` (None if they can)."""
    if robust is not None and robust.coordinatewise and strategy != "fedavg":
        return (f"federation.robust.aggregate: {robust.aggregate} replaces the weighted mean by a coordinate-wise "
                f"statistic, and strategy {strategy!r} combines the updates with its own coefficients (CMGA: "
                "group means aligned by projection), which a per-coordinate median is not; use strategy fedavg "
                "with it, or clip_to_median (which composes with CMGA: the clipped updates go into its Gram)")
    if dp is not None and strategy != "fedavg":
        return (f"federation.dp needs strategy fedavg: its noise is calibrated to the unweighted mean's "
                f"sensitivity C/K, and strategy {strategy!r} weighs clients by data-dependent coefficients")
    if dp is not None and robust is not None and robust.active:
        return ("federation.dp and federation.robust cannot be combined: median-relative clipping and "
                "coordinate-wise statistics make one client's update change the others' contributions, "
                "which the DP noise is not calibrated for (dp.clip bounds every update by itself)")
    return None


# --------------------------------------------------------------------------- the math

def clip_scales(norms: np.ndarray, robust: RobustSettings | None, dp: DPSettings | None) -> tuple[np.ndarray, dict]:
    """s [K] in (0, 1]: the factor each client's update is scaled by, and a report."""
    s = np.ones_like(norms)
    report: dict = {"norms": [float(n) for n in norms]}
    bounds = []
    if robust is not None and robust.clip_to_median is not None:
        median = float(np.median(norms))
        bounds.append(robust.clip_to_median * median)
        report.update(median_norm=median, clip_to_median=robust.clip_to_median)
    if dp is not None:
        bounds.append(dp.clip)
    if bounds:
        bound = min(bounds)
        big = norms > bound
        s[big] = bound / norms[big]
        report.update(clip_bound=bound, scales=[float(x) for x in s], clipped=int(big.sum()))
    return s, report


def coordinate_stat(X: np.ndarray, robust: RobustSettings, out: np.ndarray | None = None) -> np.ndarray:
    """Per column of X [k, m] (k clients' values of m elements): the median, or the mean of what
    is left after cutting floor(trim k) values from each end."""
    if robust.aggregate == "median":
        return np.median(X, axis=0, out=out)
    k = X.shape[0]
    cut = int(math.floor(robust.trim * k))
    if cut == 0:
        return np.mean(X, axis=0, out=out)
    S = np.sort(X, axis=0)
    return np.mean(S[cut:k - cut], axis=0, out=out)


def noise_generator(dp: DPSettings, round: int, part: int = 0) -> torch.Generator:
    """The noise source: fresh OS randomness, unless a test fixed `noise_seed`."""
    g = torch.Generator()
    if dp.noise_seed is None:
        g.manual_seed(secrets.randbits(63))
    else:
        g.manual_seed(int(np.random.SeedSequence([dp.noise_seed, round, part]).generate_state(1)[0]))
    return g


def add_noise(delta: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """delta + N(0, sigma^2) elementwise, in delta's dtype (float64 in both paths)."""
    return delta + sigma * torch.randn(delta.shape, generator=generator, dtype=delta.dtype)


def dp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """epsilon of `rounds` compositions of the Gaussian mechanism with this noise multiplier (no
    subsampling), at `delta`: dp-accounting's RDP accountant."""
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))
