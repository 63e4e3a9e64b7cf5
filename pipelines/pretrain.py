"""Pretraining: the objective mix over `cloze data` pair shards, as a task of the training
core (`pipelines.train`: Ray Train + DeepSpeed ZeRO, checkpoints, metrics, exact resume).

The shard folder's manifest is the one source of truth for what the data decided:
vocabulary size, special token ids, max sequence length, label columns, static masks. The
driver reads it (local path or URI) before any Ray work: a [pretrain] / [model] value that
disagrees with it, or an objective whose label column the shards lack, is a ConfigError.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from encoder import EncoderConfig, Encoder, MultiObjective, validate_weights

from .config import ConfigError, apply_overrides, build_dataclass, load_toml
from .data.collate import PretrainCollator
from .data.manifest import read_manifest
from .data.loader import EVAL, describe, mix_seed, open_files, read_rows, to_model_rows
from .data.tokenizer import SpecialIds
from .storage import join_path, read_bytes
from .train import Callback, TrainConfig, TrainResult, fit
from .train.task import ShardTask
from .train.metrics import held_out_summary, read_metrics  # noqa: F401  (re-exported for callers)

TOKEN_COLUMNS = ("input_ids", "token_type_ids", "mlm_labels")
LABELS = {"nsp": "nsp_label", "sop": "sop_label", "shuffle": "shuffle_label"}  # objectives that need a column


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(TrainConfig):
    """One pretraining run. TOML: the `[pretrain]` table (+ `[pretrain.optimizer]`,
    `[pretrain.objectives]`) and the `[model]` table (EncoderConfig fields or a `preset`).
    Zero / empty values of data-derived fields mean "what the shard manifest says"."""

    name: str = "pretrain"
    data: str = ""  # folder (or URI) of `cloze data` shards: required
    init_from: str = ""  # HF / cloze model folder to continue from ("" = fresh weights)
    tokenizer: str = ""  # folder with vocab.txt / tokenizer.json for the export; "" = the data folder's
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    objectives: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0})
    generator_fraction: float = 0.25  # ELECTRA generator size, with rtd
    # continuing a checkpoint (init_from) that lacks a head: its fresh weights would otherwise
    # send random gradients into a trained encoder for the first steps
    encoder_hold_steps: int = 0  # first steps with the encoder's lr at 0 (only heads train); its schedule starts after
    head_lr: float = 0.0  # the objective heads' learning rate (fresh heads may want more); 0 = optimizer.lr
    max_seq_len: int = 0  # 0 = the manifest's (an explicit value must equal it)
    special_token_ids: tuple[int, ...] = ()  # (pad, unk, cls, sep, mask); () = the manifest's
    # dynamic masking (the collator draws masks per batch; shards written with static masks carry their own)
    mask_prob: float = 0.15
    max_predictions_per_seq: int = 0  # 0 = ceil(mask_prob x max_seq_len)
    whole_word_masking: bool = False
    # held-out evaluation (before step 1, at every checkpoint, at the end): the last `eval_shards`
    # shards of `data` (the data stage spreads documents over shards at random), or `eval_data`
    eval_shards: int = 0
    eval_data: str = ""

    PATH_FIELDS = ("storage_path", "output", "data", "eval_data", "tokenizer", "init_from")

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            ("max_seq_len", self.max_seq_len == 0 or self.max_seq_len >= 8, "must be 0 (the data's) or >= 8"),
            ("mask_prob", 0.0 < self.mask_prob < 1.0, "must be in (0, 1)"),
            ("max_predictions_per_seq", self.max_predictions_per_seq >= 0, "must be >= 0"),
            ("eval_shards", self.eval_shards >= 0, "must be >= 0"),
            ("head_lr", self.head_lr >= 0, "must be >= 0"),
            ("encoder_hold_steps", 0 <= self.encoder_hold_steps <= self.max_steps,
             "must be in [0, max_steps] (max_steps: only the heads train)"),
            ("special_token_ids", len(self.special_token_ids) in (0, 5), "must be 5 ids (pad, unk, cls, sep, mask)"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key} {why}, got {getattr(self, key)!r}")
        if self.eval_shards and self.eval_data:
            raise ConfigError("eval_shards and eval_data: give one (held-out shards of `data`, or another folder)")
        validate_weights(self.objectives)
        enc = self.encoder_config()  # raises ConfigError("model.<key> ...")
        if self.max_seq_len > enc.max_position_embeddings:
            raise ConfigError(f"max_seq_len ({self.max_seq_len}) exceeds model.max_position_embeddings "
                              f"({enc.max_position_embeddings})")

    def encoder_config(self) -> EncoderConfig:
        if self.init_from:  # the checkpoint's shape wins; [model] may only be empty then
            return init_config(self.init_from)
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


def init_config(folder: str) -> EncoderConfig:
    p = Path(folder)
    if (p / "cloze.json").is_file():
        return EncoderConfig.from_dict(json.loads((p / "cloze.json").read_text())["encoder_config"])
    if (p / "config.json").is_file():
        return EncoderConfig.from_hf_dict(json.loads((p / "config.json").read_text()))
    raise ConfigError(f"init_from: {folder} is not a model folder (no config.json)")


# ------------------------------------------------------------------ the data's truth

def shard_files(data: str) -> list[str]:
    """The Parquet shards of a data folder, sorted; a URI's shards keep its scheme and query."""
    if not data:
        raise ConfigError("data: required (a folder or URI of `cloze data` shards)")
    if "://" in data:
        import pyarrow.fs as pafs

        from .storage import filesystem, to_uri

        try:
            fs, root = filesystem(data)
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


