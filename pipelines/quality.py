"""Evaluation metrics for fine-tuned classifiers (numpy only), their plot and a short report.

- `classification_report`: accuracy, macro-F1 and per-class precision / recall / F1 /
  support over the given label list, and the confusion matrix (rows = gold, columns =
  predicted, both in `labels` order). Conventions are scikit-learn's: a class with no
  prediction has precision 0, a class with no gold example recall 0, and macro-F1 averages
  over every label in `labels` (a class absent from both gold and pred counts as F1 0).
- `bio_spans` / `entity_report`: entity-level scores exactly as `seqeval` computes them in its
  default mode (the conlleval chunking): an `I-X` without a `B-X` starts an entity, a type
  switch inside a chunk ends it and starts another, sentences never share an entity; an
  entity is correct only with the same type and the same start and end. Overall scores are
  micro-averaged over entities; per-type scores cover every type in gold or predictions.
- `confusion_png`, `report_markdown`: the confusion matrix as a PNG (pillow) and a Markdown
  summary for `cloze evaluate`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

__all__ = ["classification_report", "bio_spans", "entity_report", "confusion_png", "report_markdown"]


def _prf(tp: np.ndarray, n_pred: np.ndarray, n_gold: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 (0 where a denominator is 0: scikit-learn / seqeval's zero_division)."""
    tp, n_pred, n_gold = (np.asarray(a, dtype=np.float64) for a in (tp, n_pred, n_gold))
    precision = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
    recall = np.divide(tp, n_gold, out=np.zeros_like(tp), where=n_gold > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def classification_report(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Sequence-classification scores; `labels` is the label map's order (e.g. label_names).
    A gold or predicted label outside `labels` is a ValueError naming it."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise ValueError(f"duplicate names in labels {labels}")
    for name, seq in (("gold", gold), ("predicted", pred)):
        unknown = sorted({x for x in seq if x not in index})
        if unknown:
            raise ValueError(f"{name} labels not in the label list {labels}: {unknown}")
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    if gold:
        np.add.at(confusion, (np.array([index[g] for g in gold]), np.array([index[p] for p in pred])), 1)
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)
    precision, recall, f1 = _prf(tp, confusion.sum(axis=0), support)
    n = int(confusion.sum())
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1.mean()) if k else 0.0,
        "weighted_f1": float((f1 * support).sum() / n) if n else 0.0,
        "labels": list(labels),
        "per_class": {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                              "support": int(support[i])} for i, label in enumerate(labels)},
        "confusion": confusion.tolist(),
    }


def _split_tag(tag: str) -> tuple[str, str]:
    """seqeval (prefix mode): the chunk tag is the first character, the type what follows the
    first '-' ('_' when nothing does)."""
    if not tag:
        raise ValueError("an empty tag")
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S") and tag in ("E", "I"))
            or (prev_tag == "O" and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def _chunks(seq: list[str]) -> list[tuple[str, int, int]]:
    """seqeval's get_entities on one flat sequence: (type, start, end_inclusive)."""
    prev_tag, prev_type, begin, chunks = "O", "", 0, []
    for i, chunk in enumerate([*seq, "O"]):
        tag, type_ = _split_tag(chunk)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def bio_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Typed entity spans (type, start, end_exclusive) of one sentence's tags, chunked as
    seqeval's default mode does: ['O', 'I-PER', 'I-PER', 'B-LOC', 'I-ORG'] ->
    [('PER', 1, 3), ('LOC', 3, 4), ('ORG', 4, 5)]."""
    return [(t, s, e + 1) for t, s, e in _chunks(list(tags))]


def entity_report(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level precision / recall / F1 (seqeval's default mode, micro-averaged) overall and
    per type, plus token accuracy. Sentences must pair up with equal lengths."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    flat_gold: list[str] = []
    flat_pred: list[str] = []
    for s, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {s}: {len(g)} gold tags but {len(p)} predicted")
        flat_gold += [*g, "O"]  # as seqeval: an 'O' between sentences, so no entity spans two
        flat_pred += [*p, "O"]
    true, found = set(_chunks(flat_gold)), set(_chunks(flat_pred))
    types = sorted({t for t, _, _ in true} | {t for t, _, _ in found})
    tp = np.array([len({e for e in true & found if e[0] == t}) for t in types], dtype=np.int64)
    n_pred = np.array([sum(1 for e in found if e[0] == t) for t in types], dtype=np.int64)
    n_gold = np.array([sum(1 for e in true if e[0] == t) for t in types], dtype=np.int64)
    precision, recall, f1 = _prf(tp, n_pred, n_gold)
    op, orc, of1 = _prf(np.array([tp.sum()]), np.array([n_pred.sum()]), np.array([n_gold.sum()]))
    n_tokens = sum(len(g) for g in gold)
    correct = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
    return {
        "overall": {"precision": float(op[0]), "recall": float(orc[0]), "f1": float(of1[0]),
                    "support": int(n_gold.sum()), "predicted": int(n_pred.sum())},
        "per_type": {t: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                         "support": int(n_gold[i]), "predicted": int(n_pred[i])} for i, t in enumerate(types)},
        "token_accuracy": float(correct / n_tokens) if n_tokens else 0.0,
        "sentences": len(gold),
    }


# ---------------------------------------------------------------- plot and report


def confusion_png(report: dict, labels: list[str], path: str) -> None:
    """The confusion matrix of a classification_report as a PNG: rows gold, columns predicted,
    cells shaded by the row's share (recall), with the counts written in."""
    from PIL import Image, ImageDraw, ImageFont

    m = np.asarray(report["confusion"], dtype=np.int64)
    k = len(labels)
    if m.shape != (k, k):
        raise ValueError(f"confusion matrix is {m.shape}, but {k} labels were given")
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # pillow without FreeType sizes
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    cell = max(36, max((size(str(v))[0] for v in m.flat), default=0) + 10)
    label_w = max((size(name)[0] for name in labels), default=0) + 12
    title = f"accuracy {report.get('accuracy', 0):.3f}  macro-F1 {report.get('macro_f1', 0):.3f}"
    pad, line_h = 10, size("Ag")[1] + 8
    left = pad + size("gold")[0] + 8 + label_w  # room for the axis names and the labels
    top = pad + 2 * line_h + label_w
    width = max(left + k * cell + pad, 2 * pad + size(title)[0], left + size("predicted")[0] + pad)
    height = top + k * cell + pad + 4
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), title, fill="black", font=font)
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0)
    for i in range(k):
        for j in range(k):
            x, y = left + j * cell, top + i * cell
            shade = int(255 - 200 * share[i, j])
            fill = (shade, shade, 255) if i != j else (shade, 255, shade)
            draw.rectangle([x, y, x + cell, y + cell], fill=fill, outline=(180, 180, 180))
            text = str(m[i, j])
            tw, th = size(text)
            draw.text((x + (cell - tw) / 2, y + (cell - th) / 2 - 2), text,
                      fill="white" if share[i, j] > 0.6 else "black", font=font)
    for i, name in enumerate(labels):  # gold labels: row names
        tw, th = size(name)
        draw.text((left - 6 - tw, top + i * cell + (cell - th) / 2 - 2), name, fill="black", font=font)
    for j, name in enumerate(labels):  # predicted labels: rotated column names
        tw, th = size(name)
        tag = Image.new("RGBA", (tw + 4, th + 6), (255, 255, 255, 0))
        ImageDraw.Draw(tag).text((2, 0), name, fill="black", font=font)
        tag = tag.rotate(90, expand=True)
        img.paste(tag, (int(left + j * cell + (cell - tag.width) / 2), top - 6 - tag.height), tag)
    draw.text((pad, top + k * cell / 2 - line_h / 2), "gold", fill=(90, 90, 90), font=font)
    draw.text((left, pad + line_h), "predicted", fill=(90, 90, 90), font=font)
    img.save(path, format="PNG")


