"""How YAML and ``key=value`` overrides become typed dataclasses (used by ``melp_ray.config``).

Strict on purpose: an unknown key, a wrong type or an unknown model preset is a
``ConfigError`` naming the key, before any Ray resource is asked for.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

import yaml

from melp_ray.model.config import PRESETS, ModelConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any cluster resource is used."""


def apply_preset(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """Fill model keys from ``model.preset`` where the user did not set them."""
    hints = typing.get_type_hints(cls)
    if hints.get("model") is not ModelConfig or not isinstance(raw.get("model", {}), dict):
        return raw
    model = dict(raw.get("model") or {})
    preset = model.get("preset", ModelConfig.preset)
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    explicit = model.pop("_explicit", None) or [k for k in model if k != "preset"]
    merged = {**PRESETS[preset], **{k: model[k] for k in explicit if k in model}}
    merged["preset"] = preset
    merged["_explicit"] = explicit
    return {**raw, "model": merged}


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
    return key.strip(), value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    if parts[0] == "model" and len(parts) == 2 and parts[1] != "preset":
        node.setdefault("_explicit", [k for k in node if k not in ("preset", "_explicit")])
        node["_explicit"].append(parts[1])
    node[parts[-1]] = value


def from_dict(cls: type[T], raw: dict[str, Any], prefix: str = "") -> T:
    """Recursively build a dataclass, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    raw = {k: v for k, v in raw.items() if k != "_explicit"}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]} "
                          f"({where} accepts: {sorted(names)})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce(a, v, key) for a, v in zip(args, value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(args[0], v, key) for v in value] if args else list(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:   # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, str):
        try:   # "5e7" written for an int: YAML 1.1 reads it as a string. Floats stay errors.
            number = float(value)
        except ValueError:
            number = math.nan
        if number.is_integer():
            return int(number)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, bool, str) and type(value) is tp:
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
