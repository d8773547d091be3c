"""The durable outbox: every accepted device message is a row in SQLite (WAL) until the upstream acknowledged it.

Group commit: :meth:`Outbox.submit` is synchronous and cheap (no await, no task): it gives the record its id and
queues it. One writer task (:meth:`Outbox.run`) takes what was queued while its previous commit ran (lingering up
to ``commit_window_ms`` if that is above 0, at most ``commit_max_records``), writes the group in one transaction, and only then tells the submitters: each record's ``on_commit``
callback, and each :class:`CommitAcker` (a device connection) once per group with the tokens (packet ids) of all its
records in it, which is where the ingress sends its PUBACKs. So a device is told "yes" only for a record that is on
disk (with ``synchronous=FULL``, fsynced: edge boxes lose power).

Deletes after upstream acknowledgement (:meth:`ack`) ride in the same group transactions. A lost delete (crash
before its commit) only means the record is sent again: at-least-once, never at-most-once.

Bounds (docs/OUTBOX.md): records, bytes, age (``ttl``) and disk headroom. Usage is counted in memory per device
(records awaiting commit included), so :meth:`submit` decides synchronously: with ``full_policy = "reject-new"`` it
raises :class:`OutboxFull` (the ingress answers MQTT 5 PUBACK 0x97 or applies backpressure); with ``"drop-oldest"``
the writer evicts, in the same transaction as the new records, the oldest lowest-priority records of the device
holding the most. Freed pages go back to the filesystem (``auto_vacuum=INCREMENTAL``) when the writer is idle.

Reads for the uplink go through a second connection, which in WAL mode sees only committed transactions, so nothing
uncommitted can leave the box. A row that cannot be decoded is quarantined rather than blocking the queue.

Layout: this module opens and closes the outbox and holds its state (:class:`Outbox`, which every import path
names); its methods live in one mixin per job, all on the same instance: :mod:`edgegw.outbox._admission` (submit,
caps, fair shares, backpressure signals), :mod:`edgegw.outbox._writer` (the group-commit writer task),
:mod:`edgegw.outbox._reads` (reads for the uplink, handoffs) and :mod:`edgegw.outbox._upkeep` (TTL, eviction, disk
guard, vacuum inside the writer's transactions).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import structlog

from edgegw.config import OutboxSettings
from edgegw.errors import OutboxError
from edgegw.outbox._admission import (
    FAIR_SHARE_FROM,
    ROOM_AGAIN_BELOW,
    CommitAcker,
    CommitCallback,
    _Acks,
    _Pending,
)
from edgegw.outbox._reads import UplinkReads
from edgegw.outbox._record import (
    MAX_PRIORITY,
    PRIORITY_ALARM,
    PRIORITY_BULK,
    PRIORITY_TELEMETRY,
    OutboxFull,
    Record,
    record_size,
)
from edgegw.outbox._schema import RECORD_OVERHEAD, SCHEMA_VERSION, Opened, open_database
from edgegw.outbox._upkeep import _statvfs_free
from edgegw.outbox._writer import GroupWriter

__all__ = ["CommitAcker", "CommitCallback", "Outbox", "OutboxFull", "Record", "RECORD_OVERHEAD", "SCHEMA_VERSION",
           "PRIORITY_BULK", "PRIORITY_TELEMETRY", "PRIORITY_ALARM", "MAX_PRIORITY", "record_size", "FAIR_SHARE_FROM",
           "ROOM_AGAIN_BELOW"]


class Outbox(UplinkReads, GroupWriter):
    """Open with :meth:`open`; run :meth:`run` as a task; :meth:`close` flushes and closes."""

    free_bytes: Callable[[Path], int] = staticmethod(_statvfs_free)  # type: ignore[assignment]
    """Free bytes on the outbox's filesystem (``os.statvfs``); replaceable to test the disk guard."""

    def __init__(self, settings: OutboxSettings, opened: Opened) -> None:
        self._settings = settings
        self._writer = opened.writer
        self._reader = opened.reader
        self._next_id = opened.next_id
        self._log = structlog.get_logger("edgegw.outbox")
        self._pending: list[_Pending] = []
        self._acks: _Acks = {}
        self._to_delete: set[int] = set()
        self._deleting: set[int] = set()
        self._to_quarantine: list[tuple[int, str]] = []
        self._wake = asyncio.Event()
        self._group_full: asyncio.Future[None] | None = None
        self._committed = asyncio.Condition()
        self._committed_id = opened.next_id - 1  # every id below this is committed or gone
        self._stopping = False
        self._decongested: list[Callable[[], None]] = []
        self._room_waiters: list[Callable[[], None]] = []
        self._listeners: list[Callable[[], None]] = []
        self._handoffs: list[Callable[[int, list[Record]], None]] = []
        # usage, records awaiting commit included: device -> [records, bytes]
        self._usage = opened.usage
        self._count = sum(u[0] for u in self._usage.values())
        self._bytes = sum(u[1] for u in self._usage.values())
        self._reject_new = settings.full_policy == "reject-new"
        self._byte_limit = settings.max_bytes
        self._disk_limited = False
        self._disk_checked = 0.0
        self._expire_due = 0.0
        self._vacuum_due = True
        self._full_logged = 0.0
        # the quarantine table, counted per device like the records (rebuilt at open) so a move needs no count query
        self._set_quarantine_counts(opened.quarantine)
        self._quarantine_full_logged = 0.0
        self.commits = 0
        self.committed_records = 0
        self.dropped: dict[str, int] = {}
        """Records evicted by ``drop-oldest``, per device."""
        self.expired: dict[str, int] = {}
        """Records deleted unsent because they were older than ``ttl``, per device."""
        self.rejected: dict[str, int] = {}
        """Records refused at :meth:`submit` (:class:`OutboxFull`), per device."""
        self.quarantined = 0
        """Records moved to the quarantine table by this process (refused upstream or undecodable)."""
        self.quarantine_dropped: dict[str, int] = {}
        """Quarantined rows deleted, the oldest of the device holding the most first, to keep the table within
        ``quarantine_max_records`` / ``quarantine_max_bytes``, per device."""
        self.vacuumed_pages = 0

    # --- opening ---------------------------------------------------------------------------------------------

    @classmethod
    async def open(cls, settings: OutboxSettings) -> Outbox:
        path = settings.path
        _check_writable(path)
        opened = await open_database(path, settings.synchronous, settings.lock_timeout)
        outbox = cls(settings, opened)
        outbox._refresh_disk_limit(await outbox._freelist_bytes())
        await outbox.quarantine_unclassed()
        outbox._log.info("outbox.opened", path=str(path), depth=outbox._count, bytes=outbox._bytes,
                         next_id=opened.next_id, synchronous=settings.synchronous, devices=len(outbox._usage),
                         byte_limit=outbox._byte_limit, full_policy=settings.full_policy,
                         quarantine_rows=outbox._quarantine_rows, quarantine_bytes=outbox._quarantine_bytes)
        return outbox

    # --- closing --------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Refuse new records; :meth:`run` returns once what is queued is committed."""
        self._stopping = True
        self._wake.set()

    async def close(self) -> None:
        """Close both connections. Call after :meth:`run` returned (or never ran)."""
        self._stopping = True
        try:
            await self._writer.execute("COMMIT")
        except sqlite3.Error:
            pass
        await self._reader.close()
        await self._writer.close()
        self._log.info("outbox.closed", depth=self._count, commits=self.commits,
                       dropped=sum(self.dropped.values()), expired=sum(self.expired.values()),
                       rejected=sum(self.rejected.values()), quarantined=self.quarantined,
                       quarantine_dropped=sum(self.quarantine_dropped.values()))


def _check_writable(path: Path) -> None:
    folder = path.parent
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"outbox {path}: cannot create folder {folder}: {exc.strerror}") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutboxError(f"outbox {path}: folder {folder} is not writable")
    if path.is_dir():
        raise OutboxError(f"outbox {path}: is a folder, not a file")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise OutboxError(f"outbox {path}: file is not readable and writable")
