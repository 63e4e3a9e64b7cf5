"""`cloze`: one command per stage. Config = `--config FILE.toml` + dotted overrides.

    cloze data --config configs/local.toml --data.max_seq_len 256 --data.task sop

Overrides are `--table.key VALUE`; VALUE is read as TOML when it parses (numbers, true,
["a", "b"]) and as a string otherwise. Unknown keys and bad values are errors that name
the key, reported before any Ray work starts (exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from .config import ConfigError



def parse_value(text: str) -> Any:
    """A command-line override value: TOML if it parses as one value, else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def split_overrides(rest: list[str]) -> dict[str, Any]:
    """["--data.task", "sop", "--data.seed=3"] -> {"data.task": "sop", "data.seed": 3}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r} (overrides look like --data.max_seq_len 128)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(rest):
                raise ConfigError(f"{arg}: missing value")
            key, value = arg[2:], rest[i + 1]
            i += 1
        out[key] = parse_value(value)
        i += 1
    return out


def table_help(cls, table: str) -> str:
    """Every option of a config table, its default and its comment in the source."""
    lines = [f"options of the [{table}] table (override with --{table}.KEY VALUE):", ""]
    docs = _field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, tuple):
            default = list(default)
        if dataclasses.is_dataclass(default):
            for g in dataclasses.fields(default):
                lines.append(f"  --{table}.{f.name}.{g.name} (default {getattr(default, g.name)!r})")
                if _field_comments(type(default)).get(g.name):
                    lines.append(f"      {_field_comments(type(default))[g.name]}")
            continue
        lines.append(f"  --{table}.{f.name} (default {default!r})")
        if docs.get(f.name):
            lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)


def _data_help() -> str:
    from .data.config import DataConfig

    return table_help(DataConfig, "data")


def _pretrain_help() -> str:
    from encoder.config import PRESETS

    from .pretrain import PretrainConfig

    return (table_help(PretrainConfig, "pretrain") + "\n\n[model] table: --model.preset "
            f"({' | '.join(PRESETS)}) or any transformers BertConfig field, e.g. --model.hidden_size 256")


def _field_comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each field in the class source (and its bases'): one
    place for the docs."""
    import inspect

    out = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            s = line.strip()
            if ":" in s and "#" in s and not s.startswith(("#", "def", "\"")):
                name = s.split(":", 1)[0].strip()
                out[name] = s.split("#", 1)[1].strip()
    return out


DATA_DESCRIPTION = """\
Turn raw documents into pretraining examples (the `pairs` stage) with Ray Data.

Reads the bundled corpora ("bbc": BBC News, 2,225 articles; "20ng": 20 Newsgroups, 18,846
posts; "task:NAME" or "task:NAME*PASSES": a built-in labeled task's *training* texts,
unlabeled, 16 to a pseudo-document, for task-adaptive pretraining; "opinions": 13,098
Amazon review, NYT editorial and tweet snippets, unlabeled, for sentiment-domain
pretraining) or your own .txt files
(one document each, blank line = paragraph break), JSONL (a `text` field per line) or
Parquet (a `text` column), from local paths or pyarrow filesystem URIs (s3://...).
Documents are normalized (NFC, control characters, whitespace) and split into sentences;
a WordPiece vocabulary is trained on them (or loaded); examples
are built for one task: nsp (next sentence prediction, label 0 = true continuation),
sop (sentence order, label 1 = swapped), shuffle (one paragraph, label 1 = shuffled) or
mlm (text blocks only). MLM masks are drawn per epoch by the training collator unless
--data.masking static.

Output: <output>/part-NNNNN.parquet (input_ids, token_type_ids, length, <task>_label),
tokenizer.json + vocab.txt, and manifest.json (documents read / skipped by reason,
sentences, examples, label balance, length histogram, tokens, hashes, seed, wall time).
Same inputs + config -> byte-identical shards; a rerun is a cache hit. Bad documents
(empty, not UTF-8, binary, too large) are counted in the manifest, never fatal; a missing
input path is an error before any Ray work."""


