"""Fine-tuning: a sequence ([CLS]) or token (NER) classifier on labeled data, as a second
task of the training core (Ray Train + DeepSpeed ZeRO, checkpoints, metrics, resume).

The driver reads and checks the labeled files (or a built-in task), tokenizes them with the
init model's tokenizer (`pipelines.inference`: the encoding serving and `cloze evaluate`
use), and writes the training examples as Parquet shards into the run folder, which the
core's loader reads per rank. The dev set is scored at every checkpoint (macro-F1, or
entity F1 for token tasks); the best evaluation's weights are exported (early stopping
after `patience` evaluations without improvement) as an HF `BertForSequenceClassification`
/ `BertForTokenClassification` folder with `id2label`, the tokenizer and `cloze.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoder import Encoder, EncoderConfig
from encoder.objective import ObjectiveOutput

from .config import ConfigError
from .finetune_config import FinetuneConfig, init_source, model_folder
from .finetune_data import SHARD_ROWS, Split, collate, load_sets, scores, tokenize, write_shards  # noqa: F401
from .inference import pad_batch, tokenizer_for
from .storage import join_path, read_bytes, write_atomic
from .train import TrainResult, fit
from .train.task import ShardTask

# a frozen run keeps its dev features in memory up to this much a worker (past it, recomputed)
FROZEN_EVAL_CACHE_BYTES = 2 << 30

# ------------------------------------------------------------------ the model

class Classify(torch.nn.Module):
    """The core's contract around a classifier: forward(batch) -> ObjectiveOutput."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        """ObjectiveOutput(loss, metrics) with labels; the classifier's output (logits) without.
        A batch of cached frozen features (`pipelines.features`) goes through the head only;
        `features_only` returns the encoder's part alone (what frozen mode caches)."""
        if batch.get("features_only"):
            return self.model.features(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        if "features" in batch:
            out = self.model.head(batch["features"], batch.get("attention_mask"), batch.get("labels"))
        else:
            out = self.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch.get("labels"))
        if "labels" not in batch:
            return out
        return ObjectiveOutput(out.loss, {"loss": out.loss.detach(), **{f"cls/{k}": v for k, v in out.metrics.items()}})


# ------------------------------------------------------------------ the task

