"""`cloze finetune` and `cloze evaluate`: their parsers and what they run (the parser, the
override plumbing and the other stages are in `pipelines.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .cli import table_help
from .config import ConfigError


FINETUNE_DESCRIPTION = """\
Fine-tune a classifier on labeled data with Ray Train + DeepSpeed (the training core):
a softmax over h_cls (--task sequence) or a per-token tagger (--task token: BIO tags ->
entity spans), from a pretrained encoder (--init: a cloze run's model, any HF BERT folder)
or from random weights (--init random --finetune.like DIR: the same shape, fresh weights:
the baseline). --mode frozen trains only the head on a fixed encoder: its features are
computed once (Ray Data, an actor pool) and cached in the run folder.

Labeled files: CSV / JSONL / Parquet with `text` (or `text_a` + `text_b`) and `label`;
token tasks: CoNLL columns (token ... tag) or JSONL `tokens` + `tags`. Without --dev, a
stratified 10% of train (seeded). The dev set is scored at every checkpoint (macro-F1; entity
F1 for token tasks) and the best weights are exported to --output as an HF folder
(BertForSequenceClassification / BertForTokenClassification, id2label, tokenizer,
cloze.json); the run folder (checkpoints, metrics) is <output>.run/."""


def cmd_finetune(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .finetune import FinetuneConfig, finetune
    from .train.metrics import best_eval, read_metrics

    try:
        bad = next((k for k in overrides if k.split(".", 1)[0] not in ("finetune", "model")), None)
        if bad:
            raise ConfigError(f"{bad}: `cloze finetune` reads only the [finetune] and [model] tables")
        flags = {"train": args.train, "dev": args.dev, "test": args.test, "init": args.init, "mode": args.mode,
                 "task": args.task, "task_name": args.task_name, "label_fraction": args.label_fraction}
        extra = {f"finetune.{k}": v for k, v in flags.items() if v is not None}
        if args.output:
            out = Path(args.output).expanduser().resolve()
            extra.update({"finetune.output": str(out), "finetune.storage_path": str(out.parent),
                          "finetune.name": out.name + ".run"})
        if args.resume:
            if args.config or overrides or extra:
                raise ConfigError("--resume continues a run with its saved config: no other options")
            config = None
        else:
            config = FinetuneConfig.from_toml(args.config, {**extra, **overrides})
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        result = finetune(config, resume=args.resume)
    except ConfigError as e:
        print(f"cloze finetune: error: {e}", file=sys.stderr)
        return 2
    evals = read_metrics(result.train.run_dir, "eval.csv")
    best = best_eval(result.train.run_dir)
    if best:
        print(f"cloze finetune: dev F1 {evals[0].get('eval/f1', 0):.3f} (step 0) -> best {best.get('eval/f1', 0):.3f} "
              f"(step {best['step']:.0f})")
    if result.test:
        print(f"cloze finetune: test F1 {result.test['f1']:.4f}" +
              (f", accuracy {result.test['accuracy']:.4f}" if "accuracy" in result.test else ""))
    print(f"cloze finetune: model {result.model_dir}; run folder {result.train.run_dir}")
    return 0 if result.model_dir else 1


def cmd_evaluate(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .evaluate import evaluate_folder
    from .inference import folder_kind
    from .builtin_tasks import builtin_task
    from .labeled import LabeledDataError, read_labeled

    kind = folder_kind(args.model)
    try:
        if kind is None:
            raise ConfigError(f"--model {args.model}: not a classifier folder (config.json with "
                              f"BertForSequenceClassification / BertForTokenClassification)")
        if bool(args.test) == bool(args.task_name):
            raise ConfigError("give --test FILE or --task-name NAME (its test split)")
        labeled = builtin_task(args.task_name, "test") if args.task_name else read_labeled(args.test, kind)
        report = evaluate_folder(args.model, labeled, output=args.output)
    except (ConfigError, LabeledDataError) as e:
        print(f"cloze evaluate: error: {e}", file=sys.stderr)
        return 2
    line = f"cloze evaluate: {report['examples']} examples, F1 {report['f1']:.4f}"
    if "accuracy" in report:
        line += f", accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}"
    print(line + (f"; report in {args.output}" if args.output else ""))
    return 0


def add_commands(sub) -> None:
    from .finetune_config import FinetuneConfig

    fine = sub.add_parser("finetune", help="fine-tune a sequence or token (NER) classifier",
                          description=FINETUNE_DESCRIPTION, epilog=table_help(FinetuneConfig, "finetune"),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    fine.add_argument("--train", metavar="FILE", help="labeled training file (or --task-name)")
    fine.add_argument("--dev", metavar="FILE", help="labeled dev file (default: 10%% of train, stratified)")
    fine.add_argument("--test", metavar="FILE", help="labeled test file, scored once with the exported model")
    fine.add_argument("--task-name", metavar="NAME",
                      help="a built-in task: bbc-topic, newsgroups, movie-sentiment, sms-spam, conll2003")
    fine.add_argument("--init", metavar="DIR|random", help="the starting weights: a model folder, or random")
    fine.add_argument("--output", metavar="DIR", help="the exported model folder (run folder: DIR.run/)")
    fine.add_argument("--mode", choices=("finetune", "frozen"), help="train every weight, or only the head")
    fine.add_argument("--task", choices=("sequence", "token"), help="classifier kind (default sequence)")
    fine.add_argument("--label-fraction", type=float, metavar="F", help="keep this share of the training labels")
    fine.add_argument("--config", metavar="FILE.toml", help="TOML file; its [finetune] and [model] tables are read")
    fine.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest complete checkpoint")
    fine.set_defaults(run=cmd_finetune)
    ev = sub.add_parser("evaluate", help="score a classifier folder on a labeled test set",
                        description="Score a classifier folder (cloze or HF) on labeled data: eval.json, "
                                    "report.md and a confusion matrix PNG in --output.")
    ev.add_argument("--model", metavar="DIR", required=True, help="the classifier folder")
    ev.add_argument("--test", metavar="FILE", help="labeled file (same formats as cloze finetune)")
    ev.add_argument("--task-name", metavar="NAME", help="a built-in task's test split instead of --test")
    ev.add_argument("--output", metavar="DIR", help="where eval.json, report.md, confusion.png go")
    ev.set_defaults(run=cmd_evaluate)
