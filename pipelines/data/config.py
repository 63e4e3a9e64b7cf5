"""DataConfig: everything `cloze data` (the `pairs` stage) needs, read from the `[data]` table.

Built with pipelines.config's generic machinery, so an unknown key or a bad value raises
ConfigError naming it (`data.max_seq_len: ...`) before any Ray work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, apply_overrides, build_dataclass, load_toml

TASKS = ("nsp", "sop", "shuffle", "mlm")
MASKING = ("dynamic", "static")
BUNDLED = ("bbc", "20ng")

# Fields that change where or how fast a run goes, never what it writes: left out of the
# config hash, so a rerun with more workers or another output folder is still a cache hit.
_NOT_HASHED = ("output", "num_workers", "num_blocks", "cache_dir", "shared_filesystem")
# With dynamic masking the training loader draws the masks (with [pretrain]'s settings):
# these change no shard, so they stay out of the hash (no re-tokenizing for a new
# mask_prob). With static masking the shards hold the masks: hashed.
DYNAMIC_MASKING = ("mask_prob", "max_predictions_per_seq", "whole_word_masking")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How raw documents become pretraining examples (see `cloze data --help`)."""

    inputs: tuple[str, ...] = ("bbc",)  # "bbc", "20ng", "task:NAME[*PASSES]", "opinions", folders / files / s3:// URIs of .txt, .jsonl, .parquet
    output: str = "runs/data"  # the shard folder (manifest.json marks it complete)
    task: str = "nsp"  # nsp | sop | shuffle | mlm: one task per shard set
    max_seq_len: int = 128  # tokens per example, [CLS] and [SEP]s included
    short_seq_prob: float = 0.1  # chance of a shorter random target length, per document
    dupe_factor: int = 1  # passes over the corpus, each with different randomness
    seed: int = 12345  # same seed + same inputs = byte-identical shards
    tokenizer: str = "train"  # "train", or a vocab.txt / tokenizer.json / folder holding one
    vocab_size: int = 8192  # when training (30522 for BERT-size)
    min_frequency: int = 2  # when training
    vocab_max_words: int = 1_000_000  # when training: distinct words kept (most frequent), bounds memory
    lowercase: bool = True  # when training, or loading a bare vocab.txt
    masking: str = "dynamic"  # dynamic: drawn per batch in training ([pretrain] mask_prob ...); static: written in the shards
    mask_prob: float = 0.15  # static masking: share of maskable tokens predicted (80% [MASK], 10% random, 10% kept)
    max_predictions_per_seq: int = 20  # static masking: cap on masked positions per example
    whole_word_masking: bool = False  # static masking: mask every piece of a chosen word together
    text_column: str = "text"  # JSONL field / Parquet column holding a document
    encoding_fallback: str = "cp1252"  # for files that are not UTF-8; "" skips them instead
    max_document_bytes: int = 8 * 1024 * 1024  # larger documents are skipped (too_large), not read
    shard_bytes: int = 1024 * 1024  # input bytes per work unit; one unit = one output shard
    replicate: int = 1  # read the inputs N times (benchmarks: corpus growth); copies get own randomness
    num_workers: int = 0  # Ray tasks at once; 0 = the cluster's CPUs
    num_blocks: int = 0  # Ray tasks the units are cut into; 0 = auto (~8 units a task, >= 2 tasks a worker). Output never depends on it
    cache_dir: str = ""  # where bundled corpora are unpacked; "" = ~/.cache/cloze
    shared_filesystem: bool = False  # a local `output` every node mounts (NFS, ...): allowed on a multi-node cluster

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{key}: {why}, got {getattr(self, key)!r}")

        if not self.inputs or not all(isinstance(i, str) and i for i in self.inputs):
            raise bad("inputs", "expected a non-empty list of paths / bundled corpus names")
        if self.task not in TASKS:
            raise bad("task", f"must be one of {', '.join(TASKS)}")
        if self.masking not in MASKING:
            raise bad("masking", f"must be one of {', '.join(MASKING)}")
        if not 8 <= self.max_seq_len <= 8192:
            raise bad("max_seq_len", "must be in [8, 8192]")
        for key in ("short_seq_prob",):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "must be in [0, 1]")
        if not 0.0 < self.mask_prob < 1.0:
            raise bad("mask_prob", "must be in (0, 1)")
        for key in ("dupe_factor", "vocab_size", "min_frequency", "vocab_max_words", "max_predictions_per_seq",
                    "max_document_bytes", "shard_bytes", "replicate"):
            if getattr(self, key) < 1:
                raise bad(key, "must be a positive integer")
        if self.vocab_size < 100:
            raise bad("vocab_size", "must be at least 100")
        for key in ("num_workers", "num_blocks"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if not self.tokenizer:
            raise bad("tokenizer", 'expected "train" or a path')

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], prefix: str = "data.") -> "DataConfig":
        data = dict(data)
        if isinstance(data.get("inputs"), str):  # --data.inputs bbc,20ng
            data["inputs"] = [s.strip() for s in data["inputs"].split(",") if s.strip()]
        return build_dataclass(cls, data, prefix)

    @classmethod
    def from_toml(cls, path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> "DataConfig":
        """The `[data]` table of a TOML file (or defaults), with dotted overrides applied."""
        raw = load_toml(path) if path else {}
        if overrides:
            raw = apply_overrides(raw, overrides)
        return cls.from_dict(raw.get("data", {}))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["inputs"] = list(self.inputs)
        return d

    def config_hash(self) -> str:
        """sha256 of the fields that decide the output (not where it goes, nor worker counts,
        nor the masking settings of dynamic masking)."""
        skip = _NOT_HASHED + (DYNAMIC_MASKING if self.masking == "dynamic" else ())
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    @property
    def label_column(self) -> str | None:
        return None if self.task == "mlm" else f"{self.task}_label"
