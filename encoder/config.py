"""EncoderConfig: the model's shape, with Hugging Face BERT field names so checkpoints map 1:1.

Stdlib only. The generic TOML / override machinery of the pipeline stages lives in
`pipelines.config`; it shares this module's table check and prefixed construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""


def check_table(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    """The init fields of dataclass `cls` by name; a non-table or an unknown key is a
    ConfigError naming it (shared with `pipelines.config.build_dataclass`)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a table, got {data!r}")
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known keys under "
                          f"{prefix.rstrip('.') or cls.__name__}: {', '.join(sorted(known))})")
    return known


def construct(cls: type, kwargs: Mapping[str, Any], prefix: str) -> Any:
    """`cls(**kwargs)`; a ConfigError from its checks is prefixed with the table's name."""
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}{e}") from None
        raise


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """`cls(**data)` with unknown keys and wrongly typed values named in a ConfigError."""
    types = {name: f.type for name, f in check_table(cls, data, prefix).items()}
    kwargs = {}
    for name, value in data.items():
        want = {"int": int, "float": float, "str": str}[types[name]]
        if want is not str and isinstance(value, str):  # "512" from a command line
            try:
                value = want(value)
            except ValueError:
                pass
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, want) or isinstance(value, bool):
            raise ConfigError(f"{prefix}{name}: expected {'an integer' if want is int else 'a ' + want.__name__}, "
                              f"got {value!r}")
        kwargs[name] = value
    return construct(cls, kwargs, prefix)


# Sizes of Google's BERT releases (layers x hidden, heads = hidden / 64, FFN = 4 x hidden).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}

ACTIVATIONS = ("gelu", "gelu_new", "relu")


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Shape of a BERT-style encoder. Field names follow `transformers.BertConfig`."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {v!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.initializer_range <= 0 or self.layer_norm_eps <= 0:
            raise ConfigError("initializer_range and layer_norm_eps must be positive")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"pad_token_id ({self.pad_token_id}) must be in [0, vocab_size)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "EncoderConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r} (choose from {', '.join(PRESETS)})")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], prefix: str = "") -> "EncoderConfig":
        """Build from a table; a `preset` key picks the base sizes, other keys override them."""
        data = dict(data)
        preset = data.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"{prefix}preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
            data = {**PRESETS[preset], **data}
        return _build(cls, data, prefix)

    def replace(self, **changes: Any) -> "EncoderConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of a transformers BertConfig."""
        return {**self.to_dict(), "model_type": "bert", "position_embedding_type": "absolute"}

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "EncoderConfig":
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in hf.items() if k in names}
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError("only absolute position embeddings are supported")
        if "embedding_size" in hf and hf["embedding_size"] != hf.get("hidden_size"):
            raise ConfigError("embedding_size != hidden_size (factorized embeddings) is not supported")
        if kept.get("pad_token_id") is None:
            kept["pad_token_id"] = 0
        return cls.from_dict(kept)
