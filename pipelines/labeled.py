"""Labeled data for fine-tuning and evaluation: readers and checks.

Everything here runs on the driver before any Ray work, so a bad file fails with a
`LabeledDataError` that names the file, the column and the row (or line), never deep inside
a Ray worker.

Files (local paths or pyarrow-filesystem URIs, e.g. `s3://bucket/k.csv?endpoint_override=...`):

- sequence task: CSV / TSV / JSONL (JSON lines or a JSON array) / Parquet with a text column
  (`text`, or `text_a` + `text_b` for pairs) and a `label` column (strings; ints become
  their decimal string). Rows with an empty or whitespace-only text are skipped and counted
  (`empty_text`), rows without a label likewise (`missing_label`).
- token task: CoNLL-style columns (`token ... tag`, whitespace separated, the last column is
  the tag, a blank line between sentences, `-DOCSTART-` lines ignored), or JSONL / Parquet
  rows with `tokens` and `tags` lists. Gold tags must be IOB2 (`O`, `B-TYPE`, `I-TYPE`, an
  `I-TYPE` only after `B-TYPE` / `I-TYPE`); anything else is an error naming sentence and
  position.

Built-in tasks (bbc-topic, newsgroups, movie-sentiment, sms-spam, conll2003) are in
`pipelines.builtin_tasks`.

Splits (`stratified_split`, `label_fraction`, `label_names`, `check_splits`) are in
`pipelines.label_splits`, re-exported here.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = ["LabeledDataError", "LabeledSet", "read_labeled", "SPLITS",
           "stratified_split", "label_fraction", "label_names", "check_splits", "check_bio"]

SEQUENCE, TOKEN = "sequence", "token"
TASKS = (SEQUENCE, TOKEN)
SPLITS = ("train", "dev", "test")
EMPTY_TEXT = "empty_text"  # skip reasons (LabeledSet.skipped keys)
MISSING_LABEL = "missing_label"
NEUTRAL_SCORE = "neutral_score"  # movie-sentiment: score == 0 has no sign

SEQUENCE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
                    ".parquet": "parquet"}
TOKEN_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet"}  # else CoNLL
DOCSTART = "-DOCSTART-"


class LabeledDataError(ValueError):
    """Labeled data that cannot be used: the message names the file, column and row."""


@dataclass
class LabeledSet:
    task: str  # "sequence" | "token"
    texts: list[str]  # sequence: the text (or text_a) of each example; token: []
    texts_b: list[str] | None  # sequence pairs: text_b; else None
    tokens: list[list[str]]  # token: the words of each sentence; sequence: []
    labels: list  # sequence: one str per example; token: a list of str tags per sentence
    source: str  # a path / URI, or "builtin:<name>/<split>"
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: list[int]) -> "LabeledSet":
        """The examples at `indices` (in that order); skipped counts are not carried."""
        return replace(
            self,
            texts=[self.texts[i] for i in indices] if self.task == SEQUENCE else [],
            texts_b=[self.texts_b[i] for i in indices] if self.texts_b is not None else None,
            tokens=[self.tokens[i] for i in indices] if self.task == TOKEN else [],
            labels=[self.labels[i] for i in indices],
            skipped={},
        )


# ---------------------------------------------------------------- reading files


def _fail(source: str, where: str, message: str) -> LabeledDataError:
    return LabeledDataError(": ".join(p for p in (source, where, message) if p))


def _read_bytes(path: str) -> bytes:
    import pyarrow as pa

    from .storage import filesystem

    try:
        fs, p = filesystem(path)
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        raise LabeledDataError(f"{path}: no such file") from None
    except (OSError, pa.ArrowException, ValueError) as e:
        raise LabeledDataError(f"{path}: cannot read it ({e})") from None


def _decode(path: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _fail(path, f"line {line}", f"not UTF-8 (byte {e.start}); save the file as UTF-8") from None


def _suffix(path: str) -> str:
    from .storage import split_query

    return Path(split_query(path)[0]).suffix.lower()


def _records(path: str, fmt: str) -> tuple[list[str], list[tuple[str, dict]]]:
    """(columns, [(where, row dict)]) of a CSV / TSV / JSONL / Parquet file."""
    raw = _read_bytes(path)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(raw))
        except (pa.ArrowException, OSError) as e:
            raise _fail(path, "", f"not a readable Parquet file ({e})") from None
        return table.column_names, [(f"row {i + 1}", r) for i, r in enumerate(table.to_pylist())]
    text = _decode(path, raw)
    if fmt in ("csv", "tsv"):
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
        try:
            header = next(reader, None)
            if header is None:
                raise _fail(path, "", "the file is empty (a header row with the column names is needed)")
            columns = [c.strip() for c in header]
            rows = []
            for n, values in enumerate(reader, start=1):
                if not any(v.strip() for v in values):
                    continue  # a blank line
                if len(values) > len(columns):
                    raise _fail(path, f"row {n} (line {reader.line_num})",
                                f"{len(values)} fields but the header has {len(columns)} columns {columns}")
                rows.append((f"row {n} (line {reader.line_num})", dict(zip(columns, values))))
        except csv.Error as e:
            raise _fail(path, f"line {reader.line_num}", f"malformed CSV ({e})") from None
        return columns, rows
    # JSON lines, or one JSON array of objects
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise _fail(path, f"line {e.lineno}", f"invalid JSON ({e.msg})") from None
        numbered = [(f"item {i + 1}", obj) for i, obj in enumerate(items)]
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise _fail(path, f"line {n}", f"invalid JSON ({e.msg})") from None
    columns: dict[str, None] = {}
    for where, obj in numbered:
        if not isinstance(obj, dict):
            raise _fail(path, where, f"expected a JSON object with named fields, got {type(obj).__name__}")
        columns.update(dict.fromkeys(obj))
    return list(columns), numbered


def _require(path: str, columns: list[str], name: str, what: str) -> None:
    if name not in columns:
        raise _fail(path, "", f"no {what} column '{name}' (columns found: {', '.join(map(repr, columns)) or 'none'})")


def _as_text(path: str, where: str, column: str, value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    raise _fail(path, f"{where}, column '{column}'", f"expected a string, got {type(value).__name__} {value!r}")


def _as_label(path: str, where: str, column: str, value) -> str | None:
    """Strings and integers (also integral floats such as 3.0) as a stripped string; None when missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (str, int)):
        label = str(value).strip()
        return label or None
    raise _fail(path, f"{where}, column '{column}'",
                f"a label must be a string or an integer, got {type(value).__name__} {value!r}")