class FinetuneTask(ShardTask):
    name = "finetune"

    def __init__(self, cfg: FinetuneConfig, shards, dev: Split, labels: list[str], tokenizer: str,
                 encoder_config: EncoderConfig, provenance: dict, encoder_folder: str = ""):
        self.config, self.shards, self.dev, self.labels = cfg, shards, dev, labels
        self.tokenizer, self.encoder_config, self.provenance = tokenizer, encoder_config, provenance
        # frozen mode trains on cached features; its encoder (random ones too) is a saved folder
        self.encoder_folder = encoder_folder or (cfg.init if cfg.init != "random" else "")
        self.cached = cfg.mode == "frozen"
        self.eval_features: dict[int, tuple] = {}  # frozen: id(split) -> (split, {batch: its encoder features})
        self.columns = ["features", "labels", "length"] if self.cached else ["input_ids", "token_type_ids", "labels"]

    def input_paths(self) -> list[str]:
        return [p for p in (self.config.init if self.config.init != "random" else "", self.tokenizer) if p]

    def classifier(self) -> torch.nn.Module:
        from encoder import SequenceClassifier, TokenClassifier

        cfg = self.config
        id2label = dict(enumerate(self.labels))
        frozen = cfg.mode == "frozen"
        cls = SequenceClassifier if cfg.task == "sequence" else TokenClassifier
        encoder = Encoder(self.encoder_config)
        if self.encoder_folder:  # the init's encoder (and pooler); any head it has is dropped: ours starts fresh
            from encoder.hf import load_pretrained

            encoder = load_pretrained(self.encoder_folder, kind="encoder")
        if cfg.task == "token":
            encoder.pooler = None  # a token classifier has no use for BERT's pooler
        model = cls(encoder, len(self.labels), id2label, frozen=frozen)
        if frozen and model.encoder.pooler is not None:
            model.encoder.pooler.requires_grad_(True)  # part of the head: a frozen encoder's pooler still trains
        return model

    def build_model(self) -> Classify:
        return Classify(self.classifier())

    def param_groups(self, model) -> list[dict]:
        """Encoder at optimizer.lr, the classifier head at head_lr; no decay on 1-d tensors.
        The pooler belongs to the head (BERT's classification head uses it)."""
        from .train.optim import param_groups

        cfg = self.config
        return param_groups(model, cfg.optimizer.weight_decay,
                            is_encoder=lambda name: ".encoder." in f".{name}" and ".pooler." not in f".{name}",
                            encoder={"lr": cfg.optimizer.lr}, head={"lr": cfg.head_lr or cfg.optimizer.lr})

    def batch_maker(self, rank: int):
        pad, task, hidden = self.encoder_config.pad_token_id, self.config.task, self.encoder_config.hidden_size
        if self.cached:
            from .features import collate_features

            return lambda epoch, index, rows: collate_features(rows, task, hidden)
        return lambda epoch, index, rows: collate(rows, pad, task)

    def sizes(self, batch: dict) -> tuple[float, int]:
        if "features" not in batch:
            return super().sizes(batch)
        return float(batch["lengths"].sum()), int(batch["lengths"].shape[0])

    def flops(self, batch: dict) -> float:
        if "features" not in batch:
            return super().flops(batch)
        h, c = self.encoder_config.hidden_size, len(self.labels)  # the head: (pooler +) classifier
        per_row = (h * h + h * c) if self.config.task == "sequence" else h * c
        rows = batch["features"].shape[0] if self.config.task == "sequence" else float(batch["lengths"].sum())
        return 6.0 * per_row * rows

    def predict(self, model, split: Split, rank: int, world: int, device) -> list:
        """Predictions of this rank's examples (i % world == rank), gathered on every rank in
        example order; every rank runs the same number of forwards through the engine (ZeRO-3)."""
        from .inference import word_tags

        B = self.config.batch_size_per_worker
        mine = list(range(rank, len(split.input_ids), world))
        n_batches = math.ceil(math.ceil(len(split.input_ids) / world) / B)
        preds: dict[int, Any] = {}
        model.eval()
        with torch.no_grad():
            for b in range(n_batches):
                part = mine[b * B:(b + 1) * B]
                idx = part or [0]  # a rank short of examples runs one more forward, discarded
                batch = pad_batch([split.input_ids[i] for i in idx], [split.token_type_ids[i] for i in idx],
                                  self.encoder_config.pad_token_id)
                best = self._logits(model, split, b, {k: v.to(device) for k, v in batch.items()}).argmax(-1).cpu()
                for j, i in enumerate(part):
                    if self.config.task == "sequence":
                        preds[i] = self.labels[int(best[j])]
                    else:
                        preds[i] = word_tags(split.first_piece[i], best[j].tolist(), self.labels)
        model.train()
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, preds)
            preds = {k: v for part in gathered for k, v in part.items()}
        return [preds[i] for i in range(len(split.input_ids))]

    def _logits(self, model, split: Split, b: int, batch: dict) -> torch.Tensor:
        """The logits of eval batch `b`. A frozen encoder never moves, so in frozen mode its
        features of each eval batch are computed at the first evaluation and kept (in memory,
        up to FROZEN_EVAL_CACHE_BYTES a worker); later evaluations run the head only, which is
        the whole model's computation: `forward` is `head(features(x))`."""
        if not self.cached:
            return model(batch).logits
        held, memo = self.eval_features.get(id(split), (None, {}))
        if held is not split:  # a split first seen (an id can be reused once its object is gone)
            memo = {}
            self.eval_features[id(split)] = (split, memo)
        if b not in memo:
            feats = model({**batch, "features_only": True})
            used = sum(f.numel() * f.element_size() for f, _ in memo.values())
            if used + feats.numel() * feats.element_size() > FROZEN_EVAL_CACHE_BYTES:
                return model({"features": feats, "attention_mask": batch["attention_mask"]}).logits
            memo[b] = (feats.cpu(), batch["attention_mask"].cpu())
        device = batch["input_ids"].device
        feats, mask = memo[b]
        return model({"features": feats.to(device), "attention_mask": mask.to(device)}).logits

    def evaluate(self, model, rank: int, world: int, device) -> dict[str, float]:
        report = scores(self.config.task, self.dev.gold, self.predict(model, self.dev, rank, world, device),
                        self.labels)
        out = {"eval/f1": report["f1"]}
        if self.config.task == "sequence":
            out["eval/accuracy"] = report["accuracy"]
        else:
            out.update({f"eval/{k}": report["overall"][k] for k in ("precision", "recall")})
        return out

    def export(self, state, metrics, dest: str) -> None:
        import tempfile

        from encoder.hf import save_pretrained

        model = self.classifier()
        model.load_state_dict({k[len("model."):]: v for k, v in state.items()})
        meta = {"task": self.config.task, "labels": self.labels, "init": self.provenance,
                "finetune_config": self.config.to_dict(), "dev_metrics": metrics}
        if "://" not in dest:
            save_pretrained(model, dest, tokenizer=self.tokenizer, metadata=meta)
            return
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, Path(tmp) / "model", tokenizer=self.tokenizer, metadata=meta)
            pafs.copy_files(str(Path(tmp) / "model"), dest)


