"""`cloze score` before Ray starts: the `[score]` table and the plan (which files, which
columns, which kind of classifier), so a bad config, model or input fails with one line
before any cluster work."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError, apply_overrides, build_dataclass, check_inference, load_toml
from .storage import filesystem, is_uri, local_copy

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
SEQUENCE_COLUMNS = ("label", "score", "probs", "truncated", "error")
MULTI_LABEL_COLUMNS = ("label", "labels", "score", "probs", "truncated", "error")  # labels: those >= threshold
TOKEN_COLUMNS = ("tags", "spans", "truncated", "error")
JSON_COLUMNS = ("labels", "probs", "tags", "spans")  # JSON text in CSV / Parquet, JSON values in JSONL
WORKER = "__cloze_worker"  # which actor scored a row: counted by the writer, never written
MARKER = "manifest.json"


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """The `[score]` table; --model / --input / --output set its first three keys."""

    model: str = ""  # the classifier folder (cloze finetune output, or HF BertFor{Sequence,Token}Classification)
    input: str = ""  # a CSV / JSONL / Parquet file, or a folder of them (one format), local path or URI
    output: str = ""  # the output folder (local path or URI): part files + manifest.json
    text_column: str = "text"  # the text; "text" falls back to text_a (+ text_b) when the input has no text column
    text_b_column: str = ""  # the second text of a pair ("" = text_b when text_a is used)
    tokens_column: str = "tokens"  # token classifiers: a list-of-words column, used when present
    prefix: str = ""  # prepended to the added column names, e.g. "pred_" when the input has its own `label`
    input_format: str = ""  # csv | jsonl | parquet; "" = from the file names
    output_format: str = ""  # csv | jsonl | parquet; "" = the input's format
    batch_size: int = 32  # rows per forward pass
    rows_per_block: int = 512  # rows per Ray Data task: the unit of work an actor takes from the backlog
    rows_per_file: int = 100000  # rows buffered into each output file (at least)
    min_actors: int = 1  # the actor pool starts here
    max_actors: int = 2  # and grows up to here while there is a backlog
    cpus_per_actor: float = 1.0  # Ray CPUs per actor; torch threads = this, rounded down (at least 1)
    quantize: str = "none"  # none | int8 (dynamic int8 quantization of the Linear layers)
    gpus_per_actor: float = 0.0  # GPUs per actor (0.5: two actors share one); 0 = CPU actors
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (fp16: GPU actors only); outputs are fp32 either way
    threshold: float = 0.5  # multi-label models: a row's `labels` are those with probability >= this
    max_seq_len: int = 0  # tokens per row; 0 = the length the model was fine-tuned at
    preserve_order: bool = True  # output files and rows in input order (part-00000 first)
    overwrite: bool = False  # replace an existing output (it is replaced only once the new one is complete)
    progress: bool = True  # Ray Data's progress bars
    shared_filesystem: bool = False  # local paths are on storage every node mounts (multi-node with local paths)

    def __post_init__(self) -> None:
        checks = [
            ("model", bool(self.model), "is required (--model DIR)"),
            ("input", bool(self.input), "is required (--input PATH)"),
            ("output", bool(self.output), "is required (--output PATH)"),
            ("text_column", bool(self.text_column), "must not be empty"),
            ("input_format", self.input_format in ("", *set(FORMATS.values())), "must be csv, jsonl or parquet"),
            ("output_format", self.output_format in ("", *set(FORMATS.values())), "must be csv, jsonl or parquet"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("rows_per_block", self.rows_per_block >= 1, "must be >= 1"),
            ("rows_per_file", self.rows_per_file >= 1, "must be >= 1"),
            ("min_actors", self.min_actors >= 1, "must be >= 1"),
            ("max_actors", self.max_actors >= self.min_actors, "must be >= min_actors"),
            ("cpus_per_actor", self.cpus_per_actor > 0, "must be > 0"),
            ("gpus_per_actor", 0 <= self.gpus_per_actor <= 64, "must be in [0, 64]"),
            ("threshold", 0 <= self.threshold <= 1, "must be in [0, 1]"),
            ("max_seq_len", self.max_seq_len == 0 or 8 <= self.max_seq_len <= 8192, "must be 0 or in [8, 8192]"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key} {why}, got {getattr(self, key)!r}")
        check_inference(self.quantize, self.device, self.dtype)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> "ScoreConfig":
        return build_dataclass(cls, dict(table), "score.")

    @classmethod
    def from_toml(cls, path, overrides: Mapping[str, Any] | None = None) -> "ScoreConfig":
        raw = load_toml(path) if path else {}
        if overrides:
            raw = apply_overrides(raw, overrides)
        return cls.from_dict(raw.get("score", {}))


# ------------------------------------------------------------------ before Ray: what to read


@dataclass(frozen=True)
class Plan:
    """What `plan` found: the files to read and the columns the Scorer uses."""

    kind: str  # "sequence" | "token"
    format: str  # csv | jsonl | parquet
    output_format: str
    files: tuple[str, ...]  # paths on the input's filesystem
    text: str  # the text column ("" for token rows read from `words`)
    text_b: str  # the pair's second column, or ""
    words: str  # token classifiers: the list-of-words column, or ""
    multi_label: bool = False  # a multi-label sequence classifier (sigmoid per label)

    @property
    def columns(self) -> tuple[str, ...]:
        """The prediction columns, unprefixed."""
        if self.kind == "token":
            return TOKEN_COLUMNS
        return MULTI_LABEL_COLUMNS if self.multi_label else SEQUENCE_COLUMNS

    def added(self, prefix: str, only=None) -> list[str]:
        return [prefix + c for c in self.columns if only is None or c in only]


def list_inputs(path: str, fmt: str) -> tuple[str, list[str]]:
    """(format, files) of a file or a folder of files of one format; ConfigError otherwise."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, root = filesystem(path)
        info = fs.get_file_info(root)
        listing = [info] if info.type != pafs.FileType.Directory else fs.get_file_info(
            pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ConfigError(f"input {path}: cannot list it ({e})") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"input {path}: no such file or folder")
    files = sorted(i.path for i in listing if i.type == pafs.FileType.File and (info.type == pafs.FileType.File or (
        not os.path.basename(i.path).startswith((".", "_")) and (fmt or os.path.splitext(i.path)[1].lower() in FORMATS))))
    found = {fmt or FORMATS.get(os.path.splitext(f)[1].lower(), "") for f in files}
    if not files:
        raise ConfigError(f"input {path}: no .csv / .jsonl / .parquet files in it")
    if "" in found:
        raise ConfigError(f"input {path}: unknown file type (name it .csv / .jsonl / .parquet or set score.input_format)")
    if len(found) > 1:
        raise ConfigError(f"input {path}: mixes formats ({', '.join(sorted(found))}); score one format at a time")
    return found.pop(), files


