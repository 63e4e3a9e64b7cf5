"""int8 vs fp32 inference: rows/s and accuracy on a held-out split.

Both sides are `pipelines.inference.Predictor` (what every `cloze score` actor and `cloze
serve` replica runs) on the same folder: `quantize="none"` and `quantize="int8"` (dynamic
int8 quantization of every nn.Linear), same texts, same batch size, same torch threads
(default 1: one scoring actor's CPU). Speed: rows/s of `classify` over --rows texts,
median [min-max] of --repeats interleaved runs. Accuracy: both sides on the held-out split
(--test FILE, or --task-name NAME's test split), the delta in points and how often the two
agree. Fine-tuning is not done here: without --model a random `mini` classifier is used and
only speed (and label agreement, which says little for random weights) is reported.

Usage: python benchmarks/quantize.py [--model DIR (--test FILE | --task-name NAME)] [--rows 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import bbc_paragraphs, machine, summary  # noqa: E402
from score import mini_classifier  # noqa: E402  (benchmarks/score.py)


def held_out(args) -> tuple[list[str], list[str] | None, list[str]]:
    """(texts, texts_b, gold labels) of the held-out split."""
    from pipelines.builtin_tasks import builtin_task
    from pipelines.labeled import read_labeled

    ds = builtin_task(args.task_name, "test") if args.task_name else read_labeled(args.test, "sequence")
    return ds.texts, ds.texts_b, ds.labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a fine-tuned sequence classifier folder (default: a random mini one, speed only)")
    ap.add_argument("--test", help="held-out labeled file (CSV / JSONL / Parquet with text + label)")
    ap.add_argument("--task-name", help="a built-in task whose test split is the held-out set (e.g. bbc-topic)")
    ap.add_argument("--rows", type=int, default=2000, help="texts per speed run")
    ap.add_argument("--repeats", type=int, default=3, help="speed runs of each side (interleaved)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    args = ap.parse_args()
    if args.model and not (args.test or args.task_name):
        ap.error("--model needs --test FILE or --task-name NAME for the accuracy delta")

    from pipelines.inference import Predictor

    work = Path(tempfile.mkdtemp(prefix="cloze-bench-quantize-"))
    model = args.model or mini_classifier(work / "model")
    sides = {q: Predictor(model, batch_size=args.batch_size, quantize=q, threads=args.threads) for q in ("none", "int8")}
    if args.model:
        texts, texts_b, gold = held_out(args)
    else:
        texts, texts_b, gold = [" ".join(p.split()[:24]) for p in bbc_paragraphs()[:args.rows]], None, None
    speed_texts = (texts * (args.rows // len(texts) + 1))[:args.rows]
    speed_b = (texts_b * (args.rows // len(texts_b) + 1))[:args.rows] if texts_b else None
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"model: {model}{'' if args.model else ' (random mini: speed only)'}; threads {args.threads}, "
          f"batch {args.batch_size}, {args.rows} rows per run")
    rates: dict[str, list[float]] = {q: [] for q in sides}
    for _ in range(args.repeats):
        for q, pred in sides.items():
            t0 = time.perf_counter()
            pred.classify(speed_texts, speed_b)
            rates[q].append(args.rows / (time.perf_counter() - t0))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    for q in sides:
        print(f"  {'fp32' if q == 'none' else q:5s} rows/s {summary(rates[q])}")
    print(f"  int8 / fp32 speed: x{statistics.median(rates['int8']) / statistics.median(rates['none']):.2f}")

    labels = {q: [r["label"] for r in pred.classify(texts, texts_b)] for q, pred in sides.items()}
    agree = sum(a == b for a, b in zip(labels["none"], labels["int8"])) / len(texts)
    print(f"  labels int8 == fp32 on {len(texts)} texts: {100 * agree:.2f}%")
    if gold is not None:
        acc = {q: sum(p == g for p, g in zip(labels[q], gold)) / len(gold) for q in sides}
        print(f"  held-out accuracy ({len(gold)} examples): fp32 {100 * acc['none']:.2f}%, int8 {100 * acc['int8']:.2f}% "
              f"(delta {100 * (acc['int8'] - acc['none']):+.2f} points)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
