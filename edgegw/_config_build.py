"""How a TOML table becomes a config section: the generic builder (``_build``, ``_coerce``: field by field, type by
type, every error naming the dotted key) and ``_positive``, the range check the sections share.

Split out of edgegw/config.py, which stays the import path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from edgegw.errors import ConfigError


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def _build(cls: type, values: dict[str, Any], section: str, base_dir: Path) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}", f"unknown key (known: {', '.join(fields)})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, "is required")
            continue
        kwargs[name] = _coerce(hints[name], values[name], key, base_dir)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, base_dir: Path) -> Any:
    origin = get_origin(hint)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"expected a path (string), got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base_dir / p
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is tuple:
        item = get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return tuple(_coerce(item, v, f"{key}[{i}]", base_dir) for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        # The only optional keys are paths: "" means "not set" (TOML has no null).
        if set(get_args(hint)) != {Path, type(None)}:
            raise TypeError(f"unsupported config type {hint}")
        return None if value == "" else _coerce(Path, value, key, base_dir)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint}")