def _columns(fs, path: str, fmt: str) -> dict[str, Any]:
    """Column name -> pyarrow type (None where unknown before reading) of one file's head."""
    import csv
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            with fs.open_input_file(path) as f:
                return {field.name: field.type for field in pq.read_schema(f)}
        with fs.open_input_stream(path) as f:
            head = f.read(1 << 20).decode("utf-8-sig", errors="replace")
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"input {path}: cannot read it ({e})") from None
    if fmt == "csv":
        return dict.fromkeys(next(csv.reader(io.StringIO(head)), []))  # as Arrow names them: unstripped
    names: dict[str, Any] = {}
    lines = head.splitlines()
    for n, line in enumerate(lines[:-1] if len(head) >= 1 << 20 else lines, start=1):  # whole lines only
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"input {path}: line {n} is not JSON ({e.msg}); JSONL has one object per line") from None
        if not isinstance(row, dict):
            raise ConfigError(f"input {path}: line {n} is not a JSON object")
        names.update(dict.fromkeys(row))
        if n >= 100:
            break
    return names


def _text_columns(config: ScoreConfig, kind: str, types: dict[str, Any], source: str) -> tuple[str, str, str]:
    """(text, text_b, words): the columns the Scorer reads, checked against one file's columns."""
    import pyarrow as pa

    found = ", ".join(map(repr, types)) or "none"
    text, text_b, words = config.text_column, config.text_b_column, ""
    if kind == "token" and config.tokens_column in types:
        text, words = "", config.tokens_column
    elif text == "text" and "text" not in types and "text_a" in types:
        text, text_b = "text_a", text_b or ("text_b" if "text_b" in types else "")
    if kind == "token" and text_b:
        raise ConfigError("text_b_column: a token classifier tags one text per row")
    if text and text not in types:
        also = (f" or a '{config.tokens_column}' column" if kind == "token" else
                " (or 'text_a' + 'text_b' for pairs)" if text == "text" else "")
        raise ConfigError(f"input {source}: no text column '{text}'{also}; columns found: {found}")
    if text_b and text_b not in types:
        raise ConfigError(f"input {source}: no text_b column '{text_b}'; columns found: {found}")

    def is_text(t) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)

    for col, what, ok in ((text, "text", is_text), (text_b, "text", is_text),
                          (words, "lists of words", lambda t: pa.types.is_list(t) and is_text(t.value_type))):
        if col and types.get(col) is not None and not ok(types[col]):  # (Parquet: typed before reading)
            raise ConfigError(f"input {source}: column '{col}' holds {types[col]}, not {what}")
    return text, text_b, words