# ------------------------------------------------------------------ driver

def _check_output(cfg: FinetuneConfig) -> None:
    """--output must be new, or a model folder an earlier run of this same run folder wrote:
    it is replaced at the end, so it must never be a folder of anything else."""
    if not cfg.output or "://" in cfg.output or not Path(cfg.output).exists():
        return
    out = Path(cfg.output)
    info = out / "cloze.json"
    if info.is_file():
        meta = json.loads(info.read_text()).get("metadata", {}).get("finetune_config", {})
        if (meta.get("storage_path"), meta.get("name")) == (cfg.storage_path, cfg.name):
            return
    raise ConfigError(f"output: {cfg.output} already exists and is not this run's model folder: pick a new path "
                      f"(it would be replaced)")


def resolve(cfg: FinetuneConfig, resume: bool = False) -> FinetuneTask:
    """Read, check and tokenize the labeled data, write the training shards (before any Ray
    work beyond this process), and build the task. A resumed run must see the same data."""
    from .data.loader import describe
    from .labeled import label_names
    from .train.launch import has_checkpoints, run_folder

    if cfg.task_name:
        from .builtin_tasks import BUILTIN_TASKS

        if cfg.task_name not in BUILTIN_TASKS:
            raise ConfigError(f"task_name: unknown built-in task {cfg.task_name!r} "
                              f"(choose from {', '.join(BUILTIN_TASKS)})")
        cfg = dataclasses.replace(cfg, task=BUILTIN_TASKS[cfg.task_name])
    cfg = cfg.absolute()
    if cfg.init != "random":
        cfg = dataclasses.replace(cfg, init=model_folder(cfg.init, "init"))
    if cfg.like:
        cfg = dataclasses.replace(cfg, like=model_folder(cfg.like, "like"))
    run_dir = run_folder(cfg)
    if not resume and has_checkpoints(run_dir):
        raise ConfigError(f"run folder {run_dir} already has checkpoints: pass --resume {run_dir} or pick another "
                          f"--output / name")
    _check_output(cfg)
    try:
        tok_folder, enc_cfg = init_source(cfg)
    except (OSError, ValueError) as e:
        raise ConfigError(f"init: cannot read the model in {cfg.init if cfg.init != 'random' else cfg.like}: "
                          f"{e}") from None
    if cfg.max_seq_len > enc_cfg.max_position_embeddings:
        raise ConfigError(f"max_seq_len ({cfg.max_seq_len}) exceeds the model's max_position_embeddings "
                          f"({enc_cfg.max_position_embeddings})")
    train, dev, test = load_sets(cfg)
    labels = label_names(train)
    label2id = {lab: i for i, lab in enumerate(labels)}
    tok = tokenizer_for(tok_folder, cfg.max_seq_len)
    if tok.get_vocab_size(with_added_tokens=True) > enc_cfg.vocab_size:
        raise ConfigError(f"init: the tokenizer in {tok_folder} has more ids than the model's vocab_size "
                          f"({enc_cfg.vocab_size})")
    train_split, dev_split = tokenize(train, tok, label2id), tokenize(dev, tok, label2id)
    unit = cfg.batch_size_per_worker * cfg.num_workers
    if len(train_split.input_ids) < unit:
        raise ConfigError(f"train: {len(train_split.input_ids)} examples, fewer than one global batch "
                          f"({cfg.batch_size_per_worker} x {cfg.num_workers} workers)")
    per_epoch = len(train_split.input_ids) // cfg.num_workers // cfg.batch_size_per_worker // cfg.accumulation
    changes: dict[str, Any] = {"task": cfg.task}
    if cfg.epochs:
        changes["max_steps"] = max(1, math.ceil(cfg.epochs * per_epoch))
    if not cfg.checkpoint_every:
        changes["checkpoint_every"] = max(1, per_epoch // 4)
    cfg = dataclasses.replace(cfg, **changes)
    if cfg.init != "random":  # the init loads, on this machine, before any worker tries
        try:
            from encoder.hf import load_pretrained

            load_pretrained(cfg.init, kind="encoder")
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"init: {cfg.init} does not load as a BERT encoder: {e}") from None
    digest = hashlib.sha256()
    for ids, lab in zip(train_split.input_ids, train_split.labels):
        digest.update(np.asarray(ids).tobytes() + np.asarray(lab).tobytes())
    provenance = {"init": cfg.init, "like": cfg.like, "train": train.source, "dev": dev.source,
                  "test": test.source if test else None, "train_examples": len(train), "dev_examples": len(dev),
                  "labels": labels, "truncated": {"train": train_split.truncated, "dev": dev_split.truncated},
                  "skipped": {"train": train.skipped, "dev": dev.skipped}, "examples_sha256": digest.hexdigest()}
    data_dir = join_path(run_dir, "data")
    old = read_bytes(join_path(data_dir, "manifest.json"))
    if resume and old is not None:
        before = json.loads(old)
        if (before.get("examples_sha256"), before.get("labels")) != (provenance["examples_sha256"], labels):
            raise ConfigError(f"resume: the training data or labels differ from what {run_dir} was started with")
        files = [join_path(data_dir, f"part-{s:05d}.parquet")
                 for s in range(math.ceil(len(train_split.input_ids) / SHARD_ROWS))]
    else:
        files = write_shards(train_split, data_dir, cfg.task, cfg.seed)
        write_atomic(join_path(data_dir, "manifest.json"), json.dumps(provenance, indent=2).encode())
    encoder_folder = ""
    if cfg.mode == "frozen":
        from .features import frozen_features

        encoder_folder, files = frozen_features(cfg, run_dir, files, enc_cfg, tok_folder, provenance)
    return FinetuneTask(cfg, describe(files), dev_split, labels, tok_folder, enc_cfg, provenance, encoder_folder)


