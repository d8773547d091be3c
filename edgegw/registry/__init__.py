"""The device registry (SQLite: devices and the certificates issued to them) and the gateway's credential reload."""

from __future__ import annotations

from .store import (
    REGISTRY_FILE,
    CertRecord,
    Device,
    DeviceState,
    Registry,
    RegistryError,
    blocked_devices,
    soonest_device_expiry,
)

__all__ = [
    "REGISTRY_FILE",
    "CertRecord",
    "Device",
    "DeviceState",
    "Registry",
    "RegistryError",
    "blocked_devices",
    "soonest_device_expiry",
]
