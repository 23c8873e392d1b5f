"""The LM task's split: for one seed the deduplicated corpus (lm_corpus) is cut, per domain, into
disjoint parts of whole documents:

    test   (test_docs per domain)   the held-out NLL of every client on every domain
    val    (val_docs per domain)    for tuning: scored *instead of* test when score is "val"
    train  (the rest)               dealt to the clients holding that domain, disjoint chunks

Near-duplicates were collapsed before the cut (lm_corpus), so none lands on two sides or with two
clients. Test and val are whole documents: a document longer than max_chars is cut into several
records (at line ends where possible), which all stay on the document's side.

Deterministic per (seed, domain): a domain's test / val / train cut depends only on the corpus,
the seed, the domain and the counts, not on the other domains or the clients.

Records are `{"text", "domain", "uid", "doc"}`: fedzero.data.build_examples trains `{"text"}`
records with the LM loss on every token (bos + text + eos), so the training code takes them as
they are; lm_score scores them with the same tokenisation.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from fedzero.fields import from_known_fields

from .lm_corpus import Corpus, Document, load_corpus


@dataclass
class LMDataSettings:
    domains: list[str] | None = None     # the domains scored (test/val sets); None: the clients' domains
    train_docs: int = 300                # documents per client (split evenly over its domains)
    train_chars: int | None = None       # optional cap on a client's training characters (per domain share)
    test_docs: int = 200                 # held-out documents per domain
    val_docs: int = 100                  # tuning documents per domain
    round_eval_docs: int = 0             # the first this many test documents of each domain: per-round curves
    max_chars: int = 256                 # a document longer than this is cut into records of at most this
    source: str = "fortunes"             # "fortunes" (the Debian package) or a directory in its format
    score: str = "test"                  # "val" for tuning: the val sets are scored in place of test

    def __post_init__(self):
        if self.domains is not None:
            if isinstance(self.domains, str) or not all(isinstance(d, str) and d for d in self.domains):
                raise ValueError(f"lm_data.domains must be a list of domain names, got {self.domains!r}")
            if len(set(self.domains)) != len(self.domains) or not self.domains:
                raise ValueError(f"lm_data.domains must be non-empty and without repeats, got {self.domains!r}")
            self.domains = list(self.domains)
        for name, low in (("train_docs", 1), ("test_docs", 1), ("val_docs", 0), ("round_eval_docs", 0),
                          ("max_chars", 16)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"lm_data.{name} must be an integer >= {low}, got {value!r}")
        if self.train_chars is not None and (isinstance(self.train_chars, bool) or not isinstance(self.train_chars, int)
                                             or self.train_chars < 1):
            raise ValueError(f"lm_data.train_chars must be an integer >= 1 or null, got {self.train_chars!r}")
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"lm_data.source must be 'fortunes' or a directory, got {self.source!r}")
        if self.score not in ("test", "val"):
            raise ValueError(f"lm_data.score must be 'test' or 'val', got {self.score!r}")
        if self.score == "val" and self.val_docs < 1:
            raise ValueError("lm_data.score 'val' needs val_docs >= 1")
        scored, which = (self.val_docs, "val_docs") if self.score == "val" else (self.test_docs, "test_docs")
        if self.round_eval_docs > scored:       # the curves' subset is a prefix of the scored set
            raise ValueError(f"lm_data.round_eval_docs ({self.round_eval_docs}) must be <= {which} ({scored})")

    @classmethod
    def from_dict(cls, data: dict) -> "LMDataSettings":
        return from_known_fields(cls, data, "lm_data setting")


@dataclass
class LMClientData:
    id: str
    domains: list[str]
    train: list[dict]                # {"text", "domain", "uid", "doc"} records


@dataclass
class LMSplit:
    seed: int
    domains: list[str]                             # the scored domains: clients' first, then settings.domains
    clients: list[LMClientData]
    test: dict[str, list[dict]]                    # domain -> test records
    val: dict[str, list[dict]] = field(default_factory=dict)
    corpus: dict = field(default_factory=dict)     # path, fingerprint, per-domain sizes
    round_eval_docs: int = 0                       # per-round curves: the first this many test docs per domain

    def client(self, client_id: str) -> LMClientData:
        return next(c for c in self.clients if c.id == client_id)

    def round_eval_records(self, domain: str) -> int:
        """How many leading records of test[domain] make up its first round_eval_docs documents (a
        document's records are contiguous, so the per-round subset is a prefix of the test set)."""
        keep = set(list(dict.fromkeys(r["doc"] for r in self.test[domain]))[: self.round_eval_docs])
        return sum(r["doc"] in keep for r in self.test[domain])

    def views(self, client_id: str) -> dict[str, list[str]]:
        """{view: domains}: own, unseen (the others'; absent if the client holds every scored domain), global."""
        own = self.client(client_id).domains
        unseen = [d for d in self.domains if d not in own]
        return {"own": list(own), **({"unseen": unseen} if unseen else {}), "global": list(self.domains)}

    def summary(self) -> dict:
        def size(records):
            return {"records": len(records), "docs": len({r["doc"] for r in records}),
                    "chars": sum(len(r["text"]) for r in records)}
        return {"seed": self.seed, "domains": self.domains, "corpus": self.corpus,
                "clients": [{"id": c.id, "domains": c.domains, "train": size(c.train)} for c in self.clients],
                "test": {d: size(r) for d, r in self.test.items()},
                "val": {d: size(r) for d, r in self.val.items()}}


# -- the split ---------------------------------------------------------------------------------------

def to_records(doc: Document, max_chars: int) -> list[dict]:
    """A document as records of at most max_chars characters: cut at line ends where possible, else at
    a space, else hard. The pieces share the document's "doc" id; "uid" is "<domain>/<index>.<part>"."""
    return [{"text": piece, "domain": doc.domain, "uid": f"{doc.uid}.{k}", "doc": doc.uid}
            for k, piece in enumerate(cut_text(doc.text, max_chars))]


def cut_text(text: str, max_chars: int) -> list[str]:
    pieces: list[str] = []
    current = ""
    for line in text.split("\n"):
        while len(line) > max_chars:             # a line too long on its own: cut it at a space
            if current:
                pieces.append(current)
                current = ""
            cut = line.rfind(" ", 1, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            pieces.append(line[:cut].rstrip())
            line = line[cut:].lstrip(" ")
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) <= max_chars:
            current = candidate
        else:
            pieces.append(current)
            current = line
    if current:
        pieces.append(current)
    return [p for p in (p.strip("\n") for p in pieces) if p.strip()]


def domain_cut(corpus: Corpus, domain: str, seed: int, test_docs: int, val_docs: int
               ) -> tuple[list[Document], list[Document], list[Document]]:
    """(test, val, train pool) of one domain for `seed`: depends only on the corpus, seed, domain, counts."""
    pool = corpus.docs[domain]
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    order = [pool[i] for i in rng.permutation(len(pool))]
    return order[:test_docs], order[test_docs:test_docs + val_docs], order[test_docs + val_docs:]


def lm_split(settings: LMDataSettings, seed: int, client_domains: dict[str, list[str]],
             corpus: Corpus | None = None) -> LMSplit:
    """The LM task's split for `seed` (module doc). client_domains: {client id: [domains]} (several
    clients may hold a domain: its train pool is dealt between them in disjoint chunks; a client with
    k domains gets train_docs // k documents of each, and train_chars // k characters if capped)."""
    if not client_domains:
        raise ValueError("no clients")
    for cid, doms in client_domains.items():
        if isinstance(doms, str) or not doms:
            raise ValueError(f"client {cid!r}: domains must be a non-empty list, got {doms!r}")
        if len(set(doms)) != len(doms):
            raise ValueError(f"client {cid!r}: repeated domain in {doms!r}")
    corpus = corpus if corpus is not None else load_corpus(settings.source)
    held = list(dict.fromkeys(d for doms in client_domains.values() for d in doms))
    if settings.domains is not None:
        untested = [d for d in held if d not in settings.domains]
        if untested:
            raise ValueError(f"lm_data.domains {settings.domains} lacks the clients' domain(s) {untested}")
    scored = list(dict.fromkeys(held + list(settings.domains or [])))
    unknown = [d for d in scored if d not in corpus.docs]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; the corpus at {corpus.path} has {corpus.domains}")

    test, val, pools = {}, {}, {}
    for domain in scored:
        holders = [cid for cid, doms in client_domains.items() if domain in doms]
        need = settings.test_docs + settings.val_docs + len(holders)
        have = len(corpus.docs[domain])
        if have < need:
            raise ValueError(f"domain {domain!r} has {have} documents after deduplication, needs at least {need} "
                             f"(test_docs + val_docs + one per client holding it)")
        t, v, pools[domain] = domain_cut(corpus, domain, seed, settings.test_docs, settings.val_docs)
        test[domain] = [r for d in t for r in to_records(d, settings.max_chars)]
        val[domain] = [r for d in v for r in to_records(d, settings.max_chars)]

    clients = []
    for cid, doms in client_domains.items():
        train: list[dict] = []
        for domain in doms:
            holders = [c for c, ds in client_domains.items() if domain in ds]
            chunk = pools[domain][holders.index(cid)::len(holders)][: max(1, settings.train_docs // len(doms))]
            budget = settings.train_chars // len(doms) if settings.train_chars is not None else None
            used = 0
            for doc in chunk:
                if budget is not None and used >= budget:
                    break
                records = to_records(doc, settings.max_chars)
                train.extend(records)
                used += sum(len(r["text"]) for r in records)
        clients.append(LMClientData(cid, list(doms), train))
    info = {"source": settings.source, "path": corpus.path, "fingerprint": corpus.fingerprint,
            "docs": {d: len(corpus.docs[d]) for d in scored}, "chars": {d: corpus.chars[d] for d in scored}}
    if settings.score == "val":       # tuning: everything downstream scores `test`; the real test sets stay unread
        test, val = val, {}
    return LMSplit(seed, scored, clients, test, val, info, settings.round_eval_docs)


def domain_anchor_texts(corpus: Corpus, domain: str, count: int, *, clients: list[dict], seed: int,
                        max_chars: int) -> list[dict]:
    """In-domain public anchors for the LM task: `count` records (documents cut to max_chars, as the
    task's records are) of a fortunes domain that no client holds (clients: [{"id", "domains"}]; a
    holder is refused), as [{"uid", "text"}]. The corpus is deduplicated across domains, so no anchor
    repeats a client's document. Documents in a seeded order that depends only on (seed, domain)."""
    holders = [c["id"] for c in clients if domain in c["domains"]]
    if holders:
        raise ValueError(f"anchor domain {domain!r} is held by client(s) {holders}: choose a domain no client holds")
    if domain not in corpus.docs:
        raise ValueError(f"unknown domain {domain!r}; the corpus at {corpus.path} has {corpus.domains}")
    rng = np.random.default_rng([seed, zlib.crc32(f"anchors:{domain}".encode())])
    docs = corpus.docs[domain]
    records = [r for i in rng.permutation(len(docs)) for r in to_records(docs[i], max_chars)]
    if len(records) < count:
        raise ValueError(f"anchor domain {domain!r} has {len(records)} records of at most {max_chars} characters, "
                         f"{count} are needed")
    return [{"uid": r["uid"], "text": r["text"]} for r in records[:count]]
