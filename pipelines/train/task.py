"""The contract between the training core and what it trains.

A task is a picklable object built by the driver (config checked, data described) and
shipped to every worker. The core owns DeepSpeed, the step loop, checkpoints, metrics,
resume and export plumbing; the task owns the model, the data and the exported folder:

    class MyTask(Task):
        config: TrainConfig subclass
        def build_model(self) -> nn.Module:            # forward(batch) -> ObjectiveOutput(loss, metrics)
        def batches(self, rank, world, epoch, index):  # (epoch, index, batch of CPU tensors) forever
        def held_out(self, rank, world):               # fixed evaluation batches, or []
        def export(self, state_dict, metrics, dest):   # rank 0: the full fp32 weights -> a model folder

Metrics named `<part>/count` weight `<part>/loss` and `<part>/acc` in held-out averages.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from .config import TrainConfig


class Task:
    name = "train"
    config: TrainConfig

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def input_paths(self) -> list[str]:
        """Folders and files the workers read (on a multi-node cluster they must be shared)."""
        return []

    def hidden_size(self) -> int:
        """The model's width (sizes DeepSpeed's buckets)."""
        raise NotImplementedError

    def batches(self, rank: int, world: int, epoch: int, index: int) -> Iterator[tuple[int, int, dict]]:
        raise NotImplementedError

    def locate(self, rank: int, world: int, epoch: int, index: int) -> dict[str, Any]:
        """This rank's position in the data for a checkpoint (epoch, index and what it maps to)."""
        return {"epoch": epoch, "index": index}

    def held_out(self, rank: int, world: int) -> list[dict]:
        return []

    def evaluate(self, model, rank: int, world: int, device) -> dict[str, float] | None:
        """Held-out metrics computed by the task itself (every rank calls it, the same number
        of forwards on each: ZeRO-3 gathers weights per forward); None = the core's generic
        loss / accuracy over `held_out` batches."""
        return None

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """Optimizer groups; default: weight decay on matrices, one learning rate."""
        from .optim import param_groups

        return param_groups(model, self.config.optimizer.weight_decay)

    def flops(self, batch: dict) -> float:
        """Training FLOPs of one batch (forward + backward), for MFU; 0 = unknown."""
        return 0.0

    def sizes(self, batch: dict) -> tuple[float, int]:
        """(tokens, samples) of one batch, from its CPU tensors (no device sync)."""
        return float(batch["attention_mask"].sum()), int(batch["input_ids"].shape[0])

    def export(self, state: dict[str, torch.Tensor], metrics: dict[str, float], dest: str) -> None:
        raise NotImplementedError


class Callback:
    """Hooks into every worker's loop (tests inject faults with these; a user can stop a run).

    `on_batch(step, rank, batch)`: each micro-batch as this rank receives it (CPU tensors).
    `wants_stop(step)`: stop cleanly after this step (a checkpoint is written, no export).
    `after_step(step, rank, world, run_dir)`: after the step's checkpoint, if any."""

    def on_batch(self, step: int, rank: int, batch: dict) -> None:
        pass

    def wants_stop(self, step: int) -> bool:
        return False

    def after_step(self, step: int, rank: int, world: int, run_dir: str) -> None:
        pass


class ShardTask(Task):
    """A task over an encoder whose training examples are Parquet shards, each rank reading
    its own share (`pipelines.data.loader.RankReader`) with batches made in the loader's
    prefetch thread. Subclasses set `shards`, `columns`, `encoder_config` and implement
    `batch_maker(rank)`: a function (epoch, index, rows) -> batch of CPU tensors."""

    shards: list
    columns: list[str]
    encoder_config: object  # encoder.EncoderConfig

    def batch_maker(self, rank: int):
        raise NotImplementedError

    def hidden_size(self) -> int:
        return self.encoder_config.hidden_size

    def reader(self, rank: int, world: int):
        """This rank's reader (one per (rank, world), kept: it holds its row-group cache)."""
        from ..data.loader import RankReader

        readers = self.__dict__.setdefault("_readers", {})
        if (rank, world) not in readers:
            cfg = self.config
            readers[(rank, world)] = RankReader(self.shards, self.columns, rank=rank, world=world,
                                                batch_size=cfg.batch_size_per_worker, seed=cfg.seed,
                                                shuffle_buffer=cfg.shuffle_buffer)
        return readers[(rank, world)]

    def batches(self, rank: int, world: int, epoch: int, index: int):
        from ..data.loader import Prefetcher

        make = self.batch_maker(rank)

        def produce():
            for e, i, rows in self.reader(rank, world).batches(epoch, index):
                yield e, i, make(e, i, rows)

        return Prefetcher(produce(), self.config.prefetch_batches)

    def locate(self, rank: int, world: int, epoch: int, index: int) -> dict[str, Any]:
        return self.reader(rank, world).locate(epoch, index)

    def flops(self, batch: dict) -> float:
        from encoder import flops_per_token

        return float(batch["attention_mask"].sum()) * flops_per_token(self.encoder_config, batch["input_ids"].shape[1])
