"""Labeled data: readers, built-in tasks, splits and the bad-input checks (unit tier, no Ray)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.builtin_tasks import BUILTIN_TASKS, builtin_task
from pipelines.labeled import (SPLITS, LabeledDataError, LabeledSet, check_bio, check_splits, label_fraction,
                               label_names, read_labeled, stratified_split)


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(path: Path, rows: list[dict]) -> str:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _seq(labels: list[str], source: str = "mem") -> LabeledSet:
    return LabeledSet("sequence", [f"text {i}" for i in range(len(labels))], None, [], list(labels), source, {})


# ---------------------------------------------------------------- readers: every format


def test_csv_strings_ints_and_quoted_newlines(tmp_path):
    p = _write(tmp_path / "a.csv", 'id,text,label\n1,"good, really\nmultiline",pos\n2,bad,neg\n3,fine,1\n')
    ds = read_labeled(p)
    assert ds.task == "sequence" and len(ds) == 3 and ds.texts_b is None and ds.tokens == []
    assert ds.texts == ["good, really\nmultiline", "bad", "fine"]
    assert ds.labels == ["pos", "neg", "1"] and ds.source == p and ds.skipped == {}


def test_tsv_jsonl_json_array_and_parquet_agree(tmp_path):
    rows = [{"text": "a b", "label": 1}, {"text": "c", "label": 0}, {"text": "d e f", "label": 1}]
    want = (["a b", "c", "d e f"], ["1", "0", "1"])
    paths = [
        _write(tmp_path / "a.tsv", "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows)),
        _jsonl(tmp_path / "a.jsonl", rows),
        _write(tmp_path / "a.json", json.dumps(rows)),
    ]
    pq.write_table(pa.table({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}),
                   tmp_path / "a.parquet")
    paths.append(str(tmp_path / "a.parquet"))
    for p in paths:
        ds = read_labeled(p)
        assert (ds.texts, ds.labels) == want, p


def test_pairs_custom_columns_and_uri(tmp_path):
    p = _jsonl(tmp_path / "pairs.jsonl", [{"text_a": "q1", "text_b": "a1", "label": "yes"},
                                          {"text_a": "q2", "text_b": "a2", "label": "no"}])
    ds = read_labeled(p)
    assert ds.texts == ["q1", "q2"] and ds.texts_b == ["a1", "a2"] and ds.labels == ["yes", "no"]
    q = _write(tmp_path / "c.csv", "body,topic\nhello,x\nworld,y\n")
    assert read_labeled(q, text_column="body", label_column="topic").labels == ["x", "y"]
    uri = read_labeled("file://" + p)  # a pyarrow filesystem URI
    assert uri.texts_b == ["a1", "a2"] and uri.source == "file://" + p


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_conll_jsonl_and_parquet_token_files(tmp_path):
    ds = read_labeled(_write(tmp_path / "a.conll", CONLL), task="token")
    assert ds.task == "token" and ds.texts == [] and ds.texts_b is None
    assert ds.tokens == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]]
    assert ds.labels == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER"]]
    two_col = read_labeled(_write(tmp_path / "b.txt", "Paris\tB-LOC\nis\tO\n\n\nRome\tB-LOC\n"), task="token")
    assert two_col.tokens == [["Paris", "is"], ["Rome"]] and two_col.labels == [["B-LOC", "O"], ["B-LOC"]]
    rows = [{"tokens": ["New", "York"], "tags": ["B-LOC", "I-LOC"]}, {"tokens": [], "tags": []},
            {"tokens": ["hi"], "tags": ["O"]}]
    js = read_labeled(_jsonl(tmp_path / "t.jsonl", rows), task="token")
    assert js.tokens == [["New", "York"], ["hi"]] and js.skipped == {"empty_text": 1}
    pq.write_table(pa.table({"tokens": [r["tokens"] for r in rows], "tags": [r["tags"] for r in rows]}),
                   tmp_path / "t.parquet")
    pqs = read_labeled(str(tmp_path / "t.parquet"), task="token")
    assert (pqs.tokens, pqs.labels, pqs.skipped) == (js.tokens, js.labels, js.skipped)


# ---------------------------------------------------------------- bad input: precise errors and counted skips


def test_missing_text_or_label_column_names_it_and_the_columns_found(tmp_path):
    p = _write(tmp_path / "bad.csv", "review,label\nok,1\n")
    with pytest.raises(LabeledDataError, match=r"bad\.csv: no text column 'text'.*columns found: 'review', 'label'"):
        read_labeled(p)
    q = _jsonl(tmp_path / "bad.jsonl", [{"text": "a", "sentiment": "pos"}])
    with pytest.raises(LabeledDataError, match=r"bad\.jsonl: no label column 'label' \(columns found: 'text', 'sentiment'\)"):
        read_labeled(q)
    r = _jsonl(tmp_path / "tok.jsonl", [{"words": ["a"], "tags": ["O"]}])
    with pytest.raises(LabeledDataError, match=r"no tokens column 'tokens'"):
        read_labeled(r, task="token")


def test_empty_texts_and_missing_labels_are_skipped_and_counted(tmp_path):
    p = _write(tmp_path / "e.csv", "text,label\nfine,a\n,b\n   \t ,a\nno label,\nok,b\n\n")
    ds = read_labeled(p)
    assert ds.texts == ["fine", "ok"] and ds.labels == ["a", "b"]
    assert ds.skipped == {"empty_text": 2, "missing_label": 1}
    js = read_labeled(_jsonl(tmp_path / "e.jsonl", [{"text": None, "label": "a"}, {"text": "x", "label": None},
                                                    {"text": "y", "label": "b"}]))
    assert js.texts == ["y"] and js.skipped == {"empty_text": 1, "missing_label": 1}


def test_tag_count_differs_from_token_count(tmp_path):
    p = _jsonl(tmp_path / "t.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "O"]},
                                      {"tokens": ["c", "d", "e"], "tags": ["O", "B-PER"]}])
    with pytest.raises(LabeledDataError, match=r"t\.jsonl: line 2: 3 tokens but 2 tags"):
        read_labeled(p, task="token")
    missing_tag = "EU B-NP B-ORG\nrejects B-VP O\nGerman B-NP\n"  # a tag lost on line 3
    with pytest.raises(LabeledDataError, match=r"m\.conll: line 3: 2 columns but line 1 has 3"):
        read_labeled(_write(tmp_path / "m.conll", missing_tag), task="token")
    with pytest.raises(LabeledDataError, match=r"o\.conll: line 2: 1 column \('rejects'\)"):
        read_labeled(_write(tmp_path / "o.conll", "EU B-ORG\nrejects\n"), task="token")


@pytest.mark.parametrize("tags, message", [
    (["O", "I-PER"], r"position 1: invalid BIO: 'I-PER' after 'O'"),
    (["B-LOC", "I-PER"], r"position 1: invalid BIO: 'I-PER' after 'B-LOC'"),
    (["B-ORG", "I-ORG", "I-LOC"], r"position 2: invalid BIO: 'I-LOC' after 'I-ORG'"),
    (["I-MISC", "O"], r"position 0: invalid BIO: 'I-MISC' at the start of the sentence"),
    (["B-PER", "E-PER"], r"position 1: tag 'E-PER' is not IOB2"),
    (["PER"], r"position 0: tag 'PER' is not IOB2"),
])
def test_invalid_bio_in_gold_names_sentence_and_position(tmp_path, tags, message):
    lines = "Good O\nday O\n\n" + "".join(f"w{i} {t}\n" for i, t in enumerate(tags))
    with pytest.raises(LabeledDataError, match=r"g\.conll: sentence 2 \(line 4\), " + message):
        read_labeled(_write(tmp_path / "g.conll", lines), task="token")
    p = _jsonl(tmp_path / "g.jsonl", [{"tokens": ["a"], "tags": ["O"]},
                                      {"tokens": [f"w{i}" for i in range(len(tags))], "tags": tags}])
    with pytest.raises(LabeledDataError, match=r"g\.jsonl: line 2 \(sentence 2\), " + message):
        read_labeled(p, task="token")


def test_valid_iob2_passes():
    check_bio(["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG", "I-ORG", "I-ORG"])


def test_single_class_in_train_is_an_error():
    with pytest.raises(LabeledDataError, match=r"train\.csv: the training set has a single class 'pos' \(3 examples\)"):
        check_splits(_seq(["pos"] * 3, "train.csv"))
    no_entities = LabeledSet("token", [], None, [["a", "b"]], [["O", "O"]], "t.conll", {})
    with pytest.raises(LabeledDataError, match=r"t\.conll: the training set has no entity"):
        check_splits(no_entities)


def test_dev_or_test_label_unseen_in_train_names_it_and_the_file():
    train = _seq(["a", "b", "a"], "train.csv")
    check_splits(train, _seq(["a"], "dev.csv"), _seq(["b", "a"], "test.csv"))
    with pytest.raises(LabeledDataError, match=r"dev\.csv: dev labels not in train \(train\.csv\): 'c' \(2x\)"):
        check_splits(train, _seq(["a", "c", "c"], "dev.csv"))
    with pytest.raises(LabeledDataError, match=r"test\.csv: test labels not in train .*'z' \(1x\)"):
        check_splits(train, None, _seq(["z"], "test.csv"))
    tok = LabeledSet("token", [], None, [["a"]], [["B-PER"]], "tr.conll", {})
    check_splits(tok, LabeledSet("token", [], None, [["a", "b"]], [["B-PER", "I-PER"]], "dv.conll", {}))
    with pytest.raises(LabeledDataError, match=r"te\.conll: test tags not in train \(tr\.conll\): 'B-LOC' \(1x\)"):
        check_splits(tok, None, LabeledSet("token", [], None, [["a"]], [["B-LOC"]], "te.conll", {}))


def test_other_bad_files(tmp_path):
    with pytest.raises(LabeledDataError, match=r"nope\.csv: no such file"):
        read_labeled(str(tmp_path / "nope.csv"))
    with pytest.raises(LabeledDataError, match=r"unsupported file type '\.xlsx'"):
        read_labeled(_write(tmp_path / "a.xlsx", "x"))
    bad = tmp_path / "latin.csv"
    bad.write_bytes("text,label\ncaf\u00e9,a\n".encode("latin-1"))
    with pytest.raises(LabeledDataError, match=r"latin\.csv: line 2: not UTF-8"):
        read_labeled(str(bad))
    with pytest.raises(LabeledDataError, match=r"j\.jsonl: line 2: invalid JSON"):
        read_labeled(_write(tmp_path / "j.jsonl", '{"text": "a", "label": 1}\n{"text": \n'))
    with pytest.raises(LabeledDataError, match=r"l\.jsonl: line 1, column 'label': a label must be a string"):
        read_labeled(_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": [1, 2]}]))
    with pytest.raises(LabeledDataError, match=r"unknown task 'ner'"):
        read_labeled(str(bad), task="ner")
    with pytest.raises(LabeledDataError, match=r"the training set is empty \(skipped: \{'empty_text': 1\}\)"):
        check_splits(read_labeled(_write(tmp_path / "empty.csv", "text,label\n ,a\n")))


# ---------------------------------------------------------------- splits


def test_stratified_split_keeps_proportions_and_is_deterministic():
    labels = ["a"] * 500 + ["b"] * 300 + ["c"] * 200
    ds = _seq(labels)
    ds.skipped = {"empty_text": 4}
    parts = stratified_split(ds, (0.8, 0.1, 0.1), seed=0)
    assert [len(p) for p in parts] == [800, 100, 100]
    for p in parts:
        assert Counter(p.labels) == {k: v * len(p) // 1000 for k, v in Counter(labels).items()}
    assert sorted(t for p in parts for t in p.texts) == sorted(ds.texts)  # a partition
    again = stratified_split(ds, (0.8, 0.1, 0.1), seed=0)
    assert [p.texts for p in again] == [p.texts for p in parts]
    assert stratified_split(ds, (0.8, 0.1, 0.1), seed=1)[1].texts != parts[1].texts
    assert [p.skipped for p in parts] == [{"empty_text": 4}, {}, {}]  # counted once


def test_duplicate_examples_never_straddle_splits():
    texts = [f"t{i}" for i in range(200)] + ["dup"] * 20 + ["twice"] * 2
    ds = LabeledSet("sequence", texts, None, [], ["a", "b"] * 100 + ["a"] * 22, "mem", {})
    for seed in range(5):
        parts = stratified_split(ds, (0.8, 0.1, 0.1), seed)
        assert sorted(t for p in parts for t in p.texts) == sorted(texts)
        for t in ("dup", "twice"):
            assert sum(t in p.texts for p in parts) == 1
        assert [abs(len(p) - f * len(ds)) < 20 for p, f in zip(parts, (0.8, 0.1, 0.1))] == [True] * 3


def test_stratified_split_gives_train_every_class_and_splits_token_sets():
    ds = _seq(["big"] * 50 + ["rare"])
    train, dev, test = stratified_split(ds, (0.8, 0.1, 0.1), seed=3)
    assert "rare" in train.labels
    check_splits(train, dev, test)
    tok = LabeledSet("token", [], None, [[str(i)] for i in range(10)], [["O"]] * 10, "t", {})
    a, b = stratified_split(tok, (0.7, 0.3), seed=0)
    assert (len(a), len(b)) == (7, 3) and sorted(a.tokens + b.tokens) == sorted(tok.tokens)
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(ds, (0.8, 0.1), seed=0)


def test_label_fraction_is_stratified_nested_and_keeps_every_class():
    ds = _seq(["a"] * 400 + ["b"] * 100 + ["c"] * 3)
    tenth = label_fraction(ds, 0.1, seed=0)
    assert Counter(tenth.labels) == {"a": 40, "b": 10, "c": 1}
    fifth = label_fraction(ds, 0.2, seed=0)
    assert set(tenth.texts) <= set(fifth.texts)
    assert label_fraction(ds, 0.1, seed=0).texts == tenth.texts
    assert label_fraction(ds, 0.1, seed=1).texts != tenth.texts
    assert len(label_fraction(ds, 1.0, seed=0)) == len(ds)


def test_label_names():
    assert label_names(_seq(["b", "a", "b", "c"])) == ["a", "b", "c"]
    tok = LabeledSet("token", [], None, [["x", "y", "z"]], [["B-PER", "I-PER", "B-LOC"]], "t", {})
    assert label_names(tok) == ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]  # I-LOC completed


# ---------------------------------------------------------------- built-in tasks (real bundled data)


def _all(name):
    return [builtin_task(name, s) for s in SPLITS]


def test_builtin_bbc_topic_stratified_80_10_10():
    train, dev, test = _all("bbc-topic")
    assert len(train) + len(dev) + len(test) == 2225 and (len(dev), len(test)) == (223, 222)
    assert label_names(train) == ["business", "entertainment", "politics", "sports", "tech"]
    assert train.source == "builtin:bbc-topic/train" and test.source == "builtin:bbc-topic/test"
    total = Counter(train.labels) + Counter(dev.labels) + Counter(test.labels)
    for label, n in total.items():
        assert abs(Counter(dev.labels)[label] - n / 10) <= 1
    assert not set(train.texts) & set(test.texts)
    assert any("\u00a315.8m" in t for t in train.texts + dev.texts + test.texts)  # sports/199.txt, cp1252
    check_splits(train, dev, test)


def test_builtin_newsgroups_official_split_dev_from_train():
    train, dev, test = _all("newsgroups")
    assert len(train) + len(dev) + train.skipped.get("empty_text", 0) == 11314
    assert len(test) + test.skipped.get("empty_text", 0) == 7532
    assert dev.skipped == {} and abs(len(dev) - (len(train) + len(dev)) / 10) <= 20
    assert len(label_names(train)) == 20 and set(dev.labels) == set(test.labels) == set(train.labels)
    assert all(t.strip() for t in test.texts) and "Subject:" not in train.texts[0].split("\n")[0]
    check_splits(train, dev, test)


def test_builtin_movie_sentiment_and_sms_spam():
    train, dev, test = _all("movie-sentiment")
    assert len(train) + len(dev) + len(test) + train.skipped["neutral_score"] == 10605
    assert label_names(train) == ["negative", "positive"] and train.skipped == {"neutral_score": 37}
    assert abs(len(test) - 1057) <= 2
    train, dev, test = _all("sms-spam")
    assert len(train) + len(dev) + len(test) == 4837
    assert (Counter(train.labels) + Counter(dev.labels) + Counter(test.labels)) == {"ham": 4199, "spam": 638}
    assert abs(Counter(test.labels)["spam"] - 64) <= 1


def test_builtin_conll2003_official_splits():
    train, dev, test = _all("conll2003")
    assert (len(train), len(dev), len(test)) == (14041, 3250, 3453)
    assert train.task == BUILTIN_TASKS["conll2003"] == "token" and dev.source == "builtin:conll2003/dev"
    assert train.tokens[0] == ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    assert train.labels[0] == ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
    assert label_names(train) == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER"]
    check_splits(train, dev, test)
    assert not (Path(__file__).parents[1] / "pipelines" / "data" / "conll2003").exists()


def test_builtin_returns_copies_and_rejects_unknown_names():
    a = builtin_task("sms-spam", "dev")
    a.labels.clear()
    assert len(builtin_task("sms-spam", "dev")) > 0
    with pytest.raises(LabeledDataError, match=r"unknown built-in task 'imdb'; choose one of bbc-topic, newsgroups"):
        builtin_task("imdb", "train")
    with pytest.raises(LabeledDataError, match=r"unknown split 'valid' of conll2003; choose one of train, dev, test"):
        builtin_task("conll2003", "valid")