@dataclass
class FinetuneResult:
    train: TrainResult
    model_dir: str | None
    test: dict | None  # the test report of the exported model


def finetune(cfg: FinetuneConfig, resume=None, progress: bool = True, log=print, callbacks=(),
             evaluate_test: bool = True) -> FinetuneResult:
    """`resume`: a run folder to continue (its saved config is used; `cfg` may be None).
    `evaluate_test`: score the test set (if any) with the exported model (the DAG leaves
    that to its evaluate stage)."""
    if resume is not None:
        cfg = FinetuneConfig.load_run(resume)
    task = resolve(cfg, resume=resume is not None)
    log(f"cloze finetune: {task.provenance['train_examples']} training / {task.provenance['dev_examples']} dev "
        f"examples, {len(task.labels)} labels, {task.config.max_steps} steps, init {task.config.init}")
    result = fit(task, resume=resume, progress=progress, log=log, callbacks=callbacks)
    test_report = None
    if (evaluate_test and result.model_dir and (task.config.test or task.config.task_name)
            and "://" not in result.model_dir):
        from .evaluate import evaluate_folder

        _, _, test = load_sets(task.config)
        if test is not None:
            test_report = evaluate_folder(result.model_dir, test, output=str(Path(result.run_dir) / "test"))
    return FinetuneResult(result, result.model_dir, test_report)
