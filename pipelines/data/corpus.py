"""Where documents come from: user files, bundled corpora (`bundled`), and the work units
Ray reads.

Inputs are names of bundled corpora ("bbc", "20ng", "task:NAME": see `bundled`) or paths /
pyarrow-filesystem URIs of .txt files (one document each), .jsonl (a `text` field per line)
and .parquet (a `text` column), or folders of them.

`plan_units` lists them on the driver (metadata only, so a missing path fails before any
Ray work) and cuts them into work units of about `shard_bytes` of input: a group of .txt
files (drawn in a seeded random order), a byte range of a JSONL file (a line belongs to the
range it starts in), or a run of whole Parquet row groups; the unit list is then permuted
(seeded), so every shard samples the whole corpus. A unit depends only on the sorted
listing and the config, never on Ray's blocks, so each unit becomes one output shard, the
same on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..storage import filesystem, join_path, split_query, to_uri  # noqa: F401 (re-exported for pretrain.py)
from .bundled import InputError, bbc_root, resolve_input  # noqa: F401 (InputError, bbc_root: re-exported)
from .config import DataConfig
from .text import EMPTY, TOO_LARGE, UNREADABLE, decode_document

TXT, JSONL, PARQUET = "txt", "jsonl", "parquet"
EXTENSIONS = {".txt": TXT, ".jsonl": JSONL, ".parquet": PARQUET}
UNSUPPORTED = "unsupported_type"  # a file in an input folder with another extension
MIN_DOCS_PER_UNIT = 16  # .txt units: NSP draws a random B from the unit's other documents


@dataclass
class Unit:
    """One work unit = one output shard. JSON-able, so it travels as a Ray Data row."""

    index: int
    key: str  # stable name: seeds the unit's randomness
    kind: str  # txt | jsonl | parquet
    paths: list[str]  # full paths / URIs (txt: several; others: one)
    doc_ids: list[str]  # txt: one id per path; others: [prefix] for ids built while reading
    sizes: list[int] = field(default_factory=list)  # txt: file sizes (too_large is checked first)
    start: int = 0  # jsonl: byte range [start, end); parquet: row groups [start, end)
    end: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "Unit":
        return cls(**json.loads(s))


@dataclass
class Plan:
    units: list[Unit]
    ignored: list[tuple[str, str]]  # (path, reason): files in input folders that are not read
    fingerprint: str  # sha256 over every planned file's (id, size, mtime)


# ---------------------------------------------------------------- listing and planning


def _list(name: str, cache_dir: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo], str, bool, list]:
    path, bundled = resolve_input(name, cache_dir)
    try:
        fs, root = filesystem(path)
        info = fs.get_file_info(root)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"input {name!r}: cannot open: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {name!r}: no such file or folder ({path})")
    if info.type == pafs.FileType.File:
        if Path(root).suffix.lower() not in EXTENSIONS:
            raise InputError(f"input {name!r}: unsupported file type (use .txt, .jsonl or .parquet)")
        return fs, [info], str(Path(root).parent), bundled, []
    files = sorted((f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                    if f.type == pafs.FileType.File), key=lambda f: f.path)
    ignored = [(f.path, UNSUPPORTED) for f in files if Path(f.path).suffix.lower() not in EXTENSIONS]
    files = [f for f in files if Path(f.path).suffix.lower() in EXTENSIONS]
    if not files and not ignored:
        raise InputError(f"input {name!r}: folder is empty ({path})")
    return fs, files, root, bundled, ignored


def _uri(name: str, fs: pafs.FileSystem, path: str) -> str:
    return to_uri(name, path)  # the user's scheme (gs://, not pyarrow's "gcs") and query


def plan_units(config: DataConfig) -> Plan:
    """Every input listed and cut into units; raises InputError for a missing / bad input.

    Data order: the .txt files of an input are grouped into units in a seeded permutation
    (not by path: BBC's folders are its topics), and the final unit list (every input, every
    `replicate` copy) is permuted too, so any shard, the first and the last included, holds
    a sample of the whole corpus. Both permutations depend on `seed` and the listing only,
    never on workers or blocks."""
    ignored: list[tuple[str, str]] = []
    digest = hashlib.sha256()
    per_copy: list[Unit] = []
    for i, name in enumerate(config.inputs):
        fs, files, root, bundled, skip = _list(name, config.cache_dir)
        ignored += skip
        label = name if bundled else f"in{i}"
        txt: list[tuple[str, str, int]] = []
        for f in files:
            rel = os.path.relpath(f.path, root)
            doc_id = f"{label}/{rel}"
            # bundled files: size only (mtimes change with every install)
            digest.update(f"{doc_id}\0{f.size}\0{'' if bundled else f.mtime_ns}\n".encode())
            kind = EXTENSIONS[Path(f.path).suffix.lower()]
            uri = _uri(name, fs, f.path)
            if kind == TXT:
                txt.append((uri, doc_id, f.size))
            elif kind == JSONL:
                for start in range(0, max(f.size, 1), config.shard_bytes):
                    per_copy.append(Unit(0, f"{label}:{rel}@{start}", JSONL, [uri], [doc_id],
                                         start=start, end=min(start + config.shard_bytes, f.size)))
            else:
                per_copy += _parquet_units(fs, f.path, uri, doc_id, f"{label}:{rel}", config)
        random.Random(f"{config.seed}/files/{label}").shuffle(txt)
        per_copy += _txt_units(txt, label, config)
    units = []
    for copy in range(config.replicate):
        for u in per_copy:
            prefix = f"copy{copy}/" if copy else ""
            units.append(Unit(0, f"{copy}:{u.key}", u.kind, u.paths, [prefix + d for d in u.doc_ids],
                              u.sizes, u.start, u.end))
    random.Random(f"{config.seed}/units").shuffle(units)
    for index, u in enumerate(units):
        u.index = index
    digest.update(json.dumps(sorted(ignored)).encode())
    return Plan(units, ignored, digest.hexdigest())


def _txt_units(files: list[tuple[str, str, int]], label: str, config: DataConfig) -> list[Unit]:
    """(uri, doc id, size) of .txt files, in order, cut into units of >= shard_bytes of
    readable input and >= MIN_DOCS_PER_UNIT documents (the last one may hold fewer)."""
    out: list[Unit] = []
    group: list[tuple[str, str, int]] = []
    size = 0
    for f in files:
        group.append(f)
        size += f[2] if f[2] <= config.max_document_bytes else 0  # too_large: never read
        if size >= config.shard_bytes and len(group) >= MIN_DOCS_PER_UNIT:
            out.append(Unit(0, f"{label}:{group[0][1]}", TXT, [g[0] for g in group], [g[1] for g in group],
                            [g[2] for g in group]))
            group, size = [], 0
    if group:
        out.append(Unit(0, f"{label}:{group[0][1]}", TXT, [g[0] for g in group], [g[1] for g in group],
                        [g[2] for g in group]))
    return out


def _parquet_units(fs, path: str, uri: str, doc_id: str, key: str, config: DataConfig) -> list[Unit]:
    """Runs of whole row groups [start, end) of >= shard_bytes (the last may be smaller).

    Never a part of a row group: Parquet decodes (and decompresses) a row group as a whole,
    so a unit smaller than its row group would decode all of it for a slice."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        if config.text_column not in pf.schema_arrow.names:
            raise InputError(f"{uri}: no column {config.text_column!r} (set data.text_column)")
        meta = pf.metadata
    out = []
    first, size = 0, 0
    for rg in range(meta.num_row_groups):
        size += meta.row_group(rg).total_byte_size
        if size >= config.shard_bytes or rg == meta.num_row_groups - 1:
            out.append(Unit(0, f"{key}#{first}", PARQUET, [uri], [doc_id], start=first, end=rg + 1))
            first, size = rg + 1, 0
    return out


