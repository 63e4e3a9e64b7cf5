"""The `pairs` stage: raw documents -> Parquet shards of pretraining examples, with Ray Data.

    units (driver, corpus.py) -> tokenizer (loaded, or trained with Ray: vocab.py)
      -> ReadDocuments -> SplitSentences -> TokenizeSentences -> BuildExamples -> PairShardWriter
         (units.py: one fused Ray Data operator; examples from builders.py)
      -> per-unit stats -> manifest.json (driver, manifest.py) -> published (storage.py)

Reproducible by construction: a unit's randomness is seeded by (seed, unit key, pass) and a
unit is one shard, so every shard's bytes are a function of (input, config), whatever the
number of workers or blocks. The pieces live in builders / units / manifest / vocab; the
names other code imports from here (build_sentence_pairs, read_manifest, ...) stay here.
"""

from __future__ import annotations

import hashlib
import json
import time

from .. import storage
from ..config import ConfigError
from ..ray_session import start_ray
from .config import DataConfig
from .corpus import plan_units
from .manifest import FORMAT_VERSION, build_manifest, manifest_bytes, merge_stats, read_manifest  # noqa: F401
from .tokenizer import SpecialIds, continuation_table, is_lowercase, load_tokenizer, save_tokenizer, tokenizer_hash
from .units import BuildExamples, PairShardWriter, ReadDocuments, SplitSentences, TokenizeSentences
from .vocab import stage_tokenizer

__all__ = ["build_sentence_pairs", "read_manifest", "cache_key", "default_blocks", "FORMAT_VERSION"]


def cache_key(config: DataConfig, plan_fingerprint: str) -> str:
    """What decides the output: algorithm version, config hash, input listing, tokenizer."""
    tok = config.tokenizer
    if tok != "train":  # a loaded tokenizer is part of the input
        tok = tokenizer_hash(load_tokenizer(tok, config.lowercase))
    parts = [str(FORMAT_VERSION), config.config_hash(), plan_fingerprint, tok]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


UNITS_PER_TASK = 8


def default_blocks(units: int, workers: int) -> int:
    """How many Ray tasks (blocks) the unit list is cut into when `num_blocks` is 0.

    Each Ray Data task costs ~0.1 s of scheduling on top of its work; one task per ~1 MiB
    unit left the 2 CPUs here ~30% idle (20NG: 9.4 s vs 7.2 s with 4 tasks). So a task takes
    about UNITS_PER_TASK units, and every worker still gets at least two tasks (balance)."""
    return max(1, min(units, max(2 * workers, -(-units // UNITS_PER_TASK))))


def build_sentence_pairs(config: DataConfig, *, log=print) -> dict:
    """Run the stage: `config.output` gets Parquet shards, the tokenizer and manifest.json.

    Inputs are listed (and a missing one raises InputError) before any Ray work. If the
    output already holds a manifest with the same cache key, nothing runs and nothing in the
    finished folder is touched (cache hit). Shards are written into
    `<output>.tmp-<id>`, which takes the output's name only when complete, so a killed run
    never leaves a folder that looks finished. Returns the manifest.
    """
    import ray

    t0 = time.perf_counter()
    plan = plan_units(config)
    key = cache_key(config, plan.fingerprint)
    previous = read_manifest(config.output)
    if previous and previous.get("cache_key") == key:
        log(f"cloze data: cache hit, {config.output} is up to date ({key[:12]})")
        return previous
    start_ray(log, "cloze data", num_cpus=config.num_workers or None)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and not storage.is_uri(config.output) and not config.shared_filesystem:
        # each node's tasks would write their shards to their own disk
        raise ConfigError(f"data.output {config.output!r} is a local path but the cluster has {nodes} nodes: give a "
                          f"URI (s3://, gs://) or set data.shared_filesystem = true for a path every node mounts")
    # an upper bound: Ray runs as many of these tasks as there are free CPUs at each moment
    workers = config.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = config.num_blocks or default_blocks(len(plan.units), workers)
    pool = ray.data.TaskPoolStrategy(size=workers)

    def units_dataset(units):
        return ray.data.from_items([{"unit": u.to_json()} for u in units],
                                   override_num_blocks=max(1, min(blocks, len(units))))

    with storage.Staging(config.output, log=log) as staging:
        log(f"cloze data: {len(plan.units)} units from {len(config.inputs)} input(s), task {config.task}, "
            f"{workers} workers")
        tok = stage_tokenizer(config, plan.units, units_dataset, pool)
        special = SpecialIds.of(tok)
        staging.write_folder(lambda folder: save_tokenizer(tok, folder))
        continuation = continuation_table(tok) if config.whole_word_masking and config.masking == "static" else None
        # One fused operator whose outputs are a stats row per unit: Ray Data's per-operator
        # resource reservation only held the second task back (~1 s of one idle CPU per run).
        # A Dataset copies the context when it is created, so this goes first.
        ctx = ray.data.DataContext.get_current()
        keep, ctx.op_resource_reservation_enabled = ctx.op_resource_reservation_enabled, False
        try:
            ds = units_dataset(plan.units)
            for stage in (ReadDocuments(config), SplitSentences(), TokenizeSentences(tok.to_str()),
                          BuildExamples(config, special, continuation),
                          PairShardWriter(staging.tmp, config.label_column)):
                ds = ds.map_batches(stage, batch_size=1, batch_format="pyarrow", compute=pool)
            parts = sorted((i, s) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")
                           for i, s in zip(b.column("index").to_pylist(), b.column("stats").to_pylist()))
        finally:
            ctx.op_resource_reservation_enabled = keep
        stats = merge_stats([json.loads(s) for _, s in parts])  # in unit order: a deterministic manifest
        tok_info = {"hash": tokenizer_hash(tok), "vocab_size": special.vocab_size, "lowercase": is_lowercase(tok),
                    "source": config.tokenizer, "special_ids": {"pad": special.pad, "unk": special.unk,
                                                                "cls": special.cls, "sep": special.sep,
                                                                "mask": special.mask}}
        manifest = build_manifest(config, stats, plan.ignored, key, tok_info, time.perf_counter() - t0)
        staging.publish("manifest.json", manifest_bytes(manifest))
    log(f"cloze data: {manifest['examples'][config.task]} {config.task} examples in {len(manifest['shards'])} "
        f"shards -> {config.output} ({manifest['wall_time_s']:.1f} s)")
    return manifest