def report_markdown(report: dict, title: str) -> str:
    """A short Markdown report of a classification_report (accuracy, macro-F1, per-class
    table) or an entity_report (overall and per-type entity table)."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|")

    lines = [f"# {title}", ""]
    if "per_type" in report:
        o = report["overall"]
        lines += [f"- entity F1: **{o['f1']:.4f}** (precision {o['precision']:.4f}, recall {o['recall']:.4f}; "
                  f"{o['support']} gold entities, {o.get('predicted', 0)} predicted)",
                  f"- token accuracy: {report.get('token_accuracy', 0):.4f} over {report.get('sentences', 0)} sentences",
                  "", "| type | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        for t, s in report["per_type"].items():
            lines.append(f"| {cell(t)} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['support']} |")
    else:
        lines += [f"- accuracy: **{report['accuracy']:.4f}** ({report.get('n', 0)} examples)",
                  f"- macro-F1: **{report['macro_f1']:.4f}**", "",
                  "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        for label, s in report["per_class"].items():
            lines.append(f"| {cell(label)} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['support']} |")
    return "\n".join(lines) + "\n"


def label_rows_by_init(results: list[dict]) -> list[dict]:
    """A row name that several starting points share (e.g. `large-ft` for two larger budgets)
    becomes one row per starting point, "row (model)", so that a cell never mixes models. The
    model is named by its path (the run folder's for a `.../model`), so two models of one
    folder name (`runs/abl-mlm/model`, `/tmp/s7/abl/abl-mlm/model`) stay apart."""
    inits: dict[str, set] = {}
    for r in results:
        inits.setdefault(r["row"], set()).add(r.get("init"))

    def name(init) -> str:
        path = Path(str(init))
        return str(path.parent) if path.name == "model" and path.parent.name else str(path)

    return [{**r, "row": f"{r['row']} ({name(r.get('init'))})"} if len(inits[r["row"]]) > 1 else r for r in results]


def select_by_dev(results: list[dict]) -> list[dict]:
    """Rows of benchmarks/quality.py's results: per (row, column, seed), the run whose encoder
    learning rate did best on dev (`dev_f1`); the test metric never takes part in the choice."""
    best: dict[tuple, dict] = {}
    for r in results:
        k = (r["row"], r["column"], r["seed"])
        if k not in best or (r.get("dev_f1") or -1.0) > (best[k].get("dev_f1") or -1.0):
            best[k] = r
    return list(best.values())


def quality_cells(results: list[dict]) -> dict[tuple[str, str], str]:
    """The learning-quality table's cells: per (row, column), "mean [min-max] (n=N, lr ...)"
    of the test metric over seeds, each seed's run chosen by `select_by_dev`."""
    values: dict[tuple[str, str], list[float]] = {}
    lrs: dict[tuple[str, str], set[str]] = {}
    for r in select_by_dev(results):
        if r.get("metric") is None:
            continue
        key = (r["row"], r["column"])
        values.setdefault(key, []).append(float(r["metric"]))
        if "lr" in r:
            lrs.setdefault(key, set()).add(f"{r['lr']:g}")
    return {key: f"{statistics.mean(v):.3f} [{min(v):.3f}-{max(v):.3f}] (n={len(v)}"
                 + (f", lr {'/'.join(sorted(lrs[key]))}" if key in lrs else "") + ")"
            for key, v in values.items()}
