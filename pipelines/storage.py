"""Where stage outputs live: local paths and pyarrow-filesystem URIs, and atomic publishing.

Paths are local folders or URIs (`s3://bucket/key`, `gs://...`). A URI's query holds
pyarrow filesystem options, e.g. an S3-compatible server (MinIO):
`s3://bucket/key?endpoint_override=host:9000&scheme=http` (pyarrow ignores
AWS_ENDPOINT_URL). Every URI derived from a user's URI keeps that query at its end
(`join_path`, `to_uri`).

Publishing (stage rule: a killed stage never leaves something that looks finished): a stage
writes into `<output>.tmp-<id>` (`Staging`), and `Staging.publish` writes the marker file
(e.g. manifest.json) last and gives the folder the output's name. Locally that is a rename,
and a later run removes temp folders whose writer process is gone (`remove_killed_runs`).
Object stores cannot rename a folder: see `publish`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.fs as pafs

OWNER_FILE = ".owner.json"  # in a local temp folder: who writes it (host, pid)

__all__ = ["filesystem", "split_query", "join_path", "to_uri", "is_uri", "read_bytes", "write_atomic", "remove",
           "upload", "local_copy", "remove_killed_runs", "publish", "Staging", "OWNER_FILE"]


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) of a local path (made absolute) or a URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def split_query(path: str) -> tuple[str, str]:
    """("s3://bucket/key", "?endpoint_override=...") of a URI; (path, "") of a local path."""
    if is_uri(path) and "?" in path:
        head, _, query = path.partition("?")
        return head, "?" + query
    return path, ""


def join_path(base: str, *parts: str) -> str:
    """`base`/part/...: a local path, or a URI (its query stays at the end)."""
    head, query = split_query(base)
    return "/".join([head.rstrip("/"), *parts]) + query


def to_uri(like: str, path: str) -> str:
    """A path of `filesystem(like)`'s filesystem as a URI with `like`'s scheme and query
    (a local `like`: the path itself)."""
    if not is_uri(like):
        return path
    return f"{like.split('://', 1)[0]}://{path}{split_query(like)[1]}"


def read_bytes(path: str) -> bytes | None:
    """A file's bytes (local path or URI), or None when it is missing or unreadable."""
    try:
        fs, p = filesystem(path)
        with fs.open_input_stream(p) as f:
            return f.read()
    except (FileNotFoundError, OSError, pa.ArrowException):
        return None


def write_atomic(path: str, body: bytes) -> None:
    """Replace one file in one step: locally a temp file renamed over it; on an object store a
    single PUT (readers see the old object or the new one, never a part)."""
    fs, p = filesystem(path)
    if fs.type_name != "local":
        with fs.open_output_stream(p) as f:
            f.write(body)
        return
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(body)
    os.replace(tmp, p)


def remove(fs: pafs.FileSystem, path: str) -> None:
    """Remove a folder if it is there; errors are ignored (best-effort cleanup)."""
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError, pa.ArrowException):
        pass


def upload(local: str, uri: str) -> None:
    """Copy a local folder's files to `uri`, then remove the local folder."""
    pafs.copy_files(local, uri)
    shutil.rmtree(local, ignore_errors=True)


