"""The LM task's data (fedzero/bench/lm_corpus.py, lm_data.py, lm_score.py): the fortune corpus'
split (deterministic per seed, disjoint sides, near-duplicates never across sides, disjoint clients)
on a small corpus written in the package's on-disk format, the same guarantees on the real corpus
when it is installed, and the held-out NLL helper against a hand computation on a tiny random LLaMA
with the byte tokenizer."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from fedzero.bench import lm_corpus, lm_score
from fedzero.bench.lm_corpus import DEFAULT_DOMAINS, clean_text, dedup_key, load_corpus, near_duplicates, shingles
from fedzero.bench.lm_data import LMDataSettings, cut_text, lm_split
from fedzero.bench.lm_score import heldout_nll_per_token, score_records
from fedzero.data import ByteTokenizer, build_examples, collate

from conftest import tiny_llama, with_random_adapter

DOMAINS = ("d0", "d1", "d2", "d3")
N_DOCS = 40
LONG = ("This long entry runs over several lines of text\nso that it has to be cut into pieces\n"
        "when the records hold at most sixty four characters each\nand all pieces stay together.")


def _words(rng, n):
    vocab = [f"w{i}" for i in range(400)]
    return " ".join(rng.choice(vocab, size=n))


def fake_corpus(root, n_docs=N_DOCS):
    """Strfile files like /usr/share/games/fortunes: random distinct documents per domain, plus planted
    near-duplicates (within a domain and across domains), an overstruck word, a long entry, and the
    .dat / .u8 companions the package ships (ignored). Returns {name: (domain, index)} of the planted
    documents."""
    rng = np.random.default_rng(123)
    docs = {d: [f"{d} says {_words(rng, int(rng.integers(6, 14)))}." for _ in range(n_docs)] for d in DOMAINS}
    docs["d0"][0] = "An interpretation _\bI satisfies *____\b\b\b\bonly* this\x07 sentence."
    docs["d0"][10] = docs["d0"][3].upper().replace(" ", "  ") + "!!"          # same normalised text
    docs["d1"][5] = docs["d0"][7] + "\n\t\t-- Somebody Quoted"               # attribution added, other domain
    docs["d2"][2] = "A preamble of a few words. " + docs["d3"][4] + " And a few words after it."  # containment
    docs["d2"][3] = LONG
    os.makedirs(root, exist_ok=True)
    for d, entries in docs.items():
        with open(os.path.join(root, d), "w", encoding="utf-8") as fh:
            fh.write("\n%\n".join(entries) + "\n%\n")
        with open(os.path.join(root, d + ".dat"), "wb") as fh:
            fh.write(b"\x00\x00\x00\x02garbage index")
        os.symlink(d, os.path.join(root, d + ".u8"))
    return {"upper_copy": ("d0", 10), "attributed_copy": ("d1", 5), "contained": ("d3", 4), "long": ("d2", 3)}


@pytest.fixture
def corpus_dir(tmp_path):
    path = tmp_path / "fortunes"
    fake_corpus(str(path))
    return str(path)


SETTINGS = dict(train_docs=8, test_docs=6, val_docs=4, max_chars=64)
CLIENTS = {"c0": ["d0"], "c1": ["d0"], "c2": ["d1", "d2"], "c3": ["d3"]}


def split_of(corpus_dir, seed=0, clients=CLIENTS, **kw):
    return lm_split(LMDataSettings(**{**SETTINGS, "source": corpus_dir, **kw}), seed, clients)


def sides(split):
    """{(side, domain): set of doc uids}: test, val and each client's train."""
    out = {}
    for d in split.test:
        out[("test", d)] = {r["doc"] for r in split.test[d]}
        out[("val", d)] = {r["doc"] for r in split.val.get(d, [])}
    for c in split.clients:
        for d in c.domains:
            out[(c.id, d)] = {r["doc"] for r in c.train if r["domain"] == d}
    return out


