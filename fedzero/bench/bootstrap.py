"""Paired bootstrap intervals for a method's gain over its control (fedzero.bench.stats: the runs'
stored outcomes): seeds drawn with replacement, then within every drawn seed its test records with
replacement within each stratum (topic, or the LM task's domain), one draw shared by both arms. A
gain is arm a minus arm b in each class metric, or for the LM task the relative reduction of NLL per
token (stats.LM_GAINS); the interval is the 2.5th to 97.5th percentile over resamples of the mean
over seeds of the mean over the view's clients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stats import CLASS_METRICS, LM_GAINS, Interval, LMOutcomes, Outcomes, unit_metrics, unit_sums


@dataclass
class SeedPair:
    """One seed: its test records, and two arms' (method a, control b) predictions per client on them.
    A pair knows its gain metrics and computes them for any record weights (`gains`): the bootstrap
    below is the same for every task."""

    y: np.ndarray                # [N]
    strata: np.ndarray           # [N] in 0..T-1
    pred_a: np.ndarray           # [K, N]
    pred_b: np.ndarray           # [K, N]
    unit_client: np.ndarray      # [U]: a unit is one client's view,
    unit_strata: np.ndarray      # [U, T] bool: made of whole strata (topics)
    n_classes: int

    metrics = CLASS_METRICS      # the gains: arm a minus arm b, in each class metric

    def gains(self, weights: list[np.ndarray]) -> dict[str, np.ndarray]:
        """{metric: [M, U]} for record weights [M, n_t] per stratum t."""
        m = _pair_metrics(self, weights)
        return {k: m[k][:, 0] - m[k][:, 1] for k in self.metrics}


@dataclass
class LMSeedPair:
    """One seed of the LM task: per client, two arms' per-record NLL on the same test records."""

    strata: np.ndarray           # [N] in 0..T-1
    nll_a: np.ndarray            # [K, N]
    nll_b: np.ndarray            # [K, N]
    tokens: np.ndarray           # [K, N], the same for both arms (checked)
    unit_client: np.ndarray      # [U]
    unit_strata: np.ndarray      # [U, T]

    metrics = LM_GAINS           # the gain: relative reduction of the ratio of sums, 1 - a / b

    def gains(self, weights: list[np.ndarray]) -> dict[str, np.ndarray]:
        sums = unit_sums(np.stack([self.nll_a, self.nll_b, self.tokens]), self.strata, self.unit_client,
                         self.unit_strata, weights)                    # [M, 3, U]
        per_token_a, per_token_b = sums[:, 0] / sums[:, 2], sums[:, 1] / sums[:, 2]
        return {"nll_per_token": 1 - per_token_a / per_token_b}


def pair_outcomes(a: Outcomes | LMOutcomes, b: Outcomes | LMOutcomes) -> SeedPair | LMSeedPair:
    """Pair two runs of one seed record by record; refuses runs that scored different records."""
    if type(a) is not type(b):
        raise ValueError("cannot pair an LM run with a classification run")
    if a.topics != b.topics or not np.array_equal(a.uids, b.uids):
        raise ValueError("the two runs scored different test records")
    if a.clients != b.clients or a.client_topics != b.client_topics:
        raise ValueError("the two runs have different clients")
    unit_client, unit_strata = a.unit_layout()
    if isinstance(a, LMOutcomes):
        if not (np.array_equal(a.tokens, b.tokens) and np.array_equal(a.bytes, b.bytes)):
            raise ValueError("the two runs tokenised the test records differently (another backbone per client?)")
        return LMSeedPair(a.strata, a.nll, b.nll, a.tokens, unit_client, unit_strata)
    if not np.array_equal(a.y, b.y):
        raise ValueError("the two runs scored different test records")
    return SeedPair(a.y, a.strata, a.predictions(), b.predictions(), unit_client, unit_strata, a.scores.shape[2])


@dataclass
class Draws:
    """The bootstrap's random draws. seeds [B, S]: the seed in each of the S slots of resample b.
    records[s][t]: [M_s, n_t] indices into stratum t of seed s, one row per slot that drew seed s,
    in row-major slot order (np.nonzero(seeds == s))."""

    seeds: np.ndarray
    records: list[list[np.ndarray]]