def _read_sequence(path: str, fmt: str, text_column: str, label_column: str) -> LabeledSet:
    columns, rows = _records(path, fmt)
    text_b_column = None
    if text_column == "text" and "text" not in columns and "text_a" in columns:
        text_column = "text_a"
        text_b_column = "text_b" if "text_b" in columns else None
    if text_column not in columns:
        also = " (or 'text_a' + 'text_b' for pairs)" if text_column == "text" else ""
        raise _fail(path, "", f"no text column '{text_column}'{also}; columns found: "
                              f"{', '.join(map(repr, columns)) or 'none'}")
    _require(path, columns, label_column, "label")
    texts, texts_b, labels, skipped = [], [], [], {}
    for where, row in rows:
        a = _as_text(path, where, text_column, row.get(text_column))
        b = _as_text(path, where, text_b_column, row.get(text_b_column)) if text_b_column else ""
        label = _as_label(path, where, label_column, row.get(label_column))
        if not (a and a.strip()) or (text_b_column and not (b and b.strip())):
            skipped[EMPTY_TEXT] = skipped.get(EMPTY_TEXT, 0) + 1
            continue
        if label is None:
            skipped[MISSING_LABEL] = skipped.get(MISSING_LABEL, 0) + 1
            continue
        texts.append(a)
        texts_b.append(b)
        labels.append(label)
    return LabeledSet(SEQUENCE, texts, texts_b if text_b_column else None, [], labels, path, skipped)


def check_bio(tags: list[str], where: str = "", source: str = "") -> None:
    """Gold tags must be IOB2: `O`, `B-T`, `I-T`, and `I-T` only right after `B-T` or `I-T`."""
    prev = "O"
    for i, tag in enumerate(tags):
        at = f"{where}, position {i}" if where else f"position {i}"
        if tag != "O" and not (len(tag) > 2 and tag[:2] in ("B-", "I-")):
            raise _fail(source, at,
                        f"tag {tag!r} is not IOB2 (expected 'O', 'B-TYPE' or 'I-TYPE')")
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            after = "at the start of the sentence" if i == 0 else f"after {prev!r}"
            raise _fail(source, at,
                        f"invalid BIO: {tag!r} {after} (gold data must be IOB2: an I-{tag[2:]} continues a "
                        f"B-{tag[2:]} or I-{tag[2:]})")
        prev = tag