# ---------------------------------------------------------------- reading one unit


@dataclass
class UnitDocuments:
    """What reading a unit gives: decoded documents, and every document that was not used."""

    doc_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (doc id, reason)
    repaired: list[tuple[str, str]] = field(default_factory=list)  # (doc id, how)


def _jsonl_lines(f, start: int, end: int, chunk: int = 1 << 20):
    """(offset, line) for every line of `f` that starts in [start, end)."""
    pos = max(start - 1, 0)
    f.seek(pos)
    skip_first = start > 0  # the tail of the line that started before `start`
    buf = bytearray()
    head = 0  # offset in buf of the current line
    scan = 0  # where to look for the next newline
    while True:
        nl = buf.find(b"\n", scan)
        if nl < 0:
            data = f.read(chunk)
            if not data:
                if head < len(buf) and not skip_first and pos < end:
                    yield pos, bytes(buf[head:])
                return
            if head:
                del buf[:head]
                head = 0
            scan = len(buf)
            buf += data
            continue
        line, line_pos = bytes(buf[head:nl]), pos
        pos += nl + 1 - head
        head = scan = nl + 1
        if skip_first:
            skip_first = False
            continue
        if line_pos >= end:
            return
        yield line_pos, line


def read_unit(unit: Unit, config: DataConfig) -> UnitDocuments:
    """Read one unit's documents; bad ones are recorded with a reason, never raised."""
    out = UnitDocuments()

    def take(doc_id: str, raw: bytes | str | None) -> None:
        if raw is None or len(raw) == 0:
            out.skipped.append((doc_id, EMPTY))
            return
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogatepass")
        if len(raw) > config.max_document_bytes:
            out.skipped.append((doc_id, TOO_LARGE))
            return
        text, reason, repaired = decode_document(raw, config.encoding_fallback)
        if reason:
            out.skipped.append((doc_id, reason))
            return
        if repaired:
            out.repaired.append((doc_id, f"decoded_{config.encoding_fallback}"))
        out.doc_ids.append(doc_id)
        out.texts.append(text)

    if unit.kind == TXT:
        for path, doc_id, size in zip(unit.paths, unit.doc_ids, unit.sizes):
            if size > config.max_document_bytes:
                out.skipped.append((doc_id, TOO_LARGE))
                continue
            try:
                fs, p = filesystem(path)
                with fs.open_input_stream(p) as f:
                    raw = f.read()
            except (OSError, pa.ArrowException):
                out.skipped.append((doc_id, UNREADABLE))
                continue
            take(doc_id, raw)
    elif unit.kind == JSONL:
        try:
            fs, p = filesystem(unit.paths[0])
            f = fs.open_input_file(p)
        except (OSError, pa.ArrowException):  # gone or unreadable since planning
            out.skipped.append((f"{unit.doc_ids[0]}@{unit.start}-{unit.end}", UNREADABLE))
            return out
        with f:
            for offset, line in _jsonl_lines(f, unit.start, unit.end):
                doc_id = f"{unit.doc_ids[0]}@{offset}"
                if not line.strip():
                    continue  # a blank line is not a record
                if len(line) > config.max_document_bytes:
                    out.skipped.append((doc_id, TOO_LARGE))
                    continue
                try:
                    record = json.loads(line)
                    text = record[config.text_column]
                    if not isinstance(text, str) and text is not None:
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    out.skipped.append((doc_id, UNREADABLE))
                    continue
                take(doc_id, text)
    else:
        try:
            fs, p = filesystem(unit.paths[0])
            f = fs.open_input_file(p)
            pf = pq.ParquetFile(f)
        except (OSError, pa.ArrowException):
            out.skipped.append((f"{unit.doc_ids[0]}#{unit.start}-{unit.end}", UNREADABLE))
            return out
        with f:
            for rg in range(unit.start, unit.end):  # each row group decoded once, by this unit only
                try:
                    texts = pf.read_row_group(rg, columns=[config.text_column]).column(0).to_pylist()
                except (OSError, pa.ArrowException):
                    out.skipped.append((f"{unit.doc_ids[0]}#{rg}", UNREADABLE))
                    continue
                for row, text in enumerate(texts):
                    take(f"{unit.doc_ids[0]}#{rg}:{row}", text)
    return out
