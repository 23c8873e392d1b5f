"""The benchmark's second task: language modelling of per-client domains.

Corpus: the fortune-cookie files of Debian's `fortunes` and `fortunes-min` packages (about 15k
short texts in 43 category files; BSD licence, see docs/lm_task.md), read from the installed
package, never downloaded and never committed. A *domain* is one category file (computers,
definitions, songs-poems, people, science, politics, ...); a *document* is one fortune. Install:

    apt-get install fortunes        # pulls in fortunes-min; files in /usr/share/games/fortunes

`source` may instead name any directory in the same on-disk format (strfile text files: one file
per domain, documents separated by lines holding only `%`; `.dat` index files and `.u8` links are
ignored), which is how the tests build a small corpus.

For one seed the corpus is cut, per domain, into disjoint parts of whole documents:

    test   (test_docs per domain)   the held-out NLL of every client on every domain
    val    (val_docs per domain)    for tuning: scored *instead of* test when score is "val"
    train  (the rest)               dealt to the clients holding that domain, disjoint chunks

No leakage: before anything is split, near-duplicate documents are collapsed to one, over the whole
corpus (all its domains, not only the federation's), so a fortune and its near-copy (the same
quotation with other attribution, punctuation or case, a saying quoted inside a longer fortune,
the same fortune filed under two categories) can never land on two sides, nor with two clients.
Two documents are near-duplicates when their normalised texts (lower case, letters and digits
only) are equal, or their sets of word 3-grams have Jaccard similarity >= 0.5, or >= 80% of the
smaller one's 3-grams (at least 5 of them) occur in the other; near-duplicate groups are closed
transitively and keep their first document in corpus order (domains by name, then file order),
in that document's domain. Test and val are whole documents: a document longer than max_chars is
cut into several records (at line ends where possible), which all stay on the document's side.

Deterministic per (seed, domain): a domain's test / val / train cut depends only on the corpus,
the seed, the domain and the counts, not on the other domains or the clients.

Records are `{"text", "domain", "uid", "doc"}`: fedzero.data.build_examples trains `{"text"}`
records with the LM loss on every token (bos + text + eos), so the training code takes them as
they are. `score_records` scores records with the same tokenisation (no grad) and returns, per
record, the summed NLL (nats), the number of scored tokens and the UTF-8 bytes they cover
(`heldout_nll_per_token`: their sums). NLL per token is comparable between models with the same
tokenizer only; NLL per byte is comparable across vocabularies (see docs/lm_task.md).
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedzero.fields import from_known_fields

FORTUNES_DIR = "/usr/share/games/fortunes"
FORTUNES_INSTALL = "apt-get install fortunes"
# The domain files the Debian packages fortunes and fortunes-min (1:1.99.1) ship. Only these are
# read from FORTUNES_DIR, so other fortune packages installed beside them (fortunes-bofh-excuses,
# fortune-anarchism, ...) change neither the deduplication nor the splits.
FORTUNES_DOMAINS = (
    "art", "ascii-art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs",
    "education", "ethnic", "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law",
    "linux", "linuxcookie", "literature", "love", "magic", "medicine", "men-women", "miscellaneous",
    "news", "paradoxum", "people", "perl", "pets", "platitudes", "politics", "pratchett", "riddles",
    "science", "songs-poems", "sports", "startrek", "tao", "translate-me", "wisdom", "work", "zippy",
)
# Four domains of >= 150 KB that differ in form and vocabulary (docs/lm_task.md).
DEFAULT_DOMAINS = ("computers", "definitions", "songs-poems", "people")

NEAR_JACCARD = 0.5          # word-3-gram Jaccard at or above which two documents are near-duplicates
NEAR_CONTAINMENT = 0.8      # share of the smaller document's 3-grams found in the other
NEAR_MIN_SHINGLES = 5       # containment is only judged for documents with at least this many 3-grams

_SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


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
class Document:
    domain: str
    index: int          # position of the document in its domain file (0-based, counting every entry)
    text: str

    @property
    def uid(self) -> str:
        return f"{self.domain}/{self.index}"


@dataclass
class Corpus:
    path: str
    fingerprint: str                          # sha256 over the domain files' names and bytes
    docs: dict[str, list[Document]]           # domain -> deduplicated documents, in file order
    raw_docs: dict[str, int]                  # domain -> documents before deduplication
    chars: dict[str, int]                     # domain -> characters of the deduplicated documents
    groups: list[list[str]] = field(default_factory=list)   # near-duplicate groups (uids), first kept

    @property
    def domains(self) -> list[str]:
        return list(self.docs)


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


# -- reading the corpus ------------------------------------------------------------------------------

def clean_text(text: str) -> str:
    """A fortune as plain text: overstrikes applied (`_\\bX` -> `X`, the old underlining), other
    control characters but newline and tab dropped, trailing spaces and blank edge lines removed."""
    if "\b" in text:
        out: list[str] = []
        for ch in text:
            if ch == "\b":
                if out and out[-1] != "\n":
                    out.pop()
            else:
                out.append(ch)
        text = "".join(out)
    text = _CONTROL.sub("", text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def parse_strfile(text: str) -> list[str]:
    """The entries of a strfile text (separated by lines holding only `%`), cleaned; empty ones are kept
    as "" so that an entry's index is its position in the file."""
    return [clean_text(part) for part in _SEPARATOR.split(text)]


