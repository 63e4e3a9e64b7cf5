"""The WordPiece tokenizer of a shard set: trained on the corpus with `tokenizers`, or loaded.

Trained vocabularies start with [PAD]=0, [UNK], [CLS], [SEP], [MASK]; loaded ones keep their
own ids (bert-base-uncased / MiniLM: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102,
[MASK]=103), so every id is looked up by name (`SpecialIds.of`), never assumed. The shard
folder gets `tokenizer.json`, `vocab.txt` and the two small JSON files that let
`transformers.BertTokenizerFast.from_pretrained(folder)` load it unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int
    vocab_size: int

    @classmethod
    def of(cls, tok: Tokenizer) -> "SpecialIds":
        ids = {}
        for name, token in zip(("pad", "unk", "cls", "sep", "mask"), SPECIAL_TOKENS):
            i = tok.token_to_id(token)
            if i is None:
                raise ValueError(f"tokenizer has no {token} token")
            ids[name] = i
        return cls(**ids, vocab_size=tok.get_vocab_size(with_added_tokens=True))

    @property
    def all(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)

    @property
    def random_token_low(self) -> int:
        """Random replacements are drawn from [this, vocab_size): past every special token
        (and past bert-base's [unused*] block, which lies below [MASK])."""
        return max(self.all) + 1


def _bert_pipeline(tok: Tokenizer, lowercase: bool) -> Tokenizer:
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _with_post_processor(tok: Tokenizer) -> Tokenizer:
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tok


def train_wordpiece(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2,
                    lowercase: bool = True) -> Tokenizer:
    """A BERT WordPiece vocabulary learned from `texts` (deterministic for the same stream)."""
    tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##")), lowercase)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##",
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # The Rust trainer breaks ties between equally frequent merges in hash-map order, which
    # changes from run to run: the token set is stable, the ids are not. Canonical ids:
    # special tokens first, then whole-word pieces, then "##" pieces, each sorted.
    learned = sorted((t for t in tok.get_vocab() if t not in SPECIAL_TOKENS), key=lambda t: (t.startswith("##"), t))
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *learned])}
    canonical = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    return _with_post_processor(_bert_pipeline(canonical, lowercase))


def load_tokenizer(path: str | Path, lowercase: bool = True) -> Tokenizer:
    """Load `tokenizer.json`, a bare `vocab.txt` (BERT pipeline, `lowercase`), or a folder of either."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json" if (p / "tokenizer.json").is_file() else p / "vocab.txt"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (want tokenizer.json, vocab.txt or a folder)")
    if p.suffix == ".json":
        tok = Tokenizer.from_file(str(p))
    else:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(p.read_text(encoding="utf-8").splitlines())}
        tok = _with_post_processor(_bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")), lowercase))
    tok.no_padding()  # e.g. MiniLM's tokenizer.json pads and truncates everything to 128
    tok.no_truncation()
    SpecialIds.of(tok)  # fail now if a special token is missing
    return tok


def is_lowercase(tok: Tokenizer) -> bool:
    norm = json.loads(tok.to_str()).get("normalizer") or {}
    return bool(norm.get("lowercase", False))


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the serialized tokenizer (vocabulary, normalizer, pre-tokenizer, model)."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def save_tokenizer(tok: Tokenizer, folder: str | Path) -> None:
    """tokenizer.json + vocab.txt (+ HF tokenizer_config / special_tokens_map) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
               "sep_token": "[SEP]", "mask_token": "[MASK]"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "BertTokenizerFast", "do_lower_case": is_lowercase(tok),
              "model_max_length": 512, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def continuation_table(tok: Tokenizer) -> list[bool]:
    """is_continuation[id]: the token is a "##" word piece (for whole-word masking)."""
    size = tok.get_vocab_size(with_added_tokens=True)
    return [(tok.id_to_token(i) or "").startswith("##") for i in range(size)]
