"""Issue 14, part 2: differential privacy at aggregation (federation.dp; fedzero/strategies/robust.py).

Every update is clipped to L2 norm C, the unweighted mean taken, and Gaussian noise of standard
deviation noise_multiplier x C / K added per element; epsilon over the rounds run comes from
dp-accounting's RDP accountant (Gaussian mechanism, no subsampling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedzero.aggregator import run_aggregation
from fedzero.config import ConfigError, FederationSettings
from fedzero.store import FederationStore
from fedzero.strategies import ClientUpdate, make_strategy
from fedzero.strategies.robust import DPSettings, dp_epsilon

K, D, C, Z = 8, 20000, 0.5, 1.2


def block(_key):
    return "blk"


def make_global():
    return {"w": torch.zeros(D)}


def deltas():
    return [{"w": torch.randn(D, generator=torch.Generator().manual_seed(i)) * (0.001 if i else 1.0)} for i in range(K)]


def clipped_mean():
    out = torch.zeros(D, dtype=torch.float64)
    for d in deltas():
        n = float(d["w"].double().norm())
        out += d["w"].double() * min(1.0, C / n)
    return out / K


def strategy(seed=3):
    return make_strategy("fedavg", seed=0).set_defenses(None, DPSettings(C, Z, 1e-5, noise_seed=seed))


def test_epsilon_is_the_rdp_accountants_and_below_the_classic_rdp_bound():
    # RDP of T Gaussian mechanisms: T alpha / (2 z^2); the classic conversion
    # eps <= min_alpha RDP(alpha) + log(1/delta) / (alpha - 1) is an upper bound on the accountant's.
    for z, rounds in [(1.0, 1), (1.0, 10), (2.0, 100)]:
        alpha = np.linspace(1.01, 500, 200_000)
        classic = float((rounds * alpha / (2 * z * z) + math.log(1e5) / (alpha - 1)).min())
        eps = dp_epsilon(z, rounds, 1e-5)
        assert 0.85 * classic < eps <= classic
    assert dp_epsilon(1.0, 1, 1e-5) == pytest.approx(4.7285, abs=1e-3)     # dp-accounting 0.6.0
    assert dp_epsilon(1.0, 10, 1e-5) > dp_epsilon(1.0, 1, 1e-5)


def test_in_process_clips_averages_unweighted_and_adds_the_stated_noise():
    ups = [ClientUpdate(f"c{i}", d, 10 ** i if i < 5 else 1, "f") for i, d in enumerate(deltas())]
    new, report = strategy().aggregate(make_global(), ups, round=4, block_of=block)
    noise = new["w"].double() - clipped_mean()

    sigma = Z * C / K
    assert float(noise.std()) == pytest.approx(sigma, rel=0.03)
    assert abs(float(noise.mean())) < 4 * sigma / math.sqrt(D)
    dp = report["defense"]["dp"]
    assert dp["rounds_accounted"] == 5 and dp["epsilon"] == pytest.approx(dp_epsilon(Z, 5, 1e-5))
    assert report["blocks"]["blk"]["dp_sigma"] == pytest.approx(sigma)
    assert report["defense"]["clipped"] == 1 and report["defense"]["scales"][0] < 1   # c0 (norm ~141) only


def test_the_mpi_aggregator_adds_the_same_noise_and_reports_epsilon(tmp_path):
    store = FederationStore(tmp_path / "store")
    store.publish_global(0, make_global())
    for i, d in enumerate(deltas()):
        store.write_update(0, f"c{i}", d, fingerprint="f", num_samples=1 + i)

    result = run_aggregation(store.root, 0, strategy(), comm=None, block_of=block, log=lambda m: None)
    noise = store.read_global(1)[0]["w"].double() - clipped_mean()

    assert float(noise.std()) == pytest.approx(Z * C / K, rel=0.03)
    assert result["defense"]["dp"]["epsilon"] == pytest.approx(dp_epsilon(Z, 1, 1e-5))


def test_fresh_noise_unless_seeded():
    ups = [ClientUpdate(f"c{i}", d, 1, "f") for i, d in enumerate(deltas())]
    s = make_strategy("fedavg", seed=0).set_defenses(None, DPSettings(C, Z))
    a, _ = s.aggregate(make_global(), ups, round=0, block_of=block)
    b, _ = s.aggregate(make_global(), ups, round=0, block_of=block)
    assert not torch.equal(a["w"], b["w"])
    assert torch.equal(strategy(7).aggregate(make_global(), ups, round=0, block_of=block)[0]["w"],
                       strategy(7).aggregate(make_global(), ups, round=0, block_of=block)[0]["w"])


def test_the_config_refuses_dp_with_cmga_or_robust_and_bad_values():
    with pytest.raises(ConfigError, match="federation.dp needs strategy fedavg"):
        FederationSettings(strategy="cmga", dp={"clip": 1.0, "noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="cannot be combined"):
        FederationSettings(strategy="fedavg", dp={"clip": 1.0, "noise_multiplier": 1.0},
                           robust={"clip_to_median": 2})
    with pytest.raises(ConfigError) as err:
        FederationSettings(strategy="fedavg", dp={"clip": -1, "delta": 2})
    text = str(err.value)
    assert "federation.dp.clip" in text and "federation.dp.noise_multiplier is required" in text
    assert "federation.dp.delta" in text
    s = FederationSettings(strategy="fedavg", dp={"clip": 1.0, "noise_multiplier": 0.8}).make_strategy(seed=0)
    assert s.dp == DPSettings(1.0, 0.8, 1e-5)