def _agree(key: str, explicit: Any, data_value: Any, unset: Any) -> Any:
    """The data's value; an explicit setting must equal it (the error names both)."""
    if explicit != unset and explicit != data_value:
        raise ConfigError(f"{key} = {explicit!r} disagrees with the data's manifest ({data_value!r}); "
                          f"leave it unset to use the data's")
    return data_value


def _vocab(folder: str) -> dict[str, int] | None:
    """token -> id of the tokenizer in a folder (local or URI), or None if it has none."""
    from tokenizers import Tokenizer

    body = read_bytes(join_path(folder, "tokenizer.json"))
    if body is not None:
        return Tokenizer.from_str(body.decode()).get_vocab()
    body = read_bytes(join_path(folder, "vocab.txt"))
    if body is not None:
        return {line: i for i, line in enumerate(body.decode("utf-8").splitlines())}
    return None


def _columns(files: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    (_, opened), = open_files(files[:1])
    with opened as f:
        return pq.ParquetFile(f).schema_arrow.names


MASKING_DEFAULTS = {"mask_prob": 0.15, "max_predictions_per_seq": 0, "whole_word_masking": False}


def resolve(cfg: PretrainConfig) -> "PretrainTask":
    """Check a config against its data (before any Ray work) and build the task."""
    cfg = cfg.absolute()
    files = shard_files(cfg.data)
    manifest = read_manifest(cfg.data)
    data_vocab = _vocab(cfg.data)
    if manifest is not None:
        tok = manifest["tokenizer"]
        ids = tok["special_ids"]
        special = (ids["pad"], ids["unk"], ids["cls"], ids["sep"], ids["mask"])
        vocab = tok["vocab_size"]
        columns = list(manifest["columns"])
        seq = _agree("pretrain.max_seq_len", cfg.max_seq_len, manifest["max_seq_len"], 0)
        special = _agree("pretrain.special_token_ids", tuple(cfg.special_token_ids), special, ())
        if manifest.get("masking") == "static":
            changed = [k for k, v in MASKING_DEFAULTS.items() if getattr(cfg, k) != v]
            if changed:
                raise ConfigError(f"pretrain.{changed[0]}: the shards in {cfg.data} carry static masks (drawn by "
                                  f"`cloze data`); masking settings apply to dynamic masking only")
    else:  # shards made elsewhere: every data-derived setting must be given
        if not cfg.special_token_ids or not cfg.max_seq_len:
            raise ConfigError(f"data: {cfg.data} has no manifest.json; set pretrain.special_token_ids and "
                              f"pretrain.max_seq_len (and model.vocab_size) explicitly")
        columns = _columns(files)
        special, seq, vocab = tuple(cfg.special_token_ids), cfg.max_seq_len, None
    tokenizer = cfg.tokenizer or (cfg.data if data_vocab is not None else "")
    for key, folder in (("tokenizer", cfg.tokenizer), ("init_from", cfg.init_from)):
        theirs = _vocab(folder) if folder else None
        if theirs is not None and data_vocab is not None and theirs != data_vocab:
            raise ConfigError(f"pretrain.{key}: the vocabulary in {folder} is not the one the shards in {cfg.data} "
                              f"were tokenized with ({len(theirs)} vs {len(data_vocab)} tokens)")
    enc = cfg.encoder_config()
    if vocab is None:
        vocab = enc.vocab_size
    elif (cfg.init_from or "vocab_size" in cfg.model) and enc.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size = {enc.vocab_size} is smaller than the data's vocabulary ({vocab} ids, "
                          f"manifest of {cfg.data}); leave it unset to use the data's")
    model = cfg.model if cfg.init_from or "vocab_size" in cfg.model else {**cfg.model, "vocab_size": vocab}
    if not cfg.init_from:
        model = {**model, "pad_token_id": special[0]}
    if not all(0 <= i < vocab for i in special):
        raise ConfigError(f"special_token_ids {list(special)} must be below vocab_size {vocab}")
    for name in cfg.objectives:
        if name in LABELS and LABELS[name] not in columns:
            raise ConfigError(f"objectives.{name}: the shards in {cfg.data} have no {LABELS[name]} column "
                              f"(built for {', '.join(c for c in columns if c.endswith('_label')) or 'mlm only'}); "
                              f"rebuild them with `cloze data --data.task {name}` or drop {name}")
    cfg = dataclasses.replace(cfg, max_seq_len=seq, special_token_ids=tuple(special), model=model, tokenizer=tokenizer)
    if cfg.max_seq_len > cfg.encoder_config().max_position_embeddings:
        raise ConfigError(f"the data's max_seq_len ({cfg.max_seq_len}) exceeds model.max_position_embeddings "
                          f"({cfg.encoder_config().max_position_embeddings})")
    train, held = files, []
    if cfg.eval_data:
        held = shard_files(cfg.eval_data)
        held_manifest = read_manifest(cfg.eval_data)
        if held_manifest is not None and manifest is not None and \
                held_manifest["tokenizer"].get("hash") != manifest["tokenizer"].get("hash"):
            raise ConfigError(f"eval_data: {cfg.eval_data} was tokenized with another vocabulary than {cfg.data}")
        held_columns = list(held_manifest["columns"]) if held_manifest else _columns(held)
        for name in cfg.objectives:
            if name in LABELS and LABELS[name] not in held_columns:
                raise ConfigError(f"eval_data: the shards in {cfg.eval_data} have no {LABELS[name]} column "
                                  f"for objective {name}")
    elif cfg.eval_shards:
        if cfg.eval_shards >= len(files):
            raise ConfigError(f"eval_shards ({cfg.eval_shards}) must leave training shards: {cfg.data!r} has "
                              f"{len(files)}")
        train, held = files[:-cfg.eval_shards], files[-cfg.eval_shards:]
        held_columns = columns
    wanted = [c for c in ("input_ids", "token_type_ids", "mlm_labels", *LABELS.values()) if c in columns]
    shards = describe(train)
    unit = cfg.batch_size_per_worker * cfg.num_workers
    if sum(s.rows for s in shards) < unit:
        raise ConfigError(f"data: {sum(s.rows for s in shards)} training rows in {cfg.data}, fewer than one global "
                          f"batch ({cfg.batch_size_per_worker} x {cfg.num_workers} workers)")
    if held and sum(s.rows for s in describe(held)) < unit:
        raise ConfigError(f"the held-out shards have fewer rows than one global batch ({cfg.batch_size_per_worker} x "
                          f"{cfg.num_workers} workers)")
    continuation = None
    if cfg.whole_word_masking:
        from tokenizers import Tokenizer

        from .data.tokenizer import continuation_table

        body = read_bytes(join_path(cfg.data, "tokenizer.json"))
        if body is None:
            raise ConfigError(f"whole_word_masking needs {cfg.data}/tokenizer.json")
        continuation = continuation_table(Tokenizer.from_str(body.decode()))
    eval_columns = [c for c in wanted if c in held_columns] if held else []
    return PretrainTask(cfg, shards, held, wanted, eval_columns, continuation, vocab)


