"""Which group (tier) and tenant a device belongs to, for the limiter: a snapshot of the registry file."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import structlog

log = structlog.get_logger("edgegw.limits")


class RegistryClasses:
    """Group and tenant of each device from the registry file (``devices.grp``, ``devices.tenant``), as a
    snapshot re-read when the file changes. Unknown devices and no registry: ("", "")."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._map: dict[str, tuple[str, str]] = {}
        self._stamp: tuple[int, int] | None = None

    def __call__(self, device_id: str) -> tuple[str, str]:
        return self._map.get(device_id, ("", ""))

    def read_if_changed(self) -> dict[str, tuple[str, str]] | None:
        """Blocking (sqlite3): the new snapshot if the file changed since the last one, else None."""
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return None
        try:
            uri = f"file:{Path(self.path).resolve()}?mode=ro"
            with closing(sqlite3.connect(uri, uri=True, timeout=0.5)) as conn:
                rows = conn.execute("SELECT id, grp, tenant FROM devices WHERE grp != '' OR tenant != ''").fetchall()
        except sqlite3.Error as exc:
            log.warning("limits.registry_unreadable", path=str(self.path), error=str(exc), kept="previous groups")
            return None
        self._stamp = stamp
        return {str(i): (str(g), str(t)) for i, g, t in rows}

    def install(self, snapshot: dict[str, tuple[str, str]]) -> None:
        self._map = snapshot
