"""`cloze finetune`'s configuration: the `[finetune]` table, checked on the driver before any
Ray work, and the init folder it names (model folder or run folder, its tokenizer and shape)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from encoder.config import EncoderConfig

from .config import ConfigError, apply_overrides, build_dataclass, load_toml
from .train.config import TrainConfig


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(TrainConfig):
    """One fine-tuning run: the `[finetune]` table (+ `[finetune.optimizer]`), `[model]` for
    `init = "random"` without `like`."""

    name: str = "finetune"
    task: str = "sequence"  # sequence | token
    task_name: str = ""  # a built-in task (bbc-topic, newsgroups, movie-sentiment, sms-spam, conll2003) instead of files
    train: str = ""  # labeled file (CSV / JSONL / Parquet; CoNLL or JSONL tokens + tags for token tasks)
    dev: str = ""  # "" = a stratified 10% of train (seeded)
    test: str = ""  # scored once at the end with the selected weights; "" = none
    label_fraction: float = 1.0  # keep this share of the training labels (stratified, seeded): the low-label regime
    init: str = ""  # a model folder (cloze run, cloze model, any HF BERT folder) or "random"
    like: str = ""  # with init = "random": the folder whose shape and tokenizer the fresh model takes
    model: dict[str, Any] = field(default_factory=dict)  # with init = "random" and no `like`: the [model] table
    tokenizer: str = ""  # with init = "random" and no `like`: a folder with vocab.txt / tokenizer.json
    mode: str = "finetune"  # finetune: every weight trains | frozen: the encoder is a fixed feature extractor
    head_lr: float = 0.0  # the classifier's learning rate; 0 = optimizer.lr
    max_seq_len: int = 128  # tokens per example ([CLS] and [SEP] included); longer ones are cut (counted)
    epochs: float = 3.0  # passes over the training set (sets max_steps); 0 = use max_steps
    select_metric: str = "eval/f1"  # macro-F1 (sequence) / entity F1 (token) on dev
    patience: int = 3  # evaluations without a better dev F1 before stopping
    checkpoint_every: int = 0  # 0 = evaluate about 4 times an epoch

    PATH_FIELDS = ("storage_path", "output", "train", "dev", "test", "init", "like", "tokenizer")

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            ("task", self.task in ("sequence", "token"), "must be sequence or token"),
            ("mode", self.mode in ("finetune", "frozen"), "must be finetune or frozen"),
            ("label_fraction", 0.0 < self.label_fraction <= 1.0, "must be in (0, 1]"),
            ("max_seq_len", 8 <= self.max_seq_len <= 8192, "must be in [8, 8192]"),
            ("epochs", self.epochs >= 0, "must be >= 0"),
            ("head_lr", self.head_lr >= 0, "must be >= 0"),
            ("init", bool(self.init), "is required: a model folder or \"random\""),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key} {why}, got {getattr(self, key)!r}")
        if bool(self.task_name) == bool(self.train):
            raise ConfigError("give either train (a labeled file) or task_name (a built-in task)")
        metrics = ("eval/f1", "eval/accuracy") if self.task == "sequence" else ("eval/f1", "eval/precision",
                                                                                 "eval/recall")
        if self.select_metric and self.select_metric not in metrics:
            raise ConfigError(f"select_metric must be one of {', '.join(metrics)} (or \"\" for the last "
                              f"weights), got {self.select_metric!r}")
        if self.init == "random" and not (self.like or self.tokenizer):
            raise ConfigError('init = "random" needs like (a model folder to copy the shape and tokenizer of) '
                              'or tokenizer (+ the [model] table)')

    def absolute(self):
        return dataclasses.replace(super().absolute(), init=self.init if self.init == "random" else
                                   str(Path(self.init).expanduser().resolve()) if "://" not in self.init else self.init)

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], prefix: str = "finetune.") -> "FinetuneConfig":
        return build_dataclass(cls, table, prefix)

    @classmethod
    def from_toml(cls, path, overrides: Mapping[str, Any] | None = None) -> "FinetuneConfig":
        raw = load_toml(path) if path else {}
        if overrides:
            raw = apply_overrides(raw, overrides)
        table = dict(raw.get("finetune", {}))
        if "model" in raw:
            table["model"] = raw["model"]
        return cls.from_dict(table)


def model_folder(path: str, key: str) -> str:
    """A model folder (config.json + model.safetensors); a run folder stands for its `model/`."""
    p = Path(path)
    if not (p / "model.safetensors").is_file() and (p / "model" / "model.safetensors").is_file():
        p = p / "model"  # a cloze run folder (cloze pretrain / cloze run)
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise ConfigError(f"{key}: {path} is not a model folder (needs config.json and model.safetensors)")
    if not ((p / "vocab.txt").is_file() or (p / "tokenizer.json").is_file()):
        raise ConfigError(f"{key}: {path} has no tokenizer (vocab.txt or tokenizer.json)")
    return str(p)


def init_source(cfg: FinetuneConfig) -> tuple[str, EncoderConfig]:
    """(tokenizer folder, encoder shape) of the run."""
    from .pretrain import init_config

    if cfg.init != "random":
        return cfg.init, init_config(cfg.init)
    if cfg.like:
        return cfg.like, init_config(cfg.like)
    from .data.tokenizer import load_tokenizer

    vocab = load_tokenizer(cfg.tokenizer).get_vocab_size(with_added_tokens=True)
    return cfg.tokenizer, EncoderConfig.from_dict({"preset": "tiny", **cfg.model, "vocab_size": vocab}, prefix="model.")
