"""`cloze submit` and `cloze jobs`: run a cloze command (the DAG, or one stage) as a Ray job on
a cluster, through the Ray Jobs SDK, and follow, inspect or stop it.

    cloze submit --address http://HEAD:8265 -- run --config configs/gpu-cluster.toml
    cloze jobs list | status JOB | logs JOB [--follow] | stop JOB

The job runs `python -m pipelines.cli <command>` on the head node, in the working directory
(this checkout, uploaded by Ray without .venv, runs, .git), in a virtualenv with cloze's
pinned dependencies that Ray's runtime_env builds on each node (`pip`, with constraints.txt)
unless --use-cluster-env says the cluster's Python already has them. Everything that can be
checked here is checked before submitting (cluster/preflight.py, cluster/client.py).
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from .client import ClusterError, connect, job_not_found

REPO = Path(__file__).resolve().parent.parent
# never uploaded: environments, run outputs, caches (.gitignore-style patterns, as Ray reads them)
EXCLUDES = [".venv", "runs", ".git", ".torch_extensions", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info"]
# where Ray unpacks the working directory on the node, expanded by pip in the requirements it writes
CONSTRAINTS = "-c ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/constraints.txt"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

SUBMIT_DESCRIPTION = """\
Submit a cloze command to a Ray cluster as a Ray job (Ray Jobs SDK) and follow its logs.

Everything after `--` is the cloze command the job runs on the head node, e.g.
  cloze submit --address http://HEAD:8265 -- run --config configs/gpu-cluster.toml
