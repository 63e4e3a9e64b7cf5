"""The HTTP API of `cloze serve`: request and response schemas (they are the OpenAPI spec at
/openapi.json) and the FastAPI routes of one replica.

Status codes: 400 body is not JSON; 401 bearer token missing or wrong; 404 no such route;
405 wrong method; 413 body, texts per request or characters per text over the limit; 415
not `application/json`; 422 a well-formed body that breaks the schema (missing field, wrong
type, empty list or text, the wrong route for the model's kind); 429 overloaded (retry
after Retry-After); 503 no replica could answer (retry). Errors are
`{"error", "error_type", "request_id"}` (`serve_http`).

Responses are built as plain dicts and serialized once; the response models below
document them in the spec without validating every answer again.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TEXTS_HELP = "texts to predict, each non-empty (limits: GET /v1/model)"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(Strict):
    texts: list[str] | None = Field(None, min_length=1, description=TEXTS_HELP)
    pairs: list[tuple[str, str]] | None = Field(None, min_length=1,
                                                description="text pairs ([CLS] a [SEP] b [SEP]), instead of texts")
    threshold: float | None = Field(None, ge=0, le=1, description="multi-label models only: `labels` are those "
                                                                  "with probability >= this (default: the server's)")

    @model_validator(mode="after")
    def one_input(self):
        if (self.texts is None) == (self.pairs is None):
            raise ValueError("give exactly one of texts or pairs")
        return self


class TextsRequest(Strict):
    texts: list[str] = Field(min_length=1, description=TEXTS_HELP)


class EmbedRequest(TextsRequest):
    pooling: Literal["cls", "mean"] | None = Field(None, description="cls: h_cls; mean: over real tokens; "
                                                                     "default: the server's [serve] pooling")
    normalize: bool = Field(False, description="L2-normalize each vector")


class OpenAIEmbeddingsRequest(Strict):
    input: str | list[str] = Field(min_length=1, description="a text or a non-empty list of texts (token arrays "
                                                           "are not accepted)")
    model: str | None = Field(None, description="accepted for compatibility; the served model answers")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="must equal the model's hidden size if given")
    user: str | None = None


class Prediction(BaseModel):
    label: str = Field(description="the most probable label")
    score: float = Field(description="its probability")
    probs: dict[str, float] = Field(description="label -> probability (softmax; independent sigmoids for a "
                                                "multi-label model)")
    labels: list[str] | None = Field(None, description="multi-label models only: the labels with probability >= "
                                                       "the threshold, most probable first (may be empty)")
    truncated: bool


class ClassifyResponse(BaseModel):
    model: str
    results: list[Prediction]


class Entity(BaseModel):
    type: str
    text: str
    start: int = Field(description="character offset into the original text")
    end: int = Field(description="exclusive character offset")
    score: float
    words: tuple[int, int] = Field(description="[first, last + 1) word indices")


class Word(BaseModel):
    word: str
    start: int
    end: int
    tag: str
    score: float | None = Field(description="null for a word cut off by max_seq_len (tagged O)")


class EntityResult(BaseModel):
    entities: list[Entity]
    words: list[Word]
    truncated: bool


class EntitiesResponse(BaseModel):
    model: str
    results: list[EntityResult]


class EmbedResponse(BaseModel):
    model: str
    pooling: str
    embeddings: list[list[float]]


class ErrorResponse(BaseModel):
    error: str
    error_type: str
    request_id: str


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 429, 503)}


def _validation_message(errors: list[dict]) -> tuple[int, str, str]:
    """FastAPI's validation errors -> (status, message, error_type); the input is never echoed."""
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return 400, "the request body is not valid JSON", "invalid_json"
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
    msg = first.get("msg", "invalid").removeprefix("Value error, ")
    if first.get("type") == "missing" and loc == "body":
        msg = "a JSON object is required"
    return 422, f"{loc}: {msg}", "validation"


def build_api(replica):
    """The ASGI app of one replica: FastAPI routes behind `serve_http.Gate`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    from .serve_app import ROUTES, ApiError
    from .serve_http import REASONS, Gate, error_body

    app = FastAPI(title="cloze", version="1", docs_url="/docs", redoc_url=None,
                  description="A cloze classifier on Ray Serve. " + __doc__.split("\n\n")[1])

    def error(request: Request, status: int, message: str, error_type: str, headers=None) -> Response:
        return Response(error_body(message, error_type, request.state.request_id), status,
                        headers=headers, media_type="application/json")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(request, exc.status, exc.message, exc.error_type)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error(request, *_validation_message(exc.errors()))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):  # Starlette re-raises it after this answer: Gate logs it
        return error(request, 500, "internal error; the server log has details", "internal")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        text = {404: "no such route (see /openapi.json)", 405: "method not allowed on this route"}
        return error(request, exc.status_code, text.get(exc.status_code, "request refused"),
                     REASONS.get(exc.status_code, "error"), getattr(exc, "headers", None))

    def answer(body: dict, headers: dict) -> JSONResponse:
        return JSONResponse(body, headers=headers)

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS,
              summary="label, score and probabilities per text (sequence classifiers)")
    async def classify(body: ClassifyRequest):
        return answer(*await replica.classify(body.texts, body.pairs, body.threshold))

    @app.post("/v1/entities", response_model=EntitiesResponse, responses=ERRORS,
              summary="typed entity spans with character offsets, and per-word tags (token classifiers)")
    async def entities(body: TextsRequest):
        return answer(*await replica.entities(body.texts))

    @app.post("/v1/embed", response_model=EmbedResponse, responses=ERRORS,
              summary="encoder features per text: h_cls or mean-pooled")
    async def embed(body: EmbedRequest):
        rows, _, headers = await replica.embed(body.texts, body.pooling, body.normalize)
        return answer({"model": replica.name, "pooling": body.pooling or replica.cfg.pooling,
                       "embeddings": [r.tolist() for r in rows]}, headers)

    @app.post("/v1/embeddings", responses=ERRORS, summary="OpenAI-shaped embeddings (L2-normalized, server pooling)")
    async def embeddings(body: OpenAIEmbeddingsRequest):
        inputs = [body.input] if isinstance(body.input, str) else body.input
        return answer(*await replica.embeddings_openai(inputs, body.encoding_format, body.dimensions))

    @app.get("/v1/model", responses={401: {"model": ErrorResponse}},
             summary="name, task, labels, max length, provenance and limits")
    async def model_info():
        return JSONResponse({**replica.info, "replica": replica.replica_id})

    @app.get("/healthz", summary="liveness: 200 while this replica serves")
    async def healthz():
        return JSONResponse({"status": "ok", "model": replica.name, "replica": replica.replica_id})

    @app.get("/metrics", summary="Prometheus metrics of every live replica (series labelled by replica)")
    async def metrics():
        return Response(await replica.shared_metrics.render(), media_type=replica.metrics.content_type)

    def on_response(path: str, status: int, seconds: float) -> None:
        replica.metrics.request(path if path in ROUTES else "other", status, seconds)

    return Gate(app, max_body_bytes=replica.cfg.max_body_bytes, auth_digest=replica.auth_digest,
                on_response=on_response)