def _domain_files(source: str) -> tuple[Path, list[tuple[str, Path]]]:
    if source == "fortunes":
        root = Path(FORTUNES_DIR)
        missing = [d for d in FORTUNES_DOMAINS if not (root / d).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the LM task's corpus (Debian packages fortunes and fortunes-min) is not installed: "
                f"{len(missing)} domain file(s) missing in {root} (e.g. {missing[0]!r}); install it with "
                f"`{FORTUNES_INSTALL}` (as root, after `apt-get update`), or set lm_data.source to a "
                f"directory of strfile files")
        return root, [(d, root / d) for d in FORTUNES_DOMAINS]
    root = Path(source).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"lm_data.source {source!r} is neither 'fortunes' nor a directory "
                                f"(for the fortunes corpus: `{FORTUNES_INSTALL}`)")
    files = [(p.name, p) for p in sorted(root.iterdir())
             if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
             and p.suffix not in (".dat", ".u8")]
    if not files:
        raise FileNotFoundError(f"lm_data.source {source!r} holds no domain files")
    return root, files


def load_corpus(source: str = "fortunes") -> Corpus:
    """The deduplicated corpus of `source` (cached per process while its files are unchanged)."""
    root, files = _domain_files(source)
    stamp = tuple((name, p.stat().st_size, p.stat().st_mtime_ns) for name, p in files)
    return _load_corpus(str(root.resolve()), tuple((name, str(p)) for name, p in files), stamp)


@lru_cache(maxsize=4)
def _load_corpus(root: str, files: tuple[tuple[str, str], ...], stamp) -> Corpus:
    digest = hashlib.sha256()
    docs: list[Document] = []
    raw: dict[str, int] = {}
    for name, path in files:
        data = Path(path).read_bytes()
        digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
        entries = parse_strfile(data.decode("utf-8", errors="replace"))
        kept = [Document(name, i, t) for i, t in enumerate(entries) if dedup_key(t)]
        raw[name] = len(kept)
        docs.extend(kept)
    keep, groups = near_duplicate_groups([d.text for d in docs])
    by_domain: dict[str, list[Document]] = {name: [] for name, _ in files}
    for i in keep:
        by_domain[docs[i].domain].append(docs[i])
    return Corpus(path=root, fingerprint=digest.hexdigest(), docs=by_domain, raw_docs=raw,
                  chars={d: sum(len(x.text) for x in v) for d, v in by_domain.items()},
                  groups=[[docs[i].uid for i in g] for g in groups])


# -- near-duplicates ---------------------------------------------------------------------------------

def dedup_key(text: str) -> str:
    """Normalised text: lower case, letters and digits only, single spaces."""
    return _NON_ALNUM.sub(" ", text.lower()).strip()


def shingles(key: str) -> frozenset:
    """Word 3-grams of a normalised text (a text of under three words is its own single shingle)."""
    words = key.split()
    if len(words) < 3:
        return frozenset([key])
    return frozenset(" ".join(words[i:i + 3]) for i in range(len(words) - 2))


def near_duplicates(a: str, b: str) -> bool:
    """Whether two texts are near-duplicates by the module's rule (see the module doc)."""
    ka, kb = dedup_key(a), dedup_key(b)
    if ka == kb:
        return True
    sa, sb = shingles(ka), shingles(kb)
    return _similar(len(sa & sb), sa, sb)


