"""`cloze serve`: a classifier folder as an HTTP endpoint on Ray Serve.

    cloze serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--config FILE.toml] [--serve.KEY VALUE ...]
    cloze serve --model NEW_DIR [--port 8000 | --address RAY_ADDRESS]     # hot swap

Python: `deploy(model_dir, config)` -> base URL (in-process; the DAG uses it), `swap(new_dir)`,
`shutdown()`. The replica is `serve_app.Replica`, its routes `serve_schema`, its batching
`serve_batching`, its HTTP edge `serve_http`, its settings `serve_config.ServeConfig`.

A hot swap redeploys the same application with the new folder: Ray Serve starts replicas
of the new version and drains the old ones (each finishes its in-flight requests within
`graceful_shutdown_timeout_s`); requests that arrive meanwhile wait at the proxy, so none
fails. The swapping process finds the cluster through the state file the serving process
writes (`state_file(port)`), and reuses the running app's settings and token digest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import ConfigError
from .ray_session import start_ray
from .serve_config import ServeConfig

DEPLOYMENT = "Classifier"

DESCRIPTION = """\
Serve a classifier folder (from `cloze finetune`, or any HF BertForSequenceClassification /
BertForTokenClassification folder) on Ray Serve, on 127.0.0.1 unless --host says otherwise.

Routes: POST /v1/classify {"texts": [...]} or {"pairs": [[a, b], ...]}; POST /v1/entities
{"texts": [...]} (token classifiers: typed spans with character offsets, per-word tags);
POST /v1/embed, POST /v1/embeddings (OpenAI shape); GET /v1/model, /healthz, /metrics
(Prometheus), /openapi.json. Dynamic batching by a token budget (or count, or none),
bounded queues (429 + Retry-After when full), limits on texts, characters and body size
(413), one JSON error shape. With CLOZE_API_TOKEN set, every route but /healthz, /metrics and
the spec needs `Authorization: Bearer <token>` (never printed or logged). Ctrl-C stops the
endpoint and exits 0.

Hot swap: `cloze serve --model NEW_DIR [--port P]` against a running `cloze serve` on port P
replaces the model without failing in-flight requests."""


def state_file(port: int) -> Path:
    """Where the serving process on `port` records its Ray address (for hot swaps)."""
    return Path(tempfile.gettempdir()) / f"cloze-serve-{port}.json"


def check_model(model_dir: str, cfg: ServeConfig) -> str:
    """The folder's absolute path (a URI as it is), after loading it once here (a bad folder
    or a setting the model cannot take fails before Ray or a replica starts)."""
    from .inference import Predictor, folder_kind

    from .storage import is_uri, local_copy

    if is_uri(model_dir):  # replicas copy it to their own node; check a copy on this one
        try:
            folder = Path(local_copy(model_dir))
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    else:
        folder = Path(model_dir).expanduser().resolve()
    if folder_kind(str(folder)) is None:
        raise ConfigError(f"{model_dir}: not a classifier folder (config.json with "
                          f"BertForSequenceClassification / BertForTokenClassification)")
    try:
        pred = Predictor(str(folder), max_seq_len=cfg.max_seq_len or None)
    except Exception as e:  # a broken folder: say which, not a stack
        raise ConfigError(f"{model_dir}: cannot load the model ({type(e).__name__}: {e})") from None
    if pred.max_seq_len > pred.model.config.max_position_embeddings:
        raise ConfigError(f"serve.max_seq_len {pred.max_seq_len} > the model's max_position_embeddings "
                          f"{pred.model.config.max_position_embeddings}")
    cfg.check_model(pred.max_seq_len)
    return model_dir if is_uri(model_dir) else str(folder)


def application(model_dir: str, cfg: ServeConfig, auth_digest: str | None):
    """The Serve application: one ingress deployment of `Replica` with cfg's batching,
    queue bounds, backpressure (429 + Retry-After), CPUs and autoscaling."""
    from ray import serve

    from .serve_app import Replica

    if cfg.autoscaling:
        scaling: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas, "initial_replicas": cfg.min_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests, "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s, "metrics_interval_s": cfg.metrics_interval_s,
            "look_back_period_s": cfg.look_back_period_s}}
    else:
        scaling = {"num_replicas": cfg.min_replicas}
    deployment = serve.deployment(
        serve.ingress()(Replica), name=DEPLOYMENT, max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config={"status_code": 429, "retry_after_s": cfg.retry_after_s},
        ray_actor_options=cfg.actor_options, graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
        **scaling)
    return deployment.bind(model_dir, cfg.to_dict(), auth_digest)


def app_builder(args: dict):
    """`import_path: pipelines.serve:app_builder` for `serve run` / a RayService's
    serveConfigV2, with `args: {model_dir: DIR, <any [serve] key>: value}`. There Serve's own
    config sets host and port, and the JSON error layer of the proxy needs
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=pipelines.serve_http:proxy_middlewares in the
    nodes' environment; the token comes from CLOZE_API_TOKEN where this builder runs."""
    from .serve_http import token_digest

    args = dict(args)
    if "model_dir" not in args:
        raise ConfigError("app_builder args need model_dir")
    model_dir = args.pop("model_dir")
    cfg = ServeConfig.from_dict(args)
    token = os.environ.get("CLOZE_API_TOKEN")
    return application(check_model(model_dir, cfg), cfg, token_digest(token) if token else None)


