"""Prometheus metrics of a serving deployment (`GET /metrics`, text format 0.0.4).

Each replica keeps its own registry and labels every series with its replica id. A scrape
through the proxy reaches one replica, so replicas share their metrics through a small
hub actor (`SharedMetrics`): whichever replica answers, the scrape holds every live
replica's series, and `sum by (route, status) (cloze_requests_total)` counts the whole
deployment. Times are seconds, as Prometheus wants them; sizes are texts and real
(unpadded) tokens.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ReplicaMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, replica: str, model: str):
        self.registry = CollectorRegistry()
        labels = {"replica": replica}
        reg = self.registry

        def hist(name, doc, buckets, extra=()):
            return Histogram(name, doc, ["replica", *extra], buckets=buckets, registry=reg)

        self.requests = Counter("cloze_requests", "HTTP requests answered, by route and status",
                                ["replica", "route", "status"], registry=reg)
        self.texts = Counter("cloze_texts", "texts predicted, by route", ["replica", "route"], registry=reg)
        self.queue = Gauge("cloze_queue_size", "texts waiting for a forward pass in this replica", ["replica"],
                           registry=reg).labels(**labels)
        self.batch_size = hist("cloze_batch_size", "texts per forward pass", SIZE_BUCKETS).labels(**labels)
        self.batch_tokens = hist("cloze_batch_tokens", "real tokens per forward pass", TOKEN_BUCKETS).labels(**labels)
        self.tokenize = hist("cloze_tokenize_seconds", "tokenization time per request", TIME_BUCKETS).labels(**labels)
        self.queue_time = hist("cloze_queue_seconds", "per text: wait from tokenized to its forward pass",
                               TIME_BUCKETS).labels(**labels)
        self.inference = hist("cloze_inference_seconds", "forward pass time per batch", TIME_BUCKETS).labels(**labels)
        self.latency = hist("cloze_request_seconds", "request time inside the replica, by route", TIME_BUCKETS,
                            ("route",))
        Gauge("cloze_model_info", "the model this replica serves", ["replica", "model"],
              registry=reg).labels(replica=replica, model=model).set(1)
        self.replica = replica

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(replica=self.replica, route=route, status=str(status)).inc()
        self.latency.labels(replica=self.replica, route=route).observe(seconds)

    def count_texts(self, route: str, n: int) -> None:
        self.texts.labels(replica=self.replica, route=route).inc(n)

    def batch(self, texts: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(texts)
        self.batch_tokens.observe(tokens)
        self.inference.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# --------------------------------------------------------------------------- one /metrics for the deployment

def merge(texts: list[str]) -> bytes:
    """Prometheus texts of several replicas -> one text: each family once (its HELP and TYPE),
    with every replica's samples (they differ by their `replica` label)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[tuple[str, str], Any] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            key = (fam.name, fam.type)
            if key in families:
                families[key].samples.extend(fam.samples)
            else:
                families[key] = fam

    class Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


class MetricsHub:
    """The latest Prometheus text of each replica of one application (a Ray actor with no
    CPUs, named after the application). It is owned by the replica that created it, so it
    goes away with the application; if that replica dies first the next push makes a new
    one, and within one push interval it knows every live replica again."""

    def __init__(self):
        self.latest: dict[str, tuple[float, str]] = {}

    def push(self, replica: str, text: str) -> None:
        self.latest[replica] = (time.monotonic(), text)

    def drop(self, replica: str) -> None:
        self.latest.pop(replica, None)

    def others(self, replica: str, max_age_s: float) -> list[str]:
        """Every other replica's text, forgetting replicas silent for max_age_s (gone)."""
        now = time.monotonic()
        self.latest = {k: v for k, v in self.latest.items() if now - v[0] <= max_age_s}
        return [text for k, (_, text) in sorted(self.latest.items()) if k != replica]


class SharedMetrics:
    """A replica's side of the hub: a daemon thread pushes this replica's metrics every
    `interval_s`; `render` answers a scrape with this replica's live metrics merged with
    the others' latest, so any replica the proxy picks answers for the whole deployment.
    A replica silent for 5 intervals (at least 10 s) is taken as gone and its series drop
    out, as a pod's do when Prometheus stops finding it. If the hub cannot be reached
    within `timeout_s`, the scrape answers with this replica's metrics alone."""

    def __init__(self, metrics: ReplicaMetrics, app: str, interval_s: float, timeout_s: float = 2.0):
        self.metrics, self.interval_s, self.timeout_s = metrics, interval_s, timeout_s
        self.name = f"cloze-metrics-{app}"
        self.max_age_s = max(5 * interval_s, 10.0)
        self._hub = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cloze-metrics-push", daemon=True)
        self._thread.start()

    def hub(self, fresh: bool = False):
        import ray

        if self._hub is None or fresh:
            self._hub = ray.remote(num_cpus=0)(MetricsHub).options(name=self.name, get_if_exists=True).remote()
        return self._hub

    def push(self) -> None:
        import ray

        text = self.metrics.render().decode()
        try:
            ray.get(self.hub().push.remote(self.metrics.replica, text), timeout=self.timeout_s)
        except ray.exceptions.RayActorError:  # its owner (another replica) is gone: start a new hub
            ray.get(self.hub(fresh=True).push.remote(self.metrics.replica, text), timeout=self.timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.push()
            except Exception:  # a slow or restarting hub: try again next interval, serving goes on
                pass
            self._stop.wait(self.interval_s)

    async def render(self) -> bytes:
        import asyncio

        own = self.metrics.render()
        try:
            others = await asyncio.wait_for(
                asyncio.wrap_future(self.hub().others.remote(self.metrics.replica, self.max_age_s).future()),
                self.timeout_s)
        except Exception:
            return own
        return merge([own.decode(), *others]) if others else own

    def stop(self) -> None:
        """Stop pushing and take this replica's series out (a replica shut down on purpose)."""
        self._stop.set()
        try:
            if self._hub is not None:
                self._hub.drop.remote(self.metrics.replica)
        except Exception:
            pass
