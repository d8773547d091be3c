"""The ``[limits]`` section: token-bucket rate limits (``[[limits.rate]]``) and quotas (``[[limits.quota]]``).

Parsed here, not by edgegw/config.py's generic builder, because it holds arrays of tables; the rules are the same
(strict, frozen, every error names the key, e.g. ``limits.rate[2].messages_rate``). This module imports nothing from
edgegw but the errors and certattrs (which imports only the errors), so edgegw/config.py can import it.
docs/POLICY.md "Rate limits and quotas" shows examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from edgegw.errors import ConfigError
from edgegw.policy.certattrs import attribute_oid

Scope = Literal["device", "group", "tenant", "gateway"]
Action = Literal["backpressure", "reject", "drop"]
Period = Literal["day", "month"]

SCOPES: tuple[str, ...] = get_args(Scope)
ACTIONS: tuple[str, ...] = get_args(Action)
PERIODS: tuple[str, ...] = get_args(Period)


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """One ``[[limits.rate]]``: a messages bucket and/or a bytes bucket, each with a rate and a burst.

    ``scope`` says whose bucket it is: each device its own (``device``), one per device group (``group``, the
    registry's group: the tier), one per tenant (``tenant``), one for the whole gateway (``gateway``). ``group`` and
    ``tenant`` select the devices the rule applies to ("" = any). Per scope, the FIRST rule (in file order) whose
    selectors match a device applies to it; the rules of all four scopes are checked for every message.
    """

    name: str
    scope: Scope
    group: str = ""
    tenant: str = ""
    messages_rate: float = 0.0
    """Messages per second; 0: no message bucket in this rule."""
    messages_burst: float = 0.0
    """Messages that may arrive at once after a quiet time; 0: ``max(messages_rate, 1)`` (one second's worth)."""
    bytes_rate: float = 0.0
    """Payload bytes per second; 0: no byte bucket in this rule."""
    bytes_burst: float = 0.0
    """0: ``bytes_rate``. A message larger than the burst passes when the bucket is full and leaves it in debt."""
    action: Action = "backpressure"

    @property
    def message_burst(self) -> float:
        return self.messages_burst or max(self.messages_rate, 1.0)

    @property
    def byte_burst(self) -> float:
        return self.bytes_burst or max(self.bytes_rate, 1.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Quota:
    """One ``[[limits.quota]]``: how much EACH device of the selected group/tenant may send per UTC day or month.
    Per period, the first quota (in file order) whose selectors match a device applies to it."""

    name: str
    period: Period
    group: str = ""
    tenant: str = ""
    messages: int = 0
    """Messages per device per period; 0: not limited."""
    bytes: int = 0
    """Payload bytes per device per period; 0: not limited."""
    action: Action = "reject"


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsSettings:
    rate: tuple[RateLimit, ...] = ()
    quota: tuple[Quota, ...] = ()
    usage_path: Path | None = None
    """SQLite file with each device's quota usage per day and month; None: ``usage.db`` next to the outbox."""
    flush_interval: float = 5.0
    """Seconds between writes of the usage counters (and at stop): a crash forgets at most this much usage."""
    max_devices: int = 100_000
    """Devices whose buckets are kept in memory; past it the least recently seen is forgotten (a fresh burst)."""
    idle_timeout: float = 600.0
    """A device unseen this long whose buckets have refilled is forgotten (nothing is lost: they are full)."""
    group_source: str = "registry"
    """Where a device's group (tier) comes from: ``registry`` (its ``group`` column), or its verified certificate:
    ``cert-o``, ``cert-ou``, ``cert:NAME`` (any subject attribute or OID, edgegw/policy/certattrs.py); a
    certificate without that attribute falls back to the registry's group."""

    @property
    def active(self) -> bool:
        return bool(self.rate or self.quota)


_RATE_FLOATS = ("messages_rate", "messages_burst", "bytes_rate", "bytes_burst")


def limits_from_mapping(raw: Any, base_dir: Path) -> LimitsSettings:
    """``raw`` is the ``[limits]`` table of the TOML file; relative paths resolve against ``base_dir``."""
    if not isinstance(raw, dict):
        raise ConfigError("limits", "must be a table")
    known = {f.name for f in fields(LimitsSettings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"limits.{unknown[0]}", f"unknown key (known: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    if "usage_path" in raw:
        value = raw["usage_path"]
        if not isinstance(value, str):
            raise ConfigError("limits.usage_path", f"expected a path (string), got {value!r}")
        if value:
            p = Path(value).expanduser()
            kwargs["usage_path"] = p if p.is_absolute() else base_dir / p
    if "flush_interval" in raw:
        kwargs["flush_interval"] = _number(raw["flush_interval"], "limits.flush_interval", positive=True)
    for key in ("max_devices",):
        if key in raw:
            kwargs[key] = _integer(raw[key], f"limits.{key}", minimum=1)
    if "idle_timeout" in raw:
        kwargs["idle_timeout"] = _number(raw["idle_timeout"], "limits.idle_timeout", positive=True)
    if "group_source" in raw:
        source = raw["group_source"]
        if not isinstance(source, str) or (source != "registry" and attribute_oid("limits.group_source", source)
                                           is None):
            raise ConfigError("limits.group_source", f"expected 'registry', 'cert-o', 'cert-ou' or 'cert:NAME', "
                                                     f"got {source!r}")
        kwargs["group_source"] = source
    kwargs["rate"] = tuple(_rate(item, f"limits.rate[{i}]") for i, item in enumerate(_tables(raw, "rate")))
    kwargs["quota"] = tuple(_quota(item, f"limits.quota[{i}]") for i, item in enumerate(_tables(raw, "quota")))
    _unique_names(kwargs["rate"], "limits.rate")
    _unique_names(kwargs["quota"], "limits.quota")
    return LimitsSettings(**kwargs)


def _tables(raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"limits.{key}", f"expected an array of tables ([[limits.{key}]]), got {value!r}")
    return value


def _check_keys(item: dict[str, Any], cls: type, key: str) -> None:
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(item) - set(known))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(known)})")


def _rate(item: dict[str, Any], key: str) -> RateLimit:
    _check_keys(item, RateLimit, key)
    scope = _choice(item.get("scope"), SCOPES, f"{key}.scope")
    group = _string(item.get("group", ""), f"{key}.group")
    tenant = _string(item.get("tenant", ""), f"{key}.tenant")
    values = {name: _number(item.get(name, 0.0), f"{key}.{name}") for name in _RATE_FLOATS}
    for name, value in values.items():
        if value < 0:
            raise ConfigError(f"{key}.{name}", f"must be >= 0, got {value}")
    if not values["messages_rate"] and not values["bytes_rate"]:
        raise ConfigError(f"{key}.messages_rate", "a rate limit needs messages_rate or bytes_rate (> 0)")
    for unit in ("messages", "bytes"):
        if values[f"{unit}_burst"] and not values[f"{unit}_rate"]:
            raise ConfigError(f"{key}.{unit}_burst", f"needs {unit}_rate")
    if values["messages_burst"] and values["messages_burst"] < 1:
        raise ConfigError(f"{key}.messages_burst", f"must be >= 1 (or 0: one second's worth), got "
                                                   f"{values['messages_burst']}")
    action = _choice(item.get("action", "backpressure"), ACTIONS, f"{key}.action")
    name = _string(item.get("name", ""), f"{key}.name") or _default_name(scope, group, tenant)
    return RateLimit(name=name, scope=scope, group=group, tenant=tenant,  # type: ignore[arg-type]
                     action=action, **values)  # type: ignore[arg-type]


def _quota(item: dict[str, Any], key: str) -> Quota:
    _check_keys(item, Quota, key)
    period = _choice(item.get("period"), PERIODS, f"{key}.period")
    group = _string(item.get("group", ""), f"{key}.group")
    tenant = _string(item.get("tenant", ""), f"{key}.tenant")
    messages = _integer(item.get("messages", 0), f"{key}.messages", minimum=0)
    nbytes = _integer(item.get("bytes", 0), f"{key}.bytes", minimum=0)
    if not messages and not nbytes:
        raise ConfigError(f"{key}.messages", "a quota needs messages or bytes (> 0)")
    action = _choice(item.get("action", "reject"), ACTIONS, f"{key}.action")
    name = _string(item.get("name", ""), f"{key}.name") or _default_name(f"quota:{period}", group, tenant)
    return Quota(name=name, period=period, group=group, tenant=tenant,  # type: ignore[arg-type]
                 messages=messages, bytes=nbytes, action=action)  # type: ignore[arg-type]


def _default_name(base: str, group: str, tenant: str) -> str:
    return base + (f"[group={group}]" if group else "") + (f"[tenant={tenant}]" if tenant else "")


def _unique_names(rules: Sequence[RateLimit | Quota], key: str) -> None:
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.name in seen:
            # Names key the buckets kept across a reload and label the metrics: two rules cannot share one.
            raise ConfigError(f"{key}[{i}].name", f"{rule.name!r} is used by an earlier rule; give each a name")
        seen.add(rule.name)


def _choice(value: Any, choices: tuple[str, ...], key: str) -> str:
    if value is None:
        raise ConfigError(key, f"is required (one of {', '.join(map(repr, choices))})")
    if value not in choices:
        raise ConfigError(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _number(value: Any, key: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"expected a number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")
    if not math.isfinite(value):
        raise ConfigError(key, f"must be finite, got {value}")
    return float(value)


def _integer(value: Any, key: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {value}")
    return value
