"""The cluster files, checked without a cluster: the KubeRay manifests against KubeRay v1.7's
`ray.io/v1` CRD schemas made strict (a misspelled field fails, as with the API server's
strict field validation), the launcher YAML against the schema inside the ray wheel, the
lints of cluster/manifests.py (each shown to catch the mistake it is for), the GPU profile
against the config loaders, and the parts of `cloze submit` that need no cluster."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from cluster import manifests
from cluster.client import ClusterError, Token, load_token, resolve_address
from cluster.jobs import EXCLUDES, failure_reason, runtime_env, runtime_packages
from cluster.preflight import check_command, check_run_tables
from pipelines.config import ConfigError, load_toml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "cluster" / "kuberay"
LAUNCHER = REPO / "cluster" / "launcher" / "gpu-cluster.yaml"
GPU_CONFIG = REPO / "configs" / "gpu-cluster.toml"
MANIFESTS = {"RayJob": "rayjob.yaml", "RayService": "rayservice.yaml", "RayCluster": "raycluster.yaml"}


def _crd_dir() -> Path:
    """../shared/kuberay beside the checkout (CI's layout); a fresh clone elsewhere lacks it."""
    crds = REPO.parent / "shared" / "kuberay"
    if not (crds / "ray.io_rayjobs.yaml").is_file():
        pytest.fail(f"the KubeRay CRD schemas are not at {crds} (CI puts ../shared beside the clone; "
                    f"they are KubeRay v1.7.0's ray-operator/config/crd/bases/ray.io_*.yaml)")
    return crds


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    return {kind: manifests.crd_schema(_crd_dir(), kind) for kind in MANIFESTS}


def _load(kind: str) -> dict:
    return yaml.safe_load((KUBERAY / MANIFESTS[kind]).read_text())


def _change(doc, path, value=None, *, delete: bool = False, rename: str | None = None):
    """A copy of `doc` with the field at `a/b/0/c` (or a tuple of keys) set, deleted or renamed."""
    out = copy.deepcopy(doc)
    *parents, last = path.split("/") if isinstance(path, str) else path
    node = out
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    key = int(last) if isinstance(node, list) else last
    if rename is not None:
        node[rename] = node.pop(key)
    elif delete:
        del node[key]
    else:
        node[key] = value
    return out


# ------------------------------------------------------------------ KubeRay

@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_kuberay_manifests_pass_the_strict_crd_schema_and_the_lints(schemas, kind):
    doc = _load(kind)
    assert doc["kind"] == kind and doc["apiVersion"] == "ray.io/v1"
    assert manifests.schema_errors(doc, schemas[kind]) == []
    assert manifests.lint_kuberay(doc) == []


@pytest.mark.parametrize("kind, path, typo", [
    ("RayJob", "spec/shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
    ("RayJob", "spec/rayClusterSpec/workerGroupSpecs/0/replicas", "replica"),
    ("RayJob", "spec/rayClusterSpec/workerGroupSpecs/0/template/spec/tolerations/0/effect", "efect"),
    ("RayService", "spec/rayClusterConfig/workerGroupSpecs/0/template/spec/containers/0/resources", "resource"),
    ("RayCluster", "spec/enableInTreeAutoscaling", "enableIntreeAutoscaling"),
    ("RayCluster", "metadata/labels", "lables"),
])
def test_a_misspelled_field_is_rejected(schemas, kind, path, typo):
    doc = _change(_load(kind), path, rename=typo)
    errors = manifests.schema_errors(doc, schemas[kind])
    assert any(f"'{typo}' was unexpected" in e for e in errors), errors


def test_the_strict_schema_keeps_kubernetes_semantics(schemas):
    """Maps stay maps, int-or-string accepts both, enums and types still bind."""
    job, schema = _load("RayJob"), schemas["RayJob"]
    group = "spec/rayClusterSpec/workerGroupSpecs/0"
    ok = [
        _change(job, (*group.split("/"), "template", "spec", "nodeSelector", "topology.kubernetes.io/zone"),
                "us-west-2a"),  # a map
        _change(job, f"{group}/template/spec/containers/0/resources/limits/memory", 1_932_735_283_200),  # int
        _change(job, f"{group}/rayStartParams/object-store-memory", "100000000000"),  # a map of strings
    ]
    for doc in ok:
        assert manifests.schema_errors(doc, schema) == []
    bad = {
        "submissionMode": _change(job, "spec/submissionMode", 3),
        "replicas": _change(job, f"{group}/replicas", "two"),
        "policy": _change(job, "spec/rayClusterSpec/authOptions/mode", "tokens"),
        "rayStartParams": _change(job, f"{group}/rayStartParams/num-gpus", 8),  # must be a string
    }
    for what, doc in bad.items():
        assert manifests.schema_errors(doc, schema), what


@pytest.mark.parametrize("kind, change, expected", [
    ("RayJob", ("spec/rayClusterSpec/rayVersion", "2.59.0"), "is not the pinned Ray 2.60.0"),
    ("RayJob", ("spec/rayClusterSpec/workerGroupSpecs/0/template/spec/containers/0/image",
                "rayproject/ray:2.59.0-py311-gpu"), "Ray 2.59.0 but rayVersion is '2.60.0'"),
    ("RayJob", (("spec", "rayClusterSpec", "workerGroupSpecs", "0", "template", "spec", "containers", "0",
                 "resources", "limits", "nvidia.com/gpu"), None), "without the same limit"),
    ("RayJob", ("spec/rayClusterSpec/workerGroupSpecs/0/template/spec/tolerations", None), "need a toleration"),
    ("RayJob", ("spec/rayClusterSpec/headGroupSpec/rayStartParams/num-cpus", None), "num-cpus: must be \"0\""),
    ("RayJob", ("spec/rayClusterSpec/authOptions/mode", "disabled"), "must be token"),
    ("RayJob", ("spec/runtimeEnvYAML", "working_dir: /home/me/cloze\n"), "must be a URI"),
    ("RayCluster", ("spec/headGroupSpec/rayStartParams/num-cpus", "2"), "no work on the head"),
    ("RayService", ("spec/rayClusterConfig/rayVersion", "2.6.0"), "is not the pinned Ray"),
])
def test_each_lint_catches_its_mistake(kind, change, expected):
    path, value = change
    doc = _change(_load(kind), path, value, delete=value is None)
    problems = manifests.lint_kuberay(doc)
    assert any(expected in p for p in problems), problems


def _serve_config() -> dict:
    return yaml.safe_load(_load("RayService")["spec"]["serveConfigV2"])


@pytest.mark.parametrize("change, expected", [
    (("applications/0/deployments", [{"name": "Classifier", "max_ongoing_request": 64}]),
     "not a field of Ray Serve's DeploymentSchema"),
    (("applications/0/deployments", [{"name": "Classifier", "autoscaling_config": {"max_replica": 8}}]),
     "not a field of Ray Serve's AutoscalingConfig"),
    (("applications/0/deployments", [{"name": "Classifier", "autoscaling_config": {"min_replicas": -1}}]),
     "autoscaling_config: 1 validation error"),
    (("applications/0/args/max_replica", 8), "args: unknown config key serve.max_replica"),
    (("applications/0/args/max_batch_size", 128), "args: serve.max_ongoing_requests (64) < serve.max_batch_size"),
    (("applications/0/args", {"num_cpus": 4}), "args: needs model_dir"),
    (("applications/0/improt_path", "x:y"), "not a field of Ray Serve's ServeApplicationSchema"),
    (("applications/0/import_path", "pipelines.serving:app_builder"), "no module pipelines.serving"),
    (("applications/0/import_path", "pipelines.serve:app_bulder"), "pipelines/serve.py defines no app_bulder"),
    (("http_options/port", "eighty"), "serveConfigV2: "),
    (("applications/0/runtime_env/pip/packages", ["torch"]), "pip/packages: must be"),
])
def test_serve_config_is_checked_against_ray_serves_schema_strictly(change, expected):
    """Ray Serve's own schema ignores unknown keys (forward compatibility) and KubeRay passes
    serveConfigV2 as an opaque string: both typos below would deploy with defaults."""
    path, value = change
    config = _change(_serve_config(), path, value)
    problems = manifests.lint_serve_config(yaml.safe_dump(config))
    assert any(expected in p for p in problems), problems
    assert manifests.lint_serve_config(yaml.safe_dump(_serve_config())) == []
    assert manifests.lint_serve_config("applications: [")[0].startswith("serveConfigV2: not YAML")


def test_the_rayservice_autoscales_its_replicas_and_the_pods_follow():
    from pipelines.serve_config import ServeConfig

    args = dict(_serve_config()["applications"][0]["args"])
    assert args.pop("model_dir").startswith("/models/")  # the read-only volume of the pods
    cfg = ServeConfig.from_dict(args)
    assert cfg.autoscaling and cfg.max_replicas > cfg.min_replicas >= 1
    assert cfg.max_ongoing_requests >= max(cfg.max_batch_size, cfg.target_ongoing_requests)
    cluster = _load("RayService")["spec"]["rayClusterConfig"]
    group = cluster["workerGroupSpecs"][0]
    cpus = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert cluster["enableInTreeAutoscaling"] is True
    assert cpus >= cfg.num_cpus and group["maxReplicas"] * (cpus // cfg.num_cpus) >= cfg.max_replicas


def test_the_rayjob_runs_the_dag_with_the_gpu_profile_and_gets_the_gpus_it_asks_for():
    job = _load("RayJob")["spec"]
    assert job["entrypoint"].split()[-4:] == ["pipelines.cli", "run", "--config", "configs/gpu-cluster.toml"]
    pre = load_toml(GPU_CONFIG)["pretrain"]
    group = job["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    per_node = limits["nvidia.com/gpu"]
    assert group["replicas"] * per_node == pre["num_workers"] * pre["gpus_per_worker"] == 16
    workers_per_node = per_node / pre["gpus_per_worker"]
    assert float(limits["cpu"]) >= workers_per_node * pre["cpus_per_worker"] + 8  # + CPUs for Ray Data


# ------------------------------------------------------------------ launcher

def test_launcher_yaml_passes_rays_schema_and_the_lints():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    assert manifests.schema_errors(config, manifests.launcher_schema()) == []
    validate_config(prepare_config(copy.deepcopy(config)))  # the launcher's own check, defaults filled in
    assert manifests.lint_launcher(config) == []
    gpu = config["available_node_types"]["gpu_h100"]
    pre = load_toml(GPU_CONFIG)["pretrain"]
    assert gpu["max_workers"] * gpu["resources"]["GPU"] >= pre["num_workers"]


@pytest.mark.parametrize("change, expected", [
    (("available_node_types/gpu_h100/resourcez", {"GPU": 8}), "'resourcez' was unexpected"),
    (("idle_timeout_minute", 5), "'idle_timeout_minute' was unexpected"),
    (("available_node_types/gpu_h100/resources/GPU", -1), "less than the minimum"),
])
def test_launcher_schema_rejects_typos_and_bad_values(change, expected):
    config = _change(yaml.safe_load(LAUNCHER.read_text()), *change)
    errors = manifests.schema_errors(config, manifests.launcher_schema())
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("change, expected", [
    (("docker/image", "rayproject/ray:2.59.0-py311-gpu"), "is not rayproject/ray:2.60.0"),
    (("available_node_types/head/resources/CPU", 4), "must be 0"),
    (("head_node_type", "headnode"), "is not one of available_node_types"),
    (("available_node_types/gpu_h100/resources", {"CPU": 192}), "has GPUs; declare them"),
    (("worker_start_ray_commands", ["ray start --address=$RAY_HEAD_IP:6379"]), "RAY_AUTH_MODE=token"),
])
def test_launcher_lints_catch_their_mistakes(change, expected):
    config = _change(yaml.safe_load(LAUNCHER.read_text()), *change)
    problems = manifests.lint_launcher(config)
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------ the GPU profile

def test_gpu_profile_parses_with_the_stage_loaders():
    """configs/gpu-cluster.toml names s3:// paths, so the DAG's plan_run would list the corpus
    (network): its tables go through the stage dataclasses instead, as `cloze submit` does."""
    from pipelines.data.config import DataConfig
    from pipelines.pretrain import PretrainConfig

    raw = load_toml(GPU_CONFIG)
    check_run_tables(raw)
    data = DataConfig.from_dict(raw["data"])
    pre = PretrainConfig.from_dict({**PretrainConfig.table_from_raw(raw), "data": data.output})
    enc = pre.encoder_config()
    assert (enc.num_hidden_layers, enc.hidden_size, enc.num_attention_heads) == (12, 768, 12)  # BERT-base
    assert pre.zero_stage == 2 and pre.precision == "bf16" and pre.use_gpu and pre.num_workers == 16
    assert pre.global_batch_size == pre.num_workers * pre.batch_size_per_worker  # no accumulation
    assert all(p.startswith("s3://") for p in [*data.inputs, data.output, pre.storage_path])
    # the rest of the DAG on the cluster: fine-tuning on GPUs from s3:// labeled files, GPU replicas
    from pipelines.dag import plan_finetune
    from pipelines.serve_config import ServeConfig

    fine = plan_finetune(raw, pre)
    assert fine.use_gpu and fine.precision == "bf16" and fine.num_workers == 8 and fine.storage_path == pre.storage_path
    assert all(p.startswith("s3://") for p in (fine.train, fine.dev, fine.test))
    serve = ServeConfig.from_dict(raw["serve"])
    assert serve.num_gpus == 1 and serve.dtype == "bf16" and serve.host == "127.0.0.1" and serve.autoscaling
    assert check_command(["run", "--config", "configs/gpu-cluster.toml"], REPO) == [
        "configs/gpu-cluster.toml names storage URIs: its tables are checked here, its inputs on the cluster"]
    with pytest.raises(ConfigError, match="pretrain.zero_stag"):
        check_run_tables({**raw, "pretrain": {**raw["pretrain"], "zero_stag": 3}})
    with pytest.raises(ConfigError, match="finetune.epoch"):
        check_run_tables({**raw, "finetune": {**raw["finetune"], "epoch": 3}})
    with pytest.raises(ConfigError, match="serve.dtype"):
        check_run_tables({**raw, "serve": {**raw["serve"], "num_gpus": 0, "dtype": "fp16"}})


# ------------------------------------------------------------------ cloze submit, offline parts

def test_submit_preflight_names_the_first_problem(tmp_path):
    with pytest.raises(ClusterError, match="no such file in the working directory"):
        check_command(["run", "--config", "configs/nope.toml"], REPO)
    with pytest.raises(ClusterError, match="pretrain.max_stepz"):
        check_command(["run", "--config", "configs/local.toml", "--pretrain.max_stepz", "3"], REPO)
    with pytest.raises(ClusterError, match="/no/such/corpus"):
        check_command(["run", "--config", "configs/local.toml", "--data.inputs", '["/no/such/corpus"]'], REPO)
    with pytest.raises(ClusterError, match="runs outside the cluster"):
        check_command(["jobs", "list"], REPO)
    with pytest.raises(ClusterError, match="no cloze command"):
        check_command([], REPO)
    # a relative path means what it will mean in the job: relative to the working directory
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert check_command(["run", "--config", "configs/local.toml"], REPO) == []
    finally:
        os.chdir(cwd)


def test_runtime_env_installs_the_pins_unless_the_clusters_env_is_used():
    env = runtime_env(REPO, use_cluster_env=False)
    assert env["working_dir"] == str(REPO) and {".venv", "runs", ".git"} <= set(env["excludes"]) == set(EXCLUDES)
    packages = env["pip"]["packages"]
    assert packages == runtime_packages(REPO)
    assert packages[0] == "-c ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/constraints.txt"
    assert "torch==2.13.0" in packages and all("==" in p for p in packages[1:])
    assert "pip" not in runtime_env(REPO, use_cluster_env=True)


def test_address_resolution(monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert resolve_address(None) == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example.com/")
    assert resolve_address(None) == "https://ray.example.com"
    assert resolve_address("http://head:8265") == "http://head:8265"  # the flag wins
    for bad in ("ray://head:10001", "auto"):
        with pytest.raises(ClusterError, match="not a job server address"):
            resolve_address(bad)


def test_token_sources_in_rays_order_and_never_shown(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert load_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert load_token().value == "home-token"
    (tmp_path / "path-token").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "path-token"))
    assert load_token().value == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert load_token().value == "env-token" and load_token().source == "$RAY_AUTH_TOKEN"
    (tmp_path / "token-file").write_text("flag-token")
    token = load_token(str(tmp_path / "token-file"))
    assert token.value == "flag-token" and "flag-token" not in repr(token)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClusterError, match="is empty"):
        load_token(str(tmp_path / "empty"))
    with pytest.raises(ClusterError, match="cannot read the token file"):
        load_token(str(tmp_path / "missing"))
    assert "s3cr3t" not in repr(Token("s3cr3t", "test"))


def test_failure_reason_finds_the_error_line():
    task_error = ("cloze data: 4 units\n"
                  "cloze run: error: \x1b[36mray::pretrain_stage()\x1b[39m (pid=1, ip=127.0.0.1)\n"
                  '  File "/x/pipelines/train/config.py", line 175, in check_resources\n'
                  '    raise ConfigError(f"use_gpu: ...")\n'
                  "encoder.config.ConfigError: use_gpu: 1 workers x 1.0 GPUs, but the cluster has 0\n")
    assert failure_reason("Job failed", task_error) == (
        "cloze run: error: ConfigError: use_gpu: 1 workers x 1.0 GPUs, but the cluster has 0")
    assert failure_reason(None, "x\ncloze run: error: input 'a': no such file\n") == (
        "cloze run: error: input 'a': no such file")
    crash = 'Traceback (most recent call last):\n  File "a.py", line 1\n    f()\nValueError: boom\nexiting\n'
    assert failure_reason("m", crash) == "ValueError: boom"
    assert failure_reason("runtime_env setup failed: pip\nmore", "") == "runtime_env setup failed: pip"
