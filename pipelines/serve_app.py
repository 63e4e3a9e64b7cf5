"""One serving replica: a classifier folder behind a FastAPI app, on Ray Serve.

Each replica tokenizes its requests in the event loop, hands the texts to the batcher
(`serve_batching`), runs forward passes in a worker thread (`torch.inference_mode`, torch
threads = the replica's CPUs) so the loop keeps accepting and tokenizing, and turns the
outputs into answers with `pipelines.inference.Predictor`: the same code as `cloze score`,
`cloze evaluate` and fine-tuning's dev scoring. The request schemas live in `serve_schema`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from .inference import Encoded, Predictor
from .serve_batching import Item, adapt_batch_queue, batch_cost
from .serve_config import ServeConfig
from .storage import split_query

ROUTES = ("/v1/classify", "/v1/entities", "/v1/embed", "/v1/embeddings", "/v1/model", "/healthz", "/metrics",
          "/openapi.json", "/docs")


class ApiError(Exception):
    """A client's mistake, answered as the JSON error shape with this status."""

    def __init__(self, status: int, message: str, error_type: str):
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type


def provenance(folder: str) -> dict:
    """Where the model came from: cloze.json's facts (code version, init, task, dev metrics)
    and the weights' SHA-256, so a client can tell which model answered."""
    f = Path(folder)
    digest = hashlib.sha256()
    with open(f / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    out = {"weights_sha256": digest.hexdigest(), "source": "huggingface folder"}
    if (f / "cloze.json").is_file():
        info = json.loads((f / "cloze.json").read_text())
        meta = info.get("metadata", {})
        trained = meta.get("finetune_config", {})
        out.update(source="cloze", code_version=info.get("code_version"), architecture=info.get("architecture"),
                   init=meta.get("init"), task_name=trained.get("task_name") or None,
                   dev_metrics=meta.get("dev_metrics"))
    return out


class Replica:
    """The deployment class (`pipelines.serve.application` wraps it with `serve.ingress` and
    `serve.deployment`); its ASGI app is built per replica by `serve_schema.build_api`."""

    def __init__(self, model_dir: str, config: dict, auth_digest: str | None = None):
        from ray import serve

        from .serve_metrics import ReplicaMetrics, SharedMetrics

        self.cfg = ServeConfig.from_dict(config)
        self.model_dir, self.auth_digest = str(model_dir), auth_digest
        self.predictor = Predictor(self.model_dir, max_seq_len=self.cfg.max_seq_len or None,
                                   batch_size=self.cfg.max_batch_size, quantize=self.cfg.quantize,
                                   threads=self.cfg.threads, device=self.cfg.device, dtype=self.cfg.dtype,
                                   threshold=self.cfg.threshold)
        self.name = Path(split_query(self.model_dir)[0].rstrip("/")).name
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.metrics = ReplicaMetrics(self.replica_id, self.name)
        self.shared_metrics = SharedMetrics(self.metrics, context.app_name, self.cfg.metrics_interval_s)
        self.info = {"name": self.name, "task": self.predictor.kind, "labels": self.predictor.labels,
                     "multi_label": self.predictor.multi_label,
                     **({"threshold": self.cfg.threshold} if self.predictor.multi_label else {}),
                     "max_seq_len": self.predictor.max_seq_len,
                     "hidden_size": self.predictor.model.config.hidden_size,
                     "quantize": self.cfg.quantize, "dtype": self.cfg.dtype, "device": self.cfg.device,
                     "pooling": self.cfg.pooling, "batching": self.cfg.batching,
                     "provenance": provenance(self.predictor.folder),  # (a URI's local copy)
                     "limits": {k: getattr(self.cfg, k) for k in (
                         "max_texts_per_request", "max_chars_per_text", "max_body_bytes", "max_batch_size",
                         "max_batch_tokens", "max_ongoing_requests", "max_queued_requests")}}
        self._lock = asyncio.Lock()  # mode none: one forward pass at a time
        self._queue_pending = self.cfg.batching != "none"  # adapt_batch_queue at the first request
        if self.cfg.batching == "none":
            self._batched = None
        else:
            size_fn = batch_cost(self.cfg.max_batch_tokens, self.cfg.max_batch_size) \
                if self.cfg.batching == "tokens" else None
            cap = self.cfg.max_batch_tokens if size_fn else self.cfg.max_batch_size
            self._batched = serve.batch(max_batch_size=cap, batch_wait_timeout_s=self.cfg.batch_wait_timeout_s,
                                        batch_size_fn=size_fn)(self._timed_forward)

    def __del__(self):  # Ray Serve calls it when it stops the replica on purpose
        shared = getattr(self, "shared_metrics", None)
        if shared is not None:
            shared.stop()

    def __serve_build_asgi_app__(self):
        from .serve_schema import build_api

        return build_api(self)

    def describe(self) -> dict:
        """For a hot swap from another process: what this replica serves and how."""
        return {"model_dir": self.model_dir, "config": self.cfg.to_dict(), "auth_digest": self.auth_digest}

    # ------------------------------------------------------------ inference

    def _forward(self, items: list[Item]) -> list[torch.Tensor]:
        """One forward pass per kind of output in the batch (normally one)."""
        out: list = [None] * len(items)
        for op in dict.fromkeys(i.op for i in items):
            idx = [k for k, i in enumerate(items) if i.op == op]
            enc = Encoded.join([items[k].enc for k in idx])
            rows = self.predictor.logits(enc) if op == "logits" else self.predictor.embeddings(enc, op)
            for k, row in zip(idx, rows):
                out[k] = row
        return out

    async def _timed_forward(self, items: list[Item]) -> list[tuple[torch.Tensor, float, float]]:
        start = time.perf_counter()
        self.metrics.queue.dec(len(items))
        for i in items:
            i.started = True
        rows = await asyncio.to_thread(self._forward, items)
        took = time.perf_counter() - start
        self.metrics.batch(len(items), sum(i.tokens for i in items), took)
        for i in items:
            self.metrics.queue_time.observe(start - i.enqueued)
        return [(row, start - i.enqueued, took) for row, i in zip(rows, items)]

    async def infer(self, op: str, enc: Encoded) -> tuple[list[torch.Tensor], float, float]:
        """Rows of output for the encoded texts, plus the request's queue and inference time
        (its slowest text's)."""
        now = time.perf_counter()
        items = [Item(op, row, len(row.input_ids[0]), now) for row in enc.rows()]
        self.metrics.queue.inc(len(items))
        try:
            if self._batched is None:
                async with self._lock:
                    results = await self._timed_forward(items)
            else:
                if self._queue_pending:
                    adapt_batch_queue(self._batched)
                    self._queue_pending = False
                results = await asyncio.gather(*(self._batched(i) for i in items))
        finally:  # a client that went away: Serve drops its texts from the queue unrun
            self.metrics.queue.dec(sum(1 for i in items if not i.started))
        return [r for r, _, _ in results], max(q for _, q, _ in results), max(t for _, _, t in results)

    # ------------------------------------------------------------ routes (called by serve_schema)

    def check_texts(self, texts: list[str], field: str = "texts") -> None:
        cfg = self.cfg
        if len(texts) > cfg.max_texts_per_request:
            raise ApiError(413, f"{field}: {len(texts)} texts; the limit is {cfg.max_texts_per_request} per request",
                           "payload_too_large")
        for i, t in enumerate(texts):
            if not t.strip():
                raise ApiError(422, f"{field}[{i}] is empty", "validation")
            if len(t) > cfg.max_chars_per_text:
                raise ApiError(413, f"{field}[{i}] has {len(t)} characters; the limit is {cfg.max_chars_per_text}",
                               "payload_too_large")

    def need(self, kind: str, route: str) -> None:
        if self.predictor.kind != kind:
            other = "/v1/classify" if self.predictor.kind == "sequence" else "/v1/entities"
            raise ApiError(422, f"{route} needs a {kind} classifier; this model ({self.name}) is a "
                                f"{self.predictor.kind} classifier: use {other}", "wrong_model_kind")

    async def _run(self, route: str, op: str, enc: Encoded, tokenize_s: float):
        rows, queue_s, infer_s = await self.infer(op, enc)
        self.metrics.tokenize.observe(tokenize_s)
        self.metrics.count_texts(route, len(enc))
        headers = {"x-compute-time": f"{(tokenize_s + infer_s) * 1000:.3f}", "x-queue-time": f"{queue_s * 1000:.3f}",
                   "x-tokenization-time": f"{tokenize_s * 1000:.3f}", "x-inference-time": f"{infer_s * 1000:.3f}",
                   "x-compute-tokens": str(sum(len(x) for x in enc.input_ids))}
        return rows, headers

    async def classify(self, texts: list[str] | None, pairs: list[tuple[str, str]] | None,
                       threshold: float | None = None):
        self.need("sequence", "/v1/classify")
        if threshold is not None and not self.predictor.multi_label:
            raise ApiError(422, f"threshold: this model ({self.name}) is single-label (softmax); threshold applies "
                                f"to multi-label models", "validation")
        a = texts if texts is not None else [p[0] for p in pairs]
        b = None if texts is not None else [p[1] for p in pairs]
        self.check_texts(a, "texts" if texts is not None else "pairs")
        if b is not None:
            self.check_texts(b, "pairs")
        t0 = time.perf_counter()
        enc = self.predictor.encode(a, b)
        rows, headers = await self._run("/v1/classify", "logits", enc, time.perf_counter() - t0)
        return {"model": self.name, "results": self.predictor.classify_rows(rows, enc.truncated, threshold)}, headers

    async def entities(self, texts: list[str]):
        self.need("token", "/v1/entities")
        self.check_texts(texts)
        t0 = time.perf_counter()
        enc, split = self.predictor.encode_texts_as_words(texts)
        rows, headers = await self._run("/v1/entities", "logits", enc, time.perf_counter() - t0)
        results = [self.predictor.entity_row(row, first, text, offsets, cut) for row, first, text, (_, offsets), cut
                   in zip(rows, enc.first_piece, texts, split, enc.truncated)]
        return {"model": self.name, "results": results}, headers

    async def embed(self, texts: list[str], pooling: str | None, normalize: bool, route: str = "/v1/embed"):
        self.check_texts(texts, "texts" if route == "/v1/embed" else "input")
        pooling = pooling or self.cfg.pooling
        t0 = time.perf_counter()
        enc = self.predictor.encode(texts)
        rows, headers = await self._run(route, pooling, enc, time.perf_counter() - t0)
        if normalize:
            rows = [torch.nn.functional.normalize(r, dim=-1) for r in rows]
        return rows, enc, headers

    async def embeddings_openai(self, inputs: list[str], encoding_format: str, dimensions: int | None):
        hidden = self.predictor.model.config.hidden_size
        if dimensions is not None and dimensions != hidden:
            raise ApiError(422, f"dimensions: this model returns {hidden}-dimensional embeddings", "validation")
        rows, enc, headers = await self.embed(inputs, None, True, "/v1/embeddings")
        data = []
        for i, row in enumerate(rows):
            vec = base64.b64encode(row.numpy().astype(np.float32).tobytes()).decode() \
                if encoding_format == "base64" else row.tolist()
            data.append({"object": "embedding", "index": i, "embedding": vec})
        tokens = sum(len(x) for x in enc.input_ids)
        return {"object": "list", "data": data, "model": self.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, headers
