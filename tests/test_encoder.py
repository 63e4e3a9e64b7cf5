"""Unit tests of the encoder package: shapes, padding, losses, heads, config, isolation."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import encoder as E
from encoder.objective import classification_output

TINY = E.EncoderConfig.from_name("tiny", vocab_size=64, max_position_embeddings=32,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_base_preset_gives_768_wide_hidden_state_per_token():
    torch.manual_seed(0)
    model = E.Encoder(E.EncoderConfig.from_name("base")).eval()
    ids = torch.randint(1000, 2000, (2, 15))
    with torch.no_grad():
        out = model(ids)
    assert out.shape == (2, 15, 768)
    assert out[0].shape == (15, 768)


def test_presets_have_bert_sizes():
    sizes = {n: (c["num_hidden_layers"], c["hidden_size"]) for n, c in E.PRESETS.items()}
    assert sizes == {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "base": (12, 768), "large": (24, 1024)}
    assert E.EncoderConfig.from_name("large").num_attention_heads == 16


def test_trailing_padding_does_not_change_the_output():
    torch.manual_seed(0)
    model = E.Encoder(TINY).eval()
    ids = torch.randint(5, 64, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 6)], 1).long()
    with torch.no_grad():
        a = model(ids)
        b = model(padded, mask)
        # the same sequence batched next to a longer one
        other = torch.randint(5, 64, (1, 15))
        c = model(torch.cat([padded, other]), torch.cat([mask, torch.ones(1, 15, dtype=torch.long)]))
    assert torch.allclose(a, b[:, :9], atol=1e-6)
    assert torch.allclose(a, c[:1, :9], atol=1e-6)
    assert (b[:, 9:] == 0).all()  # padding positions are zeros, never garbage
    # and the padding really is ignored by attention, not merely zeroed afterwards:
    # a model that attended to pad tokens would change when their ids change
    padded2 = padded.clone()
    padded2[:, 9:] = 7
    with torch.no_grad():
        d = model(padded2, mask)
    assert torch.allclose(b, d, atol=1e-6)


def test_nsp_loss_is_negative_log_probability_of_gold_label():
    # a classifier output of 0.8 for the gold label gives -ln 0.8 = 0.2231
    logits = torch.log(torch.tensor([[0.8, 0.2]]))
    out = classification_output(logits, torch.tensor([0]))
    assert round(float(out.loss), 4) == 0.2231
    assert math.isclose(float(out.loss), -math.log(0.8), rel_tol=1e-6)
    higher = classification_output(torch.log(torch.tensor([[0.95, 0.05]])), torch.tensor([0]))
    assert float(higher.loss) < float(out.loss)
    # through the real NSP head: loss == -log softmax(logits)[gold]
    torch.manual_seed(0)
    model = E.MultiObjective(E.Encoder(TINY), {"nsp": 1.0}).eval()
    ids = torch.randint(5, 64, (4, 10))
    gold = torch.tensor([0, 1, 1, 0])
    out = model({"input_ids": ids, "nsp_label": gold})
    hidden = model.encoder(ids)
    logits = model.objectives["nsp"].logits(hidden, model.encoder.pool(hidden))
    expect = -torch.log_softmax(logits, -1)[torch.arange(4), gold].mean()
    assert torch.allclose(out.metrics["nsp/loss"], expect, atol=1e-6)


def _batch(seed=0, B=8, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (B, T), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(B, T, dtype=torch.long)
    mask[::2, T - 3:] = 0
    ids[mask == 0] = 0
    special = (ids < 5) | (mask == 0)
    masked, labels = E.mask_tokens(ids, special, mask_token_id=4, vocab_size=64, mask_prob=0.3, generator=g, random_token_low=5)
    labels[:, 3] = torch.where(special[:, 3], labels[:, 3], ids[:, 3])  # every row has a prediction
    masked[:, 3] = torch.where(special[:, 3], masked[:, 3], torch.full_like(masked[:, 3], 4))
    lab = lambda: torch.randint(0, 2, (B,), generator=g)  # noqa: E731
    return {"input_ids": masked, "attention_mask": mask, "token_type_ids": (torch.arange(T) >= T // 2).long().expand(B, T),
            "mlm_labels": labels, "nsp_label": lab(), "sop_label": lab(), "shuffle_label": lab()}


@pytest.mark.parametrize("mix", [{"mlm": 1.0}, {"nsp": 1.0}, {"sop": 1.0}, {"shuffle": 1.0}, {"rtd": 50.0, "mlm": 1.0}])
def test_each_head_overfits_a_fixed_batch(mix):
    torch.manual_seed(0)
    model = E.MultiObjective(E.Encoder(TINY), mix)
    batch = _batch()
    # pair heads are unstable at 3e-3 on 8 examples; ELECTRA's two-model game needs it to settle in 150 steps
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3 if "rtd" in mix else 1e-3)
    watched = next(iter(mix))  # the objective under test (rtd, not its generator, for ELECTRA)
    first = None
    for step in range(150):
        if "rtd" in mix:
            torch.manual_seed(step % 3)  # the generator samples; keep the corruption repeatable
        out = model(batch)
        if first is None:
            first = float(out.metrics[f"{watched}/loss"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = float(model.eval()(batch).metrics[f"{watched}/loss"]) if "rtd" not in mix else float(out.metrics["rtd/loss"])
    assert last <= 0.1 * first, (first, last)


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_downstream_heads_overfit(kind):
    torch.manual_seed(0)
    batch = _batch(1)
    if kind == "sequence":
        model, labels = E.SequenceClassifier(E.Encoder(TINY), 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    else:
        model = E.TokenClassifier(E.Encoder(TINY), 3)
        labels = batch["input_ids"] % 3
        labels[:, 0] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    first = float(model(*args, labels=labels).loss.detach())
    for _ in range(150):
        out = model(*args, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(model(*args, labels=labels).loss.detach()) <= 0.1 * first


def test_multiobjective_total_is_the_weighted_sum():
    torch.manual_seed(0)
    weights = {"mlm": 1.0, "nsp": 0.5, "sop": 2.0, "shuffle": 0.25}
    model = E.MultiObjective(E.Encoder(TINY), weights).eval()
    out = model(_batch())
    parts = sum(w * out.metrics[f"{n}/loss"] for n, w in weights.items())
    assert torch.allclose(out.loss, parts, atol=1e-6)
    for n in weights:
        assert f"{n}/acc" in out.metrics
    # a batch without an objective's label skips it and the total follows
    b = _batch()
    del b["sop_label"]
    out2 = model(b)
    assert "sop/loss" not in out2.metrics
    assert torch.allclose(out2.loss, sum(w * out2.metrics[f"{n}/loss"] for n, w in weights.items() if n != "sop"), atol=1e-6)


def test_electra_weighting_and_labels():
    torch.manual_seed(0)
    model = E.MultiObjective(E.Encoder(TINY), {"rtd": 50.0, "mlm": 1.0})
    batch = _batch()
    out = model(batch)
    assert torch.allclose(out.loss, 50 * out.metrics["rtd/loss"] + out.metrics["mlm/loss"], atol=1e-5)
    gen_out, corrupted, labels = model.objectives["rtd"].corrupt(batch)
    original = torch.where(batch["mlm_labels"] != -100, batch["mlm_labels"], batch["input_ids"])
    real = batch["attention_mask"] == 1
    assert torch.equal(labels[real] == 1, (corrupted != original)[real])  # 1 = replaced
    assert (labels[~real] == -100).all()
    # only positions the generator predicted can be replaced
    assert ((corrupted != original) <= (batch["mlm_labels"] != -100)).all()
    # the generator is smaller and shares the embeddings
    gen = model.objectives["rtd"].generator
    assert gen.config.hidden_size < TINY.hidden_size
    assert gen.head.decoder.weight is model.encoder.embeddings.word_embeddings.weight


def test_mlm_labels_only_masked_positions_count_and_specials_never_masked():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (256, 64), generator=g)
    ids[:, 0], ids[:, 30], ids[:, 63] = 2, 3, 3  # [CLS] ... [SEP] ... [SEP]
    ids[:16, 40:] = 0  # padding
    special = (ids == 2) | (ids == 3) | (ids == 0)
    masked, labels = E.mask_tokens(ids, special, mask_token_id=4, vocab_size=1000, generator=g)
    chosen = labels != -100
    assert not (chosen & special).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    rate = chosen.sum() / (~special).sum()
    assert abs(float(rate) - 0.15) < 0.01
    as_mask = (masked[chosen] == 4).float().mean()
    kept = (masked[chosen] == ids[chosen]).float().mean()
    assert abs(float(as_mask) - 0.8) < 0.02 and abs(float(kept) - 0.1) < 0.02 + 0.001
    # the MLM loss ignores every position whose label is -100: changing their logits changes nothing
    torch.manual_seed(0)
    model = E.MultiObjective(E.Encoder(E.EncoderConfig.from_name("tiny", vocab_size=1000)), {"mlm": 1.0}).eval()
    b = {"input_ids": masked[:4, :32], "mlm_labels": labels[:4, :32]}
    n = int((b["mlm_labels"] != -100).sum())
    out = model(b)
    assert int(out.metrics["mlm/count"]) == n
    hidden = model.encoder(b["input_ids"])
    where = b["mlm_labels"] != -100
    expect = F.cross_entropy(model.objectives["mlm"].head(hidden[where]), b["mlm_labels"][where])
    assert torch.allclose(out.loss, expect, atol=1e-6)
    # full logits at every position, wildly changed where the label is -100: the same loss
    logits = model.objectives["mlm"].head(hidden)  # (B, T, V)
    noisy = torch.where(where[..., None], logits, logits + 100 * torch.randn_like(logits))
    assert not torch.allclose(noisy, logits)
    full = F.cross_entropy(noisy.reshape(-1, noisy.shape[-1]), b["mlm_labels"].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, full, atol=1e-5)


def test_max_predictions_and_whole_word_masking():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 100, (64, 40), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    _, labels = E.mask_tokens(ids, special, mask_token_id=4, vocab_size=100, mask_prob=0.5, max_predictions=5, generator=g)
    assert int((labels != -100).sum(1).max()) <= 5
    starts = torch.zeros_like(special)
    starts[:, ::2] = True  # words of two pieces
    _, labels = E.mask_tokens(ids, special, mask_token_id=4, vocab_size=100, generator=g, word_starts=starts)
    chosen = labels != -100
    assert torch.equal(chosen[:, ::2], chosen[:, 1::2])  # both pieces of a word, or neither


def test_frozen_encoder_is_a_feature_extractor():
    torch.manual_seed(0)
    enc = E.Encoder(TINY.replace(hidden_dropout_prob=0.1))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    model = E.SequenceClassifier(enc, 2, frozen=True).train()
    assert not enc.training  # no dropout in the features
    assert enc.frozen and all(p.requires_grad for p in model.classifier.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    b = _batch()
    for _ in range(3):
        out = model(b["input_ids"], b["attention_mask"], labels=torch.tensor([0, 1] * 4))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    tuned = E.SequenceClassifier(E.Encoder(TINY), 2, frozen=False)
    assert all(p.requires_grad for p in tuned.encoder.parameters())


@pytest.mark.parametrize("kwargs,needle", [
    ({"hidden_size": 130, "num_attention_heads": 4}, "num_attention_heads"),
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
    ({"hidden_act": "swish2"}, "hidden_act"),
    ({"vocab_size": "many"}, "vocab_size"),
    ({"hiden_size": 128}, "hiden_size"),
])
def test_config_errors_name_the_key(kwargs, needle):
    with pytest.raises(E.ConfigError, match=needle):
        E.EncoderConfig.from_dict({"preset": "tiny", **kwargs})


def test_config_from_toml_with_overrides(tmp_path):
    from pipelines.config import apply_overrides, load_toml

    def from_toml(path, overrides):  # the [model] table of a run config, as the stages read it
        return E.EncoderConfig.from_dict(apply_overrides(load_toml(path), overrides)["model"], prefix="model.")

    f = tmp_path / "run.toml"
    f.write_text('[model]\npreset = "mini"\nvocab_size = 8000\n')
    cfg = from_toml(f, overrides={"model.hidden_size": "512", "model.num_attention_heads": 8})
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.vocab_size) == (512, 8, 4, 8000)
    with pytest.raises(E.ConfigError, match="model.hidden_size"):
        from_toml(f, overrides={"model.hidden_size": "wide"})
    with pytest.raises(E.ConfigError, match="model.nope"):
        from_toml(f, overrides={"model.nope": 1})
    with pytest.raises(E.ConfigError, match="unknown model preset|preset"):
        E.EncoderConfig.from_name("huge")
    with pytest.raises(Exception):
        cfg.hidden_size = 3  # frozen


def test_objective_mix_errors_are_named():
    with pytest.raises(E.ConfigError, match="objectives.nsq"):
        E.validate_weights({"nsq": 1.0})
    with pytest.raises(E.ConfigError, match="objectives.mlm"):
        E.validate_weights({"mlm": -1.0})
    with pytest.raises(E.ConfigError, match="rtd"):
        E.validate_weights({"rtd": 50.0})


def test_encoder_imports_without_ray_or_deepspeed():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'deepspeed'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import encoder, encoder.hf, encoder.heads\n"
        "m = encoder.MultiObjective(encoder.Encoder(encoder.EncoderConfig.from_name('tiny')), {'mlm': 1.0})\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('ray', 'deepspeed')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
