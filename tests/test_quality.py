"""Evaluation metrics: hand-computed examples, scikit-learn and seqeval as references (unit tier)."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest

from pipelines.quality import bio_spans, classification_report, confusion_png, entity_report, report_markdown

# ---------------------------------------------------------------- sequence classification


def test_classification_report_hand_computed():
    gold = ["cat", "cat", "cat", "dog", "dog", "bird"]
    pred = ["cat", "dog", "cat", "dog", "cat", "dog"]
    r = classification_report(gold, pred, ["bird", "cat", "dog"])
    # confusion rows = gold (bird, cat, dog), columns = predicted
    assert r["confusion"] == [[0, 0, 1], [0, 2, 1], [0, 1, 1]]
    assert r["accuracy"] == pytest.approx(3 / 6) and r["n"] == 6
    cat, dog, bird = r["per_class"]["cat"], r["per_class"]["dog"], r["per_class"]["bird"]
    assert (cat["precision"], cat["recall"], cat["support"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert cat["f1"] == pytest.approx(2 / 3)
    assert (dog["precision"], dog["recall"], dog["support"]) == (pytest.approx(1 / 3), pytest.approx(1 / 2), 2)
    assert dog["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # 0.4
    assert bird == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.4 + 0) / 3)
    assert r["labels"] == ["bird", "cat", "dog"]


def test_classification_report_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    labels = ["a", "b", "c", "d", "e"]
    for trial in range(5):
        gold = [rng.choice(labels[:4]) for _ in range(300)]  # 'e' never in gold
        pred = [g if rng.random() < 0.6 else rng.choice(labels[: 3 + trial % 3]) for g in gold]
        r = classification_report(gold, pred, labels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, rc, f, s = metrics.precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
            assert r["macro_f1"] == pytest.approx(metrics.f1_score(gold, pred, labels=labels, average="macro",
                                                                   zero_division=0))
            assert r["weighted_f1"] == pytest.approx(metrics.f1_score(gold, pred, labels=labels, average="weighted",
                                                                      zero_division=0))
        assert r["accuracy"] == pytest.approx(metrics.accuracy_score(gold, pred))
        assert r["confusion"] == metrics.confusion_matrix(gold, pred, labels=labels).tolist()
        for i, label in enumerate(labels):
            c = r["per_class"][label]
            assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], rc[i], f[i], s[i]))


def test_classification_report_rejects_unknown_labels():
    with pytest.raises(ValueError, match=r"predicted labels not in the label list \['a', 'b'\]: \['z'\]"):
        classification_report(["a", "b"], ["a", "z"], ["a", "b"])
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        classification_report(["a", "b"], ["a"], ["a", "b"])


# ---------------------------------------------------------------- entity spans (seqeval's default mode)


@pytest.mark.parametrize("tags, spans", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["O", "I-PER", "I-PER", "O"], [("PER", 1, 3)]),  # I- without B- starts an entity
    (["I-PER"], [("PER", 0, 1)]),
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),  # a type switch: two entities
    (["B-ORG", "I-ORG", "I-ORG"], [("ORG", 0, 3)]),  # trailing I- closes at the end
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),
    (["B-MISC", "O", "I-MISC"], [("MISC", 0, 1), ("MISC", 2, 3)]),
    (["O", "O"], []),
    ([], []),
])
def test_bio_spans_edge_cases(tags, spans):
    assert bio_spans(tags) == spans


def test_bio_spans_matches_seqeval_get_entities():
    seqeval = pytest.importorskip("seqeval.metrics.sequence_labeling")
    rng = random.Random(1)
    vocab = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-ORG", "I-ORG"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2000):
            tags = [rng.choice(vocab) for _ in range(rng.randint(0, 8))]
            assert bio_spans(tags) == [(t, s, e + 1) for t, s, e in seqeval.get_entities(tags)], tags


def test_entity_report_hand_computed():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"], ["B-PER"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG"], ["O"]]
    r = entity_report(gold, pred)
    # gold: PER(0,2) LOC(3) | ORG(0) | PER(0); pred: PER(0,2) ORG(3) | ORG(0,2): 1 correct of 3 found, 4 true
    assert r["overall"] == {"precision": pytest.approx(1 / 3), "recall": pytest.approx(1 / 4),
                            "f1": pytest.approx(2 / 7), "support": 4, "predicted": 3}
    assert r["per_type"]["PER"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                                    "support": 2, "predicted": 1}
    assert r["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}
    assert r["per_type"]["ORG"]["predicted"] == 2 and r["per_type"]["ORG"]["precision"] == 0.0
    assert r["token_accuracy"] == pytest.approx(4 / 7) and r["sentences"] == 3
    with pytest.raises(ValueError, match="sentence 1: 2 gold tags but 1 predicted"):
        entity_report(gold, [pred[0], ["O"], ["O"]])


def _perturb(sentences, rng, rate):
    """Prediction-like errors: wrong types, dropped / added entities, B- lost (I- without B-),
    boundaries shifted."""
    types = ["PER", "LOC", "ORG", "MISC"]
    out = []
    for tags in sentences:
        tags = list(tags)
        for i, t in enumerate(tags):
            x = rng.random()
            if x > rate:
                continue
            kind = rng.randrange(5)
            if kind == 0 and t != "O":
                tags[i] = t[:2] + rng.choice(types)
            elif kind == 1:
                tags[i] = "O"
            elif kind == 2 and t.startswith("B-"):
                tags[i] = "I-" + t[2:]
            elif kind == 3:
                tags[i] = rng.choice(["B-", "I-"]) + rng.choice(types)
            elif kind == 4 and i + 1 < len(tags):
                tags[i + 1] = tags[i] if tags[i] != "O" else tags[i + 1]
        out.append(tags)
    return out


def test_entity_report_equals_seqeval_on_conll2003():
    metrics = pytest.importorskip("seqeval.metrics")
    from pipelines.builtin_tasks import builtin_task

    gold = builtin_task("conll2003", "test").labels
    for seed, rate in ((0, 0.0), (1, 0.03), (2, 0.15), (3, 0.5)):
        pred = _perturb(gold, random.Random(seed), rate)
        r = entity_report(gold, pred)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert r["overall"]["precision"] == pytest.approx(metrics.precision_score(gold, pred), abs=1e-12)
            assert r["overall"]["recall"] == pytest.approx(metrics.recall_score(gold, pred), abs=1e-12)
            assert r["overall"]["f1"] == pytest.approx(metrics.f1_score(gold, pred), abs=1e-12)
            assert r["token_accuracy"] == pytest.approx(metrics.accuracy_score(gold, pred))
            ref = metrics.classification_report(gold, pred, output_dict=True)
        for t, s in r["per_type"].items():
            assert (s["precision"], s["recall"], s["f1"], s["support"]) == pytest.approx(
                (ref[t]["precision"], ref[t]["recall"], ref[t]["f1-score"], ref[t]["support"]), abs=1e-12), t
        assert set(r["per_type"]) == {k for k in ref if not k.endswith(" avg")}
        assert r["overall"]["support"] == 5648
    assert entity_report(gold, gold)["overall"]["f1"] == 1.0


# ---------------------------------------------------------------- plot and report


def test_confusion_png_and_markdown(tmp_path):
    from PIL import Image

    labels = ["comp.os.ms-windows.misc", "rec.autos", "sci|space"]
    r = classification_report(["rec.autos", "sci|space", "rec.autos"], ["rec.autos", "rec.autos", "rec.autos"], labels)
    path = tmp_path / "confusion.png"
    confusion_png(r, labels, str(path))
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 150 and img.height > 150
        pixels = np.asarray(img.convert("RGB"))
        assert (pixels.min(axis=2) < 200).any()  # something drawn
    with pytest.raises(ValueError, match="2 labels"):
        confusion_png(r, labels[:2], str(path))
    md = report_markdown(r, "bbc-topic test")
    assert md.startswith("# bbc-topic test\n") and "accuracy: **0.6667** (3 examples)" in md
    assert "| rec.autos | 0.6667 | 1.0000 | 0.8000 | 2 |" in md and "| sci\\|space |" in md
    ner = report_markdown(entity_report([["B-PER", "O"]], [["B-PER", "O"]]), "conll2003")
    assert "entity F1: **1.0000**" in ner and "| PER | 1.0000 | 1.0000 | 1.0000 | 1 |" in ner


def test_the_quality_table_picks_each_seeds_learning_rate_on_dev_never_on_test():
    from pipelines.quality import select_by_dev

    runs = [{"row": "random", "column": "bbc", "seed": s, "lr": lr, "dev_f1": dev, "metric": test}
            for s, lr, dev, test in [(1, 1e-3, 0.7, 0.60), (1, 3e-4, 0.5, 0.95),  # seed 1: the dev winner tests worse
                                     (2, 1e-3, 0.4, 0.50), (2, 3e-4, 0.8, 0.70), (2, 1e-4, None, 0.99)]]
    chosen = {r["seed"]: (r["lr"], r["metric"]) for r in select_by_dev(runs)}
    assert chosen == {1: (1e-3, 0.60), 2: (3e-4, 0.70)}
