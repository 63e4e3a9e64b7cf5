"""Frozen mode's feature cache. A frozen encoder is a fixed function, so what it contributes
to a classifier (`DownstreamModel.features`: h_cls for a sequence task, every token's hidden
state for a token task) is computed once, with Ray Data over the training shards (an actor
pool, one encoder per actor, GPUs when the run has them), and cached as Parquet shards in
the run folder. The core then trains only the head on those rows: an epoch costs a few
matrix products instead of the encoder's forward.

The cache is keyed by the training examples, the encoder folder and the task; a resumed or
repeated run with the same key reuses it. Features are computed in eval mode (no dropout),
which is what the frozen encoder computes during training too, so the head trained on the
cache is the head of the exported classifier."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np
import torch

from .storage import join_path, read_bytes, write_atomic

FEATURES_DIR = "features"
BATCH = 64


class FeatureExtractor:
    """Ray Data callable class: a batch of (input_ids, token_type_ids, labels) rows -> their
    frozen features (float32, flattened for token tasks), labels and lengths."""

    def __init__(self, encoder_folder: str, task: str, threads: int):
        from encoder import SequenceClassifier, TokenClassifier
        from encoder.hf import load_pretrained

        torch.set_num_threads(max(1, threads))
        encoder = load_pretrained(encoder_folder, kind="encoder")
        if task == "token":
            encoder.pooler = None
        cls = SequenceClassifier if task == "sequence" else TokenClassifier
        self.model = cls(encoder, 1, frozen=True).eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.pad, self.task = encoder.config.pad_token_id, task

    def __call__(self, batch):
        import pyarrow as pa

        from .inference import pad_batch

        ids = [np.asarray(x, dtype=np.int32) for x in batch.column("input_ids").to_pylist()]
        types = [np.asarray(x, dtype=np.int8) for x in batch.column("token_type_ids").to_pylist()]
        inputs = pad_batch(ids, types, self.pad)
        with torch.inference_mode():
            feats = self.model.features(**{k: v.to(self.device) for k, v in inputs.items()}).float().cpu()
        lengths = [len(x) for x in ids]
        if self.task == "sequence":
            rows = [f.numpy() for f in feats]
        else:
            rows = [f[:n].numpy().reshape(-1) for f, n in zip(feats, lengths)]
        return pa.table({"features": pa.array(rows, pa.list_(pa.float32())), "labels": batch.column("labels"),
                         "length": pa.array(lengths, pa.int32())})


def cache_key(examples_sha256: str, encoder_folder: str, task: str) -> str:
    weights = read_bytes(join_path(encoder_folder, "model.safetensors")) or b""
    return hashlib.sha256(json.dumps([examples_sha256, hashlib.sha256(weights).hexdigest(), task]).encode()
                          ).hexdigest()


def cache_features(shards: list[str], encoder_folder: str, task: str, out_dir: str, key: str, *,
                   actors: int, cpus_per_actor: float, use_gpu: bool, log=print) -> list[str]:
    """The feature shards of `shards` in `out_dir` (computed unless a cache with `key` is there)."""
    import pyarrow.parquet as pq
    import ray.data

    from .finetune_data import SHARD_ROWS
    from .storage import filesystem

    manifest = join_path(out_dir, "manifest.json")
    old = read_bytes(manifest)
    if old is not None and json.loads(old).get("key") == key:
        log(f"cloze finetune: frozen features cached in {out_dir}")
        return json.loads(old)["files"]
    fs, root = filesystem(shards[0])
    ctx = ray.data.DataContext.get_current()
    keep_order, bars = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # the cache lines up with the shards, row for row
    ctx.enable_progress_bars = False
    try:
        paths = [filesystem(s)[1] for s in shards]
        # the read tasks need a CPU too: actors that took every CPU would wait on them forever
        # (a 2-CPU machine with cpus_per_worker = 2); each actor still runs `cpus_per_actor` threads
        total = ray.cluster_resources().get("CPU", 1.0)
        actor_cpus = cpus_per_actor if use_gpu else min(cpus_per_actor, max(0.25, (total - 1) / max(1, actors)))
        ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["input_ids", "token_type_ids", "labels"])
        ds = ds.map_batches(FeatureExtractor, fn_constructor_kwargs={"encoder_folder": encoder_folder, "task": task,
                                                                     "threads": int(cpus_per_actor)},
                            batch_size=BATCH, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
                            num_cpus=actor_cpus, num_gpus=1 if use_gpu else 0)
        out_fs, out_root = filesystem(out_dir)
        out_fs.create_dir(out_root, recursive=True)
        files, rows = [], 0
        for s, table in enumerate(ds.iter_batches(batch_size=SHARD_ROWS, batch_format="pyarrow")):
            name = f"part-{s:05d}.parquet"
            pq.write_table(table, f"{out_root}/{name}", filesystem=out_fs, row_group_size=1024, compression="zstd")
            files.append(join_path(out_dir, name))
            rows += table.num_rows
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = keep_order, bars
    write_atomic(manifest, json.dumps({"key": key, "files": files, "rows": rows}, indent=2).encode())
    log(f"cloze finetune: frozen features of {rows} examples computed once, cached in {out_dir}")
    return files


def collate_features(rows: Mapping[str, list], task: str, hidden: int) -> dict[str, Any]:
    """A batch of cached features: (B, H) for sequence tasks; (B, T, H) + attention_mask and
    per-piece labels (-100 on padding) for token tasks."""
    from .data.collate import pad_rows
    from .inference import IGNORE

    lengths = [int(n) for n in rows["length"]]
    if task == "sequence":
        return {"features": torch.as_tensor(np.stack([np.asarray(f, np.float32) for f in rows["features"]])),
                "labels": torch.as_tensor(np.asarray(rows["labels"], dtype=np.int64)),
                "lengths": torch.as_tensor(lengths)}
    width = -(-max(lengths) // 8) * 8
    feats = torch.zeros(len(lengths), width, hidden)
    for i, (f, n) in enumerate(zip(rows["features"], lengths)):
        feats[i, :n] = torch.as_tensor(np.asarray(f, np.float32).reshape(n, hidden))
    mask = (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).long()
    return {"features": feats, "attention_mask": mask, "lengths": torch.as_tensor(lengths),
            "labels": pad_rows([np.asarray(x) for x in rows["labels"]], IGNORE, 8)[:, :width]}


def frozen_features(cfg, run_dir: str, files: list[str], enc_cfg, tok_folder: str,
                    provenance: dict) -> tuple[str, list[str]]:
    """(encoder folder, feature shards) of a frozen run. A random encoder is drawn once (from
    the seed) and saved in the run folder, so the cache, the workers and the export agree."""
    from encoder import Encoder

    from .config import ConfigError

    folder = cfg.init
    if cfg.init == "random":
        folder = join_path(run_dir, "random-encoder")
        if read_bytes(join_path(folder, "model.safetensors")) is None:
            from encoder.hf import save_pretrained

            torch.manual_seed(cfg.seed)
            encoder = Encoder(enc_cfg)
            if "://" in folder:
                raise ConfigError("init = \"random\" with mode = \"frozen\" needs a local storage_path")
            save_pretrained(encoder, folder, tokenizer=tok_folder)
    key = cache_key(provenance["examples_sha256"], folder, cfg.task)
    return folder, cache_features(files, folder, cfg.task, join_path(run_dir, FEATURES_DIR), key,
                                  actors=cfg.num_workers, cpus_per_actor=cfg.cpus_per_worker, use_gpu=cfg.use_gpu)