def local_copy(path: str, cache: str | None = None) -> str:
    """A folder on a URI (a model on shared storage) copied to this node once, and its local
    path; a local path is returned as it is. The copy lives in `cache` (default
    $CLOZE_CACHE, else <tmp>/cloze-cache) under a name made of the URI and the size and
    modification time of every file in the folder, so a folder re-exported to the same URI
    is fetched again; it is filled in a temp folder and renamed into place, so a reader never
    sees a part of it (concurrent copies on one node: the first rename wins)."""
    import hashlib

    if not is_uri(path):
        return path
    fs, root = filesystem(path)
    try:
        found = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), recursive=True))
    except (FileNotFoundError, OSError, pa.ArrowException) as e:
        raise FileNotFoundError(f"{path}: cannot list it ({e})") from None
    files = sorted((i.path, i.size, str(i.mtime)) for i in found if i.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"{path}: no files there")
    base = Path(cache or os.environ.get("CLOZE_CACHE") or Path(tempfile.gettempdir()) / "cloze-cache")
    key = hashlib.sha256(json.dumps([split_query(path)[0], files]).encode()).hexdigest()[:20]
    dest = base / f"{Path(root.rstrip('/')).name}-{key}"
    if dest.is_dir():
        return str(dest)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=base))
    try:
        prefix = root.rstrip("/") + "/"
        for name, _, _ in files:
            target = tmp / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process on this node finished the same copy first
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def remove_killed_runs(output: str, log=print) -> list[str]:
    """Remove local `<output>.tmp-*` folders left by runs on this host whose process is gone
    (a killed run). A folder of a live run, of another host, or without an owner file stays.
    Returns the removed folders."""
    out = Path(output)
    removed = []
    for tmp in sorted(out.parent.glob(out.name + ".tmp-*")):
        try:
            owner = json.loads((tmp / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours to judge
        if owner.get("host") != socket.gethostname():
            continue
        try:
            os.kill(int(owner["pid"]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (PermissionError, KeyError, ValueError, TypeError):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(str(tmp))
        log(f"cloze: removed {tmp}, left by a run that was killed (pid {owner['pid']})")
    return removed


def publish(fs: pafs.FileSystem, tmp_root: str, out_root: str, marker: str, body: bytes) -> None:
    """`marker` (e.g. manifest.json) written last, then the temp folder takes the output's
    name; an old output is replaced.

    Object stores (S3, GCS) cannot rename a folder: there the old output loses its marker
    first (from then on it is not a finished output), is removed, the temp folder's files
    are copied in (server-side copies), the marker is written last, and the temp folder is
    removed."""
    if fs.type_name != "local":
        if fs.get_file_info(out_root).type != pafs.FileType.NotFound:
            try:
                fs.delete_file(f"{out_root}/{marker}")
            except FileNotFoundError:
                pass
            fs.delete_dir(out_root)
        for info in fs.get_file_info(pafs.FileSelector(tmp_root, recursive=True)):
            if info.type == pafs.FileType.File:
                fs.copy_file(info.path, out_root + info.path[len(tmp_root):])
        with fs.open_output_stream(f"{out_root}/{marker}") as f:
            f.write(body)
        remove(fs, tmp_root)
        return
    with fs.open_output_stream(f"{tmp_root}/{marker}") as f:
        f.write(body)
    if fs.get_file_info(out_root).type != pafs.FileType.NotFound:
        old = f"{out_root}.old-{uuid.uuid4().hex[:8]}"
        fs.move(out_root, old)
        fs.move(tmp_root, out_root)
        remove(fs, old)
    else:
        fs.move(tmp_root, out_root)


class Staging:
    """The temp folder of one run of a stage writing `output` (local path or URI).

        with Staging(output, log=log) as st:
            write files under st.tmp (a path / URI), or st.write_folder(fn)
            st.publish("manifest.json", body)

    Entering removes killed runs' leftovers (local outputs), creates `<output>.tmp-<id>` and,
    locally, records this process as its writer. Leaving with an exception, or without
    publishing, removes the temp folder."""

    def __init__(self, output: str, *, log=print):
        self.output = output
        self.log = log
        self.fs, self.out_root = filesystem(output)
        head, query = split_query(output)  # a URI's query (pyarrow options) stays at the end
        self.tmp = f"{head.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}{query}"
        self.tmp_root = filesystem(self.tmp)[1]
        self.local = not is_uri(head)
        self.published = False

    def __enter__(self) -> "Staging":
        if self.local:
            remove_killed_runs(split_query(self.output)[0], self.log)
        self.fs.create_dir(self.tmp_root, recursive=True)
        if self.local:  # who writes this folder: a later run removes it if this process dies
            Path(self.tmp_root, OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.published:
            remove(self.fs, self.tmp_root)

    def write_folder(self, writer: Callable[[str], None]) -> None:
        """`writer(local_folder)` writes files with plain file I/O (e.g. a tokenizer's save);
        on an object store they are written to a local scratch folder and uploaded."""
        if self.local:
            writer(self.tmp_root)
            return
        scratch = tempfile.mkdtemp(prefix="cloze-staging-")
        try:
            writer(scratch)
            upload(scratch, self.tmp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def publish(self, marker: str, body: bytes) -> None:
        if self.local:
            Path(self.tmp_root, OWNER_FILE).unlink(missing_ok=True)
        publish(self.fs, self.tmp_root, self.out_root, marker, body)
        self.published = True
