"""The device registry: one SQLite file (``DIR/registry.db`` next to the CA) that ``edgegw pki`` writes and the
gateway reads.

Two tables: ``devices`` (id, state, group, tenant, metadata JSON) and ``certificates`` (every certificate the CA
issued: serial, kind, name, validity, revocation, PEM), the latter being what ``pki revoke`` / ``pki crl`` /
``pki status`` work from. The file uses a rollback journal (not WAL) so that every commit changes the main file's
mtime, which is what the gateway's change detection looks at.
"""

from __future__ import annotations

import enum
import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgegw.errors import EdgegwError

REGISTRY_FILE = "registry.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'suspended', 'revoked')),
    grp TEXT NOT NULL DEFAULT '',
    tenant TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    reason TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,          -- upper-case hex, no leading zeros
    kind TEXT NOT NULL,               -- device, server, client, ca
    name TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    issued_at TEXT NOT NULL,
    revoked_at TEXT,
    reason TEXT,
    pem TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_by_name ON certificates (kind, name);
"""


class RegistryError(EdgegwError):
    """The registry cannot be opened, or a device is unknown; the message names the file or the id."""


class DeviceState(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    state: DeviceState
    group: str
    tenant: str
    metadata: dict[str, Any]
    reason: str
    created_at: str
    updated_at: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "state": str(self.state), "group": self.group, "tenant": self.tenant,
                "metadata": self.metadata, "reason": self.reason, "created_at": self.created_at,
                "updated_at": self.updated_at}


@dataclass(frozen=True, slots=True)
class CertRecord:
    serial: str
    kind: str
    name: str
    not_before: datetime
    not_after: datetime
    issued_at: str
    revoked_at: datetime | None
    reason: str | None
    pem: str


def serial_hex(serial: int) -> str:
    return format(serial, "X")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    """A read-write handle. Use :meth:`open` as a context manager; every method commits on its own."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._in_transaction = False

    @classmethod
    @contextmanager
    def open(cls, path: Path, *, create: bool = True) -> Iterator[Registry]:
        path = Path(path)
        if not create and not path.exists():
            raise RegistryError(f"no device registry at {path} (`edgegw pki init` creates it)")
        try:
            conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open device registry {path}: {exc}") from None
        with closing(conn):
            try:
                conn.execute("PRAGMA journal_mode=DELETE")
                conn.executescript(_SCHEMA)
            except sqlite3.Error as exc:
                raise RegistryError(f"cannot open device registry {path}: {exc}") from None
            yield cls(conn, path)

    # --- devices -------------------------------------------------------------------------------------------

    def register(self, device_id: str, *, group: str | None = None, tenant: str | None = None,
                 metadata: Mapping[str, Any] | None = None) -> Device:
        """Add ``device_id`` (state active) or update the fields given. A revoked device that is issued a new
        certificate becomes active again; a suspended one stays suspended."""
        now = _now()
        meta = json.dumps(dict(metadata), sort_keys=True) if metadata is not None else None
        with self._tx():
            self._conn.execute(
                "INSERT INTO devices (id, grp, tenant, metadata, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET grp = coalesce(?, grp), tenant = coalesce(?, tenant), "
                "metadata = coalesce(?, metadata), updated_at = ?, "
                "state = CASE state WHEN 'revoked' THEN 'active' ELSE state END, "
                "reason = CASE state WHEN 'revoked' THEN '' ELSE reason END",
                (device_id, group or "", tenant or "", meta or "{}", now, now, group, tenant, meta, now))
        return self.get(device_id)

    def get(self, device_id: str) -> Device:
        row = self._conn.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
        if row is None:
            raise RegistryError(f"unknown device {device_id!r} in {self.path}")
        return _device(row)

    def find(self, device_id: str) -> Device | None:
        row = self._conn.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
        return None if row is None else _device(row)

    def devices(self, *, state: str | None = None, group: str | None = None,
                tenant: str | None = None) -> list[Device]:
        sql, args = "SELECT * FROM devices WHERE 1", []
        for column, value in (("state", state), ("grp", group), ("tenant", tenant)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        return [_device(r) for r in self._conn.execute(sql + " ORDER BY id", args)]

    def set_state(self, device_id: str, state: DeviceState, reason: str = "") -> tuple[Device, DeviceState]:
        """Set the state; returns the device and its previous state."""
        with self._tx():
            before = self.get(device_id)
            self._conn.execute("UPDATE devices SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                               (str(state), reason, _now(), device_id))
        return self.get(device_id), before.state

    # --- certificates --------------------------------------------------------------------------------------

    def record_certificate(self, kind: str, name: str, serial: int, not_before: datetime, not_after: datetime,
                           pem: str) -> None:
        with self._tx():
            self._conn.execute(
                "INSERT OR IGNORE INTO certificates (serial, kind, name, not_before, not_after, issued_at, pem) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (serial_hex(serial), kind, name, not_before.isoformat(), not_after.isoformat(), _now(), pem))

    def certificates(self, *, kind: str | None = None, name: str | None = None,
                     revoked: bool | None = None) -> list[CertRecord]:
        sql, args = "SELECT * FROM certificates WHERE 1", []
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        if name is not None:
            sql += " AND name = ?"
            args.append(name)
        if revoked is not None:
            sql += " AND revoked_at IS NOT NULL" if revoked else " AND revoked_at IS NULL"
        return [_cert(r) for r in self._conn.execute(sql + " ORDER BY issued_at, rowid", args)]

    def mark_revoked(self, serials: list[str], reason: str) -> None:
        now = _now()
        with self._tx():
            self._conn.executemany(
                "UPDATE certificates SET revoked_at = ?, reason = ? WHERE serial = ? AND revoked_at IS NULL",
                [(now, reason, s) for s in serials])

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group many writes into one commit: each commit of the rollback journal costs several fsyncs, which made
        issuing 1,000 devices (2 commits each) wait on the disk for most of its time. Not re-entrant."""
        with self._tx():
            self._in_transaction = True
            try:
                yield
            finally:
                self._in_transaction = False

    @contextmanager
    def _tx(self) -> Iterator[None]:
        if self._in_transaction:  # inside transaction(): its commit covers this write
            yield
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise RegistryError(f"device registry {self.path}: {exc}") from None


def _device(row: tuple[Any, ...]) -> Device:
    id_, state, grp, tenant, metadata, reason, created, updated = row
    return Device(id_, DeviceState(state), grp, tenant, json.loads(metadata), reason, created, updated)


def _cert(row: tuple[Any, ...]) -> CertRecord:
    serial, kind, name, nb, na, issued, revoked_at, reason, pem = row
    return CertRecord(serial, kind, name, datetime.fromisoformat(nb), datetime.fromisoformat(na), issued,
                      datetime.fromisoformat(revoked_at) if revoked_at else None, reason, pem)


def blocked_devices(path: Path) -> dict[str, tuple[DeviceState, str]]:
    """Read-only snapshot for the gateway: every device that is not active, with its state and reason."""
    try:
        # Short timeout: this runs on the gateway's event loop; a busy registry is retried at the next poll.
        conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=0.5)
    except sqlite3.Error as exc:
        raise RegistryError(f"cannot open device registry {path}: {exc}") from None
    with closing(conn):
        try:
            rows = conn.execute("SELECT id, state, reason FROM devices WHERE state != 'active'").fetchall()
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot read device registry {path}: {exc}") from None
    return {id_: (DeviceState(state), reason) for id_, state, reason in rows}


def soonest_device_expiry(path: Path) -> datetime | None:
    """The earliest not-after among the newest unrevoked certificate of each active device, or None."""
    try:
        conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=0.5)
    except sqlite3.Error:
        return None
    with closing(conn):
        try:
            row = conn.execute(
                "SELECT min(na) FROM (SELECT max(c.not_after) AS na FROM certificates c JOIN devices d "
                "ON d.id = c.name WHERE c.kind = 'device' AND c.revoked_at IS NULL AND d.state = 'active' "
                "GROUP BY c.name)").fetchone()
        except sqlite3.Error:
            return None
    return datetime.fromisoformat(row[0]) if row and row[0] else None
