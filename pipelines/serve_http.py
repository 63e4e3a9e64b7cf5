"""The HTTP edge of `cloze serve`: one error shape everywhere, and the checks that must run
before FastAPI parses anything.

Every error is `{"error": message, "error_type": kind, "request_id": id}` with a 4xx for a
client's mistake, 429 + Retry-After when overloaded and 503 + Retry-After when no replica
can answer. No exception text or stack ever reaches a client. Two pure-ASGI layers:

- `Gate`, in each replica around the FastAPI app: bearer token on every route but the open
  ones (`OPEN`: health, metrics, the spec; SHA-256 digests compared in constant time; the
  token itself never reaches the replica), JSON content
  type on POST (415), body size (413, before parsing), and a last-resort 500 for a bug.
- `ProxyErrors`, in Ray Serve's HTTP proxy (via `http_options.middlewares`): Serve answers
  backpressure (429), no replica (503), timeouts (408) and a replica that died mid-request
  (500, with the exception's text) itself, in plain text. This layer rewrites those into
  the JSON shape (a dead replica becomes a retryable 503) and refuses a declared body over
  the limit before the proxy buffers it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Callable

log = logging.getLogger("ray.serve")

OPEN = ("/healthz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect")  # no token needed
REASONS = {400: "invalid_json", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
           408: "timeout", 413: "payload_too_large", 415: "unsupported_media_type", 422: "validation",
           429: "overloaded", 500: "internal", 503: "unavailable"}


def error_body(message: str, error_type: str, request_id: str) -> bytes:
    return json.dumps({"error": message, "error_type": error_type, "request_id": request_id}).encode()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def header(scope_or_message: dict, name: bytes) -> str | None:
    for k, v in scope_or_message.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def send_error(send, status: int, message: str, error_type: str, request_id: str,
                     extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = error_body(message, error_type, request_id)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


def is_json(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";", 1)[0].strip().lower() in ("application/json",)


class Gate:
    """Checks in front of one replica's FastAPI app (see the module docstring).

    `on_response(path, status, seconds)` is told about every answer, errors included."""

    def __init__(self, app, *, max_body_bytes: int, auth_digest: str | None,
                 on_response: Callable[[str, int, float], None]):
        self.app, self.max_body_bytes, self.auth_digest, self.on_response = app, max_body_bytes, auth_digest, on_response

    def authorized(self, scope: dict) -> bool:
        value = header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        given = token_digest(token.strip()) if scheme.lower() == "bearer" else ""
        return hmac.compare_digest(given.encode(), self.auth_digest.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        rid = header(scope, b"x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        status = {"code": 500, "started": False}

        async def tracked(message):
            if message["type"] == "http.response.start":
                status.update(code=message["status"], started=True)
            await send(message)

        try:
            if self.auth_digest and path not in OPEN and not self.authorized(scope):
                return await send_error(tracked, 401, "missing or wrong bearer token (Authorization: Bearer ...)",
                                        "unauthorized", rid, [(b"www-authenticate", b"Bearer")])
            if scope["method"] == "POST":
                if not is_json(header(scope, b"content-type")):
                    return await send_error(tracked, 415, "the request body must be JSON "
                                            "(Content-Type: application/json)", "unsupported_media_type", rid)
                declared = header(scope, b"content-length")
                if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
                    return await send_error(tracked, 413, f"request body is {declared} bytes; the limit is "
                                            f"{self.max_body_bytes}", "payload_too_large", rid)
                body = await self._read(receive)
                if body is None:
                    return await send_error(tracked, 413, f"request body exceeds {self.max_body_bytes} bytes",
                                            "payload_too_large", rid)
                receive = _replay(body, receive)
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("request %s failed", rid)  # the replica's log has the stack; the client never does
            if not status["started"]:
                await send_error(tracked, 500, "internal error; the server log has details", "internal", rid)
        finally:
            self.on_response(path, status["code"], time.perf_counter() - t0)

    async def _read(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


class ProxyErrors:
    """Serve's own error answers in the JSON shape (see the module docstring)."""

    def __init__(self, app, max_body_bytes: int = 2 * 1024 * 1024, retry_after_s: int = 1):
        self.app, self.max_body_bytes, self.retry_after = app, max_body_bytes, str(retry_after_s).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            rid = header(scope, b"x-request-id") or str(uuid.uuid4())
            return await send_error(send, 413, f"request body is {declared} bytes; the limit is "
                                    f"{self.max_body_bytes}", "payload_too_large", rid, [(b"x-request-id", rid.encode())])
        state = {"started": False, "rewrite": None}

        async def shaped(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                code = message["status"]
                if code >= 400 and not is_json(header(message, b"content-type")):
                    state["rewrite"] = message
                    return
            elif state["rewrite"] is not None:
                if not message.get("more_body", False):
                    await self._send_shaped(send, state["rewrite"])
                return
            await send(message)

        try:
            await self.app(scope, receive, shaped)
        except Exception:
            if state["started"]:
                raise
            log.warning("the proxy failed before answering; sent 503")
            await self._send_shaped(send, {"status": 500, "headers": []})
            return
        if not state["started"]:  # the app returned without answering: Serve's 500 path
            await self._send_shaped(send, {"status": 500, "headers": []})

    async def _send_shaped(self, send, start: dict) -> None:
        code = start["status"]
        keep = [(k, v) for k, v in start.get("headers", []) if k.lower() in (b"x-request-id", b"retry-after")]
        rid = header(start, b"x-request-id") or str(uuid.uuid4())
        if not any(k.lower() == b"x-request-id" for k, _ in keep):
            keep.append((b"x-request-id", rid.encode()))
        messages = {408: "the request timed out in the server",
                    429: "the server is overloaded; retry after the Retry-After delay",
                    404: "no such route"}
        if code >= 500:  # no replica, or the replica died mid-request: retryable, never a bug report
            code, text = 503, "no replica could answer; retry after the Retry-After delay"
        else:
            text = messages.get(code, "the request was refused")
        if code in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in keep):
            keep.append((b"retry-after", self.retry_after))
        await send_error(send, code, text, REASONS.get(code, "error"), rid, keep)


def proxy_middlewares() -> list:
    """The proxy's middleware list, for RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (Ray Serve
    2.60 dropped `http_options.middlewares`); limits come from the proxy's environment."""
    import os

    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors, max_body_bytes=int(os.environ.get("CLOZE_SERVE_MAX_BODY_BYTES", 2 * 1024 * 1024)),
                       retry_after_s=int(os.environ.get("CLOZE_SERVE_RETRY_AFTER_S", 1)))]
