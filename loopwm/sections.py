"""Config sections: typed dataclasses whose every field is checked when built, and the builder from mappings.

A `Section` coerces each value to its annotation (int to float only), refuses NaN and inf, checks the range in
its field's metadata (`bounds`), then runs the section's own rules across fields; `build_dataclass` builds one
from a nested mapping and refuses unknown keys. `loopwm.config` declares the project's sections with it.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import types
import typing
from typing import Any, ClassVar, Literal, Union


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key and what was expected."""


def bounds(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> dict:
    """Field metadata for a number that must lie in [lo, hi] (an end open where asked, None for no limit)."""
    return {"range": (lo, hi, lo_open, hi_open)}


class Section:
    """A config section: every field is range- and finiteness-checked at construction, then `check` runs
    the rules across fields, so a section built directly in Python is held to the same rules as YAML."""

    prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self.prefix}.{f.name}" if self.prefix else f.name
            tp, value = hints[f.name], getattr(self, f.name)
            if dataclasses.is_dataclass(tp):
                if isinstance(value, dict):
                    value = build_dataclass(tp, value, key)
                elif not isinstance(value, tp):
                    raise ConfigError(f"{key}: expected a {tp.__name__} or a mapping, got {type(value).__name__}")
            else:
                value = _coerce(key, value, tp)
                _check_range(key, value, f.metadata.get("range"))
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules across fields; sections override this."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting int->float only."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r}: expected {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {list(allowed)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected a boolean (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond the float range
                number = math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}={value!r}: expected a number")
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return number
    if tp is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ConfigError(f"{key}={value!r}: expected a mapping with string keys")
    if tp is str:
        if isinstance(value, str):
            return value
        hint = ""
        if isinstance(value, (bool, int, float, datetime.date)):  # YAML reads 42, true or 2024-06-01 as non-strings
            hint = f"; YAML read it as {type(value).__name__}: quote it, as {key}='\"...\"' on the command line"
        raise ConfigError(f"{key}={value!r}: expected a string{hint}")
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def _check_range(key: str, value: Any, spec: tuple | None) -> None:
    if spec is None or value is None:
        return
    lo, hi, lo_open, hi_open = spec
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key}={value!r}: expected a value {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ConfigError(f"{key}={value!r}: expected a value {'<' if hi_open else '<='} {hi}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Build the `Section` subclass `cls` from a mapping, refusing unknown keys (the section checks its values)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]}; expected one of {sorted(fields)}")
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        nested = dataclasses.is_dataclass(tp)
        kwargs[name] = build_dataclass(tp, {} if value is None else value, key) if nested else value
    return cls(**kwargs)
