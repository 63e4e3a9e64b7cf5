"""`cloze serve` in operation: NER spans from a token classifier over HTTP; overload refused
with 429 + Retry-After from a bounded queue; a replica killed
under load (client retries on 503/429 keep success >= 99.9%, the deployment heals);
autoscaling up under load and back down; and the command itself: start, hot swap from a
second process, Ctrl-C -> exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from test_serve import TEXTS, error_shape, free_port
from test_serve_inference import tiny_classifier

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("serve-ops")
    return {"seq": tiny_classifier(base / "topics"), "ner": tiny_classifier(base / "ner", kind="token", seed=1),
            "spam": tiny_classifier(base / "spam", seed=2, labels=("ham", "spam"))}


@pytest.fixture(scope="module")
def serving(ray_cluster):
    """deploy(folder, **settings) -> base URL; one app at a time, deleted after each test."""
    from ray import serve

    from pipelines.serve import deploy
    from pipelines.serve_config import ServeConfig

    port = free_port()
    yield lambda folder, **kw: deploy(folder, ServeConfig(port=port, **kw))
    serve.shutdown()


@pytest.fixture
def app_cleanup():
    yield
    from ray import serve

    serve.delete("cloze")


def replicas() -> dict[str, int]:
    from ray import serve

    from pipelines.serve import DEPLOYMENT

    return dict(serve.status().applications["cloze"].deployments[DEPLOYMENT].replica_states)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_entities_are_typed_spans_with_character_offsets(serving, folders, app_cleanup):
    from pipelines.inference import Predictor

    url = serving(folders["ner"], num_cpus=0.5)
    texts = ["John Smith flew from New York to Paris, France.", "Ana met Bob at the Lake Placid lodge."]
    r = requests.post(url + "/v1/entities", json={"texts": texts}, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results == Predictor(folders["ner"]).entities(texts)  # the one inference path, over HTTP
    spans = [e for res in results for e in res["entities"]]
    assert spans and {e["type"] for e in spans} <= {"PER", "LOC"}
    for text, res in zip(texts, results):
        assert [w["word"] for w in res["words"]][:4] == text.split()[:4]
        for e in res["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and 0 <= e["score"] <= 1
    r = requests.post(url + "/v1/classify", json={"texts": texts}, timeout=60)
    assert r.status_code == 422 and error_shape(r)["error_type"] == "wrong_model_kind"
    assert requests.get(url + "/v1/model", timeout=30).json()["task"] == "token"


def test_overload_is_a_429_with_retry_after(serving, folders, app_cleanup):
    """48 simultaneous requests against one in flight and one queued: the others are refused
    at once with 429 + Retry-After, in the JSON shape; the admitted ones succeed."""
    url = serving(folders["seq"], num_cpus=0.5, batching="none", max_ongoing_requests=1, max_queued_requests=1,
                  retry_after_s=2)
    body = json.dumps({"texts": [TEXTS[0] * 12] * 32}).encode()  # serialized once: the threads only send
    barrier = threading.Barrier(48)

    def one(_):
        barrier.wait(timeout=30)
        return requests.post(url + "/v1/classify", data=body, headers={"content-type": "application/json"},
                             timeout=60)

    with ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(one, range(48)))
    codes = sorted({a.status_code for a in answers})
    assert codes == [200, 429], codes
    refused = [a for a in answers if a.status_code == 429]
    assert len(refused) >= 24 and all(a.headers["retry-after"] == "2" for a in refused)
    assert error_shape(refused[0])["error_type"] == "overloaded"


def test_a_killed_replica_costs_no_request_and_heals(serving, folders, app_cleanup):
    """1,000 requests from 4 clients that retry on 503/429 (Retry-After); one of the two
    replicas is killed with ray.kill after 300. >= 99.9% succeed, and the deployment is back
    to two running replicas."""
    import ray

    url = serving(folders["seq"], num_cpus=0.5, min_replicas=2, max_replicas=2, batch_wait_timeout_s=0.002)
    assert replicas().get("RUNNING") == 2
    total, lock = 1000, threading.Lock()
    issued, done, statuses = [0], [], {}

    def client():
        s = requests.Session()
        while True:
            with lock:
                if issued[0] >= total:
                    return
                issued[0] += 1
                text = TEXTS[issued[0] % len(TEXTS)]
            ok = False
            for _ in range(30):  # bounded retries, on 503 / 429 only
                try:
                    r = s.post(url + "/v1/classify", json={"texts": [text]}, timeout=30)
                except requests.ConnectionError:
                    code = -1
                else:
                    code = r.status_code
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                if code in (429, 503):
                    time.sleep(min(float(r.headers.get("retry-after", 1)), 1.0) / 4)
                    continue
                ok = code == 200
                break
            with lock:
                done.append(ok)

    def replica_actors() -> list[str]:
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::cloze#")]

    names = replica_actors()
    assert len(names) == 2
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(done) >= 300, 120, "300 requests")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=300)
    succeeded = sum(1 for x in done if x)
    assert len(done) == total and succeeded / total >= 0.999, (succeeded, statuses)
    assert 500 not in statuses, statuses  # a dead replica is a retryable 503, never a 500
    healed = lambda: (len(now := replica_actors()) == 2 and names[0] not in now  # noqa: E731
                      and replicas() == {"RUNNING": 2})
    wait_for(healed, 120, "a new replica in place of the killed one")
    r = requests.post(url + "/v1/classify", json={"texts": TEXTS}, timeout=30)
    assert r.status_code == 200


def test_multi_label_over_http_and_one_metrics_page_for_two_replicas(serving, tmp_path, app_cleanup):
    """A multi-label folder on two replicas: /v1/classify answers as the Predictor does, a
    request's threshold applies; a scrape through the proxy (whichever replica answers)
    shows both replicas' series, and their sum counts every request the clients sent."""
    from test_serve_inference import ML_TEXTS, TOPICS, multi_label_classifier

    from pipelines.inference import Predictor

    folder = multi_label_classifier(tmp_path / "ml")
    url = serving(folder, num_cpus=0.5, min_replicas=2, max_replicas=2, metrics_interval_s=0.5)
    info = requests.get(url + "/v1/model", timeout=30).json()
    assert info["multi_label"] is True and info["threshold"] == 0.5 and info["labels"] == list(TOPICS)
    want = Predictor(folder).classify(ML_TEXTS)
    sent = 0
    with requests.Session() as s:
        for threshold, expect in ((None, [w["labels"] for w in want]), (0.0, [sorted(TOPICS)] * len(ML_TEXTS))):
            for _ in range(20):
                body = {"texts": ML_TEXTS} | ({} if threshold is None else {"threshold": threshold})
                r = s.post(url + "/v1/classify", json=body, timeout=60)
                sent += 1
                assert r.status_code == 200, r.text
                got = [x["labels"] for x in r.json()["results"]]
                assert (got if threshold is None else [sorted(g) for g in got]) == expect
        assert [x["probs"] for x in r.json()["results"]] == [pytest.approx(w["probs"], abs=1e-5) for w in want]

        def whole_deployment():
            page = s.get(url + "/metrics", timeout=30).text
            ids = {line.split('replica="')[1].split('"')[0] for line in page.splitlines()
                   if line.startswith("cloze_model_info{")}  # every replica has it from its start
            done = sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                       if line.startswith("cloze_requests_total{") and 'route="/v1/classify"' in line
                       and 'status="200"' in line)
            return page if len(ids) == 2 and done == sent else None

        page = wait_for(whole_deployment, 30, f"both replicas' series summing to the {sent} requests sent")
    assert page.count("# TYPE cloze_requests_total counter") == 1  # one family, both replicas' samples


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(serving, folders, app_cleanup):
    url = serving(folders["seq"], num_cpus=0.5, min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                  upscale_delay_s=0.5, downscale_delay_s=2, metrics_interval_s=0.5, look_back_period_s=1,
                  batching="none", max_ongoing_requests=8)
    assert replicas().get("RUNNING") == 1
    stop = threading.Event()

    def client():
        s = requests.Session()
        while not stop.is_set():
            s.post(url + "/v1/classify", json={"texts": TEXTS * 4}, timeout=30)

    with ThreadPoolExecutor(6) as pool:
        for _ in range(6):
            pool.submit(client)
        try:
            wait_for(lambda: replicas().get("RUNNING") == 2, 60, "a second replica under load")
        finally:
            stop.set()
    wait_for(lambda: replicas() == {"RUNNING": 1}, 60, "the extra replica to go once the load stops")


