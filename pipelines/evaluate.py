"""`cloze evaluate`: score a classifier folder on a labeled set with the one inference path
(`pipelines.inference.Predictor`) -> eval.json, report.md and (sequence tasks) a confusion
matrix plot."""

from __future__ import annotations

import json
from pathlib import Path


def evaluate_folder(model_dir: str, labeled, output: str | None = None) -> dict:
    """The report of `model_dir` on a LabeledSet; written to `output` (a folder) when given."""
    from .finetune_data import scores
    from .inference import Predictor
    from .quality import confusion_png, report_markdown

    from .labeled import LabeledDataError

    predictor = Predictor(model_dir)
    if predictor.multi_label:
        raise LabeledDataError(f"{model_dir} is a multi-label classifier; cloze evaluate scores single-label "
                               f"sequence and token classifiers (serve or score it instead)")
    if predictor.kind != labeled.task:
        raise LabeledDataError(f"{model_dir} is a {predictor.kind} classifier; {labeled.source} is a {labeled.task} "
                               f"task")
    gold = {t for tags in labeled.labels for t in tags} if labeled.task == "token" else set(labeled.labels)
    unknown = sorted(gold - set(predictor.labels))
    if unknown:
        raise LabeledDataError(f"{labeled.source}: label {unknown[0]!r} is not one the model knows "
                               f"({', '.join(predictor.labels)})")
    if labeled.task == "sequence":
        pred = [r["label"] for r in predictor.classify(labeled.texts, labeled.texts_b)]
    else:
        pred = predictor.tag(labeled.tokens)
    report = scores(labeled.task, list(labeled.labels), pred, predictor.labels)
    report.update(model=str(model_dir), data=labeled.source, examples=len(labeled), skipped=labeled.skipped)
    if output:
        import tempfile

        from .storage import is_uri, split_query, upload

        out = Path(tempfile.mkdtemp(prefix="cloze-eval-")) if is_uri(output) else Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        name = Path(split_query(str(model_dir))[0].rstrip("/")).name
        (out / "report.md").write_text(report_markdown(report, f"{name} on {labeled.source}"))
        if labeled.task == "sequence":
            confusion_png(report, predictor.labels, str(out / "confusion.png"))
        if is_uri(output):  # shared storage: written here, then copied there
            upload(str(out), output)
    return report
