"""Configuration: TOML (stdlib tomllib) into frozen, typed settings. Strict: an unknown key is an error.

Every error names the dotted key (``mqtt.max_packet_size``) and says why. Relative paths resolve against the folder
of the config file, so a config folder can be moved as a whole. ``configs/edgegw.example.toml`` documents each key
with its default; ``tests/test_config.py`` checks that the example and these classes agree.

This module is the configuration's one import path (:class:`Config`, the sections, ``load_config``,
``config_from_mapping``); the sections live in modules of one job each: _config_devices.py ([tls], [mqtt], [coap],
[acl], [registry]), _config_upstream.py ([outbox], [uplink]), _config_ops.py ([gateway], [log], [admin],
[tracing]); _config_build.py turns a TOML table into a section (the generic builder, key-naming errors).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgegw._config_build import _build
from edgegw._config_devices import (
    ACLSettings,
    CoAPSettings,
    MQTTSettings,
    RegistrySettings,
    TLSSettings,
)
from edgegw._config_ops import (
    AdminSettings,
    GatewaySettings,
    LogSettings,
    TracingSettings,
)
from edgegw._config_upstream import OutboxSettings, UplinkSettings
from edgegw.errors import ConfigError
from edgegw.pipeline.settings import SECTIONS as PIPELINE_SECTIONS
from edgegw.pipeline.settings import PipelineSettings, parse_pipeline
from edgegw.policy.limits_config import LimitsSettings, limits_from_mapping

__all__ = [
    "ACLSettings",
    "AdminSettings",
    "CoAPSettings",
    "Config",
    "GatewaySettings",
    "LogSettings",
    "MQTTSettings",
    "OutboxSettings",
    "RegistrySettings",
    "TLSSettings",
    "TracingSettings",
    "UplinkSettings",
    "config_from_mapping",
    "load_config",
]


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