def doc_texts(split):
    texts = {}
    for recs in [*split.test.values(), *split.val.values(), *(c.train for c in split.clients)]:
        for r in recs:
            texts.setdefault(r["doc"], []).append(r["text"])
    return {doc: "\n".join(parts) for doc, parts in texts.items()}


def assert_no_near_duplicates_across(split):
    """No two documents on different sides (or with different clients) are near-duplicates, by the rule
    itself on every pair that shares a word 3-gram, and no document of 7+ words is quoted in another."""
    texts = doc_texts(split)
    side_of = {}
    for side, docs in sides(split).items():
        for doc in docs:
            assert doc not in side_of, f"{doc} on two sides: {side_of[doc]} and {side}"
            side_of[doc] = side
    keys = {doc: dedup_key(t) for doc, t in texts.items()}
    assert len(set(keys.values())) == len(keys)
    postings = {}
    for doc, key in keys.items():
        for sh in shingles(key):
            postings.setdefault(sh, []).append(doc)
    pairs = {tuple(sorted(p)) for docs in postings.values() for p in itertools.combinations(docs, 2)}
    for a, b in pairs:
        if side_of[a] != side_of[b]:
            assert not near_duplicates(texts[a], texts[b]), (a, b)
    by_side = {}
    for doc, key in keys.items():
        by_side.setdefault(side_of[doc], []).append(key)
    for side, own in by_side.items():
        other = "\n".join(k for s, ks in by_side.items() if s != side for k in ks)
        for key in own:
            if len(key.split()) >= 7:
                assert key not in other, key


# -- settings ----------------------------------------------------------------------------------------

def test_settings_from_dict_and_errors_name_the_key():
    s = LMDataSettings.from_dict({"domains": ["computers", "people"], "train_docs": 10, "test_docs": 5})
    assert s.domains == ["computers", "people"] and s.val_docs == 100 and s.source == "fortunes"
    with pytest.raises(ValueError, match="test_doc"):
        LMDataSettings.from_dict({"test_doc": 5})
    for bad, key in [({"train_docs": 0}, "train_docs"), ({"test_docs": "5"}, "test_docs"),
                     ({"val_docs": -1}, "val_docs"), ({"max_chars": 4}, "max_chars"),
                     ({"train_chars": 0}, "train_chars"), ({"domains": "computers"}, "domains"),
                     ({"domains": ["a", "a"]}, "domains"), ({"score": "train"}, "score"),
                     ({"score": "val", "val_docs": 0}, "score"), ({"source": ""}, "source")]:
        with pytest.raises(ValueError, match=f"lm_data.{key}"):
            LMDataSettings.from_dict(bad)


# -- reading and deduplication -----------------------------------------------------------------------

def test_corpus_reading_cleans_and_collapses_planted_near_duplicates(corpus_dir):
    corpus = load_corpus(corpus_dir)
    assert corpus.domains == list(DOMAINS)                       # .dat and .u8 files are not domains
    uids = {d.uid for docs in corpus.docs.values() for d in docs}
    assert {"d0/3", "d0/7", "d2/2", "d2/3"} <= uids              # the first of each group is kept
    assert not {"d0/10", "d1/5", "d3/4"} & uids                  # its near-copies are gone
    assert corpus.raw_docs == {d: N_DOCS for d in DOMAINS}
    assert [len(corpus.docs[d]) for d in DOMAINS] == [N_DOCS - 1, N_DOCS - 1, N_DOCS, N_DOCS - 1]
    assert {tuple(g) for g in corpus.groups} == {("d0/3", "d0/10"), ("d0/7", "d1/5"), ("d2/2", "d3/4")}
    assert corpus.docs["d0"][0].text == "An interpretation I satisfies *only* this sentence."
    assert len(corpus.fingerprint) == 64 and load_corpus(corpus_dir) is corpus     # cached while unchanged


