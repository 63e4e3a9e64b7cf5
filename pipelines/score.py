"""`cloze score`: a classifier over a table with Ray Data, on an actor pool that grows with
the backlog. What it reads and writes is DESCRIPTION below (the `--help` text).

    read (CSV / JSONL / Parquet files, local or URI) -> blocks of `rows_per_block` rows
      -> map_batches(Scorer) on ActorPoolStrategy(min_actors, max_actors): a Predictor each
      -> ScoredFiles writes `<output>.tmp-<id>`, counting rows, error rows and rows per actor
      -> published with manifest.json last (storage.Staging)

The writes hold no CPU: a 1-CPU write operator makes Ray Data reserve a CPU for it, and on
a small cluster the pool then never has the budget for a second actor (the symptom of Ray
issue #59144). Writing is I/O; the pool gets the CPUs. The `[score]` table and the plan
made before Ray starts are in `score_plan`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from itertools import accumulate
from typing import Any

from .config import ConfigError
from .ray_session import start_ray
from .score_plan import (FORMATS, JSON_COLUMNS, MARKER, SEQUENCE_COLUMNS, TOKEN_COLUMNS,  # noqa: F401 (re-exported)
                         WORKER, Plan, ScoreConfig, plan)
from .storage import Staging, filesystem, is_uri

# ------------------------------------------------------------------ in the actors


def _problem(value, name: str, words: bool = False) -> str | None:
    """Why a row cannot be scored (None: it can): missing, not text, or blank."""
    if value is None:
        return f"missing {name}"
    if words:
        if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
            return f"{name} is not a list of words"
        return None if any(w.strip() for w in value) else f"empty {name}"
    if not isinstance(value, str):
        return f"{name} is not text"
    return None if value.strip() else f"empty {name}"


def _offsets(words: list[str]) -> list[tuple[int, int]]:
    """[start, end) of each word in the words joined by one space."""
    ends = accumulate(len(w) + 1 for w in words)
    return [(e - len(w) - 1, e - 1) for w, e in zip(words, ends)]


class Scorer:
    """The map_batches callable: one Predictor per actor; a pyarrow batch in, the same batch
    plus the prediction columns (and which worker scored it) out. Runs without Ray too."""

    def __init__(self, model: str, plan: Plan, prefix: str = "", batch_size: int = 32, max_seq_len: int = 0,
                 quantize: str = "none", threads: int | None = None, device: str = "cpu", dtype: str = "fp32",
                 threshold: float = 0.5):
        from .inference import Predictor

        self.predictor = Predictor(model, max_seq_len=max_seq_len or None, batch_size=batch_size,
                                   quantize=quantize, threads=threads, device=device, dtype=dtype,
                                   threshold=threshold)
        self.plan, self.prefix = plan, prefix
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, table):
        import pyarrow as pa

        values = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
                  for c in (self.plan.text, self.plan.text_b, self.plan.words) if c}
        rows = (self._classify if self.plan.kind == "sequence" else self._tag)(values, table.num_rows)
        types = {"score": pa.float64(), "truncated": pa.bool_()}
        for name in self.plan.columns:
            table = table.append_column(self.prefix + name, pa.array([r[name] for r in rows], types.get(name, pa.string())))
        return table.append_column(WORKER, pa.array([self.worker] * table.num_rows, pa.string()))

    def _logits(self, enc) -> list:
        """Logits in input order, computed shortest first: each forward pads to its longest row."""
        from .inference import Encoded

        order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))
        single = enc.rows()
        found = dict(zip(order, self.predictor.logits(Encoded.join([single[i] for i in order])) if order else []))
        return [found[i] for i in range(len(enc))]

    def _classify(self, values: dict, n: int) -> list[dict]:
        a = values[self.plan.text]
        b = values.get(self.plan.text_b) if self.plan.text_b else None
        errors = [_problem(a[i], self.plan.text) or (_problem(b[i], self.plan.text_b) if b is not None else None)
                  for i in range(n)]
        ok = [i for i in range(n) if errors[i] is None]
        enc = self.predictor.encode([a[i] for i in ok], [b[i] for i in ok] if b is not None else None)
        rows = [dict.fromkeys(self.plan.columns) | {"error": e} for e in errors]
        for i, r in zip(ok, self.predictor.classify_rows(self._logits(enc), enc.truncated)):
            rows[i].update(r, probs=json.dumps(r["probs"]))
            if "labels" in r:
                rows[i]["labels"] = json.dumps(r["labels"])
        return rows

    def _tag(self, values: dict, n: int) -> list[dict]:
        from .inference import encode_words, split_words

        col = self.plan.words or self.plan.text
        raw = values[col]
        errors = [_problem(raw[i], col, words=bool(self.plan.words)) for i in range(n)]
        ok = [i for i in range(n) if errors[i] is None]
        texts = [" ".join(raw[i]) if self.plan.words else raw[i] for i in ok]
        split = [(raw[i], _offsets(raw[i])) if self.plan.words else split_words(t) for i, t in zip(ok, texts)]
        offsets = [o for _, o in split]
        enc = encode_words(self.predictor.tok, [w for w, _ in split])
        rows = [dict.fromkeys(TOKEN_COLUMNS) | {"error": e} for e in errors]
        for i, row, first, text, offs, cut in zip(ok, self._logits(enc), enc.first_piece, texts, offsets,
                                                   enc.truncated):
            found = self.predictor.entity_row(row, first, text, offs, cut)
            rows[i].update(tags=json.dumps([w["tag"] for w in found["words"]]), spans=json.dumps(found["entities"]),
                           truncated=cut)
        return rows


# ------------------------------------------------------------------ writing


def _write_table(table, file, fmt: str, json_columns: list[str]) -> None:
    """One part file: Parquet as is; CSV with nested input columns as JSON text; JSONL with
    the JSON columns as JSON values."""
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, file)
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        for i, field in enumerate(table.schema):
            if pa.types.is_nested(field.type):
                text = [None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                        for v in table.column(i).to_pylist()]
                table = table.set_column(i, field.name, pa.array(text, pa.string()))
        pacsv.write_csv(table, file)
    else:
        lines = []
        for row in table.to_pylist():
            for c in json_columns:
                if isinstance(row[c], str):
                    row[c] = json.loads(row[c])
            lines.append(json.dumps(row, ensure_ascii=False, default=str))
        file.write(("\n".join(lines) + "\n").encode())


def _sink_class():
    """ScoredFiles, built on first use (Ray Data is imported only when scoring)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from ray.data.block import BlockAccessor
    from ray.data.datasource import BlockBasedFileDatasink, FilenameProvider

    class PartNames(FilenameProvider):
        def __init__(self, ext: str):
            self.ext = ext

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}.{self.ext}"

    class ScoredFiles(BlockBasedFileDatasink):
        """Writes scored blocks as part files and returns what each write task wrote (rows,
        error rows, rows per worker), summed on the driver in `totals`: counts of the rows
        that reached the output, once each, whatever was retried."""

        def __init__(self, path: str, *, fmt: str, json_columns: list[str], error_column: str, filesystem,
                     min_rows_per_file: int):
            ext = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}[fmt]
            super().__init__(path, filesystem=filesystem, min_rows_per_file=min_rows_per_file,
                             filename_provider=PartNames(ext), file_format=ext)
            self.fmt, self.json_columns, self.error_column = fmt, json_columns, error_column
            self.totals: dict | None = None

        def write(self, blocks, ctx) -> dict:
            tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
            if not tables:
                return {"rows": 0, "errors": 0, "workers": {}}
            table = pa.concat_tables(tables, promote_options="permissive")
            workers = {r["values"]: r["counts"] for r in pc.value_counts(table.column(WORKER)).to_pylist()}
            errors = table.num_rows - table.column(self.error_column).null_count
            self.write_block(BlockAccessor.for_block(table.drop_columns([WORKER])), 0, ctx)
            return {"rows": table.num_rows, "errors": errors, "workers": workers}

        def write_block_to_file(self, block, file) -> None:
            _write_table(block.to_arrow(), file, self.fmt, self.json_columns)

        def on_write_complete(self, write_result) -> None:
            # (not the parent's: it deletes a folder that got no rows; an empty input still
            # publishes an output with its manifest)
            totals = {"rows": 0, "errors": 0, "workers": {}}
            for r in write_result.write_returns:
                totals["rows"] += r["rows"]
                totals["errors"] += r["errors"]
                for w, n in r["workers"].items():
                    totals["workers"][w] = totals["workers"].get(w, 0) + n
            self.totals = totals

    return ScoredFiles


