"""A real two-node Ray cluster on this machine (ray.cluster_utils.Cluster: two raylets), in a
subprocess so the session's cluster is untouched: local output paths are refused before any
work, because each node would write its part to its own disk."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

SCRIPT = textwrap.dedent('''
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from encoder import ConfigError
    from pipelines.data.config import DataConfig
    from pipelines.data.pairs import build_sentence_pairs
    from pipelines.data.synthetic import synthetic_pair_shards
    from pipelines.pretrain import PretrainConfig, pretrain

    tmp = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    out = {"nodes": sum(1 for n in ray.nodes() if n["Alive"])}
    try:
        build_sentence_pairs(DataConfig(inputs=("bbc",), output=tmp + "/pairs"), log=lambda *_: None)
    except ConfigError as e:
        out["data"] = str(e)
    data = synthetic_pair_shards(tmp + "/shards", rows=32, vocab_size=128)
    cfg = PretrainConfig.from_dict({"data": str(data), "storage_path": tmp + "/runs", "num_workers": 2,
                                    "model": {"preset": "tiny", "vocab_size": 128, "max_position_embeddings": 64}})
    try:
        pretrain(cfg, progress=False)
    except ConfigError as e:
        out["pretrain"] = str(e)
    print("RESULT " + json.dumps(out))
    ray.shutdown()
    cluster.shutdown()
''')


def test_local_outputs_are_refused_on_a_multi_node_cluster(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=240, cwd=Path(__file__).resolve().parent.parent)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert out["nodes"] == 2
    assert "data.output" in out.get("data", "") and "cluster has 2 nodes" in out["data"]
    assert "storage_path" in out.get("pretrain", "") and "cluster has 2 nodes" in out["pretrain"]
    assert not (tmp_path / "pairs").exists() and not (tmp_path / "runs").exists()