def _read_conll(path: str) -> LabeledSet:
    text = _decode(path, _read_bytes(path))
    sentences: list[tuple[int, list[str], list[str]]] = []  # (first line, tokens, tags)
    words: list[str] = []
    tags: list[str] = []
    start = 0
    width = None  # columns per token line: fixed by the file's first token line
    width_line = 0

    def close():
        nonlocal words, tags
        if words:
            sentences.append((start, words, tags))
        words, tags = [], []

    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            close()
            continue
        if fields[0] == DOCSTART:
            close()
            continue
        if len(fields) < 2:
            raise _fail(path, f"line {n}", f"1 column ({fields[0]!r}): a token line needs the token and its tag "
                                           "(`token ... tag`, the last column is the tag)")
        if width is None:
            width, width_line = len(fields), n
        elif len(fields) != width:
            raise _fail(path, f"line {n}", f"{len(fields)} columns but line {width_line} has {width}: "
                                           "the tag count differs from the token count (a missing tag?)")
        if not words:
            start = n
        words.append(fields[0])
        tags.append(fields[-1])
    close()
    for s, (line, _, sent_tags) in enumerate(sentences, start=1):
        check_bio(sent_tags, f"sentence {s} (line {line})", path)
    return LabeledSet(TOKEN, [], None, [w for _, w, _ in sentences], [t for _, _, t in sentences], path, {})


def _read_token_rows(path: str, fmt: str, tokens_column: str, tags_column: str) -> LabeledSet:
    columns, rows = _records(path, fmt)
    _require(path, columns, tokens_column, "tokens")
    _require(path, columns, tags_column, "tags")
    tokens, labels, skipped = [], [], {}
    for s, (where, row) in enumerate(rows, start=1):
        words, tags = row.get(tokens_column), row.get(tags_column)
        for name, value in ((tokens_column, words), (tags_column, tags)):
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise _fail(path, f"{where}, column '{name}'", f"expected a list of strings, got {value!r:.80}")
        if not words:
            skipped[EMPTY_TEXT] = skipped.get(EMPTY_TEXT, 0) + 1
            continue
        if tags is None:
            skipped[MISSING_LABEL] = skipped.get(MISSING_LABEL, 0) + 1
            continue
        if len(words) != len(tags):
            raise _fail(path, where, f"{len(words)} tokens but {len(tags)} tags (one tag per token)")
        for i, w in enumerate(words):
            if not w.strip():
                raise _fail(path, f"{where}, column '{tokens_column}', position {i}", "an empty token")
        check_bio(tags, f"{where} (sentence {s})", path)
        tokens.append(list(words))
        labels.append(list(tags))
    return LabeledSet(TOKEN, [], None, tokens, labels, path, skipped)


def read_labeled(path: str, task: str = SEQUENCE, text_column: str = "text", label_column: str = "label") -> LabeledSet:
    """Read a labeled file (local path or URI) of a sequence or token task; see the module doc.

    Token task columns default to `tokens` / `tags` (JSONL, Parquet); a non-default
    `text_column` / `label_column` names them instead. Any other suffix is read as CoNLL.
    """
    if task not in TASKS:
        raise LabeledDataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    suffix = _suffix(path)
    if task == SEQUENCE:
        if suffix not in SEQUENCE_FORMATS:
            raise LabeledDataError(f"{path}: unsupported file type {suffix or '(no suffix)'!r} for a sequence task; "
                                   f"use one of {', '.join(SEQUENCE_FORMATS)}")
        return _read_sequence(path, SEQUENCE_FORMATS[suffix], text_column, label_column)
    if suffix in TOKEN_FORMATS:
        return _read_token_rows(path, TOKEN_FORMATS[suffix], "tokens" if text_column == "text" else text_column,
                                "tags" if label_column == "label" else label_column)
    return _read_conll(path)


from .label_splits import check_splits, label_fraction, label_names, stratified_split  # noqa: E402,F401
