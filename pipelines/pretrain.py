"""Pretraining: Ray Train `TorchTrainer` with DeepSpeed ZeRO inside each worker (issue 5).

The driver (`pretrain`) only builds and checks the config, launches, and reads results;
everything a worker needs travels in its config dict (`train_loop_per_worker(config)`).

Data: a folder of Parquet pair shards (`input_ids`, `token_type_ids`, `length`, label
columns). Every worker iterates the same ordered stream of *global* batches
(per_worker x workers rows) and keeps its own slice, so a step's data depends only on
(seed, epoch, batch index): a restarted or resumed run sees exactly the batches an
uninterrupted one would, and ZeRO stages can be compared weight for weight.

Run folder (`storage_path/name`): `config.json` (the run config), Ray's `checkpoint_*`
folders (DeepSpeed state, sharded under ZeRO, plus `trainer_state.json`, RNG states and a
per-rank manifest that marks the checkpoint complete), `metrics.csv`, `tb/` (TensorBoard)
and `model/` (the consolidated fp32 export, HF layout + cloze.json).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from encoder import EncoderConfig, MultiObjective, Encoder, flops_per_token, validate_weights
from .config import ConfigError, apply_overrides, build_dataclass, load_toml

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED_DIR = REPO / "cluster" / "deepspeed"
LABEL_COLUMNS = ("nsp_label", "sop_label", "shuffle_label")
DS_TAG = "ds"  # DeepSpeed's tag (sub-folder) inside every Ray checkpoint
# Test hooks (read by the driver, passed to workers in their config): kill one worker
# process after step k (once per run), or stop every worker cleanly after step k.
FAULT_ENV, STOP_ENV = "CLOZE_TEST_KILL_AT_STEP", "CLOZE_TEST_STOP_AT_STEP"


# --------------------------------------------------------------------------- config

@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW; lr warms up linearly for `warmup_steps`, then decays to min_lr_ratio x lr."""

    lr: float = 5e-4
    weight_decay: float = 0.01  # not applied to LayerNorm weights and biases
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    warmup_steps: int = 0
    decay: str = "linear"  # linear | cosine | constant
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 = off

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay, warmup_steps and grad_clip must be >= 0")
        if self.decay not in ("linear", "cosine", "constant"):
            raise ConfigError(f"decay must be linear, cosine or constant, got {self.decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """One pretraining run. TOML: the `[pretrain]` table (+ `[pretrain.optimizer]`,
    `[pretrain.objectives]`) and the `[model]` table (EncoderConfig fields or a `preset`)."""

    data: str = ""  # folder of Parquet pair shards
    init_from: str = ""  # HF / cloze model folder to continue from ("" = fresh weights)
    tokenizer: str = ""  # folder with vocab.txt / tokenizer.json copied into the export
    storage_path: str = "runs"  # local folder or s3:// / gs:// URI
    name: str = "pretrain"
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    objectives: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0})
    generator_fraction: float = 0.25  # ELECTRA generator size, with rtd
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch_size_per_worker: int = 8
    global_batch_size: int = 0  # 0 = batch_size_per_worker x num_workers (no accumulation)
    max_steps: int = 100  # optimizer steps
    max_tokens: int = 0  # also stop after this many real (non-pad) tokens; 0 = off
    max_seq_len: int = 128  # longer rows are truncated
    shuffle_buffer: int = 0  # rows; seeded per epoch, same on every worker
    precision: str = "fp32"  # fp32 | bf16
    zero_stage: int = 2
    offload_optimizer: bool = False  # optimizer states in CPU memory (ZeRO 1-3)
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    seed: int = 0
    mask_prob: float = 0.15
    # (pad, unk, cls, sep, mask) of BERT uncased; used only when the data folder has no tokenizer
    special_token_ids: tuple[int, ...] = (0, 100, 101, 102, 103)
    # steps between metric-only ray.train.report calls; 0 = only with checkpoints. metrics.csv
    # and TensorBoard get every step regardless: a report waits for the controller's poll
    # (Ray Train 2.60: a 1-slot queue drained every 2 s), so reporting every step costs ~2 s/step.
    log_every: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker failures Ray Train recovers from (from the last checkpoint)
    # Held-out evaluation (before the first step, at every checkpoint and at the end): the last
    # `eval_shards` shards of `data` are kept out of training, or `eval_data` names a folder of
    # shards. Up to `eval_batches` global batches, with masks fixed across evaluations.
    eval_shards: int = 0
    eval_data: str = ""
    eval_batches: int = 8

    def __post_init__(self) -> None:
        checks = [
            ("zero_stage", self.zero_stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
            ("precision", self.precision in ("fp32", "bf16"), "must be fp32 or bf16"),
            ("num_workers", self.num_workers >= 1, "must be >= 1"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"),
            ("gpus_per_worker", self.gpus_per_worker > 0, "must be > 0"),
            ("batch_size_per_worker", self.batch_size_per_worker >= 1, "must be >= 1"),
            ("global_batch_size", self.global_batch_size >= 0, "must be >= 0"),
            ("max_steps", self.max_steps >= 1, "must be >= 1"),
            ("max_tokens", self.max_tokens >= 0, "must be >= 0"),
            ("max_seq_len", self.max_seq_len >= 8, "must be >= 8"),
            ("shuffle_buffer", self.shuffle_buffer >= 0, "must be >= 0"),
            ("mask_prob", 0.0 < self.mask_prob < 1.0, "must be in (0, 1)"),
            ("log_every", self.log_every >= 0, "must be >= 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
            ("max_failures", self.max_failures >= -1, "must be >= -1 (-1 = unlimited)"),
            ("eval_shards", self.eval_shards >= 0, "must be >= 0"),
            ("eval_batches", self.eval_batches >= 1, "must be >= 1"),
            ("name", bool(self.name) and "/" not in self.name, "must be a non-empty folder name"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key} {why}, got {getattr(self, key)!r}")
        unit = self.batch_size_per_worker * self.num_workers
        if self.global_batch_size % unit:
            raise ConfigError(
                f"global_batch_size ({self.global_batch_size}) must be divisible by batch_size_per_worker x "
                f"num_workers ({self.batch_size_per_worker} x {self.num_workers} = {unit})")
        if self.eval_shards and self.eval_data:
            raise ConfigError("eval_shards and eval_data: give one (held-out shards of `data`, or another folder)")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer needs zero_stage 1, 2 or 3")
        try:
            validate_weights(self.objectives)
        except ConfigError as e:
            raise ConfigError(str(e)) from None
        enc = self.encoder_config()  # raises ConfigError("model.<key> ...")
        if self.max_seq_len > enc.max_position_embeddings:
            raise ConfigError(f"max_seq_len ({self.max_seq_len}) exceeds model.max_position_embeddings "
                              f"({enc.max_position_embeddings})")
        if len(self.special_token_ids) != 5 or not all(0 <= i < enc.vocab_size for i in self.special_token_ids):
            raise ConfigError(f"special_token_ids must be 5 ids (pad, unk, cls, sep, mask) below vocab_size "
                              f"{enc.vocab_size}, got {list(self.special_token_ids)}")

    @property
    def accumulation(self) -> int:
        """Gradient accumulation steps derived from the global batch."""
        return max(1, self.global_batch_size // (self.batch_size_per_worker * self.num_workers))

    @property
    def effective_global_batch(self) -> int:
        return self.batch_size_per_worker * self.num_workers * self.accumulation

    def encoder_config(self) -> EncoderConfig:
        if self.init_from:  # the checkpoint's shape wins; [model] may only be empty then
            return _init_config(self.init_from)
        return EncoderConfig.from_dict(self.model, prefix="model.")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["special_token_ids"] = list(self.special_token_ids)
        return out

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], prefix: str = "pretrain.") -> "PretrainConfig":
        return build_dataclass(cls, table, prefix)

    @classmethod
    def from_toml(cls, path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None) -> "PretrainConfig":
        """`[pretrain]` + `[model]` of a TOML file; dotted overrides as `pretrain.zero_stage` / `model.hidden_size`."""
        raw = load_toml(path) if path else {}
        if overrides:
            raw = apply_overrides(raw, overrides)
        return cls.from_dict(cls.table_from_raw(raw))

    @staticmethod
    def table_from_raw(raw: Mapping[str, Any]) -> dict[str, Any]:
        """The `[pretrain]` table of a whole run config, with the `[model]` table folded in."""
        table = dict(raw.get("pretrain", {}))
        if "model" in table:
            raise ConfigError("pretrain.model: put the model shape in the [model] table")
        if "model" in raw:
            table["model"] = raw["model"]
        return table


def _init_config(folder: str) -> EncoderConfig:
    p = Path(folder)
    if (p / "cloze.json").is_file():
        return EncoderConfig.from_dict(json.loads((p / "cloze.json").read_text())["encoder_config"])
    if (p / "config.json").is_file():
        return EncoderConfig.from_hf_dict(json.loads((p / "config.json").read_text()))
    raise ConfigError(f"init_from: {folder} is not a model folder (no config.json)")


def load_run_config(run_dir: str | os.PathLike) -> PretrainConfig:
    """The config a run folder was started with, re-rooted at where the folder is now."""
    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"resume: {run_dir} is not a run folder (no config.json)")
    table = json.loads((path / "config.json").read_text())
    table.update(storage_path=str(path.resolve().parent), name=path.resolve().name)
    return PretrainConfig.from_dict(table)


def check_resources(cfg: PretrainConfig, available_cpus: float, available_gpus: float = 0.0) -> None:
    """Raise ConfigError if the cluster cannot place the workers (before Ray starts any)."""
    need = cfg.num_workers * cfg.cpus_per_worker
    if need > available_cpus + 1e-9:
        raise ConfigError(f"num_workers x cpus_per_worker = {cfg.num_workers} x {cfg.cpus_per_worker} = {need:g} "
                          f"CPUs, but the cluster has {available_cpus:g}")
    if cfg.use_gpu and cfg.num_workers * cfg.gpus_per_worker > available_gpus + 1e-9:
        raise ConfigError(f"use_gpu: {cfg.num_workers} workers x {cfg.gpus_per_worker} GPUs, "
                          f"but the cluster has {available_gpus:g}")


SMALL_DATA_BYTES = 64 * 2**20


def _data_source(files: list[str]):
    """(filesystem, paths) to read shards with: URIs (from one `shard_files` call) -> one
    pyarrow filesystem, resolved once from the first (scheme, bucket, query options), and its
    paths; local files -> (None, files)."""
    if not files or "://" not in files[0]:
        return None, files
    import pyarrow.fs as pafs

    from .data.corpus import split_query

    fs, first = pafs.FileSystem.from_uri(files[0])
    head = split_query(files[0])[0]
    prefix = len(head) - len(first)  # "s3://" (s3://bucket/key -> bucket/key)
    return fs, [split_query(f)[0][prefix:] for f in files]


def _total_bytes(files: list[str]) -> int:
    fs, paths = _data_source(files)
    if fs is None:
        return sum(Path(f).stat().st_size for f in files)
    import pyarrow.fs as pafs

    wanted, total = set(paths), 0
    for parent in sorted({p.rsplit("/", 1)[0] for p in paths}):  # a listing per folder, not a request per file
        total += sum(i.size for i in fs.get_file_info(pafs.FileSelector(parent)) if i.path in wanted)
    return total


def shard_files(data: str) -> list[str]:
    """The Parquet shards of a data folder, sorted (the order defines the data stream).
    A URI's shards are URIs with its scheme and query (pyarrow options, e.g. endpoint_override)."""
    if "://" in data:
        import pyarrow.fs as pafs

        from .data.corpus import to_uri

        try:
            fs, root = pafs.FileSystem.from_uri(data)
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        except (OSError, ValueError) as e:  # pyarrow: OSError (I/O), ArrowInvalid (a bad URI)
            raise ConfigError(f"data: cannot list {data!r}: {e}") from None
        files = sorted(to_uri(data, i.path) for i in infos
                       if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    else:
        if not Path(data).is_dir():
            raise ConfigError(f"data: {data!r} is not a folder")
        files = sorted(str(p) for p in Path(data).rglob("*.parquet"))
    if not files:
        raise ConfigError(f"data: no .parquet shards under {data!r}")
    return files


def split_shards(cfg: PretrainConfig) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards): the last `eval_shards` of `data`, or `eval_data`'s."""
    files = shard_files(cfg.data)
    if cfg.eval_data:
        return files, shard_files(cfg.eval_data)
    if not cfg.eval_shards:
        return files, []
    if cfg.eval_shards >= len(files):
        raise ConfigError(f"eval_shards ({cfg.eval_shards}) must leave training shards: {cfg.data!r} has "
                          f"{len(files)}")
    return files[:-cfg.eval_shards], files[-cfg.eval_shards:]


def read_rows(files: list[str], limit: int) -> dict[str, list]:
    """The first `limit` rows of some shards, as python lists (a small held-out set)."""
    import pyarrow.parquet as pq

    fs, paths = _data_source(files)  # a remote folder: one filesystem, with the URI's options
    out: dict[str, list] = {}
    for path in paths:
        have = len(out.get("input_ids", []))
        if have >= limit:
            break
        table = pq.read_table(path, filesystem=fs)
        for name in table.column_names:
            out.setdefault(name, []).extend(table.column(name).to_pylist()[: limit - have])
    return out


# --------------------------------------------------------------------------- DeepSpeed

def deepspeed_config(cfg: PretrainConfig) -> dict:
    """`cluster/deepspeed/zero<stage>.json` with its "auto" values filled from the run config."""
    template = json.loads((DEEPSPEED_DIR / f"zero{cfg.zero_stage}.json").read_text())
    values = {
        "train_batch_size": cfg.effective_global_batch,
        "train_micro_batch_size_per_gpu": cfg.batch_size_per_worker,
        "gradient_accumulation_steps": cfg.accumulation,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "bf16.enabled": cfg.precision == "bf16",
        "zero_optimization.offload_optimizer.device": "cpu" if cfg.offload_optimizer else "none",
    }
    # Buffer sizes from the model's width, as HF's DeepSpeed integration does (H^2 elements),
    # with a 1 Mi-element floor: DeepSpeed allocates some of them whole, so a fixed 5e7 (200 MB
    # in fp32) dwarfed the model states of small models and hid ZeRO-3's saving.
    hidden = cfg.encoder_config().hidden_size
    bucket = max(hidden * hidden, 2**20)
    values.update({"zero_optimization.reduce_bucket_size": bucket, "zero_optimization.allgather_bucket_size": bucket,
                   "zero_optimization.stage3_prefetch_bucket_size": bucket,
                   "zero_optimization.stage3_param_persistence_threshold": 10 * hidden})

    def fill(node: dict, prefix: str) -> dict:
        out = {}
        for key, value in node.items():
            dotted = prefix + key
            if isinstance(value, dict):
                out[key] = fill(value, dotted + ".")
            elif value == "auto":
                if dotted not in values:
                    raise KeyError(f"zero{cfg.zero_stage}.json: no run-config value for {dotted}")
                out[key] = values[dotted]
            else:
                out[key] = value
        return out

    return fill(template, "")


def torch_extensions_dir() -> str:
    """Where DeepSpeed's JIT ops are cached across runs (so the shm op builds once, not per run)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    if os.access(REPO, os.W_OK) and (REPO / "pyproject.toml").is_file():
        return str(REPO / ".torch_extensions")
    return str(Path.home() / ".cache" / "cloze" / "torch_extensions")


# --------------------------------------------------------------------------- model and optimizer

def build_model(cfg: PretrainConfig) -> MultiObjective:
    """Fresh weights (seeded), or an imported checkpoint whose missing heads start fresh."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        from encoder.hf import load_pretrained

        return load_pretrained(cfg.init_from, kind="pretraining", objectives=cfg.objectives,
                               generator_fraction=cfg.generator_fraction)
    return MultiObjective(Encoder(cfg.encoder_config()), cfg.objectives, generator_fraction=cfg.generator_fraction)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: LayerNorm weights and biases (all 1-d tensors) get none."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # tied weights are listed once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupDecay:
    """lr multiplier at optimizer step s: linear warmup, then linear / cosine / no decay.

    A class, not a lambda, so LambdaLR's state_dict (saved in checkpoints) carries it."""

    def __init__(self, warmup: int, total: int, decay: str, min_ratio: float):
        self.warmup, self.total, self.decay, self.min_ratio = warmup, total, decay, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.decay == "constant":
            return 1.0
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 1.0 - frac if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


# --------------------------------------------------------------------------- data

def build_collator(cfg: PretrainConfig, vocab_size: int):
    """The shared collator (`pipelines.data.collate`): masking settings and special ids from the
    data folder's manifest + tokenizer when it has them, else from this config."""
    from .data.collate import PretrainCollator
    from .data.tokenizer import SpecialIds

    if "://" not in cfg.data and (Path(cfg.data) / "manifest.json").is_file():
        collate = PretrainCollator.from_folder(cfg.data, seed=cfg.seed)
    else:
        pad, unk, cls, sep, mask = cfg.special_token_ids
        special = SpecialIds(pad=pad, unk=unk, cls=cls, sep=sep, mask=mask, vocab_size=vocab_size)
        collate = PretrainCollator(special, mask_prob=cfg.mask_prob, max_predictions=None, seed=cfg.seed)
    if collate.special.vocab_size > vocab_size:
        raise ConfigError(f"data: the tokenizer has {collate.special.vocab_size} ids, the model's "
                          f"vocab_size is {vocab_size}")
    return collate


def seeded_batch(collate, rows: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Collate with the collator's mask generator reseeded: a batch is a function of its seed."""
    collate.generator.manual_seed(seed)
    return collate(rows)


def batch_seed(seed: int, epoch: int, index: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + index * 101 + rank) % (2**63)


def slice_rows(rows: Mapping[str, Any], start: int, size: int, max_seq_len: int) -> dict[str, Any]:
    """Rows [start, start + size) of a column batch, as the collator takes them: token
    columns as arrays cut to max_seq_len (longer rows are truncated), label columns as arrays."""
    out = {k: [np.asarray(x)[:max_seq_len] for x in rows[k][start:start + size]] for k in ("input_ids", "token_type_ids")}
    out.update({k: np.asarray(rows[k][start:start + size]) for k in LABEL_COLUMNS if k in rows})
    return out


def worker_batches(shard, cfg: PretrainConfig, rank: int, world: int, collate,
                   epoch: int, skip: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, index, batch) forever: global batch `index` of `epoch`, this rank's slice.

    Every rank reads the same ordered stream (the dataset is not split), so the position
    (epoch, index) fully names the data; `skip` global batches of the first epoch are
    passed over (a resumed run)."""
    B = cfg.batch_size_per_worker
    while True:
        kwargs = {}
        if cfg.shuffle_buffer:
            kwargs = dict(local_shuffle_buffer_size=cfg.shuffle_buffer, local_shuffle_seed=cfg.seed + epoch)
        seen = 0
        for index, rows in enumerate(shard.iter_batches(batch_size=B * world, batch_format="numpy",
                                                        drop_last=True, **kwargs)):
            seen += 1
            if index < skip:
                continue
            mine = slice_rows(rows, rank * B, B, cfg.max_seq_len)
            yield epoch, index, seeded_batch(collate, mine, batch_seed(cfg.seed, epoch, index, rank))
        if seen == 0:
            raise ValueError(f"the dataset has fewer rows than one global batch ({B} x {world})")
        epoch, skip = epoch + 1, 0


# --------------------------------------------------------------------------- checkpoints

def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why a checkpoint folder cannot be used (None = complete).

    Every rank writes `manifest.rank<r>.json` (its files and their sizes) after its files;
    a checkpoint is complete when all ranks' manifests exist and every file matches."""
    p = Path(path)
    state = p / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        world = json.loads(state.read_text())["world_size"]
        for r in range(world):
            m = p / f"manifest.rank{r}.json"
            if not m.is_file():
                return f"rank {r} never finished writing (no {m.name})"
            for name, size in json.loads(m.read_text()).items():
                f = p / name
                if not f.is_file():
                    return f"missing file {name}"
                if f.stat().st_size != size:
                    return f"{name} is {f.stat().st_size} bytes, expected {size} (truncated?)"
    except (ValueError, KeyError, OSError) as e:
        return f"unreadable manifest ({e})"
    return None


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(json.loads((Path(path) / "trainer_state.json").read_text())["step"])


def latest_valid_checkpoint(run_dir: str | os.PathLike, log=print) -> str | None:
    """The newest complete checkpoint of a run folder; incomplete ones are skipped, with a message."""
    cands = [p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()]
    found = []
    for p in cands:
        problem = checkpoint_problem(p)
        if problem:
            log(f"cloze pretrain: skipping checkpoint {p}: {problem}")
        else:
            found.append((checkpoint_step(p), str(p)))
    return max(found)[1] if found else None


def _save_checkpoint(engine, folder: Path, state: dict, rank: int) -> None:
    """DeepSpeed state (each rank its own shards) + trainer state + RNG + this rank's manifest."""
    engine.save_checkpoint(str(folder), tag=DS_TAG)
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               folder / f"rng.rank{rank}.pt")
    if rank == 0:
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))
    # each rank saves into its own folder, so everything in it is this rank's part
    manifest = {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*")
                if f.is_file() and not f.name.startswith(("manifest.", ".manifest."))}
    tmp = folder / f".manifest.rank{rank}.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.rename(folder / f"manifest.rank{rank}.json")  # written last: marks this rank's part complete


