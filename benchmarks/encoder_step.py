"""Training-step throughput: cloze encoder (MLM + NSP) vs transformers.BertForPreTraining.

Same config, same batches, same threads, one process, interleaved step by step. Batches come
from real text: BBC News paragraph pairs, tokenized with the bert-base-uncased WordPiece,
[CLS] A [SEP] B [SEP] truncated to --seq, 32 per batch, padded to the longest (multiple of
8) as the cloze collator does. Throughput counts real (non-padding) tokens per second of
forward + backward + AdamW step. Variants show what each lever gives:

  cloze            unpadding + sparse MLM prediction + fused QKV + SDPA (the default)
  cloze-no-unpad   padding kept through the layers (still masked in attention)
  cloze-dense-mlm  vocabulary logits for every token, as HF computes them
  cloze-neither    both levers off: what fused QKV + SDPA alone give vs HF

Usage: python benchmarks/encoder_step.py [--presets mini small] [--repeats 5] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import encoder as E  # noqa: E402
from common import bbc_paragraphs, machine, minilm_tokenizer, summary  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_batches(seq: int, batch_size: int, count: int, seed: int = 0) -> tuple[list[dict], dict]:
    tok = minilm_tokenizer()
    cls_id, sep_id, mask_id, pad_id = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]"))
    paras = bbc_paragraphs()
    ids = [e.ids for e in tok.encode_batch(paras, add_special_tokens=False)]
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    examples = []
    for a, b in zip(ids, ids[1:]):
        a, b = list(a), list(b)
        while len(a) + len(b) > seq - 3:  # trim the longer side, as BERT's generator does
            longer = a if len(a) > len(b) else b
            longer.pop(0 if rng.random() < 0.5 else -1)
        if a and b:
            examples.append(([cls_id] + a + [sep_id] + b + [sep_id], len(a) + 2))
    batches, real, padded = [], 0, 0
    for _ in range(count):
        chosen = rng.sample(examples, batch_size)
        T = -(-max(len(x) for x, _ in chosen) // 8) * 8
        input_ids = torch.full((batch_size, T), pad_id)
        types = torch.zeros((batch_size, T), dtype=torch.long)
        for i, (x, la) in enumerate(chosen):
            input_ids[i, : len(x)] = torch.tensor(x)
            types[i, la: len(x)] = 1
        mask = (input_ids != pad_id).long()
        special = (input_ids == cls_id) | (input_ids == sep_id) | (mask == 0)
        masked, labels = E.mask_tokens(input_ids, special, mask_token_id=mask_id, vocab_size=tok.get_vocab_size(),
                                       max_predictions=20, generator=g, random_token_low=999)
        nsp = torch.randint(0, 2, (batch_size,), generator=g)
        batches.append({"input_ids": masked, "attention_mask": mask, "token_type_ids": types,
                        "mlm_labels": labels, "nsp_label": nsp})
        real += int(mask.sum())
        padded += mask.numel()
    lengths = [len(x) for x, _ in examples]
    stats = {"examples": len(examples), "mean_len": sum(lengths) / len(lengths),
             "share_padding": 1 - real / padded, "vocab": tok.get_vocab_size()}
    return batches, stats


def make_models(preset: str, vocab: int, seq: int):
    import transformers

    cfg = E.EncoderConfig.from_name(preset, vocab_size=vocab, max_position_embeddings=max(512, seq))
    torch.manual_seed(0)
    ours = E.MultiObjective(E.Encoder(cfg), {"mlm": 1.0, "nsp": 1.0}).train()
    hf_cfg = transformers.BertConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "model_type"})
    hf = transformers.BertForPreTraining(hf_cfg).train()
    return cfg, ours, hf


def step_fns(ours, hf):
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def run_ours(b):
        loss = ours(b).loss
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def run_hf(b):
        out = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                 labels=b["mlm_labels"], next_sentence_label=b["nsp_label"])
        opt_hf.zero_grad(set_to_none=True)
        out.loss.backward()
        opt_hf.step()

    return run_ours, run_hf


def configure(ours, unpad: bool, sparse: bool):
    ours.encoder.unpad = unpad
    ours.objectives["mlm"].sparse = sparse


VARIANTS = {"cloze": (True, True), "cloze-no-unpad": (False, True), "cloze-dense-mlm": (True, False),
            "cloze-neither": (False, False)}


def bench(preset: str, batches: list[dict], vocab: int, seq: int, repeats: int, steps: int) -> dict:
    cfg, ours, hf = make_models(preset, vocab, seq)
    run_ours, run_hf = step_fns(ours, hf)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    for b in batches[:2]:  # warm-up: allocator, thread pools
        run_hf(b)
        for unpad, sparse in VARIANTS.values():
            configure(ours, unpad, sparse)
            run_ours(b)
    rates: dict[str, list[float]] = {"hf": [], **{v: [] for v in VARIANTS}}
    for r in range(repeats):
        window = [(i + r * steps) % len(batches) for i in range(steps)]
        n_tok = sum(tokens[i] for i in window)
        spent = dict.fromkeys(rates, 0.0)
        for i in window:  # interleaved step by step, so load drift hits every variant alike
            order = ["hf", *VARIANTS] if i % 2 == 0 else [*VARIANTS, "hf"]
            for name in order:
                if name != "hf":
                    configure(ours, *VARIANTS[name])
                fn = run_hf if name == "hf" else run_ours
                t0 = time.perf_counter()
                fn(batches[i])
                spent[name] += time.perf_counter() - t0
        for name in rates:
            rates[name].append(n_tok / spent[name])
    ratios = {v: [a / b for a, b in zip(rates[v], rates["hf"])] for v in VARIANTS}
    return {"preset": preset, "params": E.count_parameters(ours.encoder), "tokens_per_s": rates, "ratio_vs_hf": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["mini", "small"])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="training steps per timed window")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches, stats = build_batches(args.seq, args.batch_size, count=max(args.steps * 2, 16))
    print(f"machine: {machine()}")
    print(f"data: {stats['examples']} BBC paragraph pairs, mean length {stats['mean_len']:.1f} tokens, "
          f"{stats['share_padding']:.0%} of each padded batch is padding; seq {args.seq}, batch {args.batch_size}")
    results = []
    for preset in args.presets:
        res = bench(preset, batches, stats["vocab"], args.seq, args.repeats, args.steps)
        results.append(res)
        hf = res["tokens_per_s"]["hf"]
        print(f"\n{preset} ({res['params'] / 1e6:.1f}M encoder params), real tokens/s median [min-max] "
              f"over {args.repeats} repeats of {args.steps} steps:")
        print(f"  {'transformers':16s} {summary(hf)}")
        for v in VARIANTS:
            print(f"  {v:16s} {summary(res['tokens_per_s'][v])}   ratio vs HF {summary(res['ratio_vs_hf'][v])}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "data": stats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
