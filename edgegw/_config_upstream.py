"""The sections on the way up: [outbox] (what is held, how it commits) and [uplink] (the upstream broker, backfill,
failover, batching, downlink). Split out of edgegw/config.py, which stays the import path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgegw._config_build import _positive
from edgegw.errors import ConfigError


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
    quarantine_max_records: int = 100_000
    """Rows kept in the ``quarantine`` table (records the upstream refused, or that could not be read back). A move
    that would pass it deletes the oldest quarantined rows of the device holding the most in the same transaction
    (counted per device in ``quarantine_dropped``): a device the upstream keeps refusing must not fill the disk,
    nor delete another device's rows."""
    quarantine_max_bytes: int = 64 * 1024 * 1024
    """Bytes kept in the ``quarantine`` table (payload + topic + device id + properties + reason + 64 per row);
    past it, as for ``quarantine_max_records``."""

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
        _positive("outbox.quarantine_max_records", self.quarantine_max_records)
        if self.quarantine_max_bytes < 4096:
            raise ConfigError("outbox.quarantine_max_bytes", f"must be >= 4096, got {self.quarantine_max_bytes}")
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