# ------------------------------------------------------------------ the job


def _check_cluster(config: ScoreConfig, ray) -> None:
    """After Ray starts, before any Data work: a pool that would wait forever, or local paths
    that other nodes cannot see, are config errors. The pool's first `min_actors` start at
    once; Ray Data's file listing and block splitting run as 1-CPU tasks (no option sets
    theirs) that the pool's input waits for: at its minimum the pool must leave them a CPU.
    Above it, the pool grows only into CPUs the other operators do not hold."""
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if config.min_actors * config.cpus_per_actor > cpus - 1:
        raise ConfigError(f"min_actors {config.min_actors} x cpus_per_actor {config.cpus_per_actor} leaves none of "
                          f"the cluster's {cpus:g} CPUs for reading the input, and the pool would wait for it forever: "
                          f"lower min_actors (max_actors can take the rest)")
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if config.min_actors * config.gpus_per_actor > gpus:
        raise ConfigError(f"min_actors {config.min_actors} x gpus_per_actor {config.gpus_per_actor:g} needs more GPUs "
                          f"than the cluster's {gpus:g}; the pool would wait for them forever")
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    local = [k for k in ("model", "input", "output") if not is_uri(getattr(config, k))]
    if nodes > 1 and local and not config.shared_filesystem:
        raise ConfigError(f"{', '.join(local)}: local path(s) on a {nodes}-node cluster; give URIs (s3://, gs://) "
                          f"or set score.shared_filesystem = true for paths every node mounts")