def cmd_data(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .data.config import DataConfig
    from .data.corpus import InputError

    try:
        config = DataConfig.from_toml(args.config, overrides)
        if any(k.split(".", 1)[0] != "data" for k in overrides):
            bad = next(k for k in overrides if k.split(".", 1)[0] != "data")
            raise ConfigError(f"{bad}: `cloze data` reads only the [data] table")
        from .data.corpus import plan_units

        plan_units(config)  # a missing input fails here, before Ray starts
    except (ConfigError, InputError) as e:
        print(f"cloze data: error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _quiet_ray_data()
    from .data.pairs import build_sentence_pairs

    build_sentence_pairs(config)
    return 0


def _quiet_ray_data() -> None:
    """The CLI prints its own summary lines; Ray Data's per-second progress logs drown them."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def cmd_pretrain(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .pretrain import PretrainConfig, pretrain
    from .train.metrics import held_out_summary

    try:
        bad = next((k for k in overrides if k.split(".", 1)[0] not in ("pretrain", "model")), None)
        if bad:
            raise ConfigError(f"{bad}: `cloze pretrain` reads only the [pretrain] and [model] tables")
        if args.resume:
            if args.config or overrides:
                raise ConfigError("--resume continues a run with its saved config: no --config or overrides")
            config = PretrainConfig.load_run(args.resume)
        else:
            config = PretrainConfig.from_toml(args.config, overrides)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        _quiet_ray_data()
        result = pretrain(config, resume=args.resume)
    except ConfigError as e:
        print(f"cloze pretrain: error: {e}", file=sys.stderr)
        return 2
    if result.evals:
        print(held_out_summary(result.evals))
    print(f"cloze pretrain: {result.metrics.get('step', 0):.0f} steps, loss {result.metrics.get('loss', float('nan')):.4f}; "
          f"run folder {result.run_dir}; model {result.model_dir}")
    return 0


RUN_DESCRIPTION = """\
Run the whole pipeline as one Ray DAG: data (Ray Data pairs) -> pretrain (Ray Train +
DeepSpeed ZeRO, HF export) -> finetune (the [finetune] table: a built-in task or your
labeled files, on the pretrained encoder) -> evaluate (the test set: eval.json, report.md,
confusion.png) -> deploy (Ray Serve, the [serve] table, 127.0.0.1 by default) -> request
(one real HTTP request; its answer is printed). Every stage's config is read and validated before Ray starts; a stage whose
output already holds the same input+config hash is skipped, so a rerun after an edit redoes
only what the edit touches. One line per stage: its status, time and headline figure.

Without --config the bundled local profile (configs/local.toml: BBC News, tiny model,
1 worker with 2 CPUs, ZeRO-0, bbc-topic fine-tuning) runs; overrides use the stage tables: --data.KEY,
--model.KEY, --pretrain.KEY, --finetune.KEY, --serve.KEY. Each stage writes a folder named by its config
hash (runs/data-<hash>, runs/pretrain-<hash>, runs/finetune-<hash>): a changed config never
overwrites a finished run, and a killed run resumes from its last checkpoint when started
again. Each invocation also writes runs/run-<time>/: a log per stage (what the stage
printed, and the traceback if it failed), run.json (each stage's status, time and folder)
and report.html. A failing stage stops the DAG with one line naming the stage, the reason
and its log (exit 1)."""


def cmd_run(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .data.corpus import InputError
    from .dag import StageFailed, plan_run, run

    config = args.config or str(Path(__file__).resolve().parent.parent / "configs" / "local.toml")
    try:
        plan_run(config, overrides, force=args.force, until=args.until)  # validate everything before any Ray work
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        _quiet_ray_data()
        run(config, overrides, force=args.force, until=args.until, keep_serving=args.keep_serving)
    except (ConfigError, InputError) as e:
        print(f"cloze run: error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:  # its FAILED line (stage, reason, log) is already on the console
        print("cloze run: finished stages are kept; fix the cause and run again to resume", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cloze run: interrupted; finished stages are kept (a stage is only marked done once its output "
              "is complete) and a rerun resumes from the last checkpoint", file=sys.stderr)
        _exit_now(130)
    return 0


def _exit_now(code: int, grace_s: float = 10.0) -> None:
    """Exit after Ctrl-C without hanging: a terminal's Ctrl-C also reached the local Ray's
    own processes, and `ray.shutdown()` (also Python's exit hook) can wait a minute for a GCS
    that is gone. Give it `grace_s`, then leave; Ray's child processes share the driver's
    fate and go with it."""
    import threading

    sys.stdout.flush(), sys.stderr.flush()
    try:
        import ray

        if ray.is_initialized():
            done = threading.Thread(target=ray.shutdown, daemon=True)
            done.start()
            done.join(grace_s)
    except Exception:
        pass
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloze", description="Multi-objective BERT-style pretraining on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = sub.add_parser("data", help="build pretraining examples (Parquet shards + manifest)",
                          description=DATA_DESCRIPTION, epilog=_data_help(),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_argument("--config", metavar="FILE.toml", help="TOML file; its [data] table is read (default: built-in defaults)")
    data.set_defaults(run=cmd_data)
    pre = sub.add_parser("pretrain", help="pretrain the encoder with Ray Train + DeepSpeed ZeRO",
                         description="Pretrain the encoder on `cloze data` shards: Ray Train TorchTrainer, "
                                     "DeepSpeed ZeRO 0-3 in each worker, checkpoints, HF export.",
                         epilog=_pretrain_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    pre.add_argument("--config", metavar="FILE.toml", help="TOML file; its [pretrain] and [model] tables are read")
    pre.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest complete checkpoint")
    pre.set_defaults(run=cmd_pretrain)
    from .cli_finetune import add_commands

    add_commands(sub)  # finetune, evaluate
    run = sub.add_parser("run", help="run the whole pipeline as one Ray DAG (data -> pretrain -> finetune -> ...)",
                         description=RUN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", metavar="FILE.toml", help="TOML with [data], [model], [pretrain], [finetune] "
                                                          "tables (default: configs/local.toml)")
    run.add_argument("--force", metavar="STAGE", nargs="?", const="pretrain",
                     help="redo STAGE (default pretrain) and every stage after it even if finished or "
                          "checkpointed (deletes those stages' folders for this config; other runs are never "
                          "touched)")
    run.add_argument("--until", metavar="STAGE",
                     help="stop after this stage (data, pretrain, finetune, evaluate, deploy, request)")
    run.add_argument("--keep-serving", action="store_true",
                     help="leave the endpoint up after the request until Ctrl-C (default: stop it and print the "
                          "`cloze serve` command that brings it back)")
    run.set_defaults(run=cmd_run)
    _add_module_commands(sub)
    return parser


# Commands that live with their own module: each module has `add_command(subparsers)`, which
# adds its parser with `set_defaults(run=fn)` (fn(args, overrides) -> exit status). A module
# that does not exist adds nothing, so `--help` never lists a command that cannot run. These
# modules keep Ray / torch imports inside their functions: `cloze --help` stays fast.
COMMAND_MODULES = ("pipelines.serve", "pipelines.score", "cluster.jobs")


def _add_module_commands(sub) -> None:
    import importlib
    import importlib.util

    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).add_command(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = split_overrides(rest)
    except ConfigError as e:
        parser.exit(2, f"cloze {args.command}: error: {e}\n")
    return args.run(args, overrides)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