def _similar(common: int, sa: frozenset, sb: frozenset) -> bool:
    if not common:
        return False
    small = min(len(sa), len(sb))
    return (common / (len(sa) + len(sb) - common) >= NEAR_JACCARD
            or (small >= NEAR_MIN_SHINGLES and common / small >= NEAR_CONTAINMENT))


def near_duplicate_groups(texts: list[str]) -> tuple[list[int], list[list[int]]]:
    """(indices kept: the first of every near-duplicate group, in order; the groups of two or more).
    Groups are closed transitively (union-find); the result depends only on the texts and their order."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first: dict[str, int] = {}
    postings: dict[str, list[int]] = {}
    sets: list[frozenset] = []
    for i, text in enumerate(texts):
        key = dedup_key(text)
        s = shingles(key)
        sets.append(s)
        if key in first:                       # the same normalised text: no need to compare further
            union(i, first[key])
            continue
        first[key] = i
        counts: dict[int, int] = {}
        for sh in s:
            posting = postings.setdefault(sh, [])
            for j in posting:
                counts[j] = counts.get(j, 0) + 1
            posting.append(i)
        for j, common in counts.items():
            if _similar(common, s, sets[j]):
                union(i, j)
    members: dict[int, list[int]] = {}
    for i in range(len(texts)):
        members.setdefault(find(i), []).append(i)
    keep = sorted(members)                      # every root is its group's smallest index
    return keep, [g for _, g in sorted(members.items()) if len(g) > 1]


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


# -- held-out NLL ------------------------------------------------------------------------------------

class HeldoutNLL(NamedTuple):
    nll: float          # summed next-token NLL, nats
    tokens: int         # scored tokens (every text token after the first input position, and eos)
    bytes: int          # UTF-8 bytes of the text those tokens cover

    @property
    def per_token(self) -> float:
        """Nats per token: comparable only between models that share a tokenizer."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def per_byte(self) -> float:
        """Nats per UTF-8 byte: comparable across tokenizers (bits per byte = this / ln 2)."""
        return self.nll / self.bytes if self.bytes else math.nan


class RecordNLL(NamedTuple):
    """Per-record held-out NLL, arrays in the order of the records scored."""

    nll: np.ndarray          # [N] float64: each record's summed next-token NLL, nats
    tokens: np.ndarray       # [N] int64: its scored tokens
    bytes: np.ndarray        # [N] int64: the UTF-8 bytes of text those tokens cover

    def total(self, n: int | None = None) -> HeldoutNLL:
        """The sums over all records (or the first n)."""
        return HeldoutNLL(float(self.nll[:n].sum()), int(self.tokens[:n].sum()), int(self.bytes[:n].sum()))


def heldout_nll_per_token(model, tokenizer, records: list[dict], max_length: int, batch_size: int = 16
                          ) -> HeldoutNLL:
    """Summed token NLL of `records` ({"text"} records) under `model`, forward only, no grad: the sums
    of `score_records` (see there). nll / tokens is the NLL per token (same-tokenizer comparisons
    only), nll / bytes the NLL per UTF-8 byte of text, comparable across vocabularies."""
    return score_records(model, tokenizer, records, max_length, batch_size).total()


HEAD_CHUNK = 512    # positions per LM-head matmul: [512, 49152] float32 logits are 100 MB


