"""The training loader without Ray: each rank reads only its share, positions are exact and
seekable, seeds do not collide, the prefetch thread hands errors over."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.data.loader import Prefetcher, RankReader, describe, mix_seed

ROWS_PER_SHARD, SHARDS, GROUP = 96, 10, 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """10 shards x 96 rows in row groups of 16; row i's tokens are [i, i, i] (global row ids)."""
    folder = tmp_path_factory.mktemp("loader")
    files = []
    for s in range(SHARDS):
        ids = [[s * ROWS_PER_SHARD + r] * 3 for r in range(ROWS_PER_SHARD)]
        table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                          "token_type_ids": pa.array([[0] * 3] * ROWS_PER_SHARD, pa.list_(pa.int32())),
                          "nsp_label": pa.array([r % 2 for r in range(ROWS_PER_SHARD)], pa.int64())})
        path = folder / f"part-{s:05d}.parquet"
        pq.write_table(table, path, row_group_size=GROUP)
        files.append(str(path))
    return describe(files)


COLUMNS = ["input_ids", "token_type_ids", "nsp_label"]


def reader(shards, rank, world=2, batch=8, shuffle=32, seed=3) -> RankReader:
    return RankReader(shards, COLUMNS, rank=rank, world=world, batch_size=batch, seed=seed, shuffle_buffer=shuffle)


def row_ids(rows) -> list[int]:
    return [int(x[0]) for x in rows["input_ids"]]


def epoch_rows(r: RankReader, epoch: int) -> list[int]:
    it = r.batches(epoch, 0)
    return [i for _ in range(r.batches_per_epoch) for i in row_ids(next(it)[2])]


def test_ranks_read_disjoint_shares_of_about_half_the_bytes(shards):
    total_bytes = sum(sum(g.values()) for s in shards for g in s.group_bytes)
    r0, r1 = reader(shards, 0), reader(shards, 1)
    a, b = epoch_rows(r0, 0), epoch_rows(r1, 0)
    assert len(a) == len(b) == r0.batches_per_epoch * 8 == 480  # 960 rows / 2 ranks, whole batches
    assert not set(a) & set(b) and len(set(a) | set(b)) == 960  # disjoint, together the whole epoch
    for r in (r0, r1):  # each rank fetched its half (+ at most a row group at each end)
        assert r.bytes_read / total_bytes <= 0.55, r.bytes_read / total_bytes


def test_epochs_permute_shards_and_shuffle_within_windows(shards):
    r0 = reader(shards, 0)
    e0, e1 = epoch_rows(r0, 0), epoch_rows(r0, 1)
    assert sorted(e0) != sorted(e1)  # another permutation of the shards: another half of the corpus
    assert r0.order(0) != r0.order(1) and r0.order(0) == reader(shards, 1).order(0)  # same order on every rank
    assert e0 != sorted(e0)  # shuffled inside each 32-row window
    stream = [s * ROWS_PER_SHARD + r for s in r0.order(0) for r in range(ROWS_PER_SHARD)]
    assert epoch_rows(reader(shards, 0, shuffle=0), 0) == stream[:480]  # no buffer: the permuted shards in order
    assert epoch_rows(reader(shards, 1, shuffle=0), 0) == stream[480:]


@pytest.mark.parametrize("start", [(0, 3), (0, 4), (0, 59), (1, 0), (2, 17)])
def test_resume_at_any_batch_is_exact_and_reads_one_window(shards, start):
    epoch, index = start
    full = reader(shards, 1)
    it = full.batches(0, 0)
    expected = None
    for _ in range(epoch * full.batches_per_epoch + index + 2):
        e, i, rows = next(it)
        if (e, i) == start:
            expected = row_ids(rows)
    resumed = reader(shards, 1)
    e, i, rows = next(resumed.batches(epoch, index))
    assert (e, i) == start and row_ids(rows) == expected
    # a late position costs what an early one does: one window of rows, never the batches before it
    assert resumed.bytes_read <= 3 * max(sum(g.values()) for s in shards for g in s.group_bytes)
    pos = resumed.locate(epoch, index)
    assert pos["epoch"] == epoch and pos["shard"].endswith(".parquet") and 0 <= pos["row"] < ROWS_PER_SHARD


