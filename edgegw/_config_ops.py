"""The sections about the gateway process and its operator: [gateway], [log], [admin] and [tracing].
Split out of edgegw/config.py, which stays the import path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgegw._config_build import _positive
from edgegw.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
