"""Raw document bytes -> clean text -> paragraphs -> sentences. Pure Python, no Ray.

Normalization: Unicode NFC, control and invisible format characters removed, every run of
whitespace inside a paragraph collapsed to one space (hard-wrapped lines are joined), a
blank line is a paragraph break. Sentences come from `sentencex` (Wikimedia's rule-based
segmenter, compiled, MIT): it ships its abbreviation rules in the wheel, so nothing is
downloaded at run time, and it keeps "Mr.", "U.S.", "e.g." and decimals inside a sentence.
"""

from __future__ import annotations

import re
import unicodedata

import sentencex

# Why a document is not used; these are the manifest's `documents.skipped` keys.
EMPTY = "empty"  # zero bytes
NO_TEXT = "no_text"  # only whitespace / control characters after normalization
BINARY = "binary"  # NUL bytes or mostly control bytes
NOT_UTF8 = "not_utf8"  # not UTF-8 and the fallback encoding failed too (or none configured)
TOO_LARGE = "too_large"  # over max_document_bytes: refused before it is read
UNREADABLE = "unreadable"  # I/O error, or a JSONL line that is not a JSON object with a text string
SKIP_REASONS = (EMPTY, NO_TEXT, BINARY, NOT_UTF8, TOO_LARGE, UNREADABLE)

# C0/C1 controls except \t \n (\r is mapped to \n first), and zero-width / bidi format marks.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\ufff9-\ufffb]")
_SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newline (tabs, NBSP, thin spaces...)
_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")  # a blank line (possibly holding spaces)
_BINARY_BYTES = bytes(range(0, 9)) + bytes(range(14, 32))


def decode_document(raw: bytes, fallback: str = "cp1252") -> tuple[str | None, str | None, bool]:
    """Decode a document's bytes: (text, skip reason, repaired).

    UTF-8 (a BOM is dropped). A file that is not UTF-8 is decoded with `fallback` (BBC's
    `sports/199.txt` is Windows-1252: "\\xa315.8m" is "£15.8m") and flagged repaired; with
    no fallback, or if that fails too, it is skipped as not_utf8. NUL bytes, or more than
    10% control bytes in the first 64 KiB, mean binary.
    """
    if not raw:
        return None, EMPTY, False
    head = raw[:65536]
    if b"\x00" in head or sum(head.count(bytes([b])) for b in _BINARY_BYTES) > 0.1 * len(head):
        return None, BINARY, False
    try:
        return raw.decode("utf-8-sig"), None, False
    except UnicodeDecodeError:
        pass
    if fallback:
        try:
            return raw.decode(fallback), None, True
        except (UnicodeDecodeError, LookupError):
            pass
    return None, NOT_UTF8, False


def normalize_text(text: str) -> str:
    """NFC, controls dropped, whitespace collapsed; paragraphs joined by one blank line."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    text = _CONTROL.sub("", text)
    paragraphs = []
    for para in _PARAGRAPH_BREAK.split(text):
        para = _SPACES.sub(" ", para.replace("\n", " ")).strip()
        if para:
            paragraphs.append(para)
    return "\n\n".join(paragraphs)


def split_paragraphs(normalized: str) -> list[str]:
    """Paragraphs of a `normalize_text` result."""
    return [p for p in normalized.split("\n\n") if p]


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one normalized paragraph, stripped, none empty."""
    return [s.strip() for s in sentencex.segment("en", paragraph) if s.strip()]


def document_sentences(normalized: str) -> list[list[str]]:
    """A normalized document as paragraphs of sentences: [[s, s], [s], ...]."""
    out = []
    for para in split_paragraphs(normalized):
        sentences = split_sentences(para)
        if sentences:
            out.append(sentences)
    return out
