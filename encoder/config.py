"""EncoderConfig: the model's shape, with Hugging Face BERT field names so checkpoints map 1:1.

Also the small, generic machinery every cloze config uses: build a frozen dataclass from a
TOML table, apply dotted overrides, and reject unknown keys or bad values with an error
that names the offending key. Stdlib only.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check / convert one value against a dataclass field type (int, float, str, bool, dict...)."""
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        vt = typing.get_args(typ)[1] if typing.get_args(typ) else Any
        return {str(k): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(value) if origin is tuple else list(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def build_dataclass(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping; unknown keys and bad types raise ConfigError.

    Nested dataclass fields are built recursively from sub-tables. `prefix` is used only to
    name keys in errors (e.g. "model.hidden_size").
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known keys under "
            f"{prefix.rstrip('.') or cls.__name__}: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(typ):
            kwargs[name] = value if isinstance(value, typ) else build_dataclass(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, typ)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}{e}") from None
        raise


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """Return a deep copy of `data` with dotted keys set: {"model.hidden_size": 256}."""
    out = _deepcopy(data)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{dotted}: {p} is a value, not a table")
            node = nxt
        node[parts[-1]] = value
    return out


def _deepcopy(d: Mapping[str, Any]) -> dict:
    return {k: _deepcopy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


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
        return build_dataclass(cls, data, prefix)

    @classmethod
    def from_toml(cls, path: str | Path, table: str = "model", overrides: Mapping[str, Any] | None = None) -> "EncoderConfig":
        raw = load_toml(path)
        if overrides:
            raw = apply_overrides(raw, overrides)
        return cls.from_dict(raw.get(table, {}), prefix=f"{table}.")

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
