"""Configuration: TOML (stdlib tomllib) into frozen, typed settings. Strict: an unknown key is an error.

Every error names the dotted key (``mqtt.max_packet_size``) and says why. Relative paths resolve against the folder
of the config file, so a config folder can be moved as a whole. ``configs/edgegw.example.toml`` documents each key
with its default; ``tests/test_config.py`` checks that the example and these classes agree.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from edgegw.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySettings:
    id: str = "edgegw"
    """Names this gateway upstream (its MQTT client id there) and in logs."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.id):
            raise ConfigError("gateway.id", f"must be 1-128 of [A-Za-z0-9._-], got {self.id!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSSettings:
    """The device-facing TLS listener's material: our certificate, and the fleet CA that signs device certs."""

    cert: Path
    key: Path
    ca: Path
    min_version: Literal["1.2", "1.3"] = "1.2"


@dataclass(frozen=True, slots=True, kw_only=True)
class MQTTSettings:
    bind: str = "0.0.0.0"
    port: int = 8883
    max_connections: int = 10_000
    connect_timeout: float = 10.0
    max_packet_size: int = 256 * 1024
    receive_maximum: int = 64
    """QoS 1/2 publishes per connection awaiting commit; past it the connection is not read (3.1.1) or told 0x93."""
    tls_read_buffer: int = 32 * 1024
    """Per-connection TLS read buffer. asyncio's default is 256 KiB per connection (BRIEF §2)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("mqtt.port", f"must be 0-65535, got {self.port}")
        _positive("mqtt.max_connections", self.max_connections)
        _positive("mqtt.connect_timeout", self.connect_timeout)
        if not 64 <= self.max_packet_size <= 268_435_460:
            raise ConfigError("mqtt.max_packet_size", f"must be 64 .. 268435460 bytes, got {self.max_packet_size}")
        if not 1 <= self.receive_maximum <= 65535:
            raise ConfigError("mqtt.receive_maximum", f"must be 1-65535, got {self.receive_maximum}")
        if not 4096 <= self.tls_read_buffer <= 1024 * 1024:
            raise ConfigError("mqtt.tls_read_buffer", f"must be 4096 .. 1048576 bytes, got {self.tls_read_buffer}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ACLSettings:
    publish: tuple[str, ...] = ("devices/{device_id}/#",)
    """Topic filters a device may publish to; ``{device_id}`` is the device's certificate CN."""

    def __post_init__(self) -> None:
        for i, pattern in enumerate(self.publish):
            if not pattern or pattern.startswith("/"):
                raise ConfigError(f"acl.publish[{i}]", f"invalid topic filter {pattern!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxSettings:
    path: Path = Path("state/outbox.db")
    commit_window_ms: float = 5.0
    commit_max_records: int = 1000
    synchronous: Literal["full", "normal"] = "full"
    """``full`` fsyncs every group commit and survives power cuts; ``normal`` survives only a killed process."""
    max_pending: int = 20_000
    """Records awaiting commit before devices stop being read (backpressure)."""

    def __post_init__(self) -> None:
        if self.commit_window_ms < 0:
            raise ConfigError("outbox.commit_window_ms", f"must be >= 0, got {self.commit_window_ms}")
        _positive("outbox.commit_max_records", self.commit_max_records)
        _positive("outbox.max_pending", self.max_pending)


@dataclass(frozen=True, slots=True, kw_only=True)
class UplinkSettings:
    host: str
    port: int = 8883
    ca: Path
    cert: Path
    key: Path
    client_id: str = ""
    """Defaults to ``edgegw-{gateway.id}``."""
    topic_prefix: str = "edgegw"
    """A record from ``devices/{id}/rest`` goes up as ``{topic_prefix}/{id}/rest``."""
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive: int = 30
    inflight_window: int = 100
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    connect_timeout: float = 10.0
    tls_server_name: str = ""
    """Host name to check the upstream's certificate against; defaults to ``host``."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("uplink.host", "must not be empty")
        if not 1 <= self.port <= 65535:
            raise ConfigError("uplink.port", f"must be 1-65535, got {self.port}")
        if not 1 <= self.inflight_window <= 65535:
            raise ConfigError("uplink.inflight_window", f"must be 1-65535, got {self.inflight_window}")
        if self.topic_prefix.endswith("/") or "+" in self.topic_prefix or "#" in self.topic_prefix:
            raise ConfigError("uplink.topic_prefix", f"no trailing '/' and no wildcards, got {self.topic_prefix!r}")
        _positive("uplink.keepalive", self.keepalive)
        _positive("uplink.reconnect_min", self.reconnect_min)
        if self.reconnect_max < self.reconnect_min:
            raise ConfigError("uplink.reconnect_max", "must be >= uplink.reconnect_min")
        _positive("uplink.connect_timeout", self.connect_timeout)


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    tls: TLSSettings
    mqtt: MQTTSettings = field(default_factory=MQTTSettings)
    acl: ACLSettings = field(default_factory=ACLSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    uplink: UplinkSettings
    log: LogSettings = field(default_factory=LogSettings)
    source: Path | None = None
    """The file this was loaded from (not a config key)."""

    @property
    def uplink_client_id(self) -> str:
        return self.uplink.client_id or f"edgegw-{self.gateway.id}"


_SECTIONS: dict[str, type] = {
    "gateway": GatewaySettings,
    "tls": TLSSettings,
    "mqtt": MQTTSettings,
    "acl": ACLSettings,
    "outbox": OutboxSettings,
    "uplink": UplinkSettings,
    "log": LogSettings,
}


def load_config(path: Path | str) -> Config:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None
    return config_from_mapping(raw, base_dir=path.resolve().parent, source=path)


def config_from_mapping(raw: dict[str, Any], *, base_dir: Path, source: Path | None = None) -> Config:
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown section (known: {', '.join(_SECTIONS)})")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(name, "must be a table")
        sections[name] = _build(cls, value, name, base_dir)
    for required in ("tls", "uplink"):
        if required not in sections:
            raise ConfigError(required, "section is required")
    return Config(**sections, source=source)


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
        raise TypeError(f"unsupported config type {hint}")  # keep the schema simple: no optional keys
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