Before submitting, this checks that the job server answers and accepts the token, that the
cluster runs the Ray version cloze pins, that the command parses, and that its --config
exists in the working directory and is valid (cloze run: the DAG's own validation for local
paths; the tables for configs on s3:// or gs://).

The token (Ray token authentication) comes from --token-file, else $RAY_AUTH_TOKEN, else the
file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; it is sent as an HTTP header, never printed.
Exit status: 0 when the job succeeded (or was submitted, with --no-wait), 1 when it failed or
was stopped, 2 for a problem found before submitting, 130 when you stop following (the job
keeps running)."""

JOBS_DESCRIPTION = """\
List the jobs of a Ray cluster, show one's status (and its error when it failed), print or
follow its logs, or stop it. Address and token as for `cloze submit`."""


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", metavar="URL",
                        help="the head's job server (dashboard) URL; default $RAY_API_SERVER_ADDRESS, "
                             "$RAY_ADDRESS, else http://127.0.0.1:8265")
    parser.add_argument("--token-file", metavar="FILE",
                        help="file holding the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, the file "
                             "$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")


def add_command(subparsers) -> None:
    sub = subparsers.add_parser("submit", help="run a cloze command (e.g. the DAG) as a job on a Ray cluster",
                                description=SUBMIT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_connection_options(sub)
    sub.add_argument("--working-dir", metavar="DIR", default=str(REPO),
                     help="the cloze checkout uploaded as the job's working directory (default: this one)")
    sub.add_argument("--use-cluster-env", action="store_true",
                     help="run with the cluster's Python environment as it is, instead of a runtime_env that "
                          "pip-installs cloze's pinned dependencies on each node")
    sub.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following its logs")
    sub.add_argument("--job-id", metavar="ID", help="the submission id to use (default: one Ray generates)")
    sub.add_argument("cloze_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                     help="the cloze command the job runs, with its options and overrides")
    sub.set_defaults(run=cmd_submit)

    jobs = subparsers.add_parser("jobs", help="list, inspect, follow or stop Ray jobs on a cluster",
                                 description=JOBS_DESCRIPTION)
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("list", "the cluster's jobs, oldest first"),
                       ("status", "a job's status, timing and, when it failed, its error"),
                       ("logs", "a job's driver logs"), ("stop", "stop a running job")):
        action = actions.add_parser(name, help=text, description=f"cloze jobs {name}: {text}.")
        _add_connection_options(action)
        if name != "list":
            action.add_argument("job_id", metavar="JOB", help="the job's submission id (cloze jobs list shows them)")
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="keep printing new lines until the job ends")
    jobs.set_defaults(run=cmd_jobs)


# ------------------------------------------------------------------ submit

def runtime_env(working_dir: Path, use_cluster_env: bool) -> dict[str, Any]:
    """The job's runtime_env: the working directory, and unless the cluster's environment is
    to be used, pip with cloze's pinned runtime dependencies (pyproject.toml, torch included)
    under constraints.txt, so transitive packages get the versions tested here."""
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(EXCLUDES)}
    if not use_cluster_env:
        env["pip"] = {"packages": runtime_packages(working_dir), "pip_check": False}
    return env


def runtime_packages(working_dir: Path) -> list[str]:
    """The pip requirement lines of a job (and of the KubeRay manifests' runtime_envs)."""
    return [CONSTRAINTS, *pinned_dependencies(working_dir)]


def pinned_dependencies(working_dir: Path) -> list[str]:
    try:
        project = tomllib.loads((working_dir / "pyproject.toml").read_text())["project"]
    except (OSError, tomllib.TOMLDecodeError, KeyError):
        raise ClusterError(f"{working_dir}/pyproject.toml: missing or without a [project] table") from None
    deps = list(project.get("dependencies", []))
    loose = [d for d in deps if "==" not in d]
    if loose:
        raise ClusterError(f"pyproject.toml: {loose[0]!r} is not pinned (==): the cluster would get another version")
    if not (working_dir / "constraints.txt").is_file():
        raise ClusterError(f"{working_dir}/constraints.txt is missing (the pins of every transitive dependency)")
    return deps


def cmd_submit(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    import ray

    from .preflight import check_command

    cloze_args = list(args.cloze_args)
    if cloze_args[:1] == ["--"]:
        cloze_args = cloze_args[1:]
    try:
        if overrides:
            raise ClusterError(f"--{next(iter(overrides))}: put the cloze command's options after `--`")
        working_dir = Path(args.working_dir).expanduser().resolve()
        if not (working_dir / "pipelines" / "cli.py").is_file():
            raise ClusterError(f"--working-dir {args.working_dir}: not a cloze checkout (no pipelines/cli.py)")
        notes = check_command(cloze_args, working_dir)
        env = runtime_env(working_dir, args.use_cluster_env)
        client, address, version = connect(args.address, args.token_file)
        if version != ray.__version__:
            raise ClusterError(f"{address} runs Ray {version}, cloze pins Ray {ray.__version__}: the job would run "
                               f"with another Ray than the one it was tested with")
    except ClusterError as e:
        print(f"cloze submit: error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"cloze submit: note: {note}")
    _quiet_sdk()
    entrypoint = "python -u -m pipelines.cli " + shlex.join(cloze_args)
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=args.job_id,
                                   metadata={"cloze_command": shlex.join(cloze_args)})
    except (RuntimeError, ValueError) as e:  # a taken --job-id, a runtime_env Ray will not take
        print(f"cloze submit: error: the job server refused the job: {e}", file=sys.stderr)
        return 2
    print(f"cloze submit: job {job_id} submitted to {address}: cloze {shlex.join(cloze_args)}")
    where = "" if args.address is None else f" --address {address}"
    if args.no_wait:
        print(f"cloze submit: follow it with `cloze jobs logs {job_id} --follow{where}`; "
              f"stop it with `cloze jobs stop {job_id}{where}`")
        return 0
    try:
        status = _follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\ncloze submit: stopped following; job {job_id} keeps running "
              f"(`cloze jobs logs {job_id} --follow{where}`, `cloze jobs stop {job_id}{where}`)", file=sys.stderr)
        return 130
    _print_status(client.get_job_info(job_id), job_id, client, prog="cloze submit")
    return 0 if status == "SUCCEEDED" else 1


def _quiet_sdk() -> None:
    """Ray's packaging logs a line per ignored file and per default exclude, the SDK one when
    the log stream closes: not for a console."""
    import logging

    for name in ("ray._private.runtime_env", "ray.dashboard.modules"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def _follow(client, job_id: str) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    import asyncio

    import aiohttp

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError, aiohttp.ClientError) as e:  # the stream broke (a proxy, the network): the job goes on
        print(f"cloze: the log stream of job {job_id} broke ({e}); waiting for the job to end", file=sys.stderr)
    while True:  # the stream closes at the end; the status lands a moment later
        status = str(client.get_job_status(job_id))
        if status in TERMINAL:
            return status
        time.sleep(0.5)


# ------------------------------------------------------------------ jobs

def cmd_jobs(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    prog = f"cloze jobs {args.action}"
    try:
        if overrides:
            raise ClusterError(f"unexpected option --{next(iter(overrides))}")
        client, address, _ = connect(args.address, args.token_file)
        if args.action == "list":
            _print_list(client.list_jobs())
            return 0
        try:
            info = client.get_job_info(args.job_id)
        except RuntimeError as e:
            if job_not_found(e):
                raise ClusterError(f"no job {args.job_id!r} on {address} (cloze jobs list shows them)") from None
            raise
    except ClusterError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if args.action == "status":
        _print_status(info, args.job_id, client, prog=prog)
    elif args.action == "logs":
        if args.follow:
            try:
                _follow(client, args.job_id)
            except KeyboardInterrupt:
                return 130
        else:
            sys.stdout.write(client.get_job_logs(args.job_id))
    elif args.action == "stop":
        if str(info.status) in TERMINAL:
            print(f"{prog}: job {args.job_id} already ended: {info.status}")
            return 0
        client.stop_job(args.job_id)
        print(f"{prog}: stop requested for job {args.job_id} (was {info.status})")
    return 0


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _elapsed(info) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    return f"{(end - info.start_time) / 1000:.0f} s"


def _print_list(jobs) -> None:
    rows = sorted((j for j in jobs if j.submission_id), key=lambda j: j.start_time or 0)
    if not rows:
        print("no submitted jobs")
        return
    print(f"{'JOB':<30} {'STATUS':<10} {'STARTED':<20} {'TIME':>8}  COMMAND")
    for j in rows:
        command = (j.metadata or {}).get("cloze_command") or j.entrypoint
        print(f"{j.submission_id:<30} {str(j.status):<10} {_when(j.start_time):<20} {_elapsed(j):>8}  {command[:80]}")


def _print_status(info, job_id: str, client, prog: str) -> None:
    """One line of status, then for a failed job the line that says why."""
    code = f", exit code {info.driver_exit_code}" if info.driver_exit_code is not None else ""
    print(f"{prog}: job {job_id}: {info.status} after {_elapsed(info)}{code}")
    if str(info.status) == "FAILED":
        print(f"{prog}: error: {failure_reason(info.message, client.get_job_logs(job_id))}")
        print(f"{prog}: full logs: cloze jobs logs {job_id}")


ANSI = re.compile(r"\x1b\[[0-9;]*m")
# the last line of a Python traceback: `pkg.mod.SomeError: message` (module path dropped)
EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit))(?::\s*(.*))?$")


def failure_reason(message: str | None, logs: str) -> str:
    """Why a job failed, in one line: a `cloze run` stage's FAILED line (without its log
    paths, which are the head node's), or the `cloze ...: error: ...` line its command printed
    (commands report bad input that way; when that error came from inside a Ray task, the
    exception that ended the task's traceback), else the exception of the last traceback,
    else Ray's own message (a runtime_env that could not be built, a killed driver)."""
    lines = [ANSI.sub("", line).rstrip() for line in logs.splitlines()]
    lines = [line for line in lines if line.strip()]

    def exception_after(i: int) -> str | None:
        for line in lines[i + 1:]:
            m = EXCEPTION.match(line)
            if m:
                return f"{m.group(1)}: {m.group(2)}" if m.group(2) else m.group(1)
        return None

    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("cloze run: ") and " FAILED: " in lines[i]:  # a DAG stage: its line, less the log paths
            return " ".join(lines[i].split(" (log: ", 1)[0].split())
        if lines[i].startswith("cloze ") and ": error: " in lines[i]:
            prog, text = lines[i].split(": error: ", 1)
            inner = exception_after(i) if text.startswith("ray::") else None
            return f"{prog}: error: {inner}" if inner else lines[i]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback (most recent call last)"):
            return exception_after(i) or lines[i]
    return (message or "no message").splitlines()[0]
