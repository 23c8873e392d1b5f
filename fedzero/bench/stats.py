"""Per-record test outcomes of bench runs: their stored format, view metrics, the prior-only
control, and the per-unit metrics under record weights that the paired bootstrap (bootstrap.py)
resamples.

Stored format (written by fedzero.bench.methods into every run record, read by `decode_run`). Long
lists are space-separated strings, since results.json is written one JSON value per line:

    run["test_records"] = {"labels": ["negative", "neutral", "positive"],
                           "topics": {topic: {"uids": "17 4 88 ...", "y": "0212..."}}}
        the test records every client of the run scored, per topic in the split's order: their
        source uids and true class indices (one digit each). Identical for every method of one
        (setting, seed), since the split depends only on (seed, topic): that is what pairs two
        methods record by record.
    client["test_scores"] = {topic: "-1.2345 -2.5 -0.75 ..."}
        the label scores (log-likelihood of each label word) of every test record, row-major [n, C],
        rounded to SCORE_DECIMALS.
    client["train_labels"] = {label: count}: the client's train label counts (the prior-only control).

The LM task (fedzero.bench.lm_data) stores per-record NLL instead of label scores:

    run["test_records"] = {"task": "lm", "domains": {domain: {"uids": "12.0 12.1 40.0 ..."}}}
        the test records of every domain in the split's order, by uid without its "<domain>/" prefix
        ("<document index>.<part>"); identical for every method of one (setting, seed).
    client["test_nll"] = {domain: {"nll": "83.1234 12.5 ...", "tokens": "37 12 ...", "bytes": "150 40 ..."}}
        each test record's summed next-token NLL (nats, SCORE_DECIMALS), scored tokens and covered bytes.
    client["domains"] in place of client["topics"]; no train label counts (no prior-only control).

Views per client, as in fedzero.bench.data: own (its topics), unseen (the other topics), global (all).
A run's metric in a view is the mean over the clients that have that view. For the LM task a client's
metric in a view is a ratio of sums over the view's records (NLL per token: sum(nll) / sum(tokens)),
and a gain is the relative reduction 1 - method / control of that ratio (a fraction: 0.05 is "5%
lower NLL per token"), per client, then averaged over clients like the class metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedzero.evaluate import metrics_from_counts

SCORE_DECIMALS = 4
CLASS_METRICS = ("accuracy", "macro_f1", "balanced_accuracy")
LM_METRICS = ("nll_per_token", "nll_per_byte")      # levels (lower is better)
# The LM gain: the relative reduction of NLL per token. Both arms of a pair are the same client (same
# tokenizer) on the same records, so tokens and bytes are equal in both and the relative reduction
# per byte is the same number: one gain metric covers both.
LM_GAINS = ("nll_per_token",)
VIEWS = ("own", "unseen", "global")


# -- the stored format ------------------------------------------------------------------------------

def encode_records(test: dict[str, list[dict]], labels: list[str]) -> dict:
    """run["test_records"] from the split's test sets ({topic: records with "uid" and "label"})."""
    if len(labels) > 10:
        raise ValueError("one digit per true label: at most 10 labels")
    return {"labels": list(labels),
            "topics": {t: {"uids": " ".join(str(int(r["uid"])) for r in recs),
                           "y": "".join(str(labels.index(r["label"])) for r in recs)}
                       for t, recs in test.items()}}


def _number(x: float, decimals: int) -> str:
    """x with at most `decimals` decimals and no trailing zeros; never "-0"."""
    text = f"{x:.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def encode_scores(scores: dict[str, np.ndarray], decimals: int = SCORE_DECIMALS) -> dict[str, str]:
    """client["test_scores"] from {topic: [n, C] label scores}."""
    return {t: " ".join(_number(x, decimals) for x in np.asarray(s, dtype=np.float64).ravel()) for t, s in scores.items()}


def label_counts(records: list[dict], labels: list[str]) -> dict[str, int]:
    return {lab: sum(r["label"] == lab for r in records) for lab in labels}


def encode_lm_records(test: dict[str, list[dict]]) -> dict:
    """run["test_records"] of an LM run from the split's test sets ({domain: records with "uid"})."""
    def short(domain: str, uid: str) -> str:
        if not uid.startswith(f"{domain}/") or " " in uid:
            raise ValueError(f"record uid {uid!r} is not '<domain>/<index>.<part>' of domain {domain!r}")
        return uid[len(domain) + 1:]
    return {"task": "lm", "domains": {d: {"uids": " ".join(short(d, r["uid"]) for r in recs)}
                                      for d, recs in test.items()}}


