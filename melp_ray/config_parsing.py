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


@dataclasses.dataclass(frozen=True)
class Scalar:
    """A plain YAML scalar that YAML 1.1 resolved to a bool, int or float, with the text as
    typed: a ``str`` key gets the text back (``run.name=off`` is "off", not False; ``007``
    stays "007"), any other key gets the value."""
    value: Any
    text: str


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that wraps resolved bool/int/float scalars in ``Scalar``."""


def _keep_text(tag_constructor):
    def construct(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        value = tag_constructor(loader, node)
        return Scalar(value, node.value) if node.style is None else value
    return construct


for _tag, _method in (("bool", "construct_yaml_bool"), ("int", "construct_yaml_int"),
                      ("float", "construct_yaml_float")):
    ConfigLoader.add_constructor(f"tag:yaml.org,2002:{_tag}",
                                 _keep_text(getattr(yaml.SafeLoader, _method)))


def load_yaml(stream: Any) -> Any:
    """YAML for configs and overrides: ``Scalar`` for bool/int/float scalars (see ``coerce``)."""
    return yaml.load(stream, Loader=ConfigLoader)


def plain(value: Any) -> Any:
    """``value`` with every ``Scalar`` replaced by its YAML 1.1 value."""
    if isinstance(value, Scalar):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def apply_preset(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """Fill model keys from ``model.preset`` where the user did not set them."""
    hints = typing.get_type_hints(cls)
    if hints.get("model") is not ModelConfig or not isinstance(raw.get("model", {}), dict):
        return raw
    model = dict(raw.get("model") or {})
    preset = plain(model.get("preset", ModelConfig.preset))
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
        value = load_yaml(text) if text != "" else ""
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
    if isinstance(value, Scalar) and origin not in (typing.Union, types.UnionType):
        if tp is str:
            return value.text
        value = value.value
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
                # A list given: the list-typed member's complaint says what is wrong with it.
                listy = typing.get_origin(arg) in (list, tuple)
                errors.insert(0 if listy == isinstance(value, (list, tuple)) else len(errors), str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return plain(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {plain(value)!r}")
        return tuple(coerce(a, v, key) for a, v in zip(args, value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return plain(dict(value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(args[0], v, key) for v in value] if args else plain(list(value))
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
