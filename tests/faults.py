"""Fault hooks for tests: training-core callbacks that SIGKILL a worker or stop a run.

Pickled by value (this module is not importable in Ray workers)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import ray.cloudpickle

from pipelines.train import Callback

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillWorkerAt(Callback):
    """SIGKILL the last rank's process right after step `step` (its checkpoint, if any, is
    written), once per run: a marker file in the run folder records it."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, step, rank, world, run_dir):
        marker = Path(run_dir) / ".fault_injected"
        if step == self.step and rank == world - 1 and not marker.exists():
            marker.write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)


class StopAt(Callback):
    """Stop every worker cleanly after step `step` (a checkpoint, no export)."""

    def __init__(self, step: int):
        self.step = step

    def wants_stop(self, step):
        return step == self.step


class SaveBatches(Callback):
    """Save the micro-batches of steps <= `steps` that each rank receives, as
    `<folder>/batch.rank<r>.step<s>.pt` (what production feeds the model, for assertions)."""

    def __init__(self, folder: str, steps: int = 1):
        self.folder, self.steps = folder, steps

    def on_batch(self, step, rank, batch):
        if step <= self.steps:
            import torch

            torch.save(batch, Path(self.folder) / f"batch.rank{rank}.step{step}.pt")


def kill_tree(proc) -> None:
    """SIGKILL a subprocess started with `start_new_session=True`, its process group, and
    every process it started (Ray's own, whatever their session); wait until they are gone."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(30)
