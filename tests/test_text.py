"""Normalization, sentence splitting and decoding of raw documents (unit tier, no Ray)."""

from __future__ import annotations

from pipelines.data.corpus import bbc_root
from pipelines.data.text import (BINARY, EMPTY, NOT_UTF8, decode_document, document_sentences, normalize_text,
                            split_sentences)


def test_normalize_nfc_controls_whitespace_paragraphs():
    raw = "Caf\u0065\u0301 opens\r\nat  nine.\x07\u200b\n\n\n  Second\tparagraph\u00a0here. \n \n"
    assert normalize_text(raw) == "Caf\u00e9 opens at nine.\n\nSecond paragraph here."


def test_sentences_keep_abbreviations_and_decimals():
    text = ("Mr. Smith met Dr. Jones at 3.30 p.m. on Friday. The U.S. economy grew 2.5% in the "
            "third quarter. Shares rose $1.13bn! Did it last?")
    assert split_sentences(text) == [
        "Mr. Smith met Dr. Jones at 3.30 p.m. on Friday.",
        "The U.S. economy grew 2.5% in the third quarter.",
        "Shares rose $1.13bn!",
        "Did it last?",
    ]


def test_document_sentences_on_real_bbc_article():
    text = (bbc_root() / "business" / "001.txt").read_text()
    paras = document_sentences(normalize_text(text))
    assert paras[0] == ["Ad sales boost Time Warner profit"]  # the headline is its own paragraph
    assert paras[1][0].startswith("Quarterly profits at US media giant TimeWarner jumped 76% to $1.13bn")
    assert all(s and s == s.strip() for p in paras for s in p)


def test_decode_bad_documents():
    assert decode_document(b"") == (None, EMPTY, False)
    assert decode_document(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")[1] == BINARY
    assert decode_document("\ufeffhello".encode()) == ("hello", None, False)
    real = (bbc_root() / "sports" / "199.txt").read_bytes()  # Windows-1252, not UTF-8
    text, reason, repaired = decode_document(real, "cp1252")
    assert reason is None and repaired and "\u00a315.8m" in text
    assert decode_document(real, "") == (None, NOT_UTF8, False)
