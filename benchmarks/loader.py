"""The training loader at cluster scale: what each worker reads, and what a resume costs.

1. Bytes read per worker in one epoch at 2 workers, as a fraction of the corpus's bytes
   (compressed column chunks fetched), against the previous design where every worker read
   the whole ordered stream and kept its slice (fraction 1.0 by construction: it is also
   measured here by reading the stream).
2. Resume: time to the first batch when a run restarts at an early position vs a late one
   (epoch 0 batch 10 vs a position deep in a later epoch), the loader seeking directly vs a
   skip-ahead reader that reads every earlier batch (what the previous design did).

3. Throughput of one rank's loader (read + shuffle window + collate + dynamic masks, in its
   prefetch thread): batches/s.

Data: real `cloze data` output (20 Newsgroups, NSP, trained vocabulary), built once into
a temp folder (or --data FOLDER).

    python benchmarks/loader.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow.parquet as pq  # noqa: E402

from common import machine, summary  # noqa: E402
from pipelines.data.loader import RankReader, describe  # noqa: E402
from pipelines.pretrain import shard_files  # noqa: E402

COLUMNS = ["input_ids", "token_type_ids", "nsp_label"]


def build_data(folder: Path, inputs: list[str]) -> str:
    import ray

    from pipelines.data.config import DataConfig
    from pipelines.data.pairs import build_sentence_pairs

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        build_sentence_pairs(DataConfig(inputs=tuple(inputs), output=str(folder), task="nsp", seed=1),
                             log=lambda *_: None)
    finally:
        ray.shutdown()
    return str(folder)


def skip_ahead(files: list[str], batch: int, world: int, rank: int, index: int) -> dict:
    """The previous design: read the ordered stream of global batches from the start,
    keep this rank's slice of batch `index`."""
    B = batch * world
    seen, buf = 0, []
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=COLUMNS):
            buf.append(rb)
            seen += rb.num_rows
            if seen >= (index + 1) * B:
                import pyarrow as pa

                table = pa.Table.from_batches(buf)
                start = index * B - (seen - table.num_rows) + rank * batch
                return table.slice(start, batch).to_pydict()
    raise IndexError(index)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a `cloze data` folder (default: build 20NG NSP shards in a temp folder)")
    ap.add_argument("--inputs", default="20ng")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    data = args.data or build_data(Path(tempfile.mkdtemp(prefix="cloze-bench-loader-")) / "pairs",
                                   args.inputs.split(","))
    files = shard_files(data)
    shards = describe(files)
    rows = sum(s.rows for s in shards)
    total = sum(sum(v for k, v in g.items() if k in COLUMNS) for s in shards for g in s.group_bytes)
    groups = sum(len(s.group_rows) for s in shards)
    print(f"{machine()}\ndata {data}: {len(files)} shards, {groups} row groups, {rows} rows, "
          f"{total / 2**20:.1f} MiB of {', '.join(COLUMNS)}")

    # 1. bytes per worker, one epoch, 2 workers
    fractions = []
    for rank in range(2):
        r = RankReader(shards, COLUMNS, rank=rank, world=2, batch_size=args.batch, seed=0, shuffle_buffer=4096)
        it = r.batches(0, 0)
        for _ in range(r.batches_per_epoch):
            next(it)
        fractions.append(r.bytes_read / total)
    print(f"\n1. bytes read per worker in one epoch, 2 workers: rank 0 {fractions[0]:.3f}, rank 1 {fractions[1]:.3f} "
          f"of the corpus (goal <= 0.55); previous design: 1.000 each (every rank read the whole stream)")

    # 2. resume: time to the first batch at an early vs a late position
    r0 = RankReader(shards, COLUMNS, rank=0, world=2, batch_size=args.batch, seed=0, shuffle_buffer=4096)
    per_epoch = r0.batches_per_epoch
    early, late = (0, 10), (2, per_epoch - 5)
    times: dict[str, list[float]] = {k: [] for k in ("seek early", "seek late", "skip early", "skip late")}
    for _ in range(args.repeats):
        for name, pos in (("seek early", early), ("seek late", late)):
            t = time.perf_counter()
            next(RankReader(shards, COLUMNS, rank=0, world=2, batch_size=args.batch, seed=0,
                            shuffle_buffer=4096).batches(*pos))
            times[name].append(time.perf_counter() - t)
        for name, index in (("skip early", early[1]), ("skip late", late[1])):
            t = time.perf_counter()
            skip_ahead(files, args.batch, 2, 0, index)
            times[name].append(time.perf_counter() - t)
    print(f"\n2. time to the first batch of a resumed run, s, median [min-max] of {args.repeats} "
          f"(early = epoch 0 batch {early[1]}, late = epoch {late[0]} batch {late[1]}; the skip-ahead reader, "
          f"like the previous design, reads the resumed epoch from its start):")
    for k, v in times.items():
        print(f"   {k:11s} {summary(v)}")
    seek = statistics.median(times["seek late"]) / statistics.median(times["seek early"])
    skip = statistics.median(times["skip late"]) / statistics.median(times["skip early"])
    print(f"   late / early: seeking loader {seek:.2f}x, skip-ahead reader {skip:.2f}x")

    # 3. one rank's collated batches per second
    from pipelines.pretrain import PretrainConfig, resolve

    task = resolve(PretrainConfig.from_dict({"data": data, "batch_size_per_worker": args.batch, "num_workers": 2,
                                             "objectives": {"mlm": 1.0, "nsp": 1.0}}))
    rates = []
    for _ in range(args.repeats):
        it = task.batches(0, 2, 0, 0)
        n = min(200, task.reader(0, 2).batches_per_epoch)
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        rates.append(n / (time.perf_counter() - t))
    print(f"\n3. one rank's loader, collated + masked batches of {args.batch}: {summary(rates)} batches/s "
          f"({n} batches a repeat)")


if __name__ == "__main__":
    main()