def plan(config: ScoreConfig) -> Plan:
    """Check the model folder, the input and its columns, and the output, before any Ray work."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from .inference import folder_kind, is_multi_label

    try:  # a URI's folder is copied to this node once (each actor's node copies its own)
        model = local_copy(config.model)
    except FileNotFoundError as e:
        raise ConfigError(f"model {e}") from None
    kind = folder_kind(model)
    if kind is None:
        raise ConfigError(f"model {config.model}: not a classifier folder (its config.json names neither "
                          f"BertForSequenceClassification nor BertForTokenClassification)")
    limit = json.loads(Path(model, "config.json").read_text()).get("max_position_embeddings", 512)
    multi_label = kind == "sequence" and is_multi_label(model)
    if config.max_seq_len > limit:
        raise ConfigError(f"max_seq_len {config.max_seq_len} is past the model's {limit} positions")
    where = [p.split("?")[0].rstrip("/") if is_uri(p) else os.path.abspath(p) for p in (config.input, config.output)]
    local = not any(map(is_uri, where))
    if (os.path.commonpath(where) in where) if local else where[0] == where[1]:  # one holds the other
        raise ConfigError(f"output {config.output} and input {config.input} overlap: write the output elsewhere")
    fmt, files = list_inputs(config.input, config.input_format)
    fs, _ = filesystem(config.input)
    types = _columns(fs, files[0], fmt)
    text, text_b, words = _text_columns(config, kind, types, files[0])
    for other in files[1:] if fmt == "parquet" else ():  # footers are cheap: every file, as Ray Data will
        lacking = [c for c in (text, text_b, words) if c and c not in _columns(fs, other, fmt)]
        if lacking:
            raise ConfigError(f"input {other}: no column {lacking[0]!r} (the first file, {files[0]}, has it)")
    out = Plan(kind, fmt, config.output_format or fmt, tuple(files), text, text_b, words, multi_label)
    taken = sorted(set(out.added(config.prefix)) & set(types))
    if taken:
        raise ConfigError(f"input already has column(s) {', '.join(map(repr, taken))}: set score.prefix "
                          f"(e.g. --score.prefix pred_) to name the predictions apart")
    try:
        out_fs, out_root = filesystem(config.output)
        exists = out_fs.get_file_info(out_root).type != pafs.FileType.NotFound
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ConfigError(f"output {config.output}: cannot reach it ({e})") from None
    if exists and not config.overwrite:
        raise ConfigError(f"output {config.output} already exists: pick a new path or set --score.overwrite true")
    return out
