"""Hugging Face interop: folders that `transformers` loads unchanged, in both directions.

`save_pretrained(model, dir)` writes the HF architecture that matches the model:

| cloze model                              | HF class                          |
|------------------------------------------|-----------------------------------|
| Encoder                                  | BertModel                         |
| MultiObjective with mlm + nsp            | BertForPreTraining                |
| MultiObjective with mlm (no nsp)         | BertForMaskedLM                   |
| MultiObjective with rtd                  | ElectraForPreTraining (discriminator) |
| MultiObjective without mlm / rtd         | BertModel                         |
| SequenceClassifier                       | BertForSequenceClassification     |
| TokenClassifier                          | BertForTokenClassification        |

Weights HF has no slot for (SOP / shuffle heads, the ELECTRA generator, a pooler the HF
class lacks) go to `cloze_extra.safetensors`; `cloze.json` records what the folder is, so
`load_pretrained` rebuilds the exact cloze model. A plain HF folder (no cloze.json), such as
the MiniLM checkpoint, loads too: its architecture picks the cloze model, or `kind=` /
`objectives=` ask for another one (heads the folder lacks start fresh; see `load_report`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import EncoderConfig
from .heads import SequenceClassifier, TokenClassifier
from .model import Encoder
from .multi import MultiObjective

FORMAT_VERSION = 1
EXTRA_FILE = "cloze_extra.safetensors"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

Spec = str | tuple[str, ...]  # an HF key, or several concatenated along dim 0 (fused QKV)


def _encoder_pairs(native: str, hf: str, config: EncoderConfig, pooler: bool) -> Iterator[tuple[str, Spec]]:
    """(cloze key, HF key) for every encoder tensor; `native`/`hf` are key prefixes."""
    for part in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        yield f"{native}embeddings.{part}.weight", f"{hf}embeddings.{part}.weight"
    for p in ("weight", "bias"):
        yield f"{native}embeddings.LayerNorm.{p}", f"{hf}embeddings.LayerNorm.{p}"
    for i in range(config.num_hidden_layers):
        n, h = f"{native}stack.layers.{i}.", f"{hf}encoder.layer.{i}."
        for p in ("weight", "bias"):
            yield f"{n}attention.qkv.{p}", tuple(f"{h}attention.self.{x}.{p}" for x in ("query", "key", "value"))
            yield f"{n}attention.out.{p}", f"{h}attention.output.dense.{p}"
            yield f"{n}attention_norm.{p}", f"{h}attention.output.LayerNorm.{p}"
            yield f"{n}intermediate.{p}", f"{h}intermediate.dense.{p}"
            yield f"{n}output.{p}", f"{h}output.dense.{p}"
            yield f"{n}output_norm.{p}", f"{h}output.LayerNorm.{p}"
    if pooler:
        for p in ("weight", "bias"):
            yield f"{native}pooler.dense.{p}", f"{hf}pooler.dense.{p}"


def _mlm_pairs(native: str) -> Iterator[tuple[str, Spec]]:
    for p in ("weight", "bias"):
        yield f"{native}dense.{p}", f"cls.predictions.transform.dense.{p}"
        yield f"{native}norm.{p}", f"cls.predictions.transform.LayerNorm.{p}"
    yield f"{native}decoder.bias", "cls.predictions.bias"


def describe(model: nn.Module) -> dict[str, Any]:
    """What kind of cloze model this is, and the HF architecture it exports as."""
    if isinstance(model, Encoder):
        return {"kind": "encoder", "architecture": "BertModel", "prefix": ""}
    if isinstance(model, SequenceClassifier):
        return {"kind": "sequence", "architecture": "BertForSequenceClassification", "prefix": "bert."}
    if isinstance(model, TokenClassifier):
        return {"kind": "token", "architecture": "BertForTokenClassification", "prefix": "bert."}
    if isinstance(model, MultiObjective):
        objs = set(model.objectives)
        if "rtd" in objs:
            arch, prefix = "ElectraForPreTraining", "electra."
        elif {"mlm", "nsp"} <= objs:
            arch, prefix = "BertForPreTraining", "bert."
        elif "mlm" in objs:
            arch, prefix = "BertForMaskedLM", "bert."
        else:
            arch, prefix = "BertModel", ""
        return {"kind": "pretraining", "architecture": arch, "prefix": prefix}
    raise TypeError(f"cannot export {type(model).__name__}")


def hf_key_map(model: nn.Module, architecture: str) -> list[tuple[str, Spec]]:
    """Every (cloze key, HF key) pair that `architecture` has a slot for."""
    if isinstance(model, Encoder):
        return list(_encoder_pairs("", "", model.config, pooler=model.pooler is not None))
    enc_native = "encoder."
    cfg = model.config
    prefix = {"BertModel": "", "ElectraForPreTraining": "electra."}.get(architecture, "bert.")
    has_pooler = architecture in ("BertModel", "BertForPreTraining", "BertForSequenceClassification")
    pairs = list(_encoder_pairs(enc_native, prefix, cfg, pooler=has_pooler and model.encoder.pooler is not None))
    if architecture in ("BertForPreTraining", "BertForMaskedLM"):
        pairs += _mlm_pairs("objectives.mlm.head.")
    if architecture == "BertForPreTraining":
        pairs += [(f"objectives.nsp.classifier.{p}", f"cls.seq_relationship.{p}") for p in ("weight", "bias")]
    if architecture == "ElectraForPreTraining":
        for p in ("weight", "bias"):
            pairs.append((f"objectives.rtd.head.dense.{p}", f"discriminator_predictions.dense.{p}"))
            pairs.append((f"objectives.rtd.head.prediction.{p}", f"discriminator_predictions.dense_prediction.{p}"))
    if architecture in ("BertForSequenceClassification", "BertForTokenClassification"):
        pairs += [(f"classifier.{p}", f"classifier.{p}") for p in ("weight", "bias")]
    return pairs


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """State dict with tied tensors listed once (first name wins); also the tied aliases."""
    state, seen, aliases = {}, {}, set()
    for key, t in model.state_dict(keep_vars=True).items():
        ident = (t.data_ptr(), t.shape) if t.numel() else (key,)
        if ident in seen:
            aliases.add(key)
            continue
        seen[ident] = key
        state[key] = t
    return state, aliases


def _hf_config(model: nn.Module, architecture: str) -> dict[str, Any]:
    cfg: EncoderConfig = model.config
    if architecture == "ElectraForPreTraining":
        out = {**cfg.to_dict(), "model_type": "electra", "embedding_size": cfg.hidden_size,
               "position_embedding_type": "absolute", "summary_type": "first"}
    else:
        out = cfg.to_hf_dict()
    out["architectures"] = [architecture]
    out["tie_word_embeddings"] = True
    if isinstance(model, (SequenceClassifier, TokenClassifier)):
        out["num_labels"] = model.num_labels
        out["id2label"] = {str(k): v for k, v in model.id2label.items()}
        out["label2id"] = {v: k for k, v in model.id2label.items()}
    return out


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write an HF-compatible folder (atomically: a temp folder renamed into place).

    `tokenizer`: a folder holding vocab.txt / tokenizer.json (copied), or one such file.
    `metadata`: JSON-able facts for cloze.json (training config, metrics, ...).
    """
    desc = describe(model)
    arch = desc["architecture"]
    state, aliases = _unique_state(model)
    tensors: dict[str, torch.Tensor] = {}
    mapped: set[str] = set()
    for native, spec in hf_key_map(model, arch):
        t = state[native].detach().to("cpu", torch.float32)
        mapped.add(native)
        if isinstance(spec, tuple):
            for key, chunk in zip(spec, t.chunk(len(spec), dim=0)):
                tensors[key] = chunk.contiguous()
        else:
            tensors[spec] = t.contiguous()
    extra = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items() if k not in mapped}
    info: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "kind": desc["kind"],
        "architecture": arch,
        "encoder_config": model.config.to_dict(),
        "extra_weights": EXTRA_FILE if extra else None,
        "tied": sorted(aliases),
        "metadata": dict(metadata or {}),
    }
    if isinstance(model, MultiObjective):
        info["objectives"] = model.weights
        if "rtd" in model.objectives:
            gen = model.objectives["rtd"].generator.config
            info["generator_fraction"] = gen.num_attention_heads / model.config.num_attention_heads
    if isinstance(model, (SequenceClassifier, TokenClassifier)):
        info.update(num_labels=model.num_labels, id2label={str(k): v for k, v in model.id2label.items()},
                    frozen=model.frozen)
    try:
        from importlib.metadata import version

        info["code_version"] = version("cloze")
    except Exception:
        info["code_version"] = "unknown"

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if extra:
            save_file(extra, str(tmp / EXTRA_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_hf_config(model, arch), indent=2, sort_keys=True))
        _copy_tokenizer(tokenizer, tmp, model.config)
        (tmp / "cloze.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _copy_tokenizer(tokenizer: str | os.PathLike | None, dest: Path, config: EncoderConfig) -> None:
    if tokenizer is None:
        return
    src = Path(tokenizer)
    files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()] if src.is_dir() else [src]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no tokenizer files (vocab.txt / tokenizer.json) at {src}")
    for f in files:
        shutil.copyfile(f, dest / f.name)
    if not (dest / "tokenizer_config.json").exists():
        (dest / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "BertTokenizer", "do_lower_case": True,
            "model_max_length": config.max_position_embeddings,
            "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
            "sep_token": "[SEP]", "mask_token": "[MASK]",
        }, indent=2))


