"""Starting Ray for a cloze driver (every command and the DAG), one way.

Ray's own chatter (its start-up lines, the token-auth notice, worker stdout, the Train
controller's state polling) stays in the session's log folder, which is printed once;
errors still reach the driver as exceptions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

_TOKEN_NOTICE = "ray._private.authentication.authentication_token_setup"


def start_ray(log=print, name: str = "cloze", **init_kwargs) -> bool:
    """`ray.init` (a new local instance, or the cluster RAY_ADDRESS / `address=` names) unless
    Ray is up in this process; True when this call connected. `init_kwargs` go to `ray.init`."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = logging.getLogger(_TOKEN_NOTICE)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "token authentication is enabled": on by design (README)
    try:
        ray.init(**{"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
                    **init_kwargs})
    finally:
        quiet.setLevel(level)
    logs = session_logs()
    if logs:
        log(f"{name}: Ray's logs (workers, stages): {logs}")
    return True


def session_logs() -> str | None:
    """The local Ray session's log folder, or None (a client, or no local session)."""
    try:
        from ray._private import worker

        return str(Path(worker._global_node.get_session_dir_path()) / "logs")
    except Exception:
        return None