def draw_resamples(rng: np.random.Generator, stratum_sizes: list[list[int]], n_boot: int) -> Draws:
    """Seeds with replacement, then within every drawn seed its records with replacement within each
    stratum (so every view keeps its size). One record draw per slot, shared by both arms: the pairing."""
    n_seeds = len(stratum_sizes)
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    picks = np.bincount(seeds.ravel(), minlength=n_seeds)
    records = [[rng.integers(0, n, size=(picks[s], n)) for n in sizes] for s, sizes in enumerate(stratum_sizes)]
    return Draws(seeds, records)


def resample_counts(index: np.ndarray, n: int) -> np.ndarray:
    """[M, k] draws from range(n) -> [M, n] how often each record was drawn (float32 holds these
    integer counts exactly, and keeps the matrix product fast)."""
    m = index.shape[0]
    flat = (np.arange(m)[:, None] * n + index).ravel()
    return np.bincount(flat, minlength=m * n).reshape(m, n).astype(np.float32)


def _pair_metrics(pair: SeedPair, weights: list[np.ndarray]) -> dict[str, np.ndarray]:
    return unit_metrics(pair.y, pair.strata, np.stack([pair.pred_a, pair.pred_b]), pair.unit_client,
                        pair.unit_strata, pair.n_classes, weights)


def _stratum_sizes(pair: SeedPair) -> list[int]:
    return np.bincount(pair.strata, minlength=pair.unit_strata.shape[1]).tolist()


def full_sample_gains(pairs: list[SeedPair | LMSeedPair]) -> dict[str, np.ndarray]:
    """{metric: [S, U]}: the gain of arm a over arm b on every seed's records as they are."""
    out = {k: [] for k in pairs[0].metrics}
    for pair in pairs:
        gains = pair.gains([np.ones((1, n), dtype=np.float32) for n in _stratum_sizes(pair)])
        for k in out:
            out[k].append(gains[k][0])
    return {k: np.stack(v) for k, v in out.items()}


def slot_gains(pairs: list[SeedPair | LMSeedPair], draws: Draws) -> dict[str, np.ndarray]:
    """{metric: [B, S, U]}: the gain of arm a over arm b in every slot of every resample, on that slot's records."""
    n_boot, n_slots = draws.seeds.shape
    n_units = len(pairs[0].unit_client)
    out = {k: np.empty((n_boot, n_slots, n_units)) for k in pairs[0].metrics}
    for s, pair in enumerate(pairs):
        rows, cols = np.nonzero(draws.seeds == s)
        if not len(rows):
            continue
        weights = [resample_counts(idx, n) for idx, n in zip(draws.records[s], _stratum_sizes(pair))]
        gains = pair.gains(weights)
        for k in out:
            out[k][rows, cols] = gains[k]
    return out


@dataclass
class Bootstrap:
    """A gain's full-sample values [S, U] and bootstrap slot values [B, S, U] per metric."""

    units: list[tuple[str, str]]
    seeds: list[int]
    full: dict[str, np.ndarray]
    slots: dict[str, np.ndarray]

    @property
    def metrics(self) -> list[str]:
        return list(self.full)

    def interval(self, metric: str, view: str, client: str | None = None) -> Interval | None:
        """The gain in `view`, mean over the clients that have it (or of one client); None if none has."""
        cols = [u for u, (c, v) in enumerate(self.units) if v == view and client in (None, c)]
        if not cols:
            return None
        per_resample = self.slots[metric][:, :, cols].mean(axis=2).mean(axis=1)
        low, high = np.percentile(per_resample, [2.5, 97.5])
        return Interval(float(self.full[metric][:, cols].mean()), float(low), float(high))


def paired_bootstrap(method: dict[int, Outcomes | LMOutcomes], control: dict[int, Outcomes | LMOutcomes], *,
                     n_boot: int = 2000, seed: int = 0) -> Bootstrap | None:
    """Gain of `method` over `control` ({seed: Outcomes} each, or LMOutcomes: then the gain is the
    relative reduction of NLL per token), paired by seed and record, over the seeds both have (None
    if none). Deterministic given `seed`."""
    seeds = sorted(set(method) & set(control))
    if not seeds:
        return None
    units = method[seeds[0]].units()
    if any(method[s].units() != units for s in seeds):
        raise ValueError("the seeds' runs have different clients or topics: their gains cannot be averaged")
    pairs = [pair_outcomes(method[s], control[s]) for s in seeds]
    draws = draw_resamples(np.random.default_rng(seed), [_stratum_sizes(p) for p in pairs], n_boot)
    return Bootstrap(units, seeds, full_sample_gains(pairs), slot_gains(pairs, draws))
