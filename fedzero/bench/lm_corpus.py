"""The LM task's corpus: the fortune-cookie files of Debian's `fortunes` and `fortunes-min` packages
(about 15k short texts in 43 category files; BSD licence, see docs/lm_task.md), read from the
installed package, never downloaded and never committed. A *domain* is one category file
(computers, definitions, songs-poems, people, science, politics, ...); a *document* is one
fortune. Install:

    apt-get install fortunes        # pulls in fortunes-min; files in /usr/share/games/fortunes

`source` may instead name any directory in the same on-disk format (strfile text files: one file
per domain, documents separated by lines holding only `%`; `.dat` index files and `.u8` links are
ignored), which is how the tests build a small corpus.

No leakage (the split, lm_data, relies on it): before anything is split, near-duplicate documents
are collapsed to one, over the whole corpus (all its domains, not only the federation's), so a
fortune and its near-copy (the same quotation with other attribution, punctuation or case, a saying
quoted inside a longer fortune, the same fortune filed under two categories) can never land on two
sides, nor with two clients. Two documents are near-duplicates when their normalised texts (lower
case, letters and digits only) are equal, or their sets of word 3-grams have Jaccard similarity
>= 0.5, or >= 80% of the smaller one's 3-grams (at least 5 of them) occur in the other;
near-duplicate groups are closed transitively and keep their first document in corpus order
(domains by name, then file order), in that document's domain.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

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