# --------------------------------------------------------------------------- loading

_HF_KIND = {
    "BertModel": "encoder",
    "BertForPreTraining": "pretraining",
    "BertForMaskedLM": "pretraining",
    "ElectraForPreTraining": "pretraining",
    "BertForSequenceClassification": "sequence",
    "BertForTokenClassification": "token",
}
_HF_OBJECTIVES = {
    "BertForPreTraining": {"mlm": 1.0, "nsp": 1.0},
    "BertForMaskedLM": {"mlm": 1.0},
    "ElectraForPreTraining": {"rtd": 50.0, "mlm": 1.0},
}


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("model.safetensors", EXTRA_FILE):
        f = folder / name
        if f.is_file():
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    out[key] = fh.get_tensor(key)
    if not out:
        raise FileNotFoundError(f"{folder}: no model.safetensors")
    return out


def load_pretrained(
    path: str | os.PathLike,
    kind: str | None = None,
    objectives: Mapping[str, float] | None = None,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | None = None,
    frozen: bool | None = None,
    generator_fraction: float | None = None,
) -> nn.Module:
    """Build a cloze model from an HF or cloze folder. Never touches a hub: `path` is local.

    kind: "encoder" | "pretraining" | "sequence" | "token"; default: what the folder holds.
    The returned model has `load_report` = {"loaded", "fresh", "unused"} key lists.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no config.json)")
    hf_cfg = json.loads((folder / "config.json").read_text())
    info = json.loads((folder / "cloze.json").read_text()) if (folder / "cloze.json").is_file() else {}
    arch = (hf_cfg.get("architectures") or ["BertModel"])[0]
    if arch not in _HF_KIND:
        raise ValueError(f"{folder}: unsupported architecture {arch} (supported: {', '.join(_HF_KIND)})")
    config = EncoderConfig.from_dict(info["encoder_config"]) if info else EncoderConfig.from_hf_dict(hf_cfg)
    kind = kind or info.get("kind") or _HF_KIND[arch]
    saved_labels = info.get("id2label") or hf_cfg.get("id2label")
    tensors = _read_tensors(folder)
    has_pooler = any(k.endswith("pooler.dense.weight") for k in tensors)

    if kind == "encoder":
        model: nn.Module = Encoder(config)
    elif kind == "pretraining":
        weights = objectives or info.get("objectives") or _HF_OBJECTIVES.get(arch) or {"mlm": 1.0}
        frac = generator_fraction or info.get("generator_fraction") or 0.25
        model = MultiObjective(Encoder(config), weights, generator_fraction=frac)
    elif kind in ("sequence", "token"):
        labels = id2label or ({int(k): v for k, v in saved_labels.items()} if saved_labels and _HF_KIND[arch] == kind else None)
        n = num_labels or (len(labels) if labels else None)
        if n is None:
            raise ValueError(f"{folder} holds no {kind} classifier: pass num_labels")
        cls = SequenceClassifier if kind == "sequence" else TokenClassifier
        is_frozen = bool(frozen if frozen is not None else info.get("frozen", False))
        # a token classifier does not need BERT's pooler: keep one only if the folder has it
        model = cls(Encoder(config, add_pooler=kind == "sequence" or has_pooler), n, labels, frozen=is_frozen)
    else:
        raise ValueError(f"unknown kind {kind!r}")

    # Where does the encoder live in this folder? ("", "bert.", "electra.")
    src_prefix = next((p for p in ("", "bert.", "electra.") if f"{p}embeddings.word_embeddings.weight" in tensors), None)
    if src_prefix is None:
        raise ValueError(f"{folder}: no BERT embeddings found in model.safetensors")
    src_arch = {"": "BertModel", "bert.": arch if arch != "BertModel" else "BertForPreTraining",
                "electra.": "ElectraForPreTraining"}[src_prefix]
    pairs = dict(hf_key_map(model, src_arch))
    if isinstance(model, (SequenceClassifier, TokenClassifier)) and not _HF_KIND[arch] == kind:
        pairs.pop("classifier.weight", None), pairs.pop("classifier.bias", None)
    if not isinstance(model, Encoder):
        # a pooler saved under the source prefix is welcome whatever the source architecture
        for p in ("weight", "bias"):
            if f"{src_prefix}pooler.dense.{p}" in tensors and getattr(model, "encoder").pooler is not None:
                pairs.setdefault(f"encoder.pooler.dense.{p}", f"{src_prefix}pooler.dense.{p}")
    elif src_prefix:
        pairs = {n: (tuple(src_prefix + k for k in s) if isinstance(s, tuple) else src_prefix + s)
                 for n, s in pairs.items()}

    state, _ = _unique_state(model)
    used: set[str] = set()
    loaded, fresh = [], []
    with torch.no_grad():
        for native, param in state.items():
            spec = pairs.get(native)
            keys = spec if isinstance(spec, tuple) else ((spec,) if spec else ())
            if keys and all(k in tensors for k in keys):
                src = torch.cat([tensors[k] for k in keys], 0)
            elif native in tensors:  # cloze_extra.safetensors uses cloze names
                src, keys = tensors[native], (native,)
            else:
                fresh.append(native)
                continue
            if src.shape != param.shape:
                raise ValueError(f"{folder}: {native} has shape {tuple(src.shape)}, model expects {tuple(param.shape)}")
            param.copy_(src.to(param.dtype))
            used.update(keys)
            loaded.append(native)
    ignorable = {"embeddings.position_ids", "bert.embeddings.position_ids", "electra.embeddings.position_ids",
                 "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
                 "generator_lm_head.weight"}
    model.load_report = {"loaded": loaded, "fresh": fresh,
                         "unused": sorted(k for k in tensors if k not in used and k not in ignorable)}
    return model
