"""Non-IID client splits and train/test splits.

All splitters are deterministic for a given ``seed`` (``numpy.random.default_rng``), never
copy or modify records (clients hold references to the input dicts), and keep each client's
records in their original relative order.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Hashable

import numpy as np

__all__ = ["split_by_field", "split_dirichlet", "train_test_split"]


def _field(rec: dict, field: str, idx: int) -> Any:
    try:
        return rec[field]
    except (KeyError, TypeError):
        raise ValueError(f"record {idx} has no field {field!r}") from None


def _sort_key(v: Hashable):
    return (type(v).__name__, str(v))


def split_by_field(
    records,
    field: str,
    assignment: dict[str, list] | int,
    *,
    seed: int,
) -> list[list[dict]]:
    """Split records by the value of ``field`` (e.g. ``"topic"``).

    * ``assignment`` a dict ``{client_name: [values, ...]}``: client ``i`` (in the dict's
      order) gets every record whose value is in its list.  Records whose value is not listed
      for any client are left out; a value listed for two clients, or a client that ends up
      with no records, raises ``ValueError``.
    * ``assignment`` an int ``n``: the distinct values (sorted, then shuffled with ``seed``)
      are dealt round-robin to ``n`` clients; every record is assigned.  Needs at least ``n``
      distinct values.
    """
    records = list(records)
    values = [_field(r, field, i) for i, r in enumerate(records)]

    if isinstance(assignment, bool) or not isinstance(assignment, (int, dict)):
        raise TypeError(f"assignment must be a dict or an int, got {type(assignment).__name__}")

    if isinstance(assignment, int):
        n = assignment
        if n < 1:
            raise ValueError(f"number of clients must be >= 1, got {n}")
        distinct = sorted(set(values), key=_sort_key)
        if len(distinct) < n:
            raise ValueError(
                f"cannot deal {len(distinct)} distinct values of {field!r} to {n} clients"
            )
        rng = np.random.default_rng(seed)
        order = [distinct[i] for i in rng.permutation(len(distinct))]
        owner = {v: k % n for k, v in enumerate(order)}
        clients: list[list[dict]] = [[] for _ in range(n)]
        for rec, v in zip(records, values):
            clients[owner[v]].append(rec)
        return clients

    owner = {}
    for ci, (name, vals) in enumerate(assignment.items()):
        if isinstance(vals, (str, bytes)) or not hasattr(vals, "__iter__"):
            vals = [vals]
        for v in vals:
            if v in owner:
                other = list(assignment)[owner[v]]
                raise ValueError(f"value {v!r} of {field!r} is assigned to both {other!r} and {name!r}")
            owner[v] = ci
    clients = [[] for _ in assignment]
    for rec, v in zip(records, values):
        ci = owner.get(v)
        if ci is not None:
            clients[ci].append(rec)
    for name, part in zip(assignment, clients):
        if not part:
            raise ValueError(f"client {name!r} gets no records (values {assignment[name]!r} of {field!r})")
    return clients


def split_dirichlet(
    records,
    label_field: str,
    n_clients: int,
    alpha: float,
    *,
    seed: int,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[list[dict]]:
    """Classic Dirichlet-over-labels non-IID split (Yurochkin et al. 2019; Hsu et al. 2019).

    For every label, its records are shuffled and cut among the clients in proportions drawn
    from ``Dirichlet(alpha * 1)``; a client that already holds ``>= N / n_clients`` records
    gets proportion 0 for the remaining labels (the usual balancing trick).  The whole draw is
    repeated until every client holds at least ``min_size`` records (``ValueError`` after
    ``max_tries``).  Small ``alpha`` = strongly skewed label mixes, large ``alpha`` ~ IID.

    Every record ends up in exactly one client; the result is deterministic for a seed.
    """
    records = list(records)
    n = len(records)
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if n < n_clients * min_size:
        raise ValueError(f"{n} records cannot give {n_clients} clients >= {min_size} records each")
    by_label: dict[Any, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        by_label[_field(rec, label_field, i)].append(i)
    labels = sorted(by_label, key=_sort_key)
    rng = np.random.default_rng(seed)
    cap = n / n_clients

    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for lab in labels:
            idx = np.array(by_label[lab])
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(n_clients, float(alpha)))
            p = p * np.array([len(part) < cap for part in parts], dtype=float)
            if p.sum() <= 0:  # every client is full (only with rounding); fall back to uniform
                p = np.full(n_clients, 1.0)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            return [[records[i] for i in sorted(part)] for part in parts]
    raise ValueError(
        f"split_dirichlet: no split with every client >= {min_size} records after {max_tries} "
        f"draws (n={n}, n_clients={n_clients}, alpha={alpha}); lower min_size or raise alpha"
    )


def train_test_split(
    records,
    test_fraction: float,
    *,
    seed: int,
    stratify: str | None = None,
) -> tuple[list[dict], list[dict]]:
    """Deterministic, disjoint train/test split.

    ``round(len * test_fraction)`` records go to test (at least one, and at least one left
    for training, when ``0 < test_fraction < 1`` and there are two or more records).  With
    ``stratify="label"`` the split is done per value of that field.  Both parts keep the
    original record order.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    records = list(records)
    rng = np.random.default_rng(seed)

    def pick(indices: list[int]) -> list[int]:
        m = len(indices)
        k = int(round(m * test_fraction))
        if 0.0 < test_fraction < 1.0 and m >= 2:
            k = min(max(k, 1), m - 1)
        perm = rng.permutation(m)
        return [indices[j] for j in perm[:k]]

    if stratify is None:
        test_idx = set(pick(list(range(len(records)))))
    else:
        groups: dict[Any, list[int]] = defaultdict(list)
        for i, rec in enumerate(records):
            groups[_field(rec, stratify, i)].append(i)
        test_idx = set()
        for key in sorted(groups, key=_sort_key):
            test_idx.update(pick(groups[key]))
    train = [r for i, r in enumerate(records) if i not in test_idx]
    test = [r for i, r in enumerate(records) if i in test_idx]
    return train, test
