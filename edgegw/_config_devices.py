"""The device-facing sections: [tls], [mqtt], [coap], [acl] and [registry] (who may connect, how, and with what
bounds). Split out of edgegw/config.py, which stays the import path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgegw._config_build import _positive
from edgegw.errors import ConfigError


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
class RegistrySettings:
    path: Path | None = None
    """The device registry (``DIR/registry.db`` of ``edgegw pki``): suspended and revoked devices are refused at
    CONNECT; "" in TOML: no registry."""
