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


def _files(path: str) -> dict[str, int]:
    """Sizes of every file below a checkpoint folder (local or URI), by relative path."""
    if "://" not in str(path):
        root = Path(path)
        return {str(f.relative_to(root)): f.stat().st_size for f in root.rglob("*") if f.is_file()}
    import pyarrow.fs as pafs

    from ..storage import filesystem

    fs, root = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root.rstrip("/")) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def _read(path: str, name: str) -> str:
    from ..storage import join_path, read_bytes

    body = read_bytes(join_path(str(path), name))
    if body is None:
        raise OSError(f"cannot read {name}")
    return body.decode()


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why a checkpoint folder (local or URI) cannot be used (None = complete).

    Every rank writes `manifest.rank<r>.json` (its files and their sizes) after its files;
    a checkpoint is complete when all ranks' manifests exist and every file matches."""
    try:
        files = _files(str(path))
        if "trainer_state.json" not in files:
            return "no trainer_state.json"
        world = json.loads(_read(str(path), "trainer_state.json"))["world_size"]
        for r in range(world):
            name = f"manifest.rank{r}.json"
            if name not in files:
                return f"rank {r} never finished writing (no {name})"
            for rel, size in json.loads(_read(str(path), name)).items():
                if rel not in files:
                    return f"missing file {rel}"
                if files[rel] != size:
                    return f"{rel} is {files[rel]} bytes, expected {size} (truncated?)"
    except (ValueError, KeyError, OSError) as e:
        return f"unreadable manifest ({e})"
    return None


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(json.loads(_read(str(path), "trainer_state.json"))["step"])


def latest_valid_checkpoint(run_dir: str | os.PathLike, log=print) -> str | None:
    """The newest complete checkpoint of a run folder (local or URI); incomplete ones are
    skipped, with a message."""
    run_dir = str(run_dir)
    if "://" in run_dir:
        import pyarrow.fs as pafs

        from ..storage import filesystem, join_path

        fs, root = filesystem(run_dir)
        names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                 if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
        folders = [join_path(run_dir, n) for n in names]
    else:
        folders = [str(p) for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()]
    found = []
    for folder in folders:
        problem = checkpoint_problem(folder)
        if problem:
            log(f"cloze: skipping checkpoint {folder}: {problem}")
        else:
            found.append((checkpoint_step(folder), folder))
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
