"""Splits of labeled data, on the driver before any Ray work: `stratified_split` (per class,
seeded, every class keeps at least one example in the first part), `label_fraction` (a
stratified subsample for the low-label regime, nested: a smaller fraction with the same seed
is a subset of a larger one), `label_names` and `check_splits`."""

from __future__ import annotations

import random

from .labeled import TOKEN, LabeledDataError, LabeledSet


def _check_fractions(fractions: tuple[float, ...]) -> None:
    if not fractions or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be positive and sum to 1, got {tuple(fractions)}")


def _allocate(n: int, fractions: tuple[float, ...]) -> list[int]:
    """n items into parts of sizes ~ n * fractions (largest remainder; ties to the earlier part)."""
    exact = [n * f for f in fractions]
    sizes = [int(x) for x in exact]
    order = sorted(range(len(fractions)), key=lambda k: (-(exact[k] - sizes[k]), k))
    for k in order[: n - sum(sizes)]:
        sizes[k] += 1
    return sizes


def _by_label(ds: LabeledSet, seed: int) -> dict[str, list[int]]:
    """Indices of each label, each list in a seeded random order (seeded by (seed, label), so
    one class's order does not depend on the others)."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(ds.labels):
        groups.setdefault(label, []).append(i)
    for label, idx in groups.items():
        random.Random(f"{seed}:{label}").shuffle(idx)
    return dict(sorted(groups.items()))


def _duplicate_groups(ds: LabeledSet, seed: int) -> dict[str, list[list[int]]]:
    """label -> groups of identical examples (same text / text pair / token list), each
    class's groups in a seeded random order; a group's class is its first member's label
    (token task: one class, "")."""
    by_key: dict[tuple, list[int]] = {}
    for i in range(len(ds)):
        key = (tuple(ds.tokens[i]),) if ds.task == TOKEN else (
            ds.texts[i], ds.texts_b[i] if ds.texts_b is not None else None)
        by_key.setdefault(key, []).append(i)
    out: dict[str, list[list[int]]] = {}
    for members in by_key.values():
        out.setdefault("" if ds.task == TOKEN else ds.labels[members[0]], []).append(members)
    for label, groups in out.items():
        random.Random(f"{seed}:{label}").shuffle(groups)
    return dict(sorted(out.items()))


def stratified_split(ds: LabeledSet, fractions: tuple[float, ...], seed: int) -> list[LabeledSet]:
    """Split into len(fractions) parts keeping each class's proportion (token task: a plain
    seeded split of the sentences). Deterministic in (data, fractions, seed). Identical
    examples (real corpora repeat some: BBC 98, SMS spam 315) always land in the same part, so
    none is both trained and tested on; a part may so miss its size by less than a group.
    Every class keeps at least one example in the first part (train). The skipped counts of
    `ds` go with the first part only (they happened before the split)."""
    _check_fractions(fractions)
    parts: list[list[int]] = [[] for _ in fractions]
    for groups in _duplicate_groups(ds, seed).values():
        sizes = _allocate(sum(len(g) for g in groups), fractions)
        if sizes[0] == 0:  # train must see every class
            sizes[max(range(len(sizes)), key=lambda k: sizes[k])] -= 1
            sizes[0] = 1
        bounds = [sum(sizes[: k + 1]) for k in range(len(sizes))]
        position = 0
        for group in groups:
            k = next((k for k, b in enumerate(bounds) if position < b), len(bounds) - 1)
            parts[k].extend(group)
            position += len(group)
    out = [ds.subset(sorted(p)) for p in parts]
    out[0].skipped = dict(ds.skipped)
    return out


def label_fraction(ds: LabeledSet, fraction: float, seed: int) -> LabeledSet:
    """A stratified subsample of about `fraction` of each class, at least one per class
    (token task: of the sentences, at least one). Nested: with one seed, a smaller fraction's
    examples are a subset of a larger one's."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if ds.task == TOKEN:
        idx = list(range(len(ds)))
        random.Random(f"{seed}:").shuffle(idx)
        keep = idx[: max(1, round(len(idx) * fraction))] if idx else []
    else:
        keep = [i for group in _by_label(ds, seed).values() for i in group[: max(1, round(len(group) * fraction))]]
    out = ds.subset(sorted(keep))
    out.skipped = dict(ds.skipped)
    return out


def _tag_set(ds: LabeledSet) -> set[str]:
    return {t for tags in ds.labels for t in tags}


def label_names(train: LabeledSet) -> list[str]:
    """The label map's names, in id order. Sequence: the sorted label set. Token: "O" first,
    then the sorted tag set, completed so that every seen type has both B- and I- (a type seen
    only in one-word entities can still be predicted, and decoded, as a longer one)."""
    if train.task != TOKEN:
        return sorted(set(train.labels))
    types = {t[2:] for t in _tag_set(train) if t != "O"}
    return ["O"] + sorted({f"{p}-{t}" for t in types for p in "BI"})


def check_splits(train: LabeledSet, dev: LabeledSet | None = None, test: LabeledSet | None = None) -> None:
    """Raise LabeledDataError when the splits cannot train and evaluate a classifier: an empty
    split, mixed tasks, a single class in train (token task: no entity at all), or a dev/test
    label that train never shows (named, with its count and file)."""
    if len(train) == 0:
        raise LabeledDataError(f"{train.source}: the training set is empty (skipped: {train.skipped or 'none'})")
    known = set(label_names(train))
    if train.task == TOKEN:
        if known == {"O"}:
            raise LabeledDataError(f"{train.source}: the training set has no entity (every tag is 'O'); "
                                   "a token classifier needs at least one B-TYPE tag")
    elif len(known) < 2:
        only = next(iter(known))
        raise LabeledDataError(f"{train.source}: the training set has a single class {only!r} ({len(train)} "
                               "examples); a classifier needs at least 2")
    for name, ds in (("dev", dev), ("test", test)):
        if ds is None:
            continue
        if ds.task != train.task:
            raise LabeledDataError(f"{ds.source}: the {name} set is a {ds.task} task but train is {train.task}")
        if len(ds) == 0:
            raise LabeledDataError(f"{ds.source}: the {name} set is empty (skipped: {ds.skipped or 'none'})")
        seen = [t for tags in ds.labels for t in tags] if ds.task == TOKEN else ds.labels
        counts: dict[str, int] = {}
        for label in seen:
            if label not in known:
                counts[label] = counts.get(label, 0) + 1
        if counts:
            listed = ", ".join(f"{k!r} ({v}x)" for k, v in sorted(counts.items()))
            what = "tags" if ds.task == TOKEN else "labels"
            raise LabeledDataError(f"{ds.source}: {name} {what} not in train ({train.source}): {listed}; "
                                   f"train has {sorted(known)}")