def test_near_duplicate_rule():
    base = "Nothing is impossible for the man who doesn't have to do it himself."
    assert near_duplicates(base, "NOTHING is impossible, for the man who doesn't have to do it himself!")
    assert near_duplicates("Weiler's Law:\n\t" + base, base + "\n\t\t-- A. H. Weiler")
    assert near_duplicates(base, "Some preamble here.  " + base + "  And a long, long tail after it, too.")
    assert not near_duplicates("To err is human.", "To err is human, to moo bovine, to purr feline, to bark canine.")
    assert not near_duplicates(base, "Everything is possible for a woman who does it herself today.")


def test_clean_text_and_cut_text():
    assert clean_text("\n\nab\b\bxy  \n_\bq\x07\n\n") == "xy\nq"
    pieces = cut_text(LONG, 64)
    assert all(0 < len(p) <= 64 for p in pieces) and len(pieces) >= 3
    assert " ".join(p.replace("\n", " ") for p in pieces).split() == LONG.split()
    assert cut_text("x" * 150, 64) == ["x" * 64, "x" * 64, "x" * 22]


# -- the split ---------------------------------------------------------------------------------------

def test_split_is_deterministic_per_seed_and_per_domain(corpus_dir):
    a, b, c = split_of(corpus_dir, 0), split_of(corpus_dir, 0), split_of(corpus_dir, 1)
    assert a.summary() == b.summary() and a.test == b.test and a.val == b.val
    assert [x.train for x in a.clients] == [x.train for x in b.clients]
    assert a.test != c.test
    # a domain's cut does not depend on the other domains or on who holds them
    alone = split_of(corpus_dir, 0, clients={"z": ["d3"], "y": ["d1"]})
    assert alone.test["d3"] == a.test["d3"] and alone.val["d3"] == a.val["d3"]
    assert alone.client("z").train == a.client("c3").train


def test_sides_and_clients_are_disjoint_and_near_duplicates_never_cross(corpus_dir):
    for seed in range(3):
        split = split_of(corpus_dir, seed)
        assert split.domains == ["d0", "d1", "d2", "d3"]
        parts = sides(split)
        for d in split.domains:
            assert len(parts[("test", d)]) == 6 and len(parts[("val", d)]) == 4
        for (s1, d1), (s2, d2) in itertools.combinations(parts, 2):
            assert not parts[(s1, d1)] & parts[(s2, d2)], (s1, d1, s2, d2)
        assert_no_near_duplicates_across(split)
        assert len(split.client("c0").train) and len(split.client("c1").train)
        # c2 holds two domains: train_docs split between them
        c2 = split.client("c2")
        assert {r["domain"] for r in c2.train} == {"d1", "d2"}
        assert len({r["doc"] for r in c2.train if r["domain"] == "d1"}) == SETTINGS["train_docs"] // 2


def test_records_train_unchanged_and_long_documents_stay_on_one_side(corpus_dir):
    split = split_of(corpus_dir, 0)
    for recs in [*split.test.values(), *split.val.values(), *(c.train for c in split.clients)]:
        for r in recs:
            assert set(r) == {"text", "domain", "uid", "doc"} and 0 < len(r["text"]) <= SETTINGS["max_chars"]
    all_records = [r for recs in [*split.test.values(), *split.val.values(), *(c.train for c in split.clients)]
                   for r in recs]
    assert len({r["uid"] for r in all_records}) == len(all_records)
    long_parts = [r for r in all_records if r["doc"] == "d2/3"]
    assert len(long_parts) >= 3                                       # cut, every piece on one side
    examples = build_examples(split.client("c0").train, ByteTokenizer(), 80)
    assert all(torch.equal(e["input_ids"], e["labels"]) for e in examples)   # LM loss on every token