def _start_serve(cfg: ServeConfig) -> str:
    """Start Serve's proxy on cfg's host and port (with the JSON error layer), or reuse a
    running one on the same address; returns the base URL."""
    from ray import serve
    from ray.serve.context import _get_global_client

    # the proxy is the controller's child and inherits its environment: that is how the
    # JSON error layer (serve_http.ProxyErrors) and its limits reach it
    env = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "pipelines.serve_http:proxy_middlewares",
           "CLOZE_SERVE_MAX_BODY_BYTES": str(cfg.max_body_bytes), "CLOZE_SERVE_RETRY_AFTER_S": str(cfg.retry_after_s)}
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s},
                controller_options={"runtime_env": {"env_vars": env}})
    http = _get_global_client().http_config  # a running Serve keeps its own options
    if (http.host, http.port) != (cfg.host, cfg.port):
        raise ConfigError(f"Ray Serve already listens on {http.host}:{http.port} in this cluster, not "
                          f"{cfg.host}:{cfg.port}; use that port or another cluster")
    return f"http://{cfg.host}:{cfg.port}"


def deploy(model_dir: str, config: ServeConfig | None = None, api_token: str | None = None,
           address: str | None = None) -> str:
    """Deploy `model_dir` on Ray Serve (starting or joining Ray as needed) and return the base
    URL once every replica is ready. `api_token` (default: env CLOZE_API_TOKEN) turns on
    bearer authentication (all routes but health, metrics and the spec); only its SHA-256
    digest leaves this process."""
    from ray import serve

    from .serve_http import token_digest

    cfg = config or ServeConfig()
    folder = check_model(model_dir, cfg)
    token = api_token if api_token is not None else os.environ.get("CLOZE_API_TOKEN") or None
    start_ray(lambda *a: None, "cloze serve", address=address, configure_logging=False)
    check_gpus(cfg)
    url = _start_serve(cfg)
    serve.run(application(folder, cfg, token_digest(token) if token else None), name=cfg.name, route_prefix="/")
    return url


def check_gpus(cfg: ServeConfig) -> None:
    """GPU replicas on a cluster without the GPUs for `min_replicas` of them would wait
    forever for resources: refused before anything is deployed."""
    import ray

    have = ray.cluster_resources().get("GPU", 0.0)
    if cfg.num_gpus and have < cfg.num_gpus * cfg.min_replicas:
        raise ConfigError(f"serve.num_gpus = {cfg.num_gpus:g} x min_replicas {cfg.min_replicas} needs "
                          f"{cfg.num_gpus * cfg.min_replicas:g} GPUs; the Ray cluster has {have:g}")


def swap(model_dir: str, name: str = "cloze", timeout_s: float = 300.0) -> dict:
    """Replace the model of the running application `name` (same settings and token), and
    wait until every replica serves the new folder. Returns the replica's description."""
    from ray import serve

    handle = serve.get_app_handle(name)
    current = handle.describe.remote().result(timeout_s=60)
    cfg = ServeConfig.from_dict(current["config"])
    folder = check_model(model_dir, cfg)
    serve.run(application(folder, cfg, current["auth_digest"]), name=name, route_prefix="/")
    deadline = time.monotonic() + timeout_s
    while True:  # serve.run returns once the new version is up; old replicas may still be draining
        status = serve.status().applications[name].deployments[DEPLOYMENT]
        if str(status.status).endswith("HEALTHY") and not status.replica_states.get("STOPPING"):
            return handle.describe.remote().result(timeout_s=60)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the swap to {folder} did not settle within {timeout_s:.0f} s: {status.replica_states}")
        time.sleep(0.5)


