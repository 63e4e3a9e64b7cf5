"""The baseline a user would write instead of `cloze finetune`: a plain PyTorch loop over
`transformers.BertForSequenceClassification`, with the recipe `cloze finetune` runs.

Same as cloze: the labeled sets (`pipelines.finetune_data.load_sets`: built-in split, label
fraction, seed), the tokenized examples (cloze's tokenizer, max_seq_len, padding to the
batch's longest row), the batch size, the number of steps (epochs x full batches), AdamW
(betas, eps, weight decay on matrices only, clipping) with the encoder at `optimizer.lr` and
the head (pooler + classifier) at `head_lr`, linear warmup then linear decay, a dev macro-F1
evaluation every `checkpoint_every` steps and at the end, the best one's weights scored on
test. Different: one process, no Ray, no DeepSpeed, no data loader; HF's model code; each
epoch a seeded permutation of the training rows.

Used by `benchmarks/quality.py` for its `hf-*` rows ("what a plain transformers loop reaches
with the same recipe").
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch


def _batches(split, order: np.ndarray, batch: int, pad: int):
    from pipelines.inference import pad_batch

    for start in range(0, len(order) - batch + 1, batch):  # full batches only, as cloze's loader
        idx = order[start:start + batch]
        out = pad_batch([split.input_ids[i] for i in idx], [split.token_type_ids[i] for i in idx], pad)
        out["labels"] = torch.as_tensor([split.labels[i] for i in idx])
        yield out


@torch.inference_mode()
def _predict(model, split, labels: list[str], pad: int, batch: int = 64) -> list[str]:
    from pipelines.inference import pad_batch

    model.eval()
    out: list[str] = []
    for start in range(0, len(split.input_ids), batch):
        b = pad_batch(split.input_ids[start:start + batch], split.token_type_ids[start:start + batch], pad)
        out += [labels[int(i)] for i in model(**b).logits.argmax(-1)]
    model.train()
    return out


def hf_classifier(cfg, num_labels: int):
    """`transformers.BertForSequenceClassification` from cfg.init, its head drawn after seeding."""
    import transformers

    torch.manual_seed(cfg.seed)
    return transformers.BertForSequenceClassification.from_pretrained(cfg.init, num_labels=num_labels,
                                                                      local_files_only=True)


def hf_optimizer(model, cfg, steps: int):
    """AdamW with the encoder at optimizer.lr and the head (pooler + classifier) at head_lr,
    decay on matrices only; linear warmup then decay over `steps`."""
    from pipelines.train.optim import WarmupDecay

    opt = cfg.optimizer
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        encoder = name.startswith("bert.") and not name.startswith("bert.pooler.")
        groups.setdefault((encoder, p.ndim >= 2), []).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "weight_decay": opt.weight_decay if matrix else 0.0,
          "lr": opt.lr if enc else (cfg.head_lr or opt.lr)} for (enc, matrix), ps in groups.items()],
        lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupDecay(opt.warmup_steps, steps, opt.decay, opt.min_lr_ratio))


def train_step(model, optimizer, schedule, batch: dict, grad_clip: float) -> float:
    """One update on a padded batch with `labels`; returns the batch's loss."""
    loss = model(**batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    schedule.step()
    return float(loss.detach())


def plain_finetune(table: dict[str, Any], threads: int) -> dict[str, Any]:
    """Fine-tune `table["init"]` (an HF BERT folder) as the [finetune] `table` says; returns
    the test accuracy and macro-F1 of the best-dev weights, and that dev F1."""
    from pipelines.finetune import FinetuneConfig
    from pipelines.finetune_data import load_sets, scores, tokenize
    from pipelines.inference import tokenizer_for
    from pipelines.labeled import label_names

    cfg = FinetuneConfig.from_dict(table)
    if cfg.task != "sequence" or cfg.mode != "finetune" or cfg.init == "random":
        raise ValueError("the plain loop covers sequence tasks, fine-tuned from a model folder")
    torch.set_num_threads(threads)
    train, dev, test = load_sets(cfg)
    labels = label_names(train)
    label2id = {lab: i for i, lab in enumerate(labels)}
    tok = tokenizer_for(cfg.init, cfg.max_seq_len)
    tr, dv, te = (tokenize(s, tok, label2id) for s in (train, dev, test))
    batch = cfg.batch_size_per_worker
    per_epoch = len(tr.input_ids) // batch
    steps = max(1, math.ceil(cfg.epochs * per_epoch))
    every = cfg.checkpoint_every or max(1, per_epoch // 4)

    model = hf_classifier(cfg, len(labels))
    pad = model.config.pad_token_id or 0
    optimizer, schedule = hf_optimizer(model, cfg, steps)
    rng = np.random.default_rng(cfg.seed)
    best_f1, best_state, step = -1.0, None, 0

    def evaluate() -> None:
        nonlocal best_f1, best_state
        f1 = scores("sequence", dv.gold, _predict(model, dv, labels, pad), labels)["f1"]
        if f1 > best_f1:
            best_f1, best_state = f1, copy.deepcopy(model.state_dict())

    model.train()
    while step < steps:
        for b in _batches(tr, rng.permutation(len(tr.input_ids)), batch, pad):
            train_step(model, optimizer, schedule, b, cfg.optimizer.grad_clip)
            step += 1
            if step % every == 0 or step == steps:
                evaluate()
            if step == steps:
                break
    model.load_state_dict(best_state)
    report = scores("sequence", te.gold, _predict(model, te, labels, pad), labels)
    return {"metric": report["accuracy"], "f1": report["f1"], "dev_f1": best_f1, "steps": steps}