def test_train_chars_caps_and_views(corpus_dir):
    split = split_of(corpus_dir, 0, train_chars=120)
    for c in split.clients:
        per_domain = {}
        for r in c.train:
            per_domain.setdefault(r["domain"], []).append(r)
        for d, recs in per_domain.items():
            docs = list(dict.fromkeys(r["doc"] for r in recs))
            chars_before_last = sum(len(r["text"]) for r in recs if r["doc"] != docs[-1])
            assert chars_before_last < 120 // len(c.domains)
    split = split_of(corpus_dir, 0, clients={"a": ["d0"], "b": ["d1"]}, domains=["d0", "d1", "d3"])
    assert split.domains == ["d0", "d1", "d3"] and "d3" in split.test
    assert split.views("a") == {"own": ["d0"], "unseen": ["d1", "d3"], "global": ["d0", "d1", "d3"]}


def test_score_val_swaps_the_held_out_sets(corpus_dir):
    plain, tune = split_of(corpus_dir, 0), split_of(corpus_dir, 0, score="val")
    assert tune.test == plain.val and tune.val == {}


def test_split_errors_are_clear(corpus_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown domain"):
        split_of(corpus_dir, clients={"a": ["nope"]})
    with pytest.raises(ValueError, match="needs at least"):
        split_of(corpus_dir, test_docs=N_DOCS)
    with pytest.raises(ValueError, match="lacks the clients' domain"):
        split_of(corpus_dir, domains=["d1"], clients={"a": ["d0"]})
    with pytest.raises(ValueError, match="no clients"):
        split_of(corpus_dir, clients={})
    monkeypatch.setattr(lm_corpus, "FORTUNES_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        lm_split(LMDataSettings(), 0, {"a": ["computers"]})
    with pytest.raises(FileNotFoundError, match="neither 'fortunes' nor a directory"):
        load_corpus(str(tmp_path / "absent"))


# -- the real corpus (skipped where the Debian package is not installed) -------------------------------

def _real_corpus_or_skip():
    try:
        return load_corpus("fortunes")
    except FileNotFoundError:
        pytest.skip(f"the fortunes corpus is not installed ({lm_corpus.FORTUNES_INSTALL})")


def test_real_corpus_domains_are_large_enough_and_the_split_does_not_leak():
    corpus = _real_corpus_or_skip()
    assert set(corpus.domains) == set(lm_corpus.FORTUNES_DOMAINS)
    for d in DEFAULT_DOMAINS:
        assert len(corpus.docs[d]) >= 650 and corpus.chars[d] >= 140_000, d
    clients = {"a": ["computers"], "b": ["computers"], "c": ["definitions"], "d": ["songs-poems"], "e": ["people"]}
    split = lm_split(LMDataSettings(), 0, clients)
    for d in DEFAULT_DOMAINS:
        assert len(split.test[d]) >= 200 and len(split.val[d]) >= 100
    parts = sides(split)
    for p1, p2 in itertools.combinations(parts, 2):
        assert not parts[p1] & parts[p2]
    assert_no_near_duplicates_across(split)
    again = lm_split(LMDataSettings(), 0, clients)
    assert again.test == split.test and again.summary() == split.summary()


# -- held-out NLL ------------------------------------------------------------------------------------

TEXTS = ["Hello world.", "Caf\u00e9 au lait, s'il vous pla\u00eet", "a", "Fortune favours\nthe bold."]


def _hand_nll(model, tokenizer, text):
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = torch.tensor([head + tokenizer.encode(text) + [tokenizer.eos_token_id]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    targets = ids[0, 1:]
    return float(-logp[torch.arange(len(targets)), targets].sum()), len(targets)


def test_heldout_nll_equals_a_hand_computation_on_a_tiny_llama():
    model = tiny_llama(seed=1, vocab=259)
    model.train()
    tok = ByteTokenizer()
    records = [{"text": t, "uid": str(i)} for i, t in enumerate(TEXTS)]
    result = heldout_nll_per_token(model, tok, records, max_length=64, batch_size=3)   # padding in a batch
    hand = [_hand_nll(model, tok, t) for t in TEXTS]
    assert result.tokens == sum(n for _, n in hand) == sum(len(t.encode()) + 1 for t in TEXTS)
    assert result.bytes == sum(len(t.encode()) for t in TEXTS) > sum(len(t) for t in TEXTS)
    assert result.nll == pytest.approx(sum(s for s, _ in hand), rel=1e-5)
    assert result.per_token == pytest.approx(result.nll / result.tokens)
    assert result.per_byte == pytest.approx(result.nll / result.bytes)
    nll, tokens, n_bytes = result                                  # unpacks as a plain tuple
    assert model.training                                          # its mode is restored
    assert all(p.grad is None for p in model.parameters())         # forward only
    one_by_one = [heldout_nll_per_token(model, tok, [r], 64, 1) for r in records]
    assert sum(x.nll for x in one_by_one) == pytest.approx(nll, rel=1e-5)


class _NoBos(ByteTokenizer):
    bos_token_id = None


def test_heldout_nll_without_bos_counts_only_scored_bytes_and_refuses_truncation():
    model = tiny_llama(seed=2, vocab=259)
    tok = _NoBos()
    result = heldout_nll_per_token(model, tok, [{"text": t} for t in TEXTS], 64, 2)
    hand = [_hand_nll(model, tok, t) for t in TEXTS]
    assert result.tokens == sum(n for _, n in hand) == sum(len(t.encode()) for t in TEXTS)
    assert result.bytes == sum(len(t.encode()) - 1 for t in TEXTS)       # the first byte is input only
    assert result.nll == pytest.approx(sum(s for s, _ in hand), rel=1e-5)
    with pytest.raises(ValueError, match="max_chars or raise max_length"):
        heldout_nll_per_token(model, ByteTokenizer(), [{"text": "x" * 63, "uid": "u"}], 64, 1)
    assert heldout_nll_per_token(model, ByteTokenizer(), [{"text": "x" * 62}], 64, 1).tokens == 63


def test_score_records_gives_each_records_hand_computed_nll_in_record_order():
    model = tiny_llama(seed=3, vocab=259)
    tok = ByteTokenizer()
    texts = TEXTS + ["x" * 40, "short"]                  # lengths out of order: batches are sorted, results are not
    scored = score_records(model, tok, [{"text": t} for t in texts], max_length=64, batch_size=4)
    hand = [_hand_nll(model, tok, t) for t in texts]
    np.testing.assert_allclose(scored.nll, [s for s, _ in hand], rtol=1e-5)
    assert scored.tokens.tolist() == [n for _, n in hand]
    assert scored.bytes.tolist() == [len(t.encode()) for t in texts]
    assert scored.total() == heldout_nll_per_token(model, tok, [{"text": t} for t in texts], 64, 4)
    assert scored.total(2).tokens == hand[0][1] + hand[1][1]


class _HalvedLogits(torch.nn.Module):
    """A model whose logits are not output_embeddings(final hidden state) (as with logit soft-capping)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config          # so its layout is found: the first batch's check must see the difference

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits * 0.5
        return out

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def test_score_records_uses_the_models_own_logits_where_the_head_shortcut_would_differ():
    model = _HalvedLogits(tiny_llama(seed=4, vocab=259)).eval()
    tok = ByteTokenizer()
    scored = score_records(model, tok, [{"text": t} for t in TEXTS], max_length=64, batch_size=2)
    hand = [_hand_nll(model, tok, t) for t in TEXTS]       # from the halved logits
    np.testing.assert_allclose(scored.nll, [s for s, _ in hand], rtol=1e-5)


def test_round_eval_docs_is_a_prefix_of_whole_documents(corpus_dir):
    split = split_of(corpus_dir, 0, round_eval_docs=2, max_chars=24)    # documents of several records each
    for d, recs in split.test.items():
        n = split.round_eval_records(d)
        docs = list(dict.fromkeys(r["doc"] for r in recs))
        assert {r["doc"] for r in recs[:n]} == set(docs[:2]) and not {r["doc"] for r in recs[n:]} & set(docs[:2])
        assert n > 2
    with pytest.raises(ValueError, match="lm_data.round_eval_docs"):
        LMDataSettings(test_docs=3, round_eval_docs=4)
    with pytest.raises(ValueError, match="lm_data.round_eval_docs .* val_docs"):
        LMDataSettings(test_docs=9, val_docs=3, round_eval_docs=4, score="val")


def _family(family: str):
    from fedzero.backbones import BackboneSpec, load_backbone

    byte = {"vocab_size": 259, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
    config = {"model_type": family, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 64, **byte,
              **({} if family == "gpt_neox" else {"num_key_value_heads": 1, "head_dim": 16})}
    return load_backbone(BackboneSpec(model_config=config, init_seed=5, tokenizer="byte"))[0]


@pytest.mark.parametrize("family,adapter,shortcut", [
    ("llama", "none", True), ("gpt_neox", "none", True), ("llama", "dema-parallel", True),
    ("llama", "dema-side", True), ("llama", "lora", True),
    ("gemma2", "none", False),          # logit soft-capping: the head alone is not the model's logits
])
def test_score_records_through_adapters_and_families_equals_full_logits(family, adapter, shortcut):
    model = with_random_adapter(_family(family), adapter)      # non-zero adapters: they change the NLL
    model.eval()
    tok = ByteTokenizer()
    scored = score_records(model, tok, [{"text": t} for t in TEXTS], max_length=64, batch_size=3)
    np.testing.assert_allclose(scored.nll, [_hand_nll(model, tok, t)[0] for t in TEXTS], rtol=1e-5)
    capture = lm_score._FinalHidden(model)
    try:
        batch = collate(build_examples([{"text": t} for t in TEXTS], tok, 64), tok.pad_token_id)
        with torch.no_grad():
            lm_score._token_nll(model, batch, capture)
    finally:
        capture.remove()
    assert capture.exact is shortcut


def test_domain_anchor_texts_come_from_a_domain_no_client_holds(corpus_dir):
    """projector_anchors "domain:<name>" (the bench's in-domain public anchors for the LM task): records of
    that domain, cut like the task's, in a seeded order of its documents; a held domain is refused."""
    from fedzero.bench.lm_data import domain_anchor_texts, to_records

    corpus = load_corpus(corpus_dir)
    clients = [{"id": "c0", "domains": ["d0"]}, {"id": "c1", "domains": ["d1"]}]
    anchors = domain_anchor_texts(corpus, "d2", 12, clients=clients, seed=0, max_chars=64)
    pieces = {r["uid"]: r["text"] for doc in corpus.docs["d2"] for r in to_records(doc, 64)}
    assert len(anchors) == 12 and all(pieces[a["uid"]] == a["text"] for a in anchors)
    assert len({a["uid"] for a in anchors}) == 12
    assert domain_anchor_texts(corpus, "d2", 12, clients=clients, seed=0, max_chars=64) == anchors
    assert domain_anchor_texts(corpus, "d2", 12, clients=clients, seed=1, max_chars=64) != anchors
    with pytest.raises(ValueError, match=r"anchor domain 'd1' is held by client\(s\) \['c1'\]"):
        domain_anchor_texts(corpus, "d1", 5, clients=clients, seed=0, max_chars=64)
    with pytest.raises(ValueError, match=r"anchor domain 'd3' has \d+ records .* 10000 are needed"):
        domain_anchor_texts(corpus, "d3", 10000, clients=clients, seed=0, max_chars=64)
    with pytest.raises(ValueError, match="unknown domain 'x'"):
        domain_anchor_texts(corpus, "x", 5, clients=clients, seed=0, max_chars=64)
