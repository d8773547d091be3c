"""Which tenant a device belongs to, and what the registry knows about it (for ``enrich``).

``[tenants] source``: ``cert-o`` / ``cert-ou`` / ``cert:NAME`` read the Organization / Organizational Unit / any
subject attribute (edgegw/policy/certattrs.py) of the device's verified client certificate, over MQTT, coaps+tcp
and DTLS alike (resolved once per certificate: cached by device id and serial); ``registry`` reads the
``tenant`` column of the device registry; ``none`` means no tenants. A device without one gets ``tenants.default``.
A tenant must be usable as one topic level (no ``/``, ``+``, ``#``, NUL, not empty): anything else counts as none,
so a crafted certificate cannot widen or move its namespace.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import structlog

from edgegw.pipeline.settings import NO_TENANT, TenantSettings
from edgegw.policy.certattrs import attribute_oid, subject_value

log = structlog.get_logger("edgegw.pipeline")

REGISTRY_RECHECK = 5.0
"""Seconds between checks of the registry file's mtime (a stat, on the hot path at most this often)."""
_CACHE_MAX = 100_000
_EMPTY: Mapping[str, Any] = {}


def safe_tenant(value: str | None) -> str:
    if (not value or "/" in value or "+" in value or "#" in value or "\x00" in value or len(value) > 128
            or value == NO_TENANT):
        return ""
    return value


class RegistryView:
    """An in-memory snapshot of the registry's devices (id -> group, tenant, metadata), re-read when the file
    changes. Reading is synchronous and rare (start, reload, a changed file), never per message."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._devices: dict[str, Mapping[str, Any]] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        if path is not None:
            self._load()

    def _load(self) -> None:
        assert self._path is not None
        try:
            self._mtime = os.stat(self._path).st_mtime
            # Read-only, short timeout: this runs on the event loop (rarely); a busy file is retried next check.
            conn = sqlite3.connect(f"file:{self._path.resolve()}?mode=ro", uri=True, timeout=0.5)
            with closing(conn):
                rows = conn.execute("SELECT id, grp, tenant, metadata FROM devices").fetchall()
        except (OSError, sqlite3.Error) as exc:
            self._mtime = None  # try again at the next check
            log.warning("pipeline.registry_unreadable", path=str(self._path), error=str(exc))
            return
        devices: dict[str, Mapping[str, Any]] = {}
        for device_id, group, tenant, metadata in rows:
            try:
                meta = json.loads(metadata) if metadata else {}
            except ValueError:
                meta = {}
            devices[str(device_id)] = {**(meta if isinstance(meta, dict) else {}), "group": group, "tenant": tenant}
        self._devices = devices

    def get(self, device_id: str) -> Mapping[str, Any]:
        if self._path is not None:
            now = time.monotonic()
            if now - self._checked >= REGISTRY_RECHECK:
                self._checked = now
                try:
                    mtime: float | None = os.stat(self._path).st_mtime
                except OSError:
                    mtime = None
                if mtime != self._mtime:
                    self._load()
        return self._devices.get(device_id, _EMPTY)


class TenantResolver:
    def __init__(self, settings: TenantSettings, registry: RegistryView) -> None:
        self.source = settings.source
        self.default = safe_tenant(settings.default)
        self._registry = registry
        self._by_cert: dict[tuple[str, str], str] = {}
        self._oid = attribute_oid("tenants.source", settings.source)  # None: not from the certificate

    def tenant(self, device_id: str, serial: str, peercert: Any) -> str:
        """``peercert``: a callable returning ``SSLObject.getpeercert()`` (called once per certificate) or None."""
        if self.source == "none":
            return self.default
        if self.source == "registry":
            return safe_tenant(self._registry.get(device_id).get("tenant")) or self.default
        key = (device_id, serial)
        cached = self._by_cert.get(key)
        if cached is not None:
            return cached
        cert = peercert() if peercert is not None else None
        tenant = safe_tenant(subject_value(cert, self._oid or "")) or self.default
        if serial:  # the lab listener has no certificate: nothing to cache by
            if len(self._by_cert) >= _CACHE_MAX:
                self._by_cert.clear()
            self._by_cert[key] = tenant
        return tenant

    def known(self, device_id: str, noted: str | None) -> str:
        """The tenant of a device whose certificate is not at hand: an MQTT will, published after its connection
        is gone. Exact for ``none`` and ``registry`` (looked up now); from a certificate, ``noted``: what the
        ingress resolved when the device connected with its will. Without it (a delayed will restored after a
        restart) ``tenants.default``, which may be none: the will then goes up under the reserved ``_untenanted``
        level, never in a tenant's space."""
        if self.source in ("none", "registry"):
            return self.tenant(device_id, "", None)
        return noted if noted is not None else self.default


def tenant_from_peercert(peercert: Mapping[str, Any] | None, attribute: str) -> str | None:
    """The single value of ``attribute`` (a name such as ``organizationName`` or ``OU``, or an OID) in the
    certificate subject; None when absent or ambiguous (two values would make the tenant depend on an order)."""
    return subject_value(peercert, attribute_oid("attribute", f"cert:{attribute}") or "")
