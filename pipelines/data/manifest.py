"""manifest.json of a shard set: per-unit statistics merged, the manifest built, read back.

The manifest is the one source of truth for what the data decided (DESIGN.md): counts,
label balance, length histogram, skipped documents by reason, tokenizer, config and hashes.
A folder without one is not a finished shard set.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from ..storage import join_path, read_bytes
from .config import DataConfig
from .units import HIST_BIN

FORMAT_VERSION = 3  # bump when the algorithm or the shard layout changes: invalidates caches
MAX_LISTED = 200  # skipped / repaired documents named per reason in the manifest


def merge_stats(parts: list[dict]) -> dict:
    """Sum per-unit statistics (in unit order, so the manifest is deterministic)."""
    total: dict[str, Any] = {"skipped": Counter(), "repaired": Counter(), "labels": Counter(), "builder": Counter(),
                             "skipped_documents": {}, "repaired_documents": {}, "length_histogram": [], "shards": []}
    for s in parts:
        for k in ("units", "documents_seen", "documents_used", "documents_single_sentence", "paragraphs",
                  "sentences", "tokens", "examples", "example_tokens"):
            total[k] = total.get(k, 0) + s[k]
        for doc_id, reason in s["skipped"]:
            total["skipped"][reason] += 1
            listed = total["skipped_documents"].setdefault(reason, [])
            if len(listed) < MAX_LISTED:
                listed.append(doc_id)
        for doc_id, how in s["repaired"]:
            total["repaired"][how] += 1
            listed = total["repaired_documents"].setdefault(how, [])
            if len(listed) < MAX_LISTED:
                listed.append(doc_id)
        total["labels"].update(s["labels"])
        total["builder"].update(s["builder"])
        h = total["length_histogram"]
        for i, c in enumerate(s["length_histogram"]):
            if i >= len(h):
                h.append(0)
            h[i] += c
        total["shards"] += s["shards"]
    return total


def build_manifest(config: DataConfig, stats: dict, ignored: list, cache_key: str, tok_info: dict,
                   wall: float) -> dict:
    """manifest.json of a finished shard set (schema: DESIGN.md, Data contracts)."""
    n = stats.get("examples", 0)
    labels = {k: stats["labels"][k] for k in sorted(stats["labels"])}
    return {
        "format_version": FORMAT_VERSION,
        "task": config.task,
        "label_column": config.label_column,
        "columns": ["input_ids", "token_type_ids", "length"]
        + (["mlm_labels"] if config.masking == "static" else []) + ([config.label_column] if config.label_column else []),
        "masking": config.masking,
        "seed": config.seed,
        "max_seq_len": config.max_seq_len,
        "documents": {
            "seen": stats.get("documents_seen", 0) + len(ignored),
            "read": stats.get("documents_seen", 0),
            "used": stats.get("documents_used", 0),
            "single_sentence": stats.get("documents_single_sentence", 0),
            "skipped": dict(sorted(Counter({**stats["skipped"], **Counter(r for _, r in ignored)}).items())),
            "skipped_documents": {**stats["skipped_documents"],
                                  **({"unsupported_type": [p for p, _ in ignored][:MAX_LISTED]} if ignored else {})},
            "repaired": dict(stats["repaired"]),
            "repaired_documents": stats["repaired_documents"],
        },
        "paragraphs": stats.get("paragraphs", 0),
        "sentences": stats.get("sentences", 0),
        "tokens": stats.get("tokens", 0),
        "examples": {config.task: n},
        "example_tokens": stats.get("example_tokens", 0),
        "label_balance": {"counts": labels, "fraction": {k: v / n for k, v in labels.items()} if n else {}},
        "length_histogram": {"bin_width": HIST_BIN, "counts": stats["length_histogram"]},
        "builder": dict(sorted(stats["builder"].items())),
        "tokenizer": tok_info,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "cache_key": cache_key,
        "units": stats.get("units", 0),
        "shards": stats["shards"],
        "wall_time_s": round(wall, 3),
    }


def read_manifest(folder: str) -> dict | None:
    """The folder's manifest, or None: a folder without one is not a finished shard set."""
    body = read_bytes(join_path(folder, "manifest.json"))
    if body is None:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()
