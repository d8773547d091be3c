"""What a simulator run does: a TOML file and/or command-line flags -> one frozen :class:`Scenario`.

Strict like the gateway's config: unknown sections or keys, wrong types and out-of-range values raise
:class:`~edgegw.errors.ConfigError` naming the key (``telemetry.interval``). See simulators/README.md for the file
format and simulators/*.toml for examples.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgegw.errors import ConfigError

PROTOCOLS = ("3.1.1", "5")
TRANSPORTS = ("mqtt", "coap", "dtls")
"""Device transports: MQTT over TLS, CoAP over TLS (coaps+tcp, edgegw/sim/coap_device.py), CoAP over DTLS (coaps,
UDP, edgegw/sim/dtls_device.py); chosen in ``edgegw/sim/runner.py`` ``_make_device``."""
PROFILES = ("periodic", "jittered", "bursty")


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    host: str = "127.0.0.1"
    port: int = 8883
    server_name: str | None = None  # the name checked against the gateway's certificate (default: host)

    def __post_init__(self) -> None:
        _check(1 <= self.port <= 65535, "target.port", f"must be 1..65535, got {self.port}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Devices:
    certs: Path | None = None  # a folder of `edgegw pki batch` bundles, or a PKI folder
    ca: Path | None = None  # overrides each bundle's ca.crt
    count: int = 0  # 0: every identity found
    transport: str = "mqtt"
    protocol: str = "3.1.1"
    window: int = 16  # unacknowledged QoS 1 publishes per device
    keepalive: int = 60
    connect_rate: float = 200.0  # new connections per second (per process) while the fleet starts
    connect_timeout: float = 10.0
    reconnect_min: float = 0.2
    reconnect_max: float = 5.0
    max_backlog: int = 10_000  # messages a device buffers while offline or backpressured

    def __post_init__(self) -> None:
        _check(self.count >= 0, "devices.count", f"must be >= 0, got {self.count}")
        _check(self.transport in TRANSPORTS, "devices.transport",
               f"must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        _check(self.protocol in PROTOCOLS, "devices.protocol", f"must be \"3.1.1\" or \"5\", got {self.protocol!r}")
        _check(1 <= self.window <= 65535, "devices.window", f"must be 1..65535, got {self.window}")
        _check(0 <= self.keepalive <= 65535, "devices.keepalive", f"must be 0..65535, got {self.keepalive}")
        _check(self.connect_rate > 0, "devices.connect_rate", f"must be > 0, got {self.connect_rate}")
        _check(self.connect_timeout > 0, "devices.connect_timeout", f"must be > 0, got {self.connect_timeout}")
        _check(0 < self.reconnect_min <= self.reconnect_max, "devices.reconnect_min",
               f"must be > 0 and <= reconnect_max, got {self.reconnect_min} / {self.reconnect_max}")
        _check(self.max_backlog >= 1, "devices.max_backlog", f"must be >= 1, got {self.max_backlog}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Telemetry:
    profile: str = "periodic"
    interval: float = 1.0  # seconds between messages (bursty: between bursts) of one device; 0: no telemetry
    jitter: float = 0.2  # jittered: each interval is interval * uniform(1 - jitter, 1 + jitter)
    burst: int = 10  # bursty: messages per burst
    topic: str = "devices/{device_id}/telemetry"
    payload: str | None = None  # a template (edgegw/sim/payload.py); default: {"device", "seq", "t", "temp"}

    def __post_init__(self) -> None:
        _check(self.profile in PROFILES, "telemetry.profile",
               f"must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        _check(self.interval >= 0, "telemetry.interval", f"must be >= 0, got {self.interval}")
        _check(0 <= self.jitter < 1, "telemetry.jitter", f"must be 0 <= jitter < 1, got {self.jitter}")
        _check(self.burst >= 1, "telemetry.burst", f"must be >= 1, got {self.burst}")
        _check("{device_id}" in self.topic and "+" not in self.topic and "#" not in self.topic,
               "telemetry.topic", f"must contain {{device_id}} and no wildcard, got {self.topic!r}")
        try:
            self.topic.format(device_id="x")
        except (KeyError, IndexError, ValueError):
            raise ConfigError("telemetry.topic", f"{{device_id}} is its only placeholder, got {self.topic!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    seconds: float = 30.0  # publishing time (after the fleet connected)
    processes: int = 1
    connect_wait: float = 60.0  # how long the fleet may take to connect before publishing starts anyway
    drain_timeout: float = 30.0  # after publishing: wait this long at most for outstanding PUBACKs

    def __post_init__(self) -> None:
        _check(self.seconds > 0, "run.seconds", f"must be > 0, got {self.seconds}")
        _check(1 <= self.processes <= 64, "run.processes", f"must be 1..64, got {self.processes}")
        _check(self.connect_wait > 0, "run.connect_wait", f"must be > 0, got {self.connect_wait}")
        _check(self.drain_timeout >= 0, "run.drain_timeout", f"must be >= 0, got {self.drain_timeout}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Chaos:
    storm_every: float = 0.0  # seconds between reconnect storms (0: none)
    storm_fraction: float = 1.0  # share of the devices whose link drops at once
    offline_every: float = 0.0  # seconds between offline/online cycles (0: none)
    offline_for: float = 5.0
    offline_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("storm_every", "offline_every", "offline_for"):
            _check(getattr(self, name) >= 0, f"chaos.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in ("storm_fraction", "offline_fraction"):
            _check(0 < getattr(self, name) <= 1, f"chaos.{name}", f"must be in (0, 1], got {getattr(self, name)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BadActors:
    """How many of each; all but ``wrong_cert`` use real device identities, taken from the end of the list."""

    wrong_cert: int = 0  # a certificate from another CA, CN of a real device
    foreign_topic: int = 0  # a real device publishing under another device's topic
    flood: int = 0  # QoS 0 as fast as ``flood_rate`` allows
    flood_rate: float = 2000.0
    malformed: int = 0  # a valid CONNECT, then bytes that are not MQTT
    slow_connect: int = 0  # TLS up, then the CONNECT one byte per second
    pause: float = 0.5  # between two attempts of one bad actor

    def __post_init__(self) -> None:
        for name in ("wrong_cert", "foreign_topic", "flood", "malformed", "slow_connect"):
            _check(0 <= getattr(self, name) <= 1000, f"bad_actors.{name}",
                   f"must be 0..1000, got {getattr(self, name)}")
        _check(self.flood_rate > 0, "bad_actors.flood_rate", f"must be > 0, got {self.flood_rate}")
        _check(self.pause >= 0, "bad_actors.pause", f"must be >= 0, got {self.pause}")

    @property
    def with_identity(self) -> int:
        return self.foreign_topic + self.flood + self.malformed + self.slow_connect

    @property
    def total(self) -> int:
        return self.with_identity + self.wrong_cert


@dataclass(frozen=True, slots=True, kw_only=True)
class Sink:
    """The upstream broker the gateway forwards to: when ``port`` is set the run subscribes there and checks that
    everything acknowledged arrived (lost, duplicates, order, latency)."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: no sink
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    topic_prefix: str = "edgegw"
    protocol: str = "3.1.1"
    client_id: str = "edgegw-sim-sink"
    settle: float = 15.0  # after the devices are done: wait at most this long without a delivery

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "sink.port", f"must be 0..65535, got {self.port}")
        _check(self.protocol in PROTOCOLS, "sink.protocol", f"must be \"3.1.1\" or \"5\", got {self.protocol!r}")
        if self.port:
            for name in ("ca", "cert", "key"):
                _check(getattr(self, name) is not None, f"sink.{name}", "required when sink.port is set")
        _check(self.settle >= 0, "sink.settle", f"must be >= 0, got {self.settle}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    target: Target = field(default_factory=Target)
    devices: Devices = field(default_factory=Devices)
    telemetry: Telemetry = field(default_factory=Telemetry)
    run: Run = field(default_factory=Run)
    chaos: Chaos = field(default_factory=Chaos)
    bad_actors: BadActors = field(default_factory=BadActors)
    sink: Sink = field(default_factory=Sink)

    def __post_init__(self) -> None:
        if self.devices.transport in ("coap", "dtls"):
            _check(self.bad_actors.total == 0, "bad_actors", "the bad actors speak MQTT only; not with "
                                                             f"devices.transport = \"{self.devices.transport}\"")
            _check(self.telemetry.topic.startswith("devices/{device_id}/"), "telemetry.topic",
                   "CoAP devices publish under devices/{device_id}/... (POST /ps/...), got "
                   f"{self.telemetry.topic!r}")

    def to_mapping(self) -> dict[str, dict[str, Any]]:
        """Plain values (paths as strings), e.g. to hand the scenario to a worker process as JSON."""
        return {f.name: {k: str(v) if isinstance(v, Path) else v
                         for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
                for f in dataclasses.fields(self)}


_SECTIONS: dict[str, type] = {"target": Target, "devices": Devices, "telemetry": Telemetry, "run": Run,
                              "chaos": Chaos, "bad_actors": BadActors, "sink": Sink}


def load_scenario(path: Path | None = None,
                  overrides: dict[str, dict[str, Any]] | None = None) -> Scenario:
    """The scenario of TOML ``path`` (if any) with ``overrides`` (``{section: {key: value}}``, e.g. from flags,
    None values skipped) on top. Relative paths in the file are relative to the file."""
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError("", f"cannot read scenario {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("", f"{path}: not valid TOML: {exc}") from exc
        base = Path(path).resolve().parent
    return scenario_from_mapping(data, overrides, base_dir=base)


def scenario_from_mapping(data: dict[str, Any], overrides: dict[str, dict[str, Any]] | None = None, *,
                          base_dir: Path | None = None) -> Scenario:
    merged: dict[str, dict[str, Any]] = {}
    for name, values in data.items():
        if name not in _SECTIONS:
            raise ConfigError(name, f"unknown section (known: {', '.join(_SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(name, "must be a table")
        merged[name] = dict(values)
    for name, values in (overrides or {}).items():
        merged.setdefault(name, {}).update({k: v for k, v in values.items() if v is not None})
    return Scenario(**{name: _section(_SECTIONS[name], name, merged.get(name, {}), base_dir or Path.cwd())
                       for name in _SECTIONS})


def _section(cls: type, name: str, values: dict[str, Any], base_dir: Path) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(hints[key], value, f"{name}.{key}", base_dir)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, base_dir: Path) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    kind = next(o for o in options if o is not type(None))
    if kind is Path and isinstance(value, str | Path):
        p = Path(value).expanduser()
        return p if p.is_absolute() else base_dir / p
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    if kind is str and key.endswith(".protocol") and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # protocol = 5 in TOML means "5"
    if kind is bool and isinstance(value, bool):
        return value
    raise ConfigError(key, f"must be {getattr(kind, '__name__', kind)}, got {value!r}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)
