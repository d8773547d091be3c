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
from edgegw.pipeline.settings import SECTIONS as PIPELINE_SECTIONS
from edgegw.pipeline.settings import PipelineSettings, parse_pipeline
from edgegw.policy.limits_config import LimitsSettings, limits_from_mapping

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySettings:
    id: str = "edgegw"
    """Names this gateway upstream (its MQTT client id there) and in logs."""
    event_loop: Literal["auto", "uvloop", "asyncio"] = "asyncio"
    """``asyncio`` (the standard loop), ``uvloop`` (libuv's) or ``auto``: uvloop when it is installed
    (edgegw/runtime.py). ``uvloop`` without it installed is an error. Read at start only. Not yet with CoAP over
    TLS or the lab listener (docs/OPERATIONS.md "Event loop")."""

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
    crl: Path | None = None
    """The fleet CA's CRL (PEM, ``edgegw pki crl``), checked at every handshake; "" in TOML: no revocation check."""
    reload_interval: float = 5.0
    """Seconds between checks of cert, key, CA, CRL and registry for changes (SIGHUP reloads at once); 0: SIGHUP only."""

    def __post_init__(self) -> None:
        if self.reload_interval < 0:
            raise ConfigError("tls.reload_interval", f"must be >= 0 (0: SIGHUP only), got {self.reload_interval}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MQTTSettings:
    bind: str = "0.0.0.0"
    port: int = 8883
    max_connections: int = 10_000
    connect_timeout: float = 10.0
    max_packet_size: int = 256 * 1024
    receive_maximum: int = 64
    """QoS 1/2 publishes per connection awaiting commit; past it the connection is not read (3.1.1) or told 0x93."""
    tls_read_buffer: int = 16 * 1024
    """Bytes per TLS read. Device MQTT connections share one buffer of this size (edgegw/mqtt/_tls.py: no buffer
    per connection, ~29 KB per idle connection in all); other asyncio TLS listeners (CoAP over TLS) get it as their
    per-connection ``SSLProtocol.max_size`` (asyncio's default: 256 KiB, BRIEF §2). One TLS record carries at most
    16 KiB of plaintext, so more buys nothing (docs/BENCHMARKS.md "Idle connections")."""
    topic_alias_maximum: int = 16
    """Topic aliases a MQTT 5 device may set per connection (0: none)."""
    max_topic_length: int = 256
    max_topic_levels: int = 16
    max_keepalive: int = 3600
    """Keep-alive of 0 or above this is replaced by this (MQTT 5: Server Keep Alive in the CONNACK)."""
    max_session_expiry: int = 86400
    """Seconds a persistent session (and its queue) outlives its connection at most."""
    max_subscriptions: int = 64
    """Topic filters per device; more are refused (0x97)."""
    max_inflight_messages: int = 32
    """Server-to-device QoS 1/2 publishes awaiting the device's ack (lower if the device's Receive Maximum is)."""
    max_queued_messages: int = 1000
    """Per session: messages waiting for the in-flight window or for an offline device; oldest dropped past it."""
    max_queued_bytes: int = 1024 * 1024
    retained_max_count: int = 10_000
    retained_max_bytes: int = 16 * 1024 * 1024
    session_store: Path = Path("state/mqtt-sessions.msgpack")
    """Persistent sessions, their queues and retained messages live in the SQLite file next to this path with the
    suffix ``.db`` (written in batches, survives kill -9); a msgpack snapshot of an older version found here is
    imported once (edgegw/mqtt/sessiondb.py)."""
    lab: bool = False
    """Also listen on plain TCP (lab_bind:lab_port), client id as identity, every topic allowed. Never in production."""
    lab_bind: str = "127.0.0.1"
    lab_port: int = 1883

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
        if not 0 <= self.topic_alias_maximum <= 65535:
            raise ConfigError("mqtt.topic_alias_maximum", f"must be 0-65535, got {self.topic_alias_maximum}")
        if not 1 <= self.max_topic_length <= 65535:
            raise ConfigError("mqtt.max_topic_length", f"must be 1-65535, got {self.max_topic_length}")
        if not 1 <= self.max_keepalive <= 65535:
            raise ConfigError("mqtt.max_keepalive", f"must be 1-65535, got {self.max_keepalive}")
        if not 0 <= self.max_session_expiry <= 0xFFFFFFFF:
            raise ConfigError("mqtt.max_session_expiry", f"must be 0-4294967295, got {self.max_session_expiry}")
        if not 1 <= self.max_inflight_messages <= 65535:
            raise ConfigError("mqtt.max_inflight_messages", f"must be 1-65535, got {self.max_inflight_messages}")
        if not 0 <= self.lab_port <= 65535:
            raise ConfigError("mqtt.lab_port", f"must be 0-65535, got {self.lab_port}")
        for key in ("max_topic_levels", "max_subscriptions", "max_queued_messages", "max_queued_bytes",
                    "retained_max_count", "retained_max_bytes"):
            _positive(f"mqtt.{key}", getattr(self, key))


@dataclass(frozen=True, slots=True, kw_only=True)
class CoAPSettings:
    """CoAP ingress (docs/COAP.md): CoAP over TLS (RFC 8323, ``coaps+tcp``) with client certificates required,
    the same ``[tls]`` material, registry, CRL and ACL as MQTT. Off unless ``enabled``."""

    enabled: bool = False
    bind: str = "0.0.0.0"
    port: int = 5684
    """The coaps+tcp port itself (aiocoap's own listener would add 1 to the port of its ``bind``; ours does not)."""
    max_connections: int = 10_000
    handshake_timeout: float = 10.0
    idle_timeout: float = 600.0
    """Seconds without a byte from a connection before it is closed (RFC 8323 Ping counts); 0: never."""
    max_payload: int = 64 * 1024
    """Largest request payload accepted (4.13 past it, with Size1); a message announcing more closes the connection."""
    max_inflight: int = 32
    """Requests per connection being processed (awaiting their commit); past it the connection is not read."""
    max_observations: int = 16
    """Observations (GET + Observe on /ps/...) per device; more are refused with 5.03."""
    full_max_age: int = 5
    """Max-Age (seconds) of the 5.03 / 4.29 answer when the outbox is full: when the device should try again."""
    receive_buffer: int = 4 * 1024 * 1024
    """SO_RCVBUF of the UDP (lab) socket: the kernel's default drops most of a burst of datagrams (BRIEF §2)."""
    exchange_lifetime: float = 30.0
    """UDP (lab) only: seconds a message id is remembered for deduplication (RFC 7252 says 247; memory stays
    flat under load with less, at the cost of accepting a retransmission later than that as new)."""
    lab: bool = False
    """Also listen on plain CoAP over UDP (lab_bind:lab_port): NO authentication, the device id is the request's
    ``c=`` query parameter (as EMQX). For firmware bring-up only, never production."""
    lab_bind: str = "127.0.0.1"
    lab_port: int = 5683
    dtls: bool = False
    """Also CoAP over DTLS 1.2 (``coaps://``, UDP) on ``bind:dtls_port``, client certificates required
    (edgegw/coap/dtls.py); same [tls] material, registry, CRL and ACL."""
    dtls_port: int = 5684
    """UDP: may equal ``port`` (TCP)."""
    dtls_max_sessions: int = 1000
    """DTLS sessions, handshaking ones included; ClientHellos past it are not answered."""
    dtls_handshakes_per_second: float = 50.0
    """New DTLS handshakes per second (token bucket, burst of as many): a flood cannot take the CPU."""
    dtls_idle_timeout: float = 300.0
    """Seconds without a datagram before a DTLS session is closed."""

    def __post_init__(self) -> None:
        for key in ("port", "lab_port", "dtls_port"):
            if not 0 <= getattr(self, key) <= 65535:
                raise ConfigError(f"coap.{key}", f"must be 0-65535, got {getattr(self, key)}")
        for key in ("max_connections", "handshake_timeout", "max_inflight", "max_observations", "full_max_age",
                    "exchange_lifetime", "dtls_max_sessions", "dtls_handshakes_per_second", "dtls_idle_timeout"):
            _positive(f"coap.{key}", getattr(self, key))
        if self.idle_timeout < 0:
            raise ConfigError("coap.idle_timeout", f"must be >= 0 (0: never), got {self.idle_timeout}")
        if not 1 <= self.max_payload <= 1024 * 1024:
            raise ConfigError("coap.max_payload", f"must be 1 .. 1048576 bytes, got {self.max_payload}")
        if not 64 * 1024 <= self.receive_buffer <= 256 * 1024 * 1024:
            raise ConfigError("coap.receive_buffer", f"must be 65536 .. 268435456 bytes, got {self.receive_buffer}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ACLSettings:
    publish: tuple[str, ...] = ("devices/{device_id}/#",)
    """Topic filters a device may publish to; ``{device_id}`` is the device's certificate CN."""
    subscribe: tuple[str, ...] = ("devices/{device_id}/#",)
    """Topic filters a device may subscribe within (a filter must lie entirely inside one of them)."""

    def __post_init__(self) -> None:
        for key in ("publish", "subscribe"):
            for i, pattern in enumerate(getattr(self, key)):
                if not pattern or pattern.startswith("/"):
                    raise ConfigError(f"acl.{key}[{i}]", f"invalid topic filter {pattern!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxSettings:
    path: Path = Path("state/outbox.db")
    commit_window_ms: float = 0.0
    commit_max_records: int = 1000
    synchronous: Literal["full", "normal"] = "full"
    """``full`` fsyncs every group commit and survives power cuts; ``normal`` survives only a killed process."""
    max_pending: int = 20_000
    """Records awaiting commit before devices stop being read (backpressure)."""
    max_records: int = 1_000_000
    """Records held (committed and awaiting commit) before ``full_policy`` applies."""
    max_bytes: int = 256 * 1024 * 1024
    """Bytes held (payload + topic + device id + properties + 64 per record) before ``full_policy`` applies."""
    ttl: float = 7 * 24 * 3600.0
    """Seconds a record may wait for the upstream; older ones are deleted and counted as expired. 0: no limit."""
    min_free_bytes: int = 64 * 1024 * 1024
    """Disk headroom: the outbox stops growing (``full_policy`` applies) before the filesystem has less free."""
    lock_timeout: float = 5.0
    """Seconds a commit waits while another SQLite connection holds the file's write lock (a backup tool, an
    operator's ``sqlite3`` shell) before it fails: the devices of that group are not acknowledged and resend."""
    full_policy: Literal["drop-oldest", "reject-new"] = "drop-oldest"
    """When full: evict the oldest records of the device holding the most, or refuse new records (MQTT 5 PUBACK
    0x97, backpressure on 3.1.1). A device over its fair share is refused first."""

    def __post_init__(self) -> None:
        if self.commit_window_ms < 0:
            raise ConfigError("outbox.commit_window_ms", f"must be >= 0, got {self.commit_window_ms}")
        _positive("outbox.commit_max_records", self.commit_max_records)
        _positive("outbox.max_pending", self.max_pending)
        _positive("outbox.max_records", self.max_records)
        if self.max_bytes < 4096:
            raise ConfigError("outbox.max_bytes", f"must be >= 4096, got {self.max_bytes}")
        if self.ttl < 0:
            raise ConfigError("outbox.ttl", f"must be >= 0 (0: no limit), got {self.ttl}")
        if self.min_free_bytes < 0:
            raise ConfigError("outbox.min_free_bytes", f"must be >= 0, got {self.min_free_bytes}")
        if not 0 < self.lock_timeout <= 600:
            raise ConfigError("outbox.lock_timeout", f"must be > 0 and <= 600 seconds, got {self.lock_timeout}")


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
    live_first: bool = True
    """After a (re)connect, records arriving from now on go up at once; the backlog drains behind them, paced."""
    backfill_rate: float = 0.0
    """Backlog records per second (all devices); 0: as fast as the in-flight window allows."""
    backfill_bytes_rate: float = 0.0
    """Backlog payload bytes per second (all devices); 0: no limit."""
    backfill_device_rate: float = 0.0
    """Backlog records per second per device (a cloud's per-device quota); 0: no limit."""
    backfill_device_bytes_rate: float = 0.0
    """Backlog payload bytes per second per device; 0: no limit."""
    endpoints: tuple[str, ...] = ()
    """More upstream brokers as ``host:port`` (same TLS material), after ``host``:``port``."""
    endpoint_policy: Literal["priority", "round-robin"] = "priority"
    """``priority``: the first healthy endpoint, failing back when a higher one answers again; ``round-robin``:
    the next healthy one at each connection."""
    breaker_failures: int = 3
    """Consecutive failures (attempts, or connections lost within 5 s) that open an endpoint's circuit."""
    breaker_cooldown: float = 30.0
    """Seconds an open circuit keeps an endpoint out of rotation; also the fail-back probe interval."""
    batch_max_records: int = 1
    """Records per upstream message: 1 sends each record on its own; more packs them into msgpack frames
    (docs/OUTBOX.md, edgegw/uplink/frames.py)."""
    batch_max_bytes: int = 65536
    """Upper bound of a frame's payload before compression (also kept under the broker's Maximum Packet Size)."""
    batch_compression: Literal["none", "zlib"] = "none"
    batch_linger_ms: float = 0.0
    """With batching: how long a partly filled frame of live records may wait for more before it goes up anyway
    (fewer, fuller frames on a slow trickle, at the cost of that much latency). 0: send what there is."""
    client: Literal["native", "paho"] = "native"
    """The MQTT client under the uplink: ``native`` (edgegw's own on asyncio: PUBLISHes of a loop turn in one
    write, PUBACKs parsed from bytes) or ``paho`` (paho-mqtt driven by the loop). Same behaviour, same logs."""
    command_topic: str = ""
    """Downlink: a filter the uplink subscribes to upstream (QoS 1, after every connect), e.g.
    ``{prefix}/+/cmd/#``; ``{prefix}`` stands for ``topic_prefix``. A message on ``{prefix}/{device_id}/rest`` is
    delivered to that device's subscriptions matching ``devices/{device_id}/rest``. "": no downlink."""

    @property
    def command_filter(self) -> str:
        """``command_topic`` with ``{prefix}`` substituted ("" when the downlink is off)."""
        return self.command_topic.replace("{prefix}", self.topic_prefix)

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("uplink.host", "must not be empty")
        if self.command_topic:
            problem = _command_filter_problem(self.command_filter, self.topic_prefix)
            if problem is not None:
                raise ConfigError("uplink.command_topic", f"{problem}, got {self.command_topic!r}")
        for name in ("backfill_rate", "backfill_bytes_rate", "backfill_device_rate", "backfill_device_bytes_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"uplink.{name}", f"must be >= 0 (0: no limit), got {getattr(self, name)}")
        for i, endpoint in enumerate(self.endpoints):
            host, sep, port = endpoint.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ConfigError(f"uplink.endpoints[{i}]", f"expected host:port, got {endpoint!r}")
        _positive("uplink.breaker_failures", self.breaker_failures)
        if not 1 <= self.batch_max_records <= 65535:
            raise ConfigError("uplink.batch_max_records", f"must be 1-65535, got {self.batch_max_records}")
        if self.batch_max_bytes < 1024:
            raise ConfigError("uplink.batch_max_bytes", f"must be >= 1024, got {self.batch_max_bytes}")
        if not 0 <= self.batch_linger_ms <= 60_000:
            raise ConfigError("uplink.batch_linger_ms", f"must be 0-60000, got {self.batch_linger_ms}")
        _positive("uplink.breaker_cooldown", self.breaker_cooldown)
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


def _command_filter_problem(topic_filter: str, prefix: str) -> str | None:
    """Why ``topic_filter`` cannot be the downlink's subscription, or None."""
    if not topic_filter.startswith(prefix + "/"):
        return "must start with {prefix}/ (commands arrive on {prefix}/{device_id}/...)"
    levels = topic_filter.split("/")
    if len(levels) < len(prefix.split("/")) + 1:
        return "needs a device id level after {prefix}"
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' only as the whole last level"
        if "+" in level and level != "+":
            return "'+' only as a whole level"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistrySettings:
    path: Path | None = None
    """The device registry (``DIR/registry.db`` of ``edgegw pki``): suspended and revoked devices are refused at
    CONNECT; "" in TOML: no registry."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    rate_limit: int = 100
    """Log events of one name per ``rate_interval`` at most; the rest are counted and reported (0: no limit)."""
    rate_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.rate_limit < 0:
            raise ConfigError("log.rate_limit", f"must be >= 0 (0: no limit), got {self.rate_limit}")
        _positive("log.rate_interval", self.rate_interval)


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminSettings:
    """The operator's HTTP server: /metrics, /healthz, /readyz, the JSON API and the status page."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    """Loopback by default: the API can disconnect devices and has no authentication of its own."""
    port: int = 9180
    tls_cert: Path | None = None
    """Serve HTTPS with this certificate (PEM) and ``tls_key``; "" in TOML: plain HTTP."""
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """Require a client certificate signed by this CA (mTLS: the way to open the admin server beyond loopback)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("admin.port", f"must be 0-65535, got {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("admin.tls_key" if self.tls_key is None else "admin.tls_cert",
                              "tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("admin.tls_client_ca", "client certificates need HTTPS: set tls_cert and tls_key")


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSettings:
    """Optional OpenTelemetry span export (edgegw/ops/otel.py); the W3C traceparent is carried either way."""

    exporter: Literal["none", "otlp-http"] = "none"
    """``otlp-http``: spans edgegw.ingress and edgegw.uplink per record over OTLP HTTP/protobuf; needs
    ``pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http``. ``none``: nothing is imported."""
    endpoint: str = ""
    """The OTLP traces URL, e.g. ``http://127.0.0.1:4318/v1/traces``; "": the OTEL_EXPORTER_OTLP_* environment
    or the SDK default."""
    service_name: str = "edgegw"
    sample_ratio: float = 1.0
    """Share of trace ids exported, 0.0 .. 1.0 (decided on the trace id: a trace is exported whole or not)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ConfigError("tracing.sample_ratio", f"must be 0.0 .. 1.0, got {self.sample_ratio}")
        if not self.service_name:
            raise ConfigError("tracing.service_name", "must not be empty")
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError("tracing.endpoint", f"expected an http:// or https:// URL, got {self.endpoint!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    tls: TLSSettings
    mqtt: MQTTSettings = field(default_factory=MQTTSettings)
    acl: ACLSettings = field(default_factory=ACLSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    uplink: UplinkSettings
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    log: LogSettings = field(default_factory=LogSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    coap: CoAPSettings = field(default_factory=CoAPSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    """[[routes]], [routing], [transforms.*], [versions.*], [tenants] (edgegw/pipeline/settings.py)."""
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    """[limits], [[limits.rate]], [[limits.quota]] (edgegw/policy/limits_config.py)."""
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
    "registry": RegistrySettings,
    "log": LogSettings,
    "admin": AdminSettings,
    "tracing": TracingSettings,
    "coap": CoAPSettings,
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
    unknown = sorted(set(raw) - set(_SECTIONS) - set(PIPELINE_SECTIONS) - {"limits"})
    if unknown:
        known = ", ".join((*_SECTIONS, *PIPELINE_SECTIONS, "limits"))
        raise ConfigError(unknown[0], f"unknown section (known: {known})")
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
    if "limits" in raw:  # arrays of tables: parsed by its own module, errors still name the key
        sections["limits"] = limits_from_mapping(raw["limits"], base_dir)
    return Config(**sections, pipeline=parse_pipeline(raw, base_dir), source=source)


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
