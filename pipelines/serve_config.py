"""`[serve]`: how `cloze serve` deploys a classifier on Ray Serve. Every value is checked
here, before Ray starts (a bad one is a ConfigError naming it), including the pairs Ray
Serve would accept silently: a batch larger than `max_ongoing_requests` never fills (Ray
issues #43288, #44052), and an unbounded queue turns overload into timeouts instead of 429s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from .config import ConfigError, apply_overrides, build_dataclass, check_inference, load_toml

BATCHING_MODES = ("tokens", "count", "none")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # the HTTP proxy's interface; 0.0.0.0 exposes the endpoint to the network
    port: int = 8000  # the HTTP proxy's port
    name: str = "cloze"  # the Serve application's name (hot swap and shutdown find it by name)
    batching: str = "tokens"  # tokens: a forward closes at max_batch_tokens | count: at max_batch_size texts | none: one forward per request
    max_batch_size: int = 32  # texts per forward pass (also the cap in tokens mode)
    max_batch_tokens: int = 4096  # real tokens per forward pass in tokens mode (padding is dropped before the layers)
    batch_wait_timeout_s: float = 0.0  # extra wait for more texts when a batch is not full (it already takes all that arrived during the previous forward pass)
    max_ongoing_requests: int = 64  # requests a replica holds at once (>= max_batch_size, or batches never fill)
    max_queued_requests: int = 128  # requests waiting at the proxy for a replica; beyond it: 429 + Retry-After
    retry_after_s: int = 1  # the Retry-After of a 429 (overload) or 503 (replica unavailable)
    min_replicas: int = 1  # replicas never fewer than this (= max_replicas: a fixed count, no autoscaling)
    max_replicas: int = 1  # autoscaling's ceiling
    target_ongoing_requests: float = 16.0  # autoscaling adds replicas when the mean per replica is above this
    upscale_delay_s: float = 5.0  # load must stay above target this long before a replica is added
    downscale_delay_s: float = 30.0  # and below it this long before one is removed
    metrics_interval_s: float = 1.0  # how often replicas report their load to the autoscaler and their /metrics to each other
    look_back_period_s: float = 5.0  # the window the autoscaler averages load over
    num_cpus: float = 1.0  # CPUs reserved per replica; torch threads = max(1, floor(num_cpus))
    max_texts_per_request: int = 32  # texts in one request; more is a 413
    max_chars_per_text: int = 20000  # characters in one text; more is a 413
    max_body_bytes: int = 2 * 1024 * 1024  # request body size; more is a 413
    max_seq_len: int = 0  # tokens per text ([CLS]/[SEP] included; longer ones are cut); 0 = the model's
    quantize: str = "none"  # none | int8 (dynamic int8 Linear layers, CPU)
    num_gpus: float = 0.0  # GPUs per replica (e.g. 1, or 0.5 to pack two replicas on a GPU); 0 = CPU replicas
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (fp16: GPU replicas only); outputs are fp32 either way
    threshold: float = 0.5  # multi-label models: /v1/classify's `labels` are those with probability >= this (a request may set its own)
    pooling: str = "mean"  # /v1/embed and /v1/embeddings default: cls (h_cls) | mean (mean over real tokens)
    request_timeout_s: float = 30.0  # the proxy answers 408 after this long
    graceful_shutdown_timeout_s: float = 20.0  # a replica being replaced finishes its requests within this

    def __post_init__(self) -> None:
        checks = [
            ("batching", self.batching in BATCHING_MODES, f"must be one of {', '.join(BATCHING_MODES)}"),
            ("port", 0 < self.port < 65536, "must be a TCP port (1-65535)"),
            ("name", bool(self.name) and self.name.replace("-", "").replace("_", "").isalnum(),
             "must be a non-empty name of letters, digits, - and _"),
            ("max_batch_size", self.max_batch_size >= 1, "must be >= 1"),
            ("max_batch_tokens", self.max_batch_tokens >= 8, "must be >= 8"),
            ("batch_wait_timeout_s", 0 <= self.batch_wait_timeout_s <= 10, "must be in [0, 10]"),
            ("max_ongoing_requests", self.max_ongoing_requests >= 1, "must be >= 1"),
            ("max_queued_requests", self.max_queued_requests >= 1,
             "must be >= 1 (an unbounded queue answers overload with timeouts, not 429)"),
            ("retry_after_s", self.retry_after_s >= 0, "must be >= 0"),
            ("min_replicas", self.min_replicas >= 1, "must be >= 1"),
            ("max_replicas", self.max_replicas >= self.min_replicas, f"must be >= min_replicas ({self.min_replicas})"),
            ("target_ongoing_requests", self.target_ongoing_requests > 0, "must be > 0"),
            ("upscale_delay_s", self.upscale_delay_s >= 0, "must be >= 0"),
            ("downscale_delay_s", self.downscale_delay_s >= 0, "must be >= 0"),
            ("metrics_interval_s", self.metrics_interval_s > 0, "must be > 0"),
            ("look_back_period_s", self.look_back_period_s > 0, "must be > 0"),
            ("num_cpus", 0 < self.num_cpus <= 1024, "must be in (0, 1024]"),
            ("max_texts_per_request", self.max_texts_per_request >= 1, "must be >= 1"),
            ("max_chars_per_text", self.max_chars_per_text >= 1, "must be >= 1"),
            ("max_body_bytes", self.max_body_bytes >= 1024, "must be >= 1024"),
            ("max_seq_len", self.max_seq_len == 0 or 8 <= self.max_seq_len <= 8192, "must be 0 or in [8, 8192]"),
            ("num_gpus", 0 <= self.num_gpus <= 64, "must be in [0, 64]"),
            ("pooling", self.pooling in ("cls", "mean"), "must be cls or mean"),
            ("threshold", 0 <= self.threshold <= 1, "must be in [0, 1]"),
            ("request_timeout_s", self.request_timeout_s > 0, "must be > 0"),
            ("graceful_shutdown_timeout_s", self.graceful_shutdown_timeout_s >= 0, "must be >= 0"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"serve.{key} {why}, got {getattr(self, key)!r}")
        check_inference(self.quantize, self.device, self.dtype, "serve.")
        if self.batching != "none" and self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(
                f"serve.max_ongoing_requests ({self.max_ongoing_requests}) < serve.max_batch_size "
                f"({self.max_batch_size}): Ray Serve caps a batch at the requests a replica holds, so it would "
                f"never fill; raise max_ongoing_requests or lower max_batch_size")

    @property
    def threads(self) -> int:
        """torch intra-op threads of a replica: its reserved CPUs (an actor without num_cpus runs
        with OMP_NUM_THREADS=1)."""
        return max(1, math.floor(self.num_cpus))

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    @property
    def actor_options(self) -> dict[str, float]:
        """A replica's Ray resources."""
        return {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {})}

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > self.min_replicas

    def check_model(self, max_seq_len: int) -> None:
        """Settings that depend on the model: one text must fit a token batch on its own."""
        if self.batching == "tokens" and self.max_batch_tokens < max_seq_len:
            raise ConfigError(f"serve.max_batch_tokens ({self.max_batch_tokens}) < the model's max_seq_len "
                              f"({max_seq_len}): one long text would not fit a batch")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> "ServeConfig":
        return build_dataclass(cls, table, "serve.")

    @classmethod
    def from_toml(cls, path, overrides: Mapping[str, Any] | None = None) -> "ServeConfig":
        """The `[serve]` table of a TOML file (or defaults), then `--serve.KEY VALUE` overrides;
        an override outside `serve.` is an error."""
        bad = next((k for k in (overrides or {}) if k.split(".", 1)[0] != "serve"), None)
        if bad:
            raise ConfigError(f"{bad}: `cloze serve` reads only the [serve] table")
        raw = load_toml(path) if path else {}
        if overrides:
            raw = apply_overrides(raw, overrides)
        table = raw.get("serve", {})
        if not isinstance(table, Mapping):
            raise ConfigError("serve: expected a table")
        return cls.from_dict(table)