def test_seeds_do_not_collide():
    old = lambda seed, epoch, index, rank: (seed * 1_000_003 + epoch * 100_003 + index * 101 + rank) % (2**63)
    assert old(0, 1, 0, 0) == old(0, 0, 990, 13)  # the previous mix: epoch 1 batch 0 == epoch 0 batch 990 rank 13
    assert mix_seed(0, 0, 1, 0, 0) != mix_seed(0, 0, 0, 990, 13)
    seeds = {mix_seed(0, 0, e, i, r) for e in range(3) for i in range(1000) for r in range(16)}
    assert len(seeds) == 3 * 1000 * 16


def test_prefetcher_runs_ahead_and_hands_errors_over():
    def source():
        yield from range(3)
        raise RuntimeError("bad shard")

    it = Prefetcher(source(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="bad shard"):
        next(it)


def test_too_little_data_is_a_clear_error(shards):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        RankReader(shards[:1], COLUMNS, rank=0, world=16, batch_size=8, seed=0, shuffle_buffer=0)


def test_collated_batches_follow_the_position(tmp_path):
    """The pretraining task's batches (collated, masked) are a function of (epoch, index, rank)."""
    from pipelines.data.synthetic import synthetic_pair_shards
    from pipelines.pretrain import PretrainConfig, resolve

    synthetic_pair_shards(tmp_path, rows=128, shards=4, vocab_size=128)
    cfg = PretrainConfig.from_dict({"data": str(tmp_path), "model": {"preset": "tiny", "vocab_size": 128,
                                                                    "max_position_embeddings": 64},
                                    "batch_size_per_worker": 4, "num_workers": 2})
    task = resolve(cfg)
    a = [b for _, b in zip(range(5), task.batches(1, 2, 0, 0))]
    b = next(iter(task.batches(1, 2, 0, 4)))
    assert all(torch.equal(a[4][2][k], b[2][k]) for k in b[2])
    other = next(iter(task.batches(0, 2, 0, 4)))[2]
    rows = lambda batch: {tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])}
    assert not rows(other) & rows(b[2])  # the other rank's batch 4: other rows


def test_prefetcher_thread_stops_when_closed_or_dropped():
    import gc
    import itertools

    it = Prefetcher(itertools.count(), depth=2)
    assert next(it) == 0
    it.close()
    assert not it.thread.is_alive()
    dropped = Prefetcher(itertools.count(), depth=2)
    thread = dropped.thread
    del dropped
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()  # a dropped loader does not leave its thread filling a queue forever


def test_uneven_sizes_partial_windows_and_rollover(tmp_path):
    """10 shards x 97 rows (row groups of 13), 3 ranks, batch 8, shuffle window 40: shares,
    windows and epochs that do not divide evenly."""
    files = []
    for sh in range(10):
        ids = [[sh * 97 + r] for r in range(97)]
        path = tmp_path / f"part-{sh:05d}.parquet"
        pq.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                                 "token_type_ids": pa.array([[0]] * 97, pa.list_(pa.int32())),
                                 "nsp_label": pa.array([0] * 97, pa.int64())}), path, row_group_size=13)
        files.append(str(path))
    shards = describe(files)
    readers = [RankReader(shards, COLUMNS, rank=r, world=3, batch_size=8, seed=1, shuffle_buffer=40) for r in range(3)]
    assert readers[0].per_rank == 323 and readers[0].batches_per_epoch == 40  # 970 // 3 rows, 40 whole batches
    seen = []
    for r in readers:
        rows = epoch_rows(r, 0)
        assert len(rows) == 320 and len(set(rows)) == 320
        order = r.order(0)
        stream = [s * 97 + i for s in order for i in range(97)]
        mine = set(stream[r.rank * 323:(r.rank + 1) * 323])
        assert set(rows) <= mine  # only its own share, even in the partial last window
        seen += rows
    assert len(set(seen)) == 960
    # the position after the last batch of an epoch is the first of the next
    last = readers[1].batches_per_epoch
    e, i, rows = next(RankReader(shards, COLUMNS, rank=1, world=3, batch_size=8, seed=1, shuffle_buffer=40)
                      .batches(0, last))
    it = readers[1].batches(1, 0)
    assert (e, i) == (1, 0) and row_ids(rows) == row_ids(next(it)[2])
    assert readers[1].locate(0, last)["epoch"] == 1
    # resuming inside a partial window (batch 39: the window of batches 35-39 holds 40 rows, the
    # share ends at 323) gives the same rows as reading through
    through = readers[2].batches(0, 0)
    for _ in range(39):
        next(through)
    fresh = RankReader(shards, COLUMNS, rank=2, world=3, batch_size=8, seed=1, shuffle_buffer=40)
    assert row_ids(next(fresh.batches(0, 39))[2]) == row_ids(next(through)[2])
