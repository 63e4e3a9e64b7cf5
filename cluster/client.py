"""Reaching a Ray cluster's job server (the dashboard's HTTP port, 8265) with the Ray Jobs SDK.

Token authentication in Ray 2.60: the dashboard of a cluster started with token auth answers
401 to a request without `Authorization: Bearer <token>` and 403 to a wrong token, on every
route but its health checks (`/api/version` included). A cluster has token auth when it was
started with `RAY_AUTH_MODE=token`, or by `ray start` when RAY_AUTH_MODE is unset and a token
already exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); `ray.init()` of a
new local cluster always turns it on and writes ~/.ray/auth_token if missing. KubeRay sets it
up from the RayCluster's `authOptions`.

The token is read here from the same places Ray's own loader looks, in the same order after
an explicit `--token-file`, and sent as that header. It is never printed, logged or put in a
job's runtime_env: the job's driver runs on the head node and gets the cluster's own token
from there.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONNECT_TIMEOUT_S = 10.0


class ClusterError(Exception):
    """Something the user fixes before anything reaches the cluster (exit status 2)."""


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)  # never shown: not in repr, messages or logs
    source: str  # where it came from, for messages: "--token-file /p", "$RAY_AUTH_TOKEN", ...


def resolve_address(address: str | None) -> str:
    """The job server URL: --address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS (what Ray's
    own `ray job` reads), else the local default. `host:port` means http://host:port."""
    source = "--address"
    if not address:
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            if os.environ.get(var):
                address, source = os.environ[var], f"${var}"
                break
        else:
            return DEFAULT_ADDRESS
    if "://" not in address and address != "auto":
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClusterError(f"{source} = {address!r} is not a job server address: give the head's dashboard URL, "
                           f"e.g. --address http://HEAD:8265")
    return address.rstrip("/")


def load_token(token_file: str | None = None) -> Token | None:
    """The cluster token: --token-file, else $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH,
    else ~/.ray/auth_token; None when there is none (an auth-disabled cluster needs none)."""
    if token_file:
        return _read_token(Path(token_file).expanduser(), f"--token-file {token_file}")
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN")
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        return _read_token(Path(path).expanduser(), f"$RAY_AUTH_TOKEN_PATH ({path})")
    default = Path.home() / ".ray" / "auth_token"
    return _read_token(default, str(default)) if default.is_file() else None


def _read_token(path: Path, source: str) -> Token:
    try:
        value = path.read_text().strip()
    except OSError as e:
        raise ClusterError(f"cannot read the token file {source}: {e.strerror}") from None
    if not value:
        raise ClusterError(f"the token file {source} is empty")
    return Token(value, source)


def _headers(token: Token | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.value}"} if token else {}


def probe(address: str, token: Token | None) -> str:
    """Check that a Ray job server answers at `address` and accepts `token`, within
    CONNECT_TIMEOUT_S; returns the cluster's Ray version. ClusterError names what is wrong."""
    import requests

    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:  # a quick TCP check: a wrong host must not hang for the OS's connect timeout
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterError(f"nothing answers at {address} ({e.strerror or e}): is the cluster up, and is this "
                           f"the head's dashboard address (port 8265)?") from None
    try:
        r = requests.get(f"{address}/api/version", headers=_headers(token), timeout=CONNECT_TIMEOUT_S)
    except requests.RequestException as e:
        raise ClusterError(f"{address}: no answer from a Ray job server ({type(e).__name__})") from None
    if r.status_code == 401:
        raise ClusterError(f"{address} requires a Ray authentication token and none was found: give --token-file, "
                           f"or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, or copy the cluster's token to "
                           f"~/.ray/auth_token (on the head: `ray get-auth-token`)")
    if r.status_code == 403:
        raise ClusterError(f"{address} refused the authentication token from {token.source if token else '?'}: "
                           f"it is not this cluster's token")
    try:
        r.raise_for_status()
        return str(r.json()["ray_version"])
    except (requests.HTTPError, ValueError, KeyError, TypeError):
        raise ClusterError(f"{address} is not a Ray job server (GET /api/version answered "
                           f"{r.status_code})") from None


@contextlib.contextmanager
def _address_env_cleared():
    """The SDK lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given:
    resolve_address already chose, so hide them while the client is built."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None = None, token_file: str | None = None):
    """A JobSubmissionClient for the resolved address with the token header, after `probe`.
    Returns (client, address, cluster's Ray version)."""
    address = resolve_address(address)
    token = load_token(token_file)
    version = probe(address, token)
    from ray.job_submission import JobSubmissionClient

    with _address_env_cleared():
        client = JobSubmissionClient(address, headers=_headers(token))
    return client, address, version


def job_not_found(error: Exception) -> bool:
    """The SDK reports an unknown job id as a RuntimeError carrying the server's 404."""
    return isinstance(error, RuntimeError) and "status code 404" in str(error)
