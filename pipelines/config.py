"""The generic config machinery every cloze stage uses: build a frozen dataclass from a TOML
table, apply dotted overrides (`--pretrain.zero_stage 3`), and reject unknown keys or bad
values with a ConfigError that names the key, before any Ray work starts.

(`encoder.ConfigError` is the one error class: the model's own config raises it too.)
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, Mapping

from encoder.config import ConfigError, check_table, construct

__all__ = ["ConfigError", "build_dataclass", "apply_overrides", "load_toml"]


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
    check_table(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(typ):
            kwargs[name] = value if isinstance(value, typ) else build_dataclass(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, typ)
    return construct(cls, kwargs, prefix)


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


QUANTIZE_MODES = ("none", "int8")
INFERENCE_DTYPES = ("fp32", "bf16", "fp16")


def check_inference(quantize: str, device: str, dtype: str, prefix: str = "") -> None:
    """The inference settings a Predictor runs (ConfigError, a ValueError, otherwise); `prefix`
    names the table in the message, e.g. "serve."."""
    if quantize not in QUANTIZE_MODES:
        raise ConfigError(f"{prefix}quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"{prefix}device must be cpu or cuda, got {device!r}")
    if dtype not in INFERENCE_DTYPES:
        raise ConfigError(f"{prefix}dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")
    if dtype == "fp16" and device == "cpu":
        raise ConfigError(f"{prefix}dtype fp16 needs a GPU (on CPUs use fp32, bf16 or quantize int8)")
    if quantize == "int8" and (device != "cpu" or dtype != "fp32"):
        raise ConfigError(f"{prefix}quantize int8 is for fp32 CPU inference (on a GPU use dtype bf16 or fp16)")