def encode_lm_scores(per_domain: dict, decimals: int = SCORE_DECIMALS) -> dict[str, dict[str, str]]:
    """client["test_nll"] from {domain: (nll [n], tokens [n], bytes [n])} (lm_score.RecordNLL)."""
    return {d: {"nll": " ".join(_number(x, decimals) for x in np.asarray(nll, dtype=np.float64)),
                "tokens": " ".join(str(int(x)) for x in tokens), "bytes": " ".join(str(int(x)) for x in nbytes)}
            for d, (nll, tokens, nbytes) in per_domain.items()}


def decode_lm_scores(encoded: dict[str, dict[str, str]]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The inverse of encode_lm_scores: {domain: (nll, tokens, bytes)} arrays."""
    return {d: (np.array(e["nll"].split(), dtype=np.float64), np.array(e["tokens"].split(), dtype=np.int64),
                np.array(e["bytes"].split(), dtype=np.int64)) for d, e in encoded.items()}


def lm_view_metrics(per_domain: dict, views: dict[str, list[str]], limit: dict[str, int] | None = None
                    ) -> dict[str, dict]:
    """{view: {nll_per_token, nll_per_byte, tokens, bytes, n}} of one client from {domain: (nll, tokens,
    bytes)} per-record arrays (only each domain's first limit[domain] records, if given): ratios of
    sums over the view's records."""
    out = {}
    for view, domains in views.items():
        n = {d: None if limit is None else limit[d] for d in domains}
        nll = sum(float(np.sum(per_domain[d][0][:n[d]])) for d in domains)
        tokens = sum(int(np.sum(per_domain[d][1][:n[d]])) for d in domains)
        nbytes = sum(int(np.sum(per_domain[d][2][:n[d]])) for d in domains)
        records = sum(len(per_domain[d][0][:n[d]]) for d in domains)
        out[view] = {"nll_per_token": nll / tokens if tokens else None, "nll_per_byte": nll / nbytes if nbytes else None,
                     "tokens": tokens, "bytes": nbytes, "n": records}
    return out


class _Views:
    """The (client, view) units of a run's outcomes: needs .topics (the strata: topics, or the LM
    task's domains), .clients and .client_topics."""

    def units(self) -> list[tuple[str, str]]:
        """(client, view) for every view each client has (no "unseen" for a client holding every topic)."""
        return [(c, v) for c, own in zip(self.clients, self.client_topics) for v in VIEWS
                if not (v == "unseen" and set(self.topics) <= set(own))]

    def unit_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """(unit_client [U] client index, unit_strata [U, T] bool: the topics of each unit's view)."""
        units = self.units()
        index = {c: k for k, c in enumerate(self.clients)}
        strata = np.zeros((len(units), len(self.topics)), dtype=bool)
        for u, (c, v) in enumerate(units):
            own = set(self.client_topics[index[c]])
            strata[u] = [v == "global" or (t in own) == (v == "own") for t in self.topics]
        return np.array([index[c] for c, _ in units]), strata


@dataclass
class Outcomes(_Views):
    """One run's final test outcomes: N records (topics concatenated in order), K clients' scores."""

    topics: list[str]
    labels: list[str]
    uids: np.ndarray             # [N]
    y: np.ndarray                # [N] true class
    strata: np.ndarray           # [N] index into topics: records are resampled within their topic
    clients: list[str]
    client_topics: list[list[str]]
    scores: np.ndarray           # [K, N, C] label scores
    train_labels: np.ndarray | None = None   # [K, C] train label counts, None if not recorded

    def predictions(self) -> np.ndarray:
        return self.scores.argmax(axis=2)        # [K, N]; ties to the first class, as classification_metrics


@dataclass
class LMOutcomes(_Views):
    """One LM run's final test outcomes: N records (domains concatenated in order), K clients' NLL."""

    topics: list[str]            # the domains (named like Outcomes.topics: the view layout is shared)
    uids: np.ndarray             # [N] "<domain>/<index>.<part>"
    strata: np.ndarray           # [N] index into topics: records are resampled within their domain
    clients: list[str]
    client_topics: list[list[str]]   # each client's domains
    nll: np.ndarray              # [K, N] summed next-token NLL per record, nats
    tokens: np.ndarray           # [K, N] scored tokens
    bytes: np.ndarray            # [K, N] covered UTF-8 bytes


def decode_run(run: dict) -> Outcomes | LMOutcomes | None:
    """The run's Outcomes (LMOutcomes for an LM run), or None for a run recorded before outcomes were stored."""
    records = run.get("test_records")
    if records and records.get("task") == "lm":
        return decode_lm_run(run)
    if not records or not run.get("clients") or any("test_scores" not in c for c in run["clients"]):
        return None
    topics, labels = list(records["topics"]), list(records["labels"])
    uids = np.concatenate([np.array(records["topics"][t]["uids"].split(), dtype=np.int64) for t in topics])
    y = np.concatenate([np.frombuffer(records["topics"][t]["y"].encode(), dtype=np.uint8).astype(np.int64) - 48
                        for t in topics])
    strata = np.concatenate([np.full(len(records["topics"][t]["y"]), i) for i, t in enumerate(topics)])
    scores = np.stack([np.concatenate([np.array(c["test_scores"][t].split(), dtype=np.float64).reshape(-1, len(labels))
                                       for t in topics]) for c in run["clients"]])
    if scores.shape[1] != len(y):
        raise ValueError(f"run {run.get('method')!r} seed {run.get('seed')}: {scores.shape[1]} scored records, {len(y)} stored")
    train = ([[c["train_labels"][lab] for lab in labels] for c in run["clients"]]
             if all("train_labels" in c for c in run["clients"]) else None)
    return Outcomes(topics, labels, uids, y, strata, [c["id"] for c in run["clients"]],
                    [list(c["topics"]) for c in run["clients"]], scores,
                    None if train is None else np.array(train, dtype=np.float64))


def decode_lm_run(run: dict) -> LMOutcomes | None:
    records = run["test_records"]
    if not run.get("clients") or any("test_nll" not in c for c in run["clients"]):
        return None
    domains = list(records["domains"])
    uids = np.array([f"{d}/{u}" for d in domains for u in records["domains"][d]["uids"].split()])
    strata = np.concatenate([np.full(len(records["domains"][d]["uids"].split()), i) for i, d in enumerate(domains)])
    per_client = [decode_lm_scores(c["test_nll"]) for c in run["clients"]]
    nll, tokens, nbytes = (np.stack([np.concatenate([p[d][j] for d in domains]) for p in per_client]) for j in range(3))
    if nll.shape[1] != len(uids):
        raise ValueError(f"run {run.get('method')!r} seed {run.get('seed')}: {nll.shape[1]} scored records, {len(uids)} stored")
    return LMOutcomes(domains, uids, strata, [c["id"] for c in run["clients"]],
                      [list(c["domains"]) for c in run["clients"]], nll, tokens, nbytes)


# -- gains -------------------------------------------------------------------------------------------

@dataclass
class Interval:
    """A gain: its point estimate and, where per-record outcomes were stored, a bootstrap interval."""

    point: float                  # mean over seeds of the gain on all records
    low: float | None = None      # 2.5th percentile of the bootstrap distribution (None: no records stored)
    high: float | None = None     # 97.5th

    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


# -- the prior-only control -------------------------------------------------------------------------

def prior_shift(scores: np.ndarray, own_counts, pooled_counts) -> np.ndarray:
    """Bayes' rule under label shift: a model fit to label prior π_own scores log p(x|c) + log π_own(c)
    up to a constant in c; re-fitting only its prior to π_pool adds log π_pool(c) − log π_own(c).
    Priors from counts with +1 smoothing, so a label a client never saw keeps a finite score."""
    own = np.asarray(own_counts, dtype=np.float64) + 1
    pooled = np.asarray(pooled_counts, dtype=np.float64) + 1
    return np.asarray(scores, dtype=np.float64) + np.log(pooled / pooled.sum()) - np.log(own / own.sum())


def prior_only(local: Outcomes) -> Outcomes:
    """The prior-only control of a local-only run: every client's scores with its label prior re-fit
    to the federation's pooled train label counts, nothing else changed (no training)."""
    if local.train_labels is None:
        raise ValueError("the prior-only control needs the clients' train label counts")
    pooled = local.train_labels.sum(axis=0)
    shifted = np.stack([prior_shift(s, own, pooled) for s, own in zip(local.scores, local.train_labels)])
    return Outcomes(local.topics, local.labels, local.uids, local.y, local.strata, local.clients,
                    local.client_topics, shifted, local.train_labels)


# -- weighted metrics per unit (the bootstrap's resamples; weights 1: the records as they are) ------

def _stratum_features(y: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """[n, A * K * C * 2 + C] indicators per record: for every arm, client and class, correct-and-
    predicted-c and predicted-c; then true-c. Weighted sums of these are confusion counts."""
    classes = np.arange(n_classes)
    predicted = preds[..., None] == classes                       # [A, K, n, C]
    correct = predicted & (y[:, None] == classes)
    per_arm = np.stack([correct, predicted], axis=-1)             # [A, K, n, C, 2]
    n = len(y)
    return np.concatenate([np.moveaxis(per_arm, 2, 0).reshape(n, -1),
                           (y[:, None] == classes)], axis=1).astype(np.float32)


def unit_metrics(y, strata, preds, unit_client, unit_strata, n_classes, weights) -> dict[str, np.ndarray]:
    """Every class metric [M, A, U] per resample, arm and unit. preds [A, K, N] (arms: e.g. method and
    control); weights[t]: [M, n_t] how often each record of stratum t is in each resample. Counts are
    taken per stratum, then summed over each unit's strata."""
    n_arms, n_clients = preds.shape[:2]
    per_stratum = [w @ _stratum_features(y[strata == t], preds[:, :, strata == t], n_classes)
                   for t, w in enumerate(weights)]
    counts = np.stack(per_stratum, axis=1).astype(np.float64)     # [M, T, F]
    m, n_strata = counts.shape[:2]
    split = n_arms * n_clients * n_classes * 2
    arm = counts[..., :split].reshape(m, n_strata, n_arms, n_clients, n_classes, 2)[:, :, :, unit_client]
    sel = unit_strata.astype(np.float64)                          # [U, T]
    arm_u = np.einsum("mtaucj,ut->maucj", arm, sel)               # [M, A, U, C, 2]
    true_u = np.einsum("mtc,ut->muc", counts[..., split:], sel)[:, None]    # [M, 1, U, C]
    return metrics_from_counts(arm_u[..., 0], arm_u[..., 1], np.broadcast_to(true_u, arm_u.shape[:-1]))


def unit_sums(values: np.ndarray, strata, unit_client, unit_strata, weights) -> np.ndarray:
    """values [A, K, N] (per-record quantities of A arrays, K clients) -> [M, A, U]: for every resample,
    array and unit, the weighted sum over the records of the unit's strata and of its client."""
    n_arrays, n_clients = values.shape[:2]
    per_stratum = [w.astype(np.float64) @ values[:, :, strata == t].reshape(n_arrays * n_clients, -1).T
                   for t, w in enumerate(weights)]                       # [M, A * K] each
    sums = np.stack(per_stratum, axis=1).reshape(len(per_stratum[0]), len(weights), n_arrays, n_clients)
    return np.einsum("mtau,ut->mau", sums[..., unit_client], unit_strata.astype(np.float64))


def outcome_metrics(out: Outcomes) -> dict[str, float | None]:
    """{"view.metric": mean over the clients with that view} on all records (the headline of an arm
    that has no final metrics of its own, such as the prior-only control)."""
    unit_client, unit_strata = out.unit_layout()
    sizes = np.bincount(out.strata, minlength=len(out.topics))
    metrics = unit_metrics(out.y, out.strata, out.predictions()[None], unit_client, unit_strata,
                           out.scores.shape[2], [np.ones((1, n), dtype=np.float32) for n in sizes])
    units = out.units()
    result = {}
    for view in VIEWS:
        cols = [u for u, (_, v) in enumerate(units) if v == view]
        for k in CLASS_METRICS:
            result[f"{view}.{k}"] = float(metrics[k][0, 0, cols].mean()) if cols else None
    return result


def lm_outcome_metrics(out: LMOutcomes) -> dict[str, float | None]:
    """{"view.nll_per_token" / "view.nll_per_byte": mean over the clients with that view} on all
    records: the ratios of sums of lm_view_metrics, from stored outcomes."""
    unit_client, unit_strata = out.unit_layout()
    sizes = np.bincount(out.strata, minlength=len(out.topics))
    sums = unit_sums(np.stack([out.nll, out.tokens, out.bytes]), out.strata, unit_client, unit_strata,
                     [np.ones((1, n), dtype=np.float32) for n in sizes])[0]      # [3, U]
    units = out.units()
    result = {}
    for view in VIEWS:
        cols = [u for u, (_, v) in enumerate(units) if v == view]
        result[f"{view}.nll_per_token"] = float((sums[0, cols] / sums[1, cols]).mean()) if cols else None
        result[f"{view}.nll_per_byte"] = float((sums[0, cols] / sums[2, cols]).mean()) if cols else None
    return result