def score_records(model, tokenizer, records: list[dict], max_length: int, batch_size: int = 16) -> RecordNLL:
    """Every record's summed next-token NLL, scored tokens and covered bytes, forward only, no grad, in
    eval mode (the model's mode is restored). The bench's one NLL scorer: the LM task's final, per-round
    and zero-shot scores all come from here.

    Tokenised exactly as training does (fedzero.data.build_examples: [bos] + text + eos, loss on every
    token). The eos prediction counts in tokens and NLL (the end of a document is part of what every
    model predicts). Without a bos token the first text token is input only, so its bytes are not
    counted. A record that does not fit max_length is refused rather than silently cut (cutting would
    make the byte count wrong): lower the split's max_chars or raise max_length.

    Speed (the LM task's dominant cost; the LM head over a 49k vocabulary is half of a 10-layer
    SmolLM2's forward and most of a small model's): records are batched in order of length, so
    batches carry little padding; the model runs its decoder but not its head (an empty
    `logits_to_keep`), and the head is applied to the real (non-padding) positions alone, in
    chunks of HEAD_CHUNK, from the final norm's output. That equals the model's logits where
    logits = output_embeddings(final norm output); where it does not (e.g. logit soft-capping),
    the first batch, scored from the model's full logits, shows it, and full logits are used throughout.
    """
    import torch

    from fedzero.data import build_examples, collate

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_bytes = _record_bytes(tokenizer, records, max_length)
    examples = build_examples(records, tokenizer, max_length)
    order = sorted(range(len(examples)), key=lambda i: int(examples[i]["input_ids"].shape[0]))
    nll = np.zeros(len(records))
    tokens = np.zeros(len(records), dtype=np.int64)
    was_training = model.training
    model.eval()
    capture = _FinalHidden(model)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = collate([examples[i] for i in rows], tokenizer.pad_token_id)
                per_token, row = _token_nll(model, batch, capture)
                nll[rows] = np.bincount(row, weights=per_token, minlength=len(rows))
                tokens[rows] = np.bincount(row, minlength=len(rows))
    finally:
        capture.remove()
        model.train(was_training)
    return RecordNLL(nll, tokens, n_bytes)


def _record_bytes(tokenizer, records: list[dict], max_length: int) -> np.ndarray:
    """UTF-8 bytes each record's scored tokens cover; refuses records that build_examples would cut."""
    from fedzero.data.tokenize import bos_head

    head = bos_head(tokenizer)
    room = max_length - 1 - len(head)           # what build_examples keeps besides [bos] and eos
    out = np.zeros(len(records), dtype=np.int64)
    for i, record in enumerate(records):
        if not record.get("text"):
            raise ValueError(f"record {i} ({record.get('uid', '?')}): needs a non-empty \"text\"")
        ids = tokenizer.encode(record["text"])
        if len(ids) > room:
            raise ValueError(f"record {i} ({record.get('uid', '?')}) is {len(ids)} tokens; max_length={max_length} "
                             f"holds {room} besides bos/eos: lower lm_data.max_chars or raise max_length")
        out[i] = len(record["text"].encode("utf-8"))
        if not head and ids:
            out[i] -= len(tokenizer.decode([ids[0]]).encode("utf-8"))
    return out


class _FinalHidden:
    """Keeps the final norm's last output while registered: the final hidden state, with whatever
    adapters add there (DeMA's side stream adds its output at the final norm, by a hook registered
    earlier, so it runs first). `exact` (does output_embeddings(value) reproduce the model's logits?)
    is settled on the first batch; False at once for a model whose layout is not found or whose config
    caps its logits."""

    def __init__(self, model):
        from fedzero.backbones import decoder_layout

        self.value = None
        self.exact = None
        self.head = model.get_output_embeddings()
        self.handle = None
        config = getattr(model, "config", None)
        if config is not None and getattr(config.get_text_config(), "final_logit_softcapping", None):
            self.exact = False      # Gemma 2: tanh-capped logits; the check could miss it where logits are small
            return
        try:
            norm = decoder_layout(model).final_norm
        except ValueError:
            self.exact = False
            return
        self.handle = norm.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.value = output

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def _token_nll(model, batch, capture: _FinalHidden):
    """(NLL [n] float64, batch row [n]) of every labelled token of a collated batch."""
    import torch
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    labelled = targets != -100
    rows = labelled.nonzero()[:, 0].numpy()
    t = targets[labelled]
    if capture.exact is not True:       # the first batch (checks the shortcut) or a model it does not fit
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][labelled]
        if capture.exact is None:
            mine = capture.head(capture.value[:, :-1][labelled]).float()
            capture.exact = bool(torch.allclose(mine, logits.float(), rtol=1e-4, atol=1e-4))
        return F.cross_entropy(logits.float(), t, reduction="none").double().numpy(), rows
    # An empty logits_to_keep: the model's forward runs its decoder and no head (logits_to_keep=1 was
    # no cheaper: HF's [B, 1, H] head ran as a slow batched matmul)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
          logits_to_keep=torch.zeros(0, dtype=torch.long))
    h = capture.value[:, :-1][labelled]             # real positions only: no padding reaches the head
    parts = [F.cross_entropy(capture.head(h[i:i + HEAD_CHUNK]).float(), t[i:i + HEAD_CHUNK], reduction="none")
             for i in range(0, len(t), HEAD_CHUNK)]
    return torch.cat(parts).double().numpy(), rows
