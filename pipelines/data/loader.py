"""The one training loader: each rank reads only its share of the shards, from a recorded
position, and a thread reads + collates batches ahead of the training step.

The data of an epoch is a seeded permutation of the shards, laid end to end; rank r of W
takes rows [r * n, (r + 1) * n) of it, n = total // W (the same for every rank, so ranks
step together; the < W rows left over are dropped for that epoch only). Within its share a
rank shuffles windows of `shuffle_buffer` rows (rounded up to whole batches) with a seed of
its own. Batch `index` of `epoch` is therefore a pure function of (seed, epoch, index, rank,
world): resuming at batch k reads one window, never the k batches before it, and each rank
reads ~1/W of the bytes (plus at most a row group at each end of its share).

Masks are drawn by the collator with a generator seeded from
`SeedSequence([seed, epoch, index, rank])` (no collisions between nearby tuples).
"""

from __future__ import annotations

import atexit
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

TRAIN, EVAL = 0, 1  # seed streams: training batches and the fixed held-out masks


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts, collision-free in practice (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Shard:
    """One Parquet file: where it is and its row groups' row counts and column bytes."""

    path: str
    group_rows: tuple[int, ...]
    group_bytes: tuple[dict[str, int], ...]  # compressed bytes of each column chunk, per row group

    @property
    def rows(self) -> int:
        return sum(self.group_rows)


def open_files(files: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """(path, an open input file) for each path: local files or URIs of one filesystem (a
    `shard_files` listing), the filesystem resolved once from the first URI's scheme, bucket
    and query options (e.g. `?endpoint_override=...`)."""
    import pyarrow.fs as pafs

    if not files:
        return
    if "://" not in files[0]:
        fs, paths = pafs.LocalFileSystem(), list(files)
    else:
        from .corpus import split_query

        fs, first = pafs.FileSystem.from_uri(files[0])
        prefix = len(split_query(files[0])[0]) - len(first)  # "s3://" of s3://bucket/key
        paths = [split_query(f)[0][prefix:] for f in files]
    for name, path in zip(files, paths):
        yield name, fs.open_input_file(path)


def describe(files: Sequence[str]) -> list[Shard]:
    """Footers of the shards (read once, by the driver): row groups and their sizes."""
    import pyarrow.parquet as pq


    out = []
    for path, opened in open_files(files):
        with opened as f:
            meta = pq.ParquetFile(f).metadata
        rows, sizes = [], []
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            rows.append(rg.num_rows)
            sizes.append({rg.column(c).path_in_schema.split(".")[0]: rg.column(c).total_compressed_size
                          for c in range(rg.num_columns)})
        out.append(Shard(path, tuple(rows), tuple(sizes)))
    return out


class RankReader:
    """Rows of this rank's share of an epoch, window by window (see the module doc)."""

    def __init__(self, shards: Sequence[Shard], columns: Sequence[str], *, rank: int, world: int, batch_size: int,
                 seed: int, shuffle_buffer: int):
        self.shards, self.columns = list(shards), list(columns)
        self.rank, self.world, self.batch_size, self.seed = rank, world, batch_size, seed
        self.window = max(1, -(-shuffle_buffer // batch_size)) * batch_size if shuffle_buffer else batch_size
        self.shuffle = shuffle_buffer > 0
        self.total = sum(s.rows for s in self.shards)
        self.per_rank = self.total // world
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"the data has {self.total} rows: fewer than one global batch ({batch_size} x {world})")
        self.bytes_read = 0  # compressed column-chunk bytes this reader fetched
        self._cache: tuple[tuple[int, int], dict[str, list]] | None = None

    def order(self, epoch: int) -> list[int]:
        """The epoch's shard order (the same on every rank)."""
        return np.random.default_rng(mix_seed(self.seed, TRAIN, epoch)).permutation(len(self.shards)).tolist()

    def locate(self, epoch: int, index: int) -> dict[str, Any]:
        """Where batch `index` of `epoch` starts for this rank: the shard file and its row."""
        epoch, index = epoch + index // self.batches_per_epoch, index % self.batches_per_epoch
        offset = self.rank * self.per_rank + index * self.batch_size
        for s in self.order(epoch):
            if offset < self.shards[s].rows:
                return {"epoch": epoch, "index": index, "shard": self.shards[s].path, "row": offset}
            offset -= self.shards[s].rows
        raise IndexError(index)

    def _group(self, shard: int, group: int) -> dict[str, list]:
        if self._cache and self._cache[0] == (shard, group):
            return self._cache[1]
        import pyarrow.parquet as pq

        s = self.shards[shard]
        (_, opened), = open_files([s.path])
        with opened as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=self.columns)
        self.bytes_read += sum(s.group_bytes[group].get(c, 0) for c in self.columns)
        data = {c: table.column(c).to_numpy(zero_copy_only=False) for c in self.columns}
        self._cache = ((shard, group), data)
        return data

    def rows(self, epoch: int, start: int, stop: int) -> dict[str, list]:
        """Rows [start, stop) of the epoch's stream of permuted shards (global offsets)."""
        out: dict[str, list] = {c: [] for c in self.columns}
        base = 0
        for s in self.order(epoch):
            shard = self.shards[s]
            if base >= stop:
                break
            if base + shard.rows > start:
                g0 = base
                for g, n in enumerate(shard.group_rows):
                    lo, hi = max(start, g0), min(stop, g0 + n)
                    if lo < hi:
                        data = self._group(s, g)
                        for c in self.columns:
                            out[c].extend(data[c][lo - g0:hi - g0])
                    g0 += n
            base += shard.rows
        return out

    def window_rows(self, epoch: int, w: int) -> dict[str, list]:
        """Window `w` of this rank's share, shuffled with its own seed."""
        begin = self.rank * self.per_rank + w * self.window
        end = min(begin + self.window, (self.rank + 1) * self.per_rank)
        rows = self.rows(epoch, begin, end)
        if self.shuffle:
            perm = np.random.default_rng(mix_seed(self.seed, TRAIN, epoch, self.rank, w)).permutation(end - begin)
            rows = {c: [v[i] for i in perm] for c, v in rows.items()}
        return rows

    def batches(self, epoch: int, index: int) -> Iterator[tuple[int, int, dict[str, list]]]:
        """(epoch, index, rows of the batch) forever, from batch `index` of `epoch`."""
        B = self.batch_size
        while True:
            w_rows, w = None, -1
            for i in range(index, self.batches_per_epoch):
                if (i * B) // self.window != w:
                    w = (i * B) // self.window
                    w_rows = self.window_rows(epoch, w)
                at = i * B - w * self.window
                yield epoch, i, {c: v[at:at + B] for c, v in w_rows.items()}
            epoch, index = epoch + 1, 0


def to_model_rows(rows: dict[str, list], max_seq_len: int, token_columns: Sequence[str]) -> dict[str, Any]:
    """Token columns as arrays cut to max_seq_len, other columns as one array each."""
    out = {}
    for k, v in rows.items():
        out[k] = [np.asarray(x)[:max_seq_len] for x in v] if k in token_columns else np.asarray(v)
    return out


_THREADS: set[tuple[threading.Thread, threading.Event]] = set()


@atexit.register
def _stop_all() -> None:
    """Stop and join every loader thread before the interpreter tears down: a daemon thread
    still inside a torch op at exit aborts the process (also for a dropped Prefetcher whose
    thread is finishing its last item)."""
    for _, stop in list(_THREADS):
        stop.set()
    for thread, _ in list(_THREADS):
        thread.join(timeout=30)


_END = object()


def _fill(source: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """The loader thread: items of `source` into `out` until the end, an error, or `stop`.
    (A function, not a method: the thread holds no reference to its Prefetcher, so a
    dropped Prefetcher is collected and its thread told to stop.)"""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in source:
            if not put(item):
                return
        put(_END)
    except BaseException as e:  # handed to the consumer
        put(e)
    finally:
        _THREADS.discard((threading.current_thread(), stop))


class Prefetcher:
    """Runs an iterator in a thread, `depth` items ahead; its errors re-raise here. `close()`
    (also at exit, and when it is garbage collected) stops the thread."""

    def __init__(self, source: Iterator, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=_fill, args=(source, self.queue, self.stop), daemon=True,
                                       name="cloze-loader")
        _THREADS.add((self.thread, self.stop))
        self.thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=30)

    def __del__(self) -> None:
        self.stop.set()


def read_rows(files: Sequence[str], limit: int, columns: Sequence[str] | None = None) -> dict[str, list]:
    """The first `limit` rows of some shards, as Python lists (a small held-out set)."""
    import pyarrow.parquet as pq


    out: dict[str, list] = {}
    for _, opened in open_files(files):
        have = len(out.get("input_ids", []))
        if have >= limit:
            break
        with opened as f:
            table = pq.read_table(f, columns=list(columns) if columns else None)
        for name in table.column_names:
            out.setdefault(name, []).extend(table.column(name).to_pylist()[: limit - have])
    return out
