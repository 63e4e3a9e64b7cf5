"""What `cloze submit` checks on this machine before anything reaches the cluster: the cloze
command line parses, its --config file is in the working directory the job runs in, and the
config is valid. A mistake found here costs an exit status 2 and one line, not an upload, a
pip install and a failed job.

For `run`, a config that names only local paths goes through the DAG's own validation
(`pipelines.dag.plan_run`, run from the working directory, as the job will). A config that
names storage URIs cannot be planned here without reaching that storage (listing an s3://
corpus offline takes ~11 s and then fails), so its tables are checked against the stage
dataclasses instead, and the inputs are left to the cluster.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipelines.config import ConfigError, apply_overrides, load_toml

from .client import ClusterError

# commands that make no sense inside a job: they talk to a cluster from outside it
NOT_SUBMITTABLE = ("submit", "jobs")


def check_command(args: list[str], working_dir: Path) -> list[str]:
    """Validate the cloze command line a job will run; returns notes for the user (what could
    not be checked here). Raises ClusterError with the first problem."""
    from pipelines.cli import build_parser, split_overrides
    from pipelines.data.corpus import InputError

    if not args:
        raise ClusterError("no cloze command to submit: e.g. cloze submit -- run --config configs/gpu-cluster.toml")
    if args[0] in NOT_SUBMITTABLE:
        raise ClusterError(f"`cloze {args[0]}` runs outside the cluster; submit a stage or the DAG (e.g. run)")
    try:
        ns, rest = build_parser().parse_known_args(args)
    except SystemExit:  # argparse printed what is wrong (an unknown command, a bad option value)
        raise ClusterError(f"the command `cloze {' '.join(args)}` does not parse (see above)") from None
    try:
        overrides = split_overrides(rest)
    except ConfigError as e:
        raise ClusterError(f"cloze {ns.command}: {e}") from None
    config = getattr(ns, "config", None)
    if ns.command == "run" and not config:
        config = "configs/local.toml"  # what `cloze run` reads without --config
    if not config:
        return []
    path = Path(config)
    if path.is_absolute():
        if not path.is_file():  # it may exist on the cluster's nodes (an image's file): theirs to say
            return [f"--config {config} is an absolute path not on this machine: not checked here"]
    elif not (working_dir / path).is_file():
        raise ClusterError(f"--config {config}: no such file in the working directory {working_dir} "
                           f"(the job runs there)")
    try:
        raw = apply_overrides(load_toml(working_dir / path), overrides)
        if ns.command != "run":
            return []
        if _names_uri(raw):
            check_run_tables(raw)
            return [f"{config} names storage URIs: its tables are checked here, its inputs on the cluster"]
        with _cwd(working_dir):  # relative paths mean what they will mean to the job
            from pipelines.dag import plan_run

            plan_run(path, overrides)
    except (ConfigError, InputError) as e:  # InputError: a missing corpus, an unreadable file
        raise ClusterError(f"{config}: {e}") from None
    return []


def check_run_tables(raw: Mapping[str, Any]) -> None:
    """Every table of a run config ([data], [model], [pretrain], [finetune], [score],
    [serve]) built into its stage's dataclass without touching storage (ConfigError naming
    the key); what needs storage (the corpus, labeled files, the score input) is checked by
    the DAG on the cluster."""
    from pipelines.dag import check_tables, plan_finetune, plan_pretrain, plan_score
    from pipelines.data.config import DataConfig
    from pipelines.serve_config import ServeConfig

    check_tables(raw)
    data = DataConfig.from_dict(raw.get("data", {}))
    pre = plan_pretrain(raw, data)
    fine = plan_finetune(dict(raw), pre)
    serve = ServeConfig.from_dict(raw.get("serve", {}))
    if fine is not None:
        serve.check_model(fine.max_seq_len)
    plan_score(dict(raw), pre, fine, list_input=False)  # the score input is the cluster's to list


def _names_uri(value: Any) -> bool:
    if isinstance(value, str):
        return "://" in value
    if isinstance(value, Mapping):
        return any(_names_uri(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_names_uri(v) for v in value)
    return False


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