def shutdown() -> None:
    """Stop every Serve application and the proxy (Ray itself keeps running)."""
    from ray import serve

    serve.shutdown()


# ------------------------------------------------------------------ CLI

def _config(args: argparse.Namespace, overrides: dict[str, Any]) -> ServeConfig:
    flags = {f"serve.{k}": v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    return ServeConfig.from_toml(args.config, {**overrides, **flags})


def _check_port(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None


def _serve_forever(args: argparse.Namespace, cfg: ServeConfig) -> int:
    import signal
    import threading

    import ray

    if not args.address:  # a fresh local Ray: nothing of ours holds the port yet
        _check_port(cfg.host, cfg.port)
    stop = threading.Event()
    url = deploy(args.model_dir, cfg, address=args.address)  # checks the folder before Ray starts
    folder = args.model_dir if "://" in args.model_dir else str(Path(args.model_dir).expanduser().resolve())
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
        signal.signal(sig, lambda *_: stop.set())
    state = state_file(cfg.port)
    state.write_text(json.dumps({"address": ray.get_runtime_context().gcs_address, "name": cfg.name,
                                 "pid": os.getpid(), "url": url, "auth_mode": os.environ.get("RAY_AUTH_MODE")}))
    auth = " (bearer token from CLOZE_API_TOKEN required)" if os.environ.get("CLOZE_API_TOKEN") else ""
    print(f"cloze serve: {Path(folder.split('?')[0].rstrip('/')).name} at {url}{auth}; docs {url}/docs; "
          f"Ctrl-C stops", flush=True)
    print(f"cloze serve: swap the model with: cloze serve --model NEW_DIR --port {cfg.port}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("cloze serve: stopping", flush=True)
        state.unlink(missing_ok=True)
        shutdown()
        ray.shutdown()
    return 0


def _swap(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    if args.config or overrides or args.host:
        raise ConfigError("--model swaps the model of a running app with its settings: no --config, --host "
                          "or --serve.* options")
    address, name = args.address, "cloze"
    if not address:
        port = args.port or ServeConfig().port
        path = state_file(port)
        if not path.is_file():
            raise ConfigError(f"no `cloze serve` found on port {port} ({path} missing); give --port or --address")
        info = json.loads(path.read_text())
        if not _alive(info["pid"]):
            raise ConfigError(f"the `cloze serve` on port {port} (pid {info['pid']}) is gone; {path} is stale")
        address, name = info["address"], info["name"]
        if info.get("auth_mode"):  # Ray 2.60 reads the client's token mode when it is imported
            os.environ.setdefault("RAY_AUTH_MODE", info["auth_mode"])
    import ray

    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as e:
        raise ConfigError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    try:
        desc = swap(args.model, name)
    finally:
        ray.shutdown()
    print(f"cloze serve: now serving {desc['model_dir']} (app {name})")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_serve(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    try:
        if args.model and args.model_dir:
            raise ConfigError("give MODEL_DIR to start serving, or --model NEW_DIR to swap a running app's model")
        if args.model:
            return _swap(args, overrides)
        if not args.model_dir:
            raise ConfigError("MODEL_DIR is required (or --model NEW_DIR to swap a running app's model)")
        cfg = _config(args, overrides)
        return _serve_forever(args, cfg)
    except ConfigError as e:
        print(f"cloze serve: error: {e}", file=sys.stderr)
        return 2


def _options_help() -> str:
    from .cli import table_help

    return table_help(ServeConfig, "serve")


def add_command(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a classifier over HTTP on Ray Serve", description=DESCRIPTION,
                              epilog=_options_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="the classifier folder to serve")
    p.add_argument("--model", metavar="NEW_DIR", help="hot swap: serve NEW_DIR on the running app (no MODEL_DIR)")
    p.add_argument("--host", help="interface to bind (default 127.0.0.1; [serve] host)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000; [serve] port); with --model: the running app's")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file; its [serve] table is read")
    p.add_argument("--address", metavar="RAY_ADDRESS",
                   help="a running Ray cluster (host:port) to deploy on or to swap on; default: start a local one")
    p.set_defaults(run=cmd_serve)