def _load_checkpoint(engine, folder: str, rank: int) -> dict:
    load_path, _ = engine.load_checkpoint(folder, tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {folder}")
    rng = torch.load(Path(folder) / f"rng.rank{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((Path(folder) / "trainer_state.json").read_text())


# --------------------------------------------------------------------------- metrics

def gemm_peak_flops(size: int = 1024, seconds: float = 1.0, trials: int = 10) -> float:
    """Measured fp32 GEMM FLOP/s of this process's threads (the CPU 'peak' for MFU): the best
    of `trials` short timings, so a moment of contention from other processes does not lower
    the peak (which would inflate MFU)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up
    best = 0.0
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while True:
            a @ b
            n += 1
            dt = time.perf_counter() - t0
            if dt >= seconds / trials:
                best = max(best, 2.0 * size**3 * n / dt)
                break
    return best


GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def cpu_peak_flops(threads: int) -> float:
    """The GEMM probe with `threads` torch threads (a worker's share of a node), kept as the
    best value ever measured on this machine (~/.cache/cloze/peak_flops.json): a peak is a
    maximum, and one probe that meets other processes' load would inflate every MFU of a run."""
    keep = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        measured = gemm_peak_flops()
    finally:
        torch.set_num_threads(keep)
    cache = Path(os.environ.get("CLOZE_CACHE_DIR", Path.home() / ".cache" / "cloze")) / "peak_flops.json"
    key = f"{cpu_model()}|{max(1, threads)} threads|torch {torch.__version__}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    best = max(measured, float(known.get(key, 0.0)))
    if best > float(known.get(key, 0.0)):
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({**known, key: best}, indent=1))
            tmp.replace(cache)
        except OSError:
            pass
    return best


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_peak_flops(use_gpu: bool) -> float:
    if use_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_BF16_PEAK.items():
            if key in name:
                return peak
        return 0.0  # unknown GPU: MFU is reported as 0
    return gemm_peak_flops()


class MetricsWriter:
    """metrics.csv (+ eval.csv) + TensorBoard events in the run folder (rank 0). A restarted
    worker re-writes the steps after its checkpoint; readers keep the last row per step."""

    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder else None
        self.columns: dict[str, list[str]] = {}
        self.tb = None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.folder / "tb"))
            except Exception:  # tensorboard not installed: CSV only
                self.tb = None

    def write(self, metrics: Mapping[str, float], file: str = "metrics.csv") -> None:
        if not self.folder:
            return
        path = self.folder / file
        if file not in self.columns:
            self.columns[file] = list(metrics)
            if path.is_file() and path.stat().st_size:
                with path.open() as f:
                    self.columns[file] = next(csv.reader(f))
            else:
                with path.open("w", newline="") as f:
                    csv.writer(f).writerow(self.columns[file])
        with path.open("a", newline="") as f:
            csv.writer(f).writerow([metrics.get(c, "") for c in self.columns[file]])
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, int(metrics["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | os.PathLike, file: str = "metrics.csv") -> list[dict[str, float]]:
    """Rows of metrics.csv (or eval.csv), one per step (the last written wins), in step order."""
    path = Path(run_dir) / file
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            rows[int(row["step"])] = {k: float(v) for k, v in row.items() if v not in ("", None)}
    return [rows[s] for s in sorted(rows)]


EVAL_EPOCH = -1  # seeds the held-out batches' masks: the same at every evaluation


def evaluate(engine, rows: Mapping[str, list], cfg: PretrainConfig, rank: int, world: int, collate,
             device) -> dict[str, float]:
    """Held-out metrics: each rank takes its slice of every global eval batch (so ZeRO-3
    ranks run the same number of forwards); losses and accuracies are averaged over
    labelled positions across ranks. Keys: eval/loss, eval/<objective>/{loss,acc}."""
    B = cfg.batch_size_per_worker
    n = min(cfg.eval_batches, len(rows.get("input_ids", [])) // (B * world))
    if n == 0:
        raise ValueError(f"the held-out set has fewer rows than one global batch ({B} x {world})")
    sums: dict[str, float] = {}
    engine.eval()
    with torch.no_grad():
        for e in range(n):
            mine = slice_rows(rows, (e * world + rank) * B, B, cfg.max_seq_len)
            batch = seeded_batch(collate, mine, batch_seed(cfg.seed, EVAL_EPOCH, e, rank))
            out = engine({k: v.to(device) for k, v in batch.items()})
            metrics = {k: float(v) for k, v in out.metrics.items()}
            sums["loss"] = sums.get("loss", 0.0) + metrics["loss"]
            for key, count in metrics.items():
                if key.endswith("/count"):
                    name = key[: -len("/count")]
                    for part in ("loss", "acc"):
                        sums[f"{name}/{part}"] = sums.get(f"{name}/{part}", 0.0) + metrics[f"{name}/{part}"] * count
                    sums[key] = sums.get(key, 0.0) + count
    engine.train()
    names = sorted(sums)
    vec = torch.tensor([sums[k] for k in names], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(vec)
    total = dict(zip(names, vec.tolist()))
    out = {"eval/loss": total["loss"] / (n * world)}
    for key in names:
        if key.endswith("/count"):
            name = key[: -len("/count")]
            for part in ("loss", "acc"):
                out[f"eval/{name}/{part}"] = total[f"{name}/{part}"] / max(total[key], 1.0)
    return out


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (views and shared storages once):
    after a step that is the model states (parameters, gradients, optimizer states, ZeRO
    partitions and buffers) plus a batch."""
    import gc

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                if storage.data_ptr():
                    seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        except Exception:  # a tensor subclass without storage
            continue
    return sum(seen.values())


def max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def gather_per_rank(value: float, rank: int, world: int) -> list[float]:
    vec = torch.zeros(world, dtype=torch.float64)
    vec[rank] = value
    if world > 1:
        torch.distributed.all_reduce(vec)
    return vec.tolist()


def _write_memory(engine, cfg: PretrainConfig, run: dict, rank: int, world: int, step: int) -> None:
    """memory.json (rank 0): every rank's live tensor bytes and peak RSS, mid-step."""
    tensors, rss = gather_per_rank(live_tensor_bytes(), rank, world), gather_per_rank(max_rss_bytes(), rank, world)
    if rank == 0 and run.get("metrics_dir"):
        params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        (Path(run["metrics_dir"]) / "memory.json").write_text(json.dumps(
            {"measured": f"step {step}, after backward, before the optimizer update", "zero_stage": cfg.zero_stage,
             "precision": cfg.precision, "offload_optimizer": cfg.offload_optimizer, "world_size": world,
             "parameters": params, "live_tensor_bytes": tensors, "max_rss_bytes": rss}, indent=2))


# --------------------------------------------------------------------------- the worker

def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: DeepSpeed engine, data slice, steps, checkpoints, export.

    config: {"pretrain": PretrainConfig.to_dict(), "deepspeed": dict, "run": {run_dir,
    metrics_dir, export_dir, resume_from, torch_extensions_dir, fault_at_step,
    fault_marker, stop_at_step}}"""
    run = config["run"]
    os.environ["TORCH_EXTENSIONS_DIR"] = run["torch_extensions_dir"]  # before DeepSpeed builds an op
    import deepspeed
    import ray.train
    import ray.train.torch

    cfg = PretrainConfig.from_dict(config["pretrain"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")

    model = build_model(cfg)
    enc_cfg = model.config
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optimizer.weight_decay), lr=cfg.optimizer.lr,
                                  betas=(cfg.optimizer.beta1, cfg.optimizer.beta2), eps=cfg.optimizer.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(
        cfg.optimizer.warmup_steps, cfg.max_steps, cfg.optimizer.decay, cfg.optimizer.min_lr_ratio))
    engine, _, _, schedule = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                  config=config["deepspeed"])

    # Resume: the newest complete checkpoint of Ray's (after a worker failure) or the driver's pick.
    state = {"step": 0, "epoch": 0, "index": 0, "tokens": 0, "samples": 0}
    candidates = []
    ckpt = ray.train.get_checkpoint()
    with (ckpt.as_directory() if ckpt else _nullpath()) as ray_dir:
        for path in (ray_dir, run.get("resume_from")):
            if path and checkpoint_problem(path) is None:
                candidates.append((checkpoint_step(path), path))
            elif path and rank == 0:
                print(f"cloze pretrain: skipping checkpoint {path}: {checkpoint_problem(path)}")
        if candidates:
            state = _load_checkpoint(engine, max(candidates)[1], rank)

    collate = build_collator(cfg, enc_cfg.vocab_size)
    batches = worker_batches(ray.train.get_dataset_shard("train"), cfg, rank, world, collate,
                             state["epoch"], state["index"])
    # CPU: the driver's GEMM probe with this worker's thread count (probing here would race
    # the other workers and this worker's own data thread, and a low peak inflates MFU)
    peak = run.get("cpu_peak_flops") if not cfg.use_gpu and run.get("cpu_peak_flops") else device_peak_flops(cfg.use_gpu)
    writer = MetricsWriter(run.get("metrics_dir") if rank == 0 else None)
    step, tokens_seen, samples_seen = state["step"], state["tokens"], state["samples"]
    start_step = step
    metrics: dict[str, float] = {}
    held_out = read_rows(run["eval_files"], cfg.eval_batches * cfg.batch_size_per_worker * world) \
        if run.get("eval_files") else None

    def held_out_eval(at_step: int) -> dict[str, float]:
        if held_out is None:
            return {}
        result = evaluate(engine, held_out, cfg, rank, world, collate, device)
        writer.write({"step": at_step, **result, "time": time.time()}, file="eval.csv")
        return result

    if step == 0:
        held_out_eval(0)  # the starting point the final evaluation is compared with
    engine.train()
    while step < cfg.max_steps and not (cfg.max_tokens and tokens_seen >= cfg.max_tokens):
        t0 = time.perf_counter()
        lr = schedule.get_last_lr()[0]
        sums: dict[str, float] = {}
        tokens = samples = flops = 0.0
        stage0_norm = None
        for _ in range(cfg.accumulation):
            epoch, index, batch = next(batches)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out = engine(batch)
            engine.backward(out.loss)
            if cfg.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
                # DeepSpeed computes no norm for an fp32 ZeRO-0 step; grads are whole (and averaged) here
                grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
                stage0_norm = float(torch.stack(grads).norm()) if grads else 0.0
            if step == start_step + 1 and engine.is_gradient_accumulation_boundary():
                # this worker's 2nd step, before the update: gradients are alive and the optimizer
                # states exist (they appear at the first update), so model states are all allocated
                _write_memory(engine, cfg, run, rank, world, step + 1)
            engine.step()  # DeepSpeed steps the optimizer and lr schedule at the accumulation boundary
            for k, v in out.metrics.items():
                if not k.endswith("/count"):
                    sums[k] = sums.get(k, 0.0) + float(v)
            n = float(batch["attention_mask"].sum())
            tokens, samples = tokens + n, samples + batch["input_ids"].shape[0]
            flops += n * flops_per_token(enc_cfg, batch["input_ids"].shape[1])
        step += 1
        names = sorted(sums)
        # one all-reduce per step: mean metrics over ranks and micro-batches, summed counts
        vec = torch.tensor([sums[k] for k in names] + [tokens, samples, flops], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(vec)
        dt = time.perf_counter() - t0
        tokens_seen += int(vec[-3])
        samples_seen += int(vec[-2])
        grad_norm = stage0_norm if cfg.zero_stage == 0 else engine.get_global_grad_norm()
        metrics = {"step": step, **{k: float(vec[i]) / (world * cfg.accumulation) for i, k in enumerate(names)},
                   "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "tokens_per_s": float(vec[-3]) / dt, "samples_per_s": float(vec[-2]) / dt,
                   "mfu": float(vec[-1]) / dt / (peak * world) if peak else 0.0,
                   "tokens": tokens_seen, "samples": samples_seen, "epoch": epoch, "batch_index": index,
                   "step_time_s": dt, "max_rss_mb": max_rss_bytes() / 2**20, "time": time.time()}
        writer.write(metrics)
        state = {"step": step, "epoch": epoch, "index": index + 1, "tokens": tokens_seen,
                 "samples": samples_seen, "world_size": world}
        done = step >= cfg.max_steps or (cfg.max_tokens and tokens_seen >= cfg.max_tokens)
        stop = run.get("stop_at_step") == step
        if done or stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            metrics.update(held_out_eval(step))
            with tempfile.TemporaryDirectory(prefix="cloze-ckpt-") as tmp:
                _save_checkpoint(engine, Path(tmp), state, rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_{step:08d}")
        elif cfg.log_every and step % cfg.log_every == 0:
            ray.train.report(metrics)
        if run.get("fault_at_step") == step and rank == world - 1 and not Path(run["fault_marker"]).exists():
            Path(run["fault_marker"]).write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)  # the test hook: a worker dies mid-run
        if stop:
            writer.close()
            return
    writer.close()
    _export(engine, cfg, run, metrics, rank)


class _nullpath:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _export(engine, cfg: PretrainConfig, run: dict, metrics: dict, rank: int) -> None:
    """Consolidated fp32 weights (gathered across ranks under ZeRO-3) -> HF folder + cloze.json."""
    import deepspeed

    master: dict[str, torch.Tensor] = {}
    if cfg.precision == "bf16":  # the optimizer's fp32 master weights, not their bf16 copies (every rank: a gather)
        from deepspeed.utils import safe_get_full_fp32_param

        for name, p in engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is not None:
                master[name] = full.detach().to("cpu", torch.float32).clone()
    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.zero_stage == 3 else _nullpath()
    with gather:
        if rank == 0:
            state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in engine.module.state_dict().items()}
            tied = {id(v): k for k, v in engine.module.named_parameters()}  # state_dict lists tied weights twice
            for k, v in engine.module.state_dict(keep_vars=True).items():
                if tied.get(id(v)) in master:
                    state[k] = master[tied[id(v)]]
    if rank != 0 or not run.get("export_dir"):
        return
    from encoder.hf import save_pretrained

    model = MultiObjective(Encoder(engine.module.config), cfg.objectives, generator_fraction=cfg.generator_fraction)
    model.load_state_dict(state)
    meta = {"pretrain_config": cfg.to_dict(), "final_metrics": metrics, "steps": metrics.get("step")}
    dest = run["export_dir"]
    if "://" in dest:  # cluster storage: write locally, then copy up
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, Path(tmp) / "model", tokenizer=cfg.tokenizer or None, metadata=meta)
            pafs.copy_files(str(Path(tmp) / "model"), dest)
    else:
        save_pretrained(model, dest, tokenizer=cfg.tokenizer or None, metadata=meta)


# --------------------------------------------------------------------------- the driver

@dataclass
class PretrainResult:
    run_dir: str
    model_dir: str | None
    metrics: dict[str, float]
    checkpoint: str | None
    evals: list[dict[str, float]] = field(default_factory=list)  # eval.csv: held-out metrics by step


def _progress(run_dir: Path, total: int, stop: threading.Event) -> None:
    """tqdm bar with ETA, fed from metrics.csv while fit() runs."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="pretrain", unit="step")
    while not stop.wait(0.5):
        rows = read_metrics(run_dir)
        if rows:
            last = rows[-1]
            bar.n = int(last["step"])
            bar.set_postfix(loss=f"{last.get('loss', float('nan')):.3f}", tok_s=f"{last.get('tokens_per_s', 0):.0f}")
            bar.refresh()
    rows = read_metrics(run_dir)
    bar.n = int(rows[-1]["step"]) if rows else bar.n
    bar.close()


def pretrain(cfg: PretrainConfig, resume: str | os.PathLike | None = None, progress: bool = True,
             log=print) -> PretrainResult:
    """Check, launch, and read the result of one run. `resume`: an existing run folder."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = absolute_paths(cfg)  # workers do not run in this process's working directory
    files, eval_files = split_shards(cfg)
    if cfg.init_from:
        _init_config(cfg.init_from)
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from .data.corpus import join_path, to_uri

    remote = "://" in cfg.storage_path
    run_dir = join_path(cfg.storage_path, cfg.name)  # a URI keeps its query (pyarrow options)
    if not remote:
        run_dir = str(Path(cfg.storage_path) / cfg.name)
    resume_from = None
    if resume is not None:
        if remote:
            raise ConfigError("--resume reads a local run folder; remote runs resume through Ray's own state")
        if not Path(run_dir).is_dir():
            raise ConfigError(f"resume: {run_dir} is not a run folder")
        resume_from = latest_valid_checkpoint(run_dir, log=log)
        log(f"cloze pretrain: resuming {run_dir} from {resume_from or 'the start (no complete checkpoint)'}")
    elif not remote and any(p.is_dir() for p in Path(run_dir).glob("checkpoint_*")):
        raise ConfigError(f"run folder {run_dir} already has checkpoints: pass --resume {run_dir} or pick another name")
    store_fs, run_path = None, None
    if remote:  # Ray Train gets the filesystem itself: the URI's query options reach it and its workers
        try:
            store_fs, store_path = pafs.FileSystem.from_uri(cfg.storage_path)
            run_path = f"{store_path.rstrip('/')}/{cfg.name}"
            found = store_fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
        except (OSError, ValueError) as e:
            raise ConfigError(f"storage_path: cannot open {cfg.storage_path!r}: {e}") from None
        if any(i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_") for i in found):
            raise ConfigError(f"run folder {run_dir} already has checkpoints: pick another name")

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    res = ray.cluster_resources()
    check_resources(cfg, res.get("CPU", 0.0), res.get("GPU", 0.0))
    ds_config = deepspeed_config(cfg)

    local_dir = run_dir if not remote else tempfile.mkdtemp(prefix=f"cloze-{cfg.name}-")
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    (Path(local_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    ext_dir = torch_extensions_dir()
    Path(ext_dir).mkdir(parents=True, exist_ok=True)
    run = {"run_dir": run_dir, "metrics_dir": local_dir, "export_dir": join_path(run_dir, "model"),
           "resume_from": resume_from, "torch_extensions_dir": ext_dir, "eval_files": eval_files,
           "cpu_peak_flops": None if cfg.use_gpu else cpu_peak_flops(int(cfg.cpus_per_worker)),
           "fault_at_step": int(os.environ[FAULT_ENV]) if os.environ.get(FAULT_ENV) else None,
           "fault_marker": str(Path(local_dir) / ".fault_injected"),
           "stop_at_step": int(os.environ[STOP_ENV]) if os.environ.get(STOP_ENV) else None}

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # the data stream's order is part of the run
    data_fs, paths = _data_source(files)  # a remote folder: one filesystem, with the URI's options
    if _total_bytes(files) <= SMALL_DATA_BYTES:
        # a small corpus is read here and put in the object store whole: no read tasks to schedule
        dataset = ray.data.from_arrow([pq.read_table(f, filesystem=data_fs) for f in paths])
    elif res.get("CPU", 0.0) - cfg.num_workers * cfg.cpus_per_worker < 1.0:
        # Ray Data's read tasks would wait forever for a CPU the workers hold: read it all now
        log("cloze pretrain: no CPU left beside the workers; materializing the dataset before training")
        dataset = ray.data.read_parquet(paths, filesystem=data_fs).materialize()
    else:
        dataset = ray.data.read_parquet(paths, filesystem=data_fs)  # streamed by read tasks beside the workers
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"pretrain": cfg.to_dict(), "deepspeed": ds_config, "run": run},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=store_path if remote else cfg.storage_path,
            storage_filesystem=store_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": ext_dir}}),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # every rank reads the ordered stream
    )
    stop = threading.Event()
    bar = threading.Thread(target=_progress, args=(Path(local_dir), cfg.max_steps, stop), daemon=True)
    if progress:
        bar.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if progress:
            bar.join()
    model_dir = join_path(run_dir, "model")
    if remote:
        # config.json and the metrics files (written where rank 0 runs: here on a one-node cluster)
        pafs.copy_files(local_dir, run_path, destination_filesystem=store_fs)
        if store_fs.get_file_info(f"{run_path}/model/cloze.json").type != pafs.FileType.File:
            model_dir = None
    elif not Path(model_dir, "cloze.json").is_file():
        model_dir = None  # stopped before the end (test hook)
    ckpt = result.checkpoint.path if result.checkpoint else None
    if ckpt and remote:
        ckpt = to_uri(cfg.storage_path, ckpt)
    return PretrainResult(run_dir=run_dir, model_dir=model_dir, metrics=dict(result.metrics or {}), checkpoint=ckpt,
                          evals=read_metrics(local_dir, "eval.csv"))


def absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """The config with its local paths made absolute (URIs and empty values stay)."""
    changes = {}
    for key in ("data", "eval_data", "tokenizer", "init_from", "storage_path"):
        value = getattr(cfg, key)
        if value and "://" not in value:
            changes[key] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(cfg, **changes)


def held_out_summary(evals: list[dict[str, float]], prog: str = "cloze pretrain") -> str:
    """'<prog>: held-out mlm acc 0.001 -> 0.212, ... (step 0 -> 200)' from eval.csv rows."""
    first, last = evals[0], evals[-1]
    parts = [f"{k[len('eval/'):-len('/acc')]} acc {first[k]:.3f} -> {last[k]:.3f}"
             for k in sorted(last) if k.startswith("eval/") and k.endswith("/acc") and k in first]
    parts.append(f"loss {first['eval/loss']:.3f} -> {last['eval/loss']:.3f}")
    return f"{prog}: held-out {', '.join(parts)} (step {first['step']:.0f} -> {last['step']:.0f})"


# --------------------------------------------------------------------------- synthetic data

def synthetic_pair_shards(folder: str | os.PathLike, rows: int = 32, shards: int = 2, vocab_size: int = 128,
                          max_len: int = 24, seed: int = 0) -> Path:
    """Parquet pair shards of random tokens in the pair-shard schema (smoke runs, tests, benchmarks).

    Rows are `[CLS] A [SEP] B [SEP]` with ids in [110, vocab_size) (clear of BERT's specials)
    and random 0/1 labels in every label column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    per = -(-rows // shards)
    for s in range(shards):
        n = min(per, rows - s * per)
        ids, types = [], []
        for _ in range(n):
            la = int(rng.integers(2, max(3, max_len // 2 - 2)))
            lb = int(rng.integers(2, max(3, max_len - la - 3)))
            a = [101, *rng.integers(110, vocab_size, la).tolist(), 102]
            b = [*rng.integers(110, vocab_size, lb).tolist(), 102]
            ids.append(a + b)
            types.append([0] * len(a) + [1] * len(b))
        table = {"input_ids": pa.array(ids, pa.list_(pa.int32())),
                 "token_type_ids": pa.array(types, pa.list_(pa.int32())),
                 "length": pa.array([len(x) for x in ids], pa.int32())}
        for col in LABEL_COLUMNS:
            table[col] = pa.array(rng.integers(0, 2, n), pa.int64())
        pq.write_table(pa.table(table), out / f"part-{s:05d}.parquet")
    return out
