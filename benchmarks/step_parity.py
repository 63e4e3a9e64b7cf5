"""Is `cloze finetune`'s step the plain loop's step? (the learning-quality table's
cloze vs plain-`transformers` rows)

MiniLM with dropout off (a copy of its folder with both dropout rates 0), bbc-topic 10%, the
table's recipe (batch 16, max_seq_len 128, lr 1e-4, head lr 2e-3, 10 warmup steps, seed 1):
`cloze finetune` (Ray Train + DeepSpeed, 1 worker) runs STEPS steps and saves the batches it
trained on; `benchmarks/plain_loop.py`'s model, optimizer and step then replay those batches
from cloze's initial head. Prints both loss curves and the largest
relative difference. With dropout off and the same data, the only randomness left, any
difference is a recipe difference; what remains between the two rows of the table is
dropout masks, data order and the head's draw (the seed streams differ).

    .venv/bin/python benchmarks/step_parity.py [--steps 30] [--work /tmp/cloze-step-parity]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def save_batches(folder: str):
    """A core callback that saves the batches rank 0 trains on (`batch.step<s>.pt`)."""
    from pipelines.train.task import Callback

    class SaveBatches(Callback):
        def on_batch(self, step, rank, batch):
            if rank == 0:
                torch.save(batch, Path(folder) / f"batch.step{step}.pt")

    return SaveBatches()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--work", default="/tmp/cloze-step-parity")
    args = p.parse_args()

    import plain_loop
    from quality import COLUMNS, minilm

    from common import machine
    from pipelines.finetune import FinetuneConfig, finetune, resolve
    from pipelines.train.metrics import read_metrics

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    init = work / "minilm-no-dropout"
    shutil.copytree(minilm(), init)
    hf = json.loads((init / "config.json").read_text())
    (init / "config.json").write_text(json.dumps({**hf, "hidden_dropout_prob": 0.0,
                                                  "attention_probs_dropout_prob": 0.0}))
    table = {"storage_path": str(work / "runs"), "name": "cloze", "num_workers": 1, "cpus_per_worker": 2.0,
             "zero_stage": 0, "seed": 1, "batch_size_per_worker": 16, "max_seq_len": 128, "patience": 0,
             "head_lr": 2e-3, "optimizer": {"lr": 1e-4, "warmup_steps": 10}, **COLUMNS["bbc-topic-10"],
             "epochs": 0, "max_steps": args.steps, "init": str(init), "output": str(work / "model")}
    cfg = FinetuneConfig.from_dict(table)
    task = resolve(cfg)
    torch.manual_seed(task.config.seed)  # the head every rank draws
    head = {k[len("model."):]: v for k, v in task.build_model().state_dict().items() if ".classifier." in f".{k}"}
    (work / "batches").mkdir()
    result = finetune(cfg, progress=False, log=lambda *a: None, evaluate_test=False,
                      callbacks=[save_batches(str(work / "batches"))])
    rows = read_metrics(result.train.run_dir)

    model = plain_loop.hf_classifier(task.config, len(task.labels))
    model.load_state_dict(head, strict=False)
    optimizer, schedule = plain_loop.hf_optimizer(model, task.config, args.steps)
    model.train()
    print(machine())
    print(" step   cloze loss   plain loss")
    worst = 0.0
    for step in range(1, args.steps + 1):
        batch = torch.load(work / "batches" / f"batch.step{step}.pt")
        loss = plain_loop.train_step(model, optimizer, schedule, batch, task.config.optimizer.grad_clip)
        ours = rows[step - 1]["loss"]
        worst = max(worst, abs(ours - loss) / max(abs(loss), 1e-12))
        print(f"{step:5d} {ours:12.6f} {loss:12.6f}")
    print(f"largest relative loss difference over {args.steps} steps: {worst:.2e}")


if __name__ == "__main__":
    main()
