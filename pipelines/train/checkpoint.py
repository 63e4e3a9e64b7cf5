"""Checkpoints: DeepSpeed state (sharded under ZeRO) + trainer state + RNG + data position,
and a per-rank manifest written last, so a checkpoint is complete only when every rank's
files are all there at their recorded sizes."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

DS_TAG = "ds"  # DeepSpeed's tag (sub-folder) inside every Ray checkpoint


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why a checkpoint folder cannot be used (None = complete).

    Every rank writes `manifest.rank<r>.json` (its files and their sizes) after its files;
    a checkpoint is complete when all ranks' manifests exist and every file matches."""
    p = Path(path)
    state = p / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        world = json.loads(state.read_text())["world_size"]
        for r in range(world):
            m = p / f"manifest.rank{r}.json"
            if not m.is_file():
                return f"rank {r} never finished writing (no {m.name})"
            for name, size in json.loads(m.read_text()).items():
                f = p / name
                if not f.is_file():
                    return f"missing file {name}"
                if f.stat().st_size != size:
                    return f"{name} is {f.stat().st_size} bytes, expected {size} (truncated?)"
    except (ValueError, KeyError, OSError) as e:
        return f"unreadable manifest ({e})"
    return None


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(json.loads((Path(path) / "trainer_state.json").read_text())["step"])


def latest_valid_checkpoint(run_dir: str | os.PathLike, log=print) -> str | None:
    """The newest complete checkpoint of a run folder; incomplete ones are skipped, with a message."""
    found = []
    for p in Path(run_dir).glob("checkpoint_*"):
        if not p.is_dir():
            continue
        problem = checkpoint_problem(p)
        if problem:
            log(f"cloze: skipping checkpoint {p}: {problem}")
        else:
            found.append((checkpoint_step(p), str(p)))
    return max(found)[1] if found else None


def save_checkpoint(engine, folder: Path, state: dict, rank: int, position: dict) -> None:
    """DeepSpeed state (each rank its own shards) + trainer state + RNG + this rank's data
    position + this rank's manifest (last: it marks the rank's part complete)."""
    engine.save_checkpoint(str(folder), tag=DS_TAG)
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               folder / f"rng.rank{rank}.pt")
    (folder / f"position.rank{rank}.json").write_text(json.dumps(position, indent=1))
    if rank == 0:
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))
    # each rank saves into its own folder, so everything in it is this rank's part
    manifest = {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*")
                if f.is_file() and not f.name.startswith(("manifest.", ".manifest."))}
    tmp = folder / f".manifest.rank{rank}.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.rename(folder / f"manifest.rank{rank}.json")


def load_checkpoint(engine, folder: str, rank: int) -> dict:
    """Restore engine + RNG; returns the trainer state (step, epoch, index, tokens, samples)."""
    load_path, _ = engine.load_checkpoint(folder, tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {folder}")
    rng = torch.load(Path(folder) / f"rng.rank{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((Path(folder) / "trainer_state.json").read_text())