def test_the_command_serves_swaps_and_stops_on_ctrl_c(folders, tmp_path):
    """`cloze serve` in its own process and its own Ray: serves with a token it never
    prints, a second `cloze serve --model` swaps the model, SIGINT exits 0 and cleans up."""
    from faults import kill_tree

    from pipelines.serve import state_file

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["CLOZE_API_TOKEN"] = token = "cli-secret-4242"
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", folders["seq"], "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    try:
        def up():
            try:
                return requests.get(url + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:  # not listening yet, or listening with no replica yet
                return proc.poll() is not None and pytest.fail(open(tmp_path / "serve.log").read()[-2000:])
        wait_for(up, 180, "cloze serve to answer")
        assert requests.get(url + "/v1/model", timeout=10).status_code == 401
        assert requests.get(url + "/v1/model", headers=auth, timeout=10).json()["labels"] == \
            ["negative", "neutral", "positive"]
        swap_env = {k: v for k, v in env.items() if k != "CLOZE_API_TOKEN"}  # the swap keeps the running token
        out = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--model", folders["spam"],
                              "--port", str(port)], capture_output=True, text=True, env=swap_env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        info = requests.get(url + "/v1/model", headers=auth, timeout=10).json()
        assert info["labels"] == ["ham", "spam"]
        assert requests.get(url + "/v1/model", timeout=10).status_code == 401
        assert json.loads(state_file(port).read_text())["pid"] == proc.pid
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        assert not state_file(port).exists()
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/healthz", timeout=5)
        log.seek(0)
        printed = log.read()
        assert token not in printed and "cloze serve: stopping" in printed
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        log.close()