def _read(found: Plan, fs):
    """The input as a Dataset. Reads hold no CPU either (see the module docstring)."""
    import pyarrow as pa
    import ray

    files, common = list(found.files), dict(filesystem=fs, file_extensions=None, num_cpus=0)
    if found.format == "parquet":
        return ray.data.read_parquet(files, **common)
    text_types = {c: pa.string() for c in (found.text, found.text_b) if c}
    if found.format == "csv":
        import pyarrow.csv as pacsv

        # text stays text (a column of numbers would be read as int64) and "" stays "" (-> empty)
        return ray.data.read_csv(files, convert_options=pacsv.ConvertOptions(column_types=text_types), **common)
    import pyarrow.json as pajson

    schema = pa.schema([*text_types.items(), *([(found.words, pa.list_(pa.string()))] if found.words else [])])
    return ray.data.read_json(files, parse_options=pajson.ParseOptions(  # (Arrow reads JSON lines)
        explicit_schema=schema, unexpected_field_behavior="infer"), **common)


@contextmanager
def _data_context(ray, config: ScoreConfig):
    """Ray Data settings for this job (a Dataset copies the context when created), restored
    after: progress bars drawn on the driver's terminal, input order kept or not."""
    ctx = ray.data.DataContext.get_current()
    settings = {"enable_progress_bars": config.progress, "enable_rich_progress_bars": True, "use_ray_tqdm": False}
    saved = {k: getattr(ctx, k) for k in settings}, ctx.execution_options.preserve_order
    try:
        for k, v in settings.items():
            setattr(ctx, k, v)
        ctx.execution_options.preserve_order = config.preserve_order
        yield
    finally:
        for k, v in saved[0].items():
            setattr(ctx, k, v)
        ctx.execution_options.preserve_order = saved[1]


