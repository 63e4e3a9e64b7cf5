"""Prometheus metrics of one serving replica (`GET /metrics`, text format 0.0.4).

Each replica keeps its own registry and labels every series with its replica id: with
several replicas a scrape through the proxy reaches one of them, so a Prometheus that
scrapes them all (or sums by route) sees the whole deployment; the load tests read one.
Times are seconds, as Prometheus wants them; sizes are texts and real (unpadded) tokens.
"""

from __future__ import annotations

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
