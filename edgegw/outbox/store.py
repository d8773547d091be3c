"""The durable outbox: every accepted device message is a row in SQLite (WAL) until the upstream acknowledged it.

Group commit: :meth:`Outbox.submit` is synchronous and cheap (no await, no task): it gives the record its id and
queues it. One writer task (:meth:`Outbox.run`) lingers up to ``commit_window`` or until ``commit_max_records`` are
queued, writes the whole group in one transaction, and only then calls each record's ``on_commit`` callback, which is
where the ingress sends PUBACK. So a device is told "yes" only for a record that is on disk (with
``synchronous=FULL``, fsynced: edge boxes lose power).

Deletes after upstream acknowledgement (:meth:`ack`) ride in the same group transactions. A lost delete (crash
before its commit) only means the record is sent again: at-least-once, never at-most-once.

Reads for the uplink go through a second connection, which in WAL mode sees only committed transactions, so nothing
uncommitted can leave the box.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import structlog

from edgegw.config import OutboxSettings
from edgegw.errors import OutboxError

CommitCallback = Callable[[bool], None]
"""Called once with True after the record's transaction committed, or False if the commit failed."""

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused, so the cloud can deduplicate
    device_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    received_at REAL NOT NULL,             -- unix seconds at ingress
    properties BLOB                        -- msgpack of MQTT 5 properties to carry upstream, or NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    received_at REAL NOT NULL,
    properties BLOB,
    reason TEXT NOT NULL,
    quarantined_at REAL NOT NULL
);
"""

_INSERT = "INSERT INTO records (id, device_id, topic, payload, qos, received_at, properties) VALUES (?,?,?,?,?,?,?)"
_COLUMNS = "id, device_id, topic, payload, qos, received_at, properties"


@dataclass(frozen=True, slots=True)
class Record:
    id: int
    device_id: str
    topic: str
    payload: bytes
    qos: int
    received_at: float
    properties: bytes | None = None

    def row(self) -> tuple[int, str, str, bytes, int, float, bytes | None]:
        return (self.id, self.device_id, self.topic, self.payload, self.qos, self.received_at, self.properties)


class Outbox:
    """Open with :meth:`open`; run :meth:`run` as a task; :meth:`close` flushes and closes."""

    def __init__(self, settings: OutboxSettings, writer: aiosqlite.Connection, reader: aiosqlite.Connection,
                 next_id: int, depth: int) -> None:
        self._settings = settings
        self._writer = writer
        self._reader = reader
        self._next_id = next_id
        self._depth = depth
        self._log = structlog.get_logger("edgegw.outbox")
        self._pending: list[tuple[Record, CommitCallback | None]] = []
        self._to_delete: set[int] = set()
        self._deleting: set[int] = set()
        self._to_quarantine: list[tuple[int, str]] = []
        self._wake = asyncio.Event()
        self._group_full: asyncio.Future[None] | None = None
        self._committed = asyncio.Condition()
        self._committed_id = next_id - 1  # every id below this is committed or gone
        self._stopping = False
        self._decongested: list[Callable[[], None]] = []
        self.commits = 0
        self.committed_records = 0

    # --- opening ---------------------------------------------------------------------------------------------

    @classmethod
    async def open(cls, settings: OutboxSettings) -> Outbox:
        path = settings.path
        _check_writable(path)
        try:
            writer = await aiosqlite.connect(path, isolation_level=None)
            await writer.execute("PRAGMA journal_mode=WAL")
            await writer.execute(f"PRAGMA synchronous={settings.synchronous.upper()}")
            await writer.executescript(_SCHEMA)
            await writer.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            async with writer.execute("SELECT value FROM meta WHERE key='schema_version'") as cur:
                version = int((await cur.fetchone())[0])  # type: ignore[index]
            if version != SCHEMA_VERSION:
                raise OutboxError(f"outbox {path}: schema version {version}, this edgegw knows {SCHEMA_VERSION}")
            async with writer.execute(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name='records'), 0),"
                " coalesce((SELECT max(id) FROM records), 0), coalesce((SELECT max(id) FROM quarantine), 0)),"
                " (SELECT count(*) FROM records)"
            ) as cur:
                high, depth = await cur.fetchone()  # type: ignore[misc]
            await writer.execute("BEGIN")  # the writer always holds an open transaction between group commits
            reader = await aiosqlite.connect(path, isolation_level=None)
            await reader.execute("PRAGMA query_only=1")
        except sqlite3.DatabaseError as exc:
            raise OutboxError(f"outbox {path}: cannot open as an SQLite database: {exc}") from exc
        log = structlog.get_logger("edgegw.outbox")
        log.info("outbox.opened", path=str(path), depth=depth, next_id=high + 1, synchronous=settings.synchronous)
        return cls(settings, writer, reader, high + 1, depth)

    # --- the hot path (synchronous, no await) ---------------------------------------------------------------

    def submit(self, device_id: str, topic: str, payload: bytes, qos: int,
               on_commit: CommitCallback | None = None, properties: bytes | None = None) -> Record:
        if self._stopping:
            raise OutboxError("outbox is closing")
        record = Record(self._next_id, device_id, topic, payload, qos, time.time(), properties)
        self._next_id += 1
        self._pending.append((record, on_commit))
        if len(self._pending) == 1:
            self._wake.set()
        elif len(self._pending) >= self._settings.commit_max_records and self._group_full is not None:
            if not self._group_full.done():
                self._group_full.set_result(None)
        return record

    @property
    def congested(self) -> bool:
        """True when more records await commit than ``max_pending``: ingress should stop reading."""
        return len(self._pending) >= self._settings.max_pending

    def when_decongested(self, callback: Callable[[], None]) -> None:
        self._decongested.append(callback)

    def ack(self, record_ids: Iterable[int]) -> None:
        """The upstream acknowledged these records: delete them in the next group commit."""
        self._to_delete.update(record_ids)
        self._wake.set()

    def quarantine(self, record_id: int, reason: str) -> None:
        """Move a record the upstream refused out of the queue, keeping it and the reason for an operator."""
        self._to_quarantine.append((record_id, reason))
        self._wake.set()

    @property
    def depth(self) -> int:
        """Committed records not yet acknowledged upstream, plus those awaiting commit."""
        return self._depth + len(self._pending)

    # --- the group-commit writer ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Commit groups until :meth:`close` asks to stop and everything queued is on disk."""
        loop = asyncio.get_running_loop()
        window = self._settings.commit_window_ms / 1000
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._pending and window > 0 and not self._stopping and \
                    len(self._pending) < self._settings.commit_max_records:
                self._group_full = loop.create_future()
                await asyncio.wait((self._group_full,), timeout=window)
                self._group_full = None
            await self._commit_group()
            if self._pending or self._to_delete or self._to_quarantine:
                self._wake.set()
            elif self._stopping:
                async with self._committed:
                    self._committed.notify_all()  # waiters see _stopping and return
                return

    async def _commit_group(self) -> None:
        group = self._pending[: self._settings.commit_max_records]
        del self._pending[: len(group)]
        deletes = self._to_delete
        self._to_delete = set()
        self._deleting = deletes
        quarantine = self._to_quarantine
        self._to_quarantine = []
        if not (group or deletes or quarantine):
            return
        ok = True
        deleted = 0
        try:
            if group:
                await self._writer.executemany(_INSERT, [r.row() for r, _ in group])
            if quarantine:
                await self._writer.executemany(
                    f"INSERT OR REPLACE INTO quarantine SELECT {_COLUMNS}, ?, ? FROM records WHERE id=?",
                    [(reason, time.time(), rid) for rid, reason in quarantine])
                deletes = deletes | {rid for rid, _ in quarantine}
            if deletes:
                async with self._writer.executemany("DELETE FROM records WHERE id=?",
                                                    [(i,) for i in deletes]) as cur:
                    deleted = cur.rowcount
            await self._writer.execute("COMMIT")
            await self._writer.execute("BEGIN")
        except sqlite3.Error as exc:
            ok = False
            self._log.error("outbox.commit_failed", path=str(self._settings.path), error=str(exc),
                            records=len(group), deletes=len(deletes))
            try:
                await self._writer.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            try:
                await self._writer.execute("BEGIN")
            except sqlite3.Error:
                pass
            # Deletes are retried with the next group; records are not: their devices were not acknowledged and
            # will resend.
            self._to_delete |= deletes
            self._to_quarantine = quarantine + self._to_quarantine
        finally:
            self._deleting = set()
        if ok:
            self.commits += 1
            self.committed_records += len(group)
            self._depth += len(group) - deleted
            if group:
                self._committed_id = group[-1][0].id
        for record, callback in group:
            if callback is not None:
                try:
                    callback(ok)
                except Exception:  # one broken connection must not stop the writer
                    self._log.exception("outbox.callback_failed", record_id=record.id)
        if ok and group:
            async with self._committed:
                self._committed.notify_all()
        if self._decongested and len(self._pending) < self._settings.max_pending // 2:
            callbacks, self._decongested = self._decongested, []
            for cb in callbacks:
                cb()

    # --- reads for the uplink -------------------------------------------------------------------------------

    async def fetch_after(self, after_id: int, limit: int) -> list[Record]:
        """Up to ``limit`` committed records with id > ``after_id``, oldest first, minus those being deleted."""
        # A delete may commit while the query runs, and the read snapshot may predate it; an id acknowledged before
        # the query started is in one of these sets at the start, so the union of both ends catches it.
        gone = self._settled_ids()
        # Rows being deleted still count against LIMIT in SQL; ask for that many more so a page is never short.
        async with self._reader.execute(
            f"SELECT {_COLUMNS} FROM records WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit + len(gone))
        ) as cur:
            rows = await cur.fetchall()
        gone |= self._settled_ids()
        return [Record(*row) for row in rows if row[0] not in gone][:limit]

    def _settled_ids(self) -> set[int]:
        """Ids acknowledged or quarantined whose removal is not committed yet."""
        return self._to_delete | self._deleting | {rid for rid, _ in self._to_quarantine}

    async def wait_for_records_after(self, after_id: int) -> None:
        """Return once some record with id > ``after_id`` is committed."""
        async with self._committed:
            await self._committed.wait_for(lambda: self._committed_id > after_id or self._stopping)

    @property
    def committed_id(self) -> int:
        return self._committed_id

    async def count_quarantined(self) -> int:
        async with self._reader.execute("SELECT count(*) FROM quarantine") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

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
        self._log.info("outbox.closed", depth=self._depth, commits=self.commits)


def _check_writable(path: Path) -> None:
    folder = path.parent
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"outbox {path}: cannot create folder {folder}: {exc.strerror}") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutboxError(f"outbox {path}: folder {folder} is not writable")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise OutboxError(f"outbox {path}: file is not readable and writable")