def score(config: ScoreConfig, log=print, found: Plan | None = None) -> dict:
    """Score `config.input` into `config.output`; returns the manifest (also written there).
    Config, model, input and output are checked (`plan`, unless given) before Ray starts."""
    found = found or plan(config)
    import ray

    start_ray(log, "cloze score")
    _check_cluster(config, ray)
    t0 = time.perf_counter()
    added, json_columns = found.added(config.prefix), found.added(config.prefix, JSON_COLUMNS)
    with _data_context(ray, config), Staging(config.output, log=log) as staging:
        ds = _read(found, filesystem(config.input)[0]).repartition(target_num_rows_per_block=config.rows_per_block)
        ds = ds.map_batches(
            Scorer, batch_format="pyarrow", batch_size=config.rows_per_block, num_cpus=config.cpus_per_actor,
            **({"num_gpus": config.gpus_per_actor} if config.gpus_per_actor else {}), compute=ray.data.ActorPoolStrategy(min_size=config.min_actors, max_size=config.max_actors),
            fn_constructor_kwargs=dict(model=config.model if is_uri(config.model) else os.path.abspath(config.model),
                                       plan=found, prefix=config.prefix,
                                       batch_size=config.batch_size, max_seq_len=config.max_seq_len,
                                       quantize=config.quantize, threads=max(1, int(config.cpus_per_actor)),
                                       device=config.device, dtype=config.dtype, threshold=config.threshold))
        out_fs, tmp_root = filesystem(staging.tmp)
        sink = _sink_class()(tmp_root, fmt=found.output_format, filesystem=out_fs, json_columns=json_columns,
                             error_column=config.prefix + "error", min_rows_per_file=config.rows_per_file)
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})  # see the module docstring
        seconds = time.perf_counter() - t0
        totals = sink.totals or {"rows": 0, "errors": 0, "workers": {}}
        manifest = {**totals, "actors": len(totals["workers"]), "seconds": round(seconds, 3),
                    "rows_per_s": round(totals["rows"] / seconds, 1), "kind": found.kind, "multi_label": found.multi_label, "format": found.format,
                    "output_format": found.output_format, "input_files": len(found.files), "columns_added": added,
                    "json_columns": json_columns, "read": {"text": found.text, "text_b": found.text_b,
                                                           "words": found.words},
                    "config": dataclasses.asdict(config), "ray_version": ray.__version__}
        staging.publish(MARKER, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


# ------------------------------------------------------------------ the command

DESCRIPTION = """\
Score a table with a classifier folder (cloze finetune output, or an HF
BertForSequenceClassification / BertForTokenClassification folder) using Ray Data:
map_batches on an actor pool (one model per actor) that grows from min_actors to
max_actors while there is a backlog.

Input: a CSV / JSONL / Parquet file or a folder of them, local or a URI (s3://...). The
text is in `text` (or `text_a` + `text_b`; see --score.text_column); token classifiers
read a `tokens` list column when present, else split `text` into words (runs of letters
and digits, each punctuation mark alone); span offsets are characters of `text` (of the
tokens joined by one space for `tokens` input).

Output (a folder of part files + manifest.json, in --score.output_format, default the
input's): every input column, plus label, score, probs, truncated, error (sequence;
multi-label models add `labels`, those with probability >= --score.threshold) or tags,
spans, truncated, error (token). probs / labels / tags / spans are JSON text in CSV and
Parquet, JSON values in JSONL. A row with missing, null or blank text gets its reason in
`error` and null predictions; the manifest counts rows, error rows and rows per actor.
The output is written under a temporary name and published complete; an existing output
is refused unless --score.overwrite true."""


def cmd_score(args, overrides: dict[str, Any]) -> int:
    try:
        bad = next((k for k in overrides if k.split(".", 1)[0] != "score"), None)
        if bad:
            raise ConfigError(f"{bad}: `cloze score` reads only the [score] table")
        flags = {f"score.{k}": getattr(args, k) for k in ("model", "input", "output") if getattr(args, k)}
        config = ScoreConfig.from_toml(args.config, {**overrides, **flags})
        found = plan(config)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import importlib
        import logging

        importlib.import_module("ray.data")  # it configures its loggers on import: quiet them after
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # the progress bar says it better
        manifest = score(config, found=found)
    except ConfigError as e:
        print(f"cloze score: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the job failed (an unreadable file, a dead node...): the temp folder is gone
        import pyarrow as pa
        import ray

        if not isinstance(e, (ray.exceptions.RayError, pa.ArrowException, OSError)):
            raise
        cause = getattr(e, "cause", None) or e
        first = next((line for line in str(cause).splitlines() if line.strip()), "")
        print(f"cloze score: failed, nothing published: {type(cause).__name__}: {first}", file=sys.stderr)
        return 1
    print(f"cloze score: {manifest['rows']:,} rows scored ({manifest['errors']:,} error rows) by "
          f"{manifest['actors']} actor(s) in {manifest['seconds']:.1f} s ({manifest['rows_per_s'] or 0:,.0f} rows/s); "
          f"output {config.output}")
    return 0


def add_command(subparsers) -> None:
    from .cli import table_help

    p = subparsers.add_parser("score", help="score a table with a classifier (Ray Data, autoscaled actor pool)",
                              description=DESCRIPTION, epilog=table_help(ScoreConfig, "score"),
                              formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="the classifier folder (sets score.model)")
    p.add_argument("--input", metavar="PATH", help="file or folder (CSV / JSONL / Parquet), local or URI (sets score.input)")
    p.add_argument("--output", metavar="PATH", help="the output folder, local or URI; must not exist (sets score.output)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file; its [score] table is read")
    p.set_defaults(run=cmd_score)
