"""ConfigDict -> typed frozen dataclasses, with errors that name the key's full path.

`to_dataclass(cls, mapping, path)` walks a plain mapping (or an ml_collections.ConfigDict) and
builds `cls`, checking every value against the field's annotation:

- unknown keys fail, listing the accepted keys;
- missing keys take the field's default, or fail if the field has none;
- int, float (an int is accepted and converted), bool (strict), str, None / Optional, Literal,
  tuple[X, ...], tuple[X, Y], list[X], dict[str, X] and nested dataclasses are checked;
- anything else is passed through unchecked.

Errors are ConfigError (a ValueError) whose message starts with the key's path, e.g.
`config.model.n_heads: expected int, got '4' (str)`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
  """A config value that cannot be accepted; the message starts with the key's full path."""


def plain(value: Any) -> Any:
  """ConfigDict / FieldReference / nested containers -> plain Python values."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if hasattr(value, "get") and callable(getattr(value, "get")) and not isinstance(value, Mapping):
    value = value.get()  # ml_collections.FieldReference
  if isinstance(value, Mapping):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(plain(v) for v in value)
  return value


def describe(value: Any) -> str:
  return f"{value!r} ({type(value).__name__})"


def type_name(tp: Any) -> str:
  if tp is type(None):
    return "None"
  if isinstance(tp, type):
    return tp.__name__
  return str(tp).replace("typing.", "")


def convert_value(tp: Any, value: Any, path: str) -> Any:
  """Checks `value` against annotation `tp` and returns it converted (tuples, dataclasses)."""
  if tp is Any:
    return value
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if isinstance(value, Mapping) and sum(dataclasses.is_dataclass(a) for a in args) > 1:
      return choose_dataclass([a for a in args if dataclasses.is_dataclass(a)], value, path)
    errors = []
    # None first, so that Optional[X] = None never tries X.
    for option in sorted(args, key=lambda a: a is not type(None)):
      try:
        return convert_value(option, value, path)
      except ConfigError as e:
        errors.append(e)
    raise ConfigError(f"{path}: expected {' or '.join(type_name(a) for a in args)}, "
                      f"got {describe(value)}")
  if origin is typing.Literal:
    if value not in args:
      raise ConfigError(f"{path}: got {value!r}; accepted: {', '.join(repr(a) for a in args)}")
    return value
  if tp is type(None) or tp is None:
    if value is not None:
      raise ConfigError(f"{path}: expected None, got {describe(value)}")
    return None
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{path}: expected bool (True/False), got {describe(value)}")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{path}: expected int, got {describe(value)}")
    return value
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{path}: expected float, got {describe(value)}")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{path}: expected str, got {describe(value)}")
    return value
  if origin in (tuple, list):
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"{path}: expected a {origin.__name__} of {', '.join(type_name(a) for a in args)}, "
                        f"got {describe(value)}")
    if origin is tuple and args and args[-1] is not Ellipsis:
      if len(value) != len(args):
        raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}: {value!r}")
      items = [convert_value(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
    else:
      item_tp = args[0] if args else Any
      items = [convert_value(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items
  if origin is dict:
    if not isinstance(value, Mapping):
      raise ConfigError(f"{path}: expected a mapping, got {describe(value)}")
    val_tp = args[1] if len(args) == 2 else Any
    return {k: convert_value(val_tp, v, f"{path}.{k}") for k, v in value.items()}
  if dataclasses.is_dataclass(tp):
    if dataclasses.is_dataclass(value) and isinstance(value, tp):
      return value
    return to_dataclass(tp, value, path)
  if isinstance(tp, type) and not isinstance(value, tp):
    raise ConfigError(f"{path}: expected {tp.__name__}, got {describe(value)}")
  return value


def variant_names(classes: list[type]) -> dict[str, type]:
  """Short names of union members: class names lowercased, minus their common suffix
  (LinearScaling, YarnScaling -> "linear", "yarn"); the full lowercased names work too."""
  names = [c.__name__.lower() for c in classes]
  suffix = ""
  while all(len(n) > len(suffix) for n in names) and len({n[len(n) - len(suffix) - 1:] for n in names}) == 1:
    suffix = names[0][len(names[0]) - len(suffix) - 1:]
  table = {n: c for n, c in zip(names, classes)}
  table.update({n[:len(n) - len(suffix)]: c for n, c in zip(names, classes)})
  return table


def choose_dataclass(classes: list[type], value: Mapping, path: str):
  """A mapping for a union of dataclasses names its member with the key "type"."""
  table = variant_names(classes)
  short = sorted({n for n in table if not any(n == c.__name__.lower() for c in classes)} or table)
  if "type" not in value:
    raise ConfigError(f"{path}: a section for one of {[c.__name__ for c in classes]} needs a key "
                      f"{path}.type; accepted types: {', '.join(short)}")
  kind = value["type"]
  if not isinstance(kind, str) or kind.lower() not in table:
    raise ConfigError(f"{path}.type: got {kind!r}; accepted: {', '.join(short)}")
  rest = {k: v for k, v in value.items() if k != "type"}
  return to_dataclass(table[kind.lower()], rest, path)


def to_dataclass(cls: type, mapping: Any, path: str = "config"):
  """Builds dataclass `cls` from `mapping` (dict or ConfigDict), checking keys and types.

  ValueErrors raised by `cls.__post_init__` are re-raised as ConfigError prefixed with `path`.
  """
  mapping = plain(mapping)
  if not isinstance(mapping, Mapping):
    raise ConfigError(f"{path}: expected a section (mapping) for {cls.__name__}, got {describe(mapping)}")
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(mapping) - set(fields))
  if unknown:
    raise ConfigError(f"{path}: unknown key(s) {', '.join(f'{path}.{k}' for k in unknown)}; "
                      f"accepted keys: {', '.join(sorted(fields))}")
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, field in fields.items():
    if name in mapping:
      kwargs[name] = convert_value(hints.get(name, Any), mapping[name], f"{path}.{name}")
    elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
      raise ConfigError(f"{path}.{name}: required ({type_name(hints.get(name, Any))}) but missing")
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    # "ModelConfig.n_heads=..." -> "config.model.n_heads=...": the message names the key's path.
    message = str(e).replace(f"{cls.__name__}.", f"{path}.")
    named = re.match(r"(\w+)(?:\.\w+)*=", message)   # "n_heads=" or "task_options.passkey="
    if named and named.group(1) in fields:  # "n_heads=3 ..." -> "config.model.n_heads=3 ..."
      message = f"{path}.{message}"
    raise ConfigError(message if path in message else f"{path}: {message}") from e