# ------------------------------------------------------------------ the task

class PretrainTask(ShardTask):
    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, shards, eval_files: list[str], columns: list[str],
                 eval_columns: list[str], continuation: list[bool] | None, data_vocab: int):
        self.config, self.shards, self.eval_files, self.columns = cfg, shards, eval_files, columns
        self.eval_columns, self.continuation, self.data_vocab = eval_columns, continuation, data_vocab
        self.encoder_config = cfg.encoder_config()  # read once (with init_from: from disk)

    def input_paths(self) -> list[str]:
        cfg = self.config
        return [p for p in (cfg.data, cfg.eval_data, cfg.init_from, cfg.tokenizer) if p]

    def build_model(self) -> MultiObjective:
        """Fresh weights (the core seeds them), or an imported checkpoint whose missing heads start fresh."""
        cfg = self.config
        if cfg.init_from:
            from encoder.hf import load_pretrained

            return load_pretrained(cfg.init_from, kind="pretraining", objectives=cfg.objectives,
                                   generator_fraction=cfg.generator_fraction)
        return MultiObjective(Encoder(cfg.encoder_config()), cfg.objectives, generator_fraction=cfg.generator_fraction)

    def param_groups(self, model) -> list[dict]:
        """The core's groups; with encoder_hold_steps or head_lr, the shared encoder's groups
        carry `hold_steps` and the heads' groups their own lr."""
        from .train.optim import param_groups

        cfg = self.config
        if not (cfg.encoder_hold_steps or cfg.head_lr):
            return param_groups(model, cfg.optimizer.weight_decay)
        return param_groups(model, cfg.optimizer.weight_decay, is_encoder=lambda name: name.startswith("encoder."),
                            encoder={"hold_steps": cfg.encoder_hold_steps},
                            head={"lr": cfg.head_lr or cfg.optimizer.lr})

    def collator(self) -> PretrainCollator:
        cfg = self.config
        pad, unk, cls, sep, mask = cfg.special_token_ids
        # random replacements come from the data's vocabulary (a padded embedding has unused rows)
        special = SpecialIds(pad=pad, unk=unk, cls=cls, sep=sep, mask=mask, vocab_size=self.data_vocab)
        limit = cfg.max_predictions_per_seq or math.ceil(cfg.mask_prob * cfg.max_seq_len)
        return PretrainCollator(special, mask_prob=cfg.mask_prob, max_predictions=limit,
                                whole_word_masking=cfg.whole_word_masking, continuation=self.continuation)

    def batch_maker(self, rank: int):
        collate, cfg = self.collator(), self.config

        def make(epoch: int, index: int, rows: dict) -> dict:
            collate.generator.manual_seed(mix_seed(cfg.seed, 0, epoch, index, rank))
            return collate(to_model_rows(rows, cfg.max_seq_len, TOKEN_COLUMNS))

        return make

    def held_out(self, rank: int, world: int) -> list[dict]:
        """Up to eval_batches global batches of the held-out shards; this rank's slice of each,
        masks fixed across evaluations (seeded by position, not by step)."""
        if not self.eval_files:
            return []
        cfg, B = self.config, self.config.batch_size_per_worker
        rows = read_rows(self.eval_files, cfg.eval_batches * B * world, self.eval_columns)
        n = min(cfg.eval_batches, len(rows.get("input_ids", [])) // (B * world))
        if n == 0:
            raise ValueError(f"the held-out set has fewer rows than one global batch ({B} x {world})")
        collate, out = self.collator(), []
        for e in range(n):
            start = (e * world + rank) * B
            mine = {k: v[start:start + B] for k, v in rows.items()}
            collate.generator.manual_seed(mix_seed(cfg.seed, EVAL, e, rank))
            out.append(collate(to_model_rows(mine, cfg.max_seq_len, TOKEN_COLUMNS)))
        return out

    def export(self, state, metrics, dest: str) -> None:
        from encoder.hf import save_pretrained

        cfg = self.config
        model = MultiObjective(Encoder(self.encoder_config), cfg.objectives, generator_fraction=cfg.generator_fraction)
        model.load_state_dict(state)
        meta = {"pretrain_config": cfg.to_dict(), "final_metrics": metrics, "steps": metrics.get("step")}
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = cfg.tokenizer or None
            if tokenizer and "://" in tokenizer:  # copy the tokenizer files down first
                tokenizer = str(Path(tmp) / "tokenizer")
                Path(tokenizer).mkdir()
                for name in ("tokenizer.json", "vocab.txt"):
                    body = read_bytes(join_path(cfg.tokenizer, name))
                    if body is not None:
                        (Path(tokenizer) / name).write_bytes(body)
            if "://" not in dest:
                save_pretrained(model, dest, tokenizer=tokenizer, metadata=meta)
                return
            import pyarrow.fs as pafs

            save_pretrained(model, Path(tmp) / "model", tokenizer=tokenizer, metadata=meta)
            pafs.copy_files(str(Path(tmp) / "model"), dest)


def pretrain(cfg: PretrainConfig, resume: str | os.PathLike | None = None, progress: bool = True, log=print,
             callbacks: list[Callback] = ()) -> TrainResult:
    """Check the config against its data, launch, and read the result. `resume`: a run folder."""
    return fit(resolve(cfg), resume=resume, progress=progress, log=log, callbacks=callbacks)
