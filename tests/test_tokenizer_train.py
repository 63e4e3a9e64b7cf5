"""WordPiece training (no Ray): the same texts give the same vocabulary in every process, and it
is a proper BERT vocabulary (special ids, every character, "##" pieces, loadable by transformers)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipelines.data.corpus import bbc_root
from pipelines.data.text import normalize_text
from pipelines.data.tokenizer import (SPECIAL_TOKENS, SpecialIds, _bert_pipeline, count_words, learn_wordpiece_vocab,
                                 load_tokenizer, save_tokenizer, tokenizer_hash, train_wordpiece)

ROOT = Path(__file__).resolve().parents[1]


def paragraphs(n: int) -> list[str]:
    """The first `n` paragraphs of BBC News (the files in sorted order), normalized."""
    out: list[str] = []
    for f in sorted(bbc_root().glob("*/*.txt")):
        text = f.read_bytes().decode("utf-8", errors="replace")
        out += [normalize_text(p.strip()) for p in text.split("\n\n") if p.strip()]
        if len(out) >= n:
            return out[:n]
    return out


# 150 paragraphs at vocab 800: the Rust WordPieceTrainer's cut falls among tied counts there, and
# its vocabulary changed between processes (4 different ones in 6 runs before this trainer)
N, VOCAB = 150, 800
_HASH = ("import sys; sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r});"
         "from test_tokenizer_train import paragraphs, N, VOCAB;"
         "from pipelines.data.tokenizer import train_wordpiece, tokenizer_hash;"
         "print(tokenizer_hash(train_wordpiece(iter(paragraphs(N)), vocab_size=VOCAB)))")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return paragraphs(N)


@pytest.fixture(scope="module")
def tok(texts):
    return train_wordpiece(iter(texts), vocab_size=VOCAB)


def test_same_vocabulary_in_fresh_processes(tok):
    code = _HASH.format(root=str(ROOT), tests=str(ROOT / "tests"))
    hashes = set()
    for seed in ("1", "2"):  # string hashing (and set order) differs between the two
        env = {**os.environ, "PYTHONHASHSEED": seed, "TOKENIZERS_PARALLELISM": "false"}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        hashes.add(out.stdout.strip())
    assert hashes == {tokenizer_hash(tok)}


def test_a_bert_vocabulary(tok, texts):
    special = SpecialIds.of(tok)
    assert (special.pad, special.unk, special.cls, special.sep, special.mask) == (0, 1, 2, 3, 4)
    assert tok.get_vocab_size() == VOCAB
    vocab = tok.get_vocab()
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])[:5]] == list(SPECIAL_TOKENS)
    alphabet = {ch for w in count_words(texts, tok) for ch in w}
    assert len(alphabet) > 40
    assert all(ch in vocab and "##" + ch in vocab for ch in alphabet)  # every character, both ways
    learned = [t for t in vocab if t.startswith("##") and len(t) > 3]
    assert len(learned) > 100  # merged continuation pieces, not only characters
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    assert not any(special.unk in e.ids for e in encodings)
    assert tok.encode("zebra-like 2005").tokens[0] != "[UNK]"


def test_as_good_as_the_rust_trainer(tok, texts):
    from tokenizers import Tokenizer, models, trainers

    rust = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##")), True)
    rust.train_from_iterator(iter(texts), trainer=trainers.WordPieceTrainer(
        vocab_size=VOCAB, min_frequency=2, special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##",
        show_progress=False))

    def total(t):
        return sum(len(e.ids) for e in t.encode_batch(texts, add_special_tokens=False))

    assert abs(total(tok) / total(rust) - 1) < 0.03


def test_round_trip_through_files_and_transformers(tok, texts, tmp_path):
    from transformers import BertTokenizerFast

    save_tokenizer(tok, tmp_path)
    lines = (tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert lines[:5] == list(SPECIAL_TOKENS) and len(lines) == VOCAB
    hf = BertTokenizerFast.from_pretrained(str(tmp_path))
    sample = [*texts[:20], "Ünïcode café, naïve 北京 ‘quotes’ — and\ttabs"]
    for loaded in (load_tokenizer(tmp_path), load_tokenizer(tmp_path / "vocab.txt")):
        assert [e.ids for e in loaded.encode_batch(sample)] == [e.ids for e in tok.encode_batch(sample)]
    assert hf(sample)["input_ids"] == [e.ids for e in tok.encode_batch(sample)]
    assert tokenizer_hash(load_tokenizer(tmp_path)) == tokenizer_hash(tok)


def test_word_counts_are_the_pre_tokenizers(texts):
    """Batched counting == normalizing and pre-tokenizing every text on its own."""
    from tokenizers import Tokenizer, models

    tricky = ["Ünïcode café,naïve 北京人 ‘quotes’ — and\ttabs\r\nnew\u00a0line\x00nul\u200bzw",
              "U.S.-based e-mail: a@b.com (x2)... ", "", "  ", "ǅemal ﬁ ß İstanbul ΣΑΣ"]
    for lowercase in (True, False):
        tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")), lowercase)
        want: Counter = Counter()
        for t in [*texts[:50], *tricky]:
            want.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(t)))
        assert count_words(iter([*texts[:50], *tricky]), tok) == want


def test_merges_ties_and_limits():
    base = len(SPECIAL_TOKENS) + 2 * 4  # a b c d, then ##a ##b ##c ##d
    learn = learn_wordpiece_vocab
    assert learn({"ab": 2, "cd": 2}, vocab_size=base + 1)[base:] == ["ab"]  # tie: smallest ids first
    assert learn({"ab": 2, "cd": 3}, vocab_size=base + 1)[base:] == ["cd"]  # most frequent first
    assert learn({"ab": 2, "cd": 2}, vocab_size=100)[base:] == ["ab", "cd"]
    assert learn({"ab": 2, "cd": 2}, vocab_size=100, min_frequency=3)[base:] == []
    assert learn({"ab": 1, "cd": 2}, vocab_size=100, min_frequency=1)[base:] == ["cd", "ab"]
    # a ##a ##a ##a: ##a+##a is merged left to right (a ##aa ##a), then a+##aa, then aaa+##a
    assert learn({"aaaa": 5, "ba": 1}, vocab_size=100, min_frequency=1)[len(SPECIAL_TOKENS) + 4:] == [
        "##aa", "aaa", "aaaa", "ba"]


def test_vocabulary_never_exceeds_vocab_size_with_many_rare_characters(texts):
    """3,000 CJK characters seen once and 200 rare letters inside words: the old trainer gave
    every character two entries (3,909 tokens for a 1,000 asked). Now the most frequent
    characters that fit are kept and the rare ones encode as [UNK]."""
    cjk = "".join(chr(0x4E00 + i) for i in range(3000))
    rare = [chr(0x0400 + i) for i in range(0x60)] + [chr(0x1E00 + i) for i in range(104)]  # Cyrillic, Latin Ext.
    mixed = [*texts[:60], *(cjk[i:i + 30] for i in range(0, 3000, 30)),
             *(f"ab{ch}cd and x{ch}" for ch in rare), "北京 北京 北京 北京 北京 北京 北京 北京 北京"]
    toks = [train_wordpiece(iter(order), vocab_size=1000) for order in (mixed, mixed[::-1])]
    assert tokenizer_hash(toks[0]) == tokenizer_hash(toks[1])  # deterministic, whatever the text order
    tok = toks[0]
    vocab = tok.get_vocab()
    assert tok.get_vocab_size() == len(vocab) <= 1000
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])[:5]] == list(SPECIAL_TOKENS)
    assert all(ch in vocab and "##" + ch in vocab for ch in "abcdefghijklmnopqrstuvwxyz0123456789")
    assert "北" in vocab and "京" in vocab and "##北" not in vocab  # frequent CJK: a word of its own
    unk = SpecialIds.of(tok).unk
    assert tok.encode(chr(0x4E00 + 2999), add_special_tokens=False).ids == [unk]
    assert tok.encode("the economy", add_special_tokens=False).ids.count(unk) == 0


def test_alphabet_limit_and_merge_caps():
    from pipelines.data.tokenizer import limit_alphabet, merge_word_counts

    # by frequency (ties: smaller code point); a CJK character costs one entry, others two
    assert limit_alphabet({"ab": 3, "北": 5, "c": 1}, 4) == ["a", "北", "##a"]
    assert limit_alphabet({"ab": 3, "北": 5, "c": 1}, 6) == ["a", "b", "北", "##a", "##b"]
    assert limit_alphabet({"ab": 3, "北": 5, "c": 1}, 7) == ["a", "b", "c", "北", "##a", "##b", "##c"]
    # words holding a character left out take no part in the merges
    # ("xab" would make "##ab" the first merge; x does not fit, so "xab" counts for nothing)
    assert learn_wordpiece_vocab({"ab": 2, "xab": 5}, vocab_size=len(SPECIAL_TOKENS) + 5)[len(SPECIAL_TOKENS):] == [
        "a", "b", "##a", "##b", "ab"]

    import pyarrow as pa

    def part(d):
        return pa.table({"word": list(d), "count": list(d.values())})

    parts = [part({"a": 1, "b": 2}), part({"a": 3, "c": 1}), part({"d": 1, "b": 1})]
    assert merge_word_counts(parts, 10) == {"a": 4, "b": 3, "c": 1, "d": 1}
    assert merge_word_counts(parts, 2) == {"a": 4, "b": 3}  # the most frequent kept
    assert merge_word_counts([part({"z": 1, "y": 1, "x": 1})], 2) == {"x": 1, "y": 1}  # ties: smaller word
    assert merge_word_counts([], 5) == {}
