"""Opening the outbox file: schema, migration, and what to do with a file that is not a healthy SQLite database.

A corrupt file (not a database, or failing ``PRAGMA quick_check``) is moved aside as
``{name}.corrupt-{UTC timestamp}`` (with its ``-wal``/``-shm``) and a new one is created, with an error log naming
both files: a gateway that refuses to start loses every future message, while the old file stays for forensics.
A file that cannot be opened for other reasons (permissions, a folder in its place, no space) is not touched and
fails the start with :class:`~edgegw.errors.OutboxError` naming it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import structlog

from edgegw.errors import OutboxError

SCHEMA_VERSION = 2

WRITER_STATEMENTS = 192
"""Prepared statements the writer connection keeps (sqlite3's ``cached_statements``)."""

RECORD_OVERHEAD = 64
"""Bytes counted per record on top of payload, topic, device id and properties (row header, index entries)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused, so the cloud can deduplicate
    device_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    received_at REAL NOT NULL,             -- unix seconds at ingress
    properties BLOB,                       -- MQTT 5 properties to carry upstream, or NULL
    priority INTEGER NOT NULL DEFAULT 1,   -- 0 bulk, 1 telemetry, 2 alarm ...: higher classes leave first
    size INTEGER NOT NULL DEFAULT 0        -- bytes counted against outbox.max_bytes
);
CREATE INDEX IF NOT EXISTS records_by_device ON records (device_id, priority, id);
CREATE INDEX IF NOT EXISTS records_by_priority ON records (priority, id) WHERE priority != 1;
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

_INDEXES_SINCE_2 = """
CREATE INDEX IF NOT EXISTS quarantine_by_device ON quarantine (device_id, id);
"""
"""Indexes added to schema version 2 without a version bump, created at every open (IF NOT EXISTS), so a file made
before them gets them at its next start, and an older edgegw still opens the file (SQLite keeps the index up to
date whoever writes). ``quarantine_by_device``: the quarantine cap deletes the oldest rows of one device without a
scan of the table."""

QUARANTINE_SIZE = ("length(CAST(payload AS BLOB)) + length(CAST(topic AS BLOB)) + length(CAST(device_id AS BLOB))"
                   f" + coalesce(length(properties), 0) + length(CAST(reason AS BLOB)) + {RECORD_OVERHEAD}")
"""Bytes a quarantined row counts against ``outbox.quarantine_max_bytes`` (SQL over its columns: the table has no
size column, and the same expression serves the count at open, the moves and the deletes)."""

QUARANTINE_BY_DEVICE = (f"SELECT CAST(device_id AS BLOB), count(*), sum({QUARANTINE_SIZE}) FROM quarantine {{}}"
                        " GROUP BY device_id")
"""(device, rows, bytes) of the quarantine table (``{}``: a WHERE clause, or nothing), as at open and recount."""

_MIGRATE_1_TO_2 = f"""
ALTER TABLE records ADD COLUMN priority INTEGER NOT NULL DEFAULT 1;
ALTER TABLE records ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
UPDATE records SET size = length(CAST(payload AS BLOB)) + length(CAST(topic AS BLOB))
    + length(CAST(device_id AS BLOB)) + coalesce(length(properties), 0) + {RECORD_OVERHEAD};
"""

_CORRUPT_CODES = {getattr(sqlite3, "SQLITE_CORRUPT", 11), getattr(sqlite3, "SQLITE_NOTADB", 26)}


class _Corrupt(Exception):
    pass


@dataclass
class Opened:
    writer: aiosqlite.Connection
    reader: aiosqlite.Connection
    next_id: int
    usage: dict[str, list[int]]  # device -> [records, bytes]
    quarantine: dict[bytes, list[int]]  # device (as stored) -> [rows, bytes (QUARANTINE_SIZE)] in the quarantine


def device_key(raw: bytes | str) -> str:
    """Device ids read back as bytes (they may not be valid UTF-8 in a damaged file)."""
    return raw if isinstance(raw, str) else raw.decode("utf-8", "replace")


async def open_database(path: Path, synchronous: str, lock_timeout: float = 5.0) -> Opened:
    log = structlog.get_logger("edgegw.outbox")
    try:
        return await _open(path, synchronous, lock_timeout)
    except _Corrupt as exc:
        aside = _move_aside(path)
        log.error("outbox.corrupt_moved_aside", path=str(path), moved_to=str(aside), error=str(exc),
                  action="a new, empty outbox was created; the records in the old file were NOT sent")
    try:
        return await _open(path, synchronous, lock_timeout)
    except _Corrupt as exc:
        raise OutboxError(f"outbox {path}: still corrupt after moving the old file aside: {exc}") from None


async def _open(path: Path, synchronous: str, lock_timeout: float) -> Opened:
    writer = reader = None
    try:
        # Room for every statement the writer prepares (up to 100 multi-row INSERT sizes, the DELETE shapes, upkeep):
        # past sqlite3's default of 128 they would be evicted and re-prepared, ~1.5 us per row of an INSERT.
        writer = await aiosqlite.connect(path, timeout=lock_timeout, isolation_level=None,
                                         cached_statements=WRITER_STATEMENTS)
        writer.text_factory = bytes  # a damaged row must not make a whole read fail: decode ourselves
        fresh = not path.exists() or path.stat().st_size == 0
        if fresh:
            await writer.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table: space is returned
        await writer.execute("PRAGMA journal_mode=WAL")
        await writer.execute(f"PRAGMA synchronous={synchronous.upper()}")
        # Above the ~4 MB (1000 pages) at which SQLite checkpoints on its own: under load the WAL is overwritten in
        # place, rather than cut to the limit and grown again after every checkpoint (new blocks make each fdatasync
        # commit filesystem metadata too: -1 to -2 us per record on the writer thread, bench/outbox_writer.py
        # --inflight 3). After a burst it shrinks back to this, and to nothing once the writer is idle (_vacuum_step).
        await writer.execute("PRAGMA journal_size_limit=8388608")
        if not fresh:
            async with writer.execute("PRAGMA quick_check") as cur:
                problems = [device_key(r[0]) for r in await cur.fetchall()]
            if problems != ["ok"]:
                raise _Corrupt("quick_check: " + "; ".join(problems[:3]))
        version = await _schema_version(writer)
        if version == 0:
            await writer.executescript(_SCHEMA)
            await writer.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            # A new file (first start, deleted by an operator, or replacing a corrupt one) starts its ids at the
            # current time in microseconds, above any id an earlier file can have handed out: the cloud
            # deduplicates on record ids, so an id must never come back.
            await writer.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)",
                                 (time.time_ns() // 1000,))
        elif version == 1:
            await writer.executescript(f"BEGIN; {_MIGRATE_1_TO_2} {_SCHEMA} "
                                       f"UPDATE meta SET value='{SCHEMA_VERSION}' WHERE key='schema_version'; COMMIT;")
        elif version != SCHEMA_VERSION:
            raise OutboxError(f"outbox {path}: schema version {version}, this edgegw knows {SCHEMA_VERSION}")
        await writer.executescript(_INDEXES_SINCE_2)
        async with writer.execute("PRAGMA auto_vacuum") as cur:
            auto_vacuum = (await cur.fetchone())[0]  # type: ignore[index]
        if auto_vacuum != 2:  # a file made before auto_vacuum was set: rewrite it once
            await writer.execute("PRAGMA auto_vacuum=INCREMENTAL")
            await writer.execute("VACUUM")
        async with writer.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name='records'), 0),"
            " coalesce((SELECT max(id) FROM records), 0), coalesce((SELECT max(id) FROM quarantine), 0))"
        ) as cur:
            (high,) = await cur.fetchone()  # type: ignore[misc]
        usage: dict[str, list[int]] = {}
        async with writer.execute(
                "SELECT CAST(device_id AS BLOB), count(*), sum(size) FROM records GROUP BY device_id") as cur:
            for device, count, size in await cur.fetchall():
                entry = usage.setdefault(device_key(device), [0, 0])
                entry[0] += count
                entry[1] += size or 0
        quarantine = await count_quarantine(writer)
        await writer.execute("BEGIN")  # the writer always holds an open transaction between group commits
        reader = await aiosqlite.connect(path, timeout=lock_timeout, isolation_level=None)
        reader.text_factory = bytes
        await reader.execute("PRAGMA query_only=1")
        return Opened(writer, reader, high + 1, usage, quarantine)
    except BaseException as exc:
        for conn in (reader, writer):
            if conn is not None:
                try:
                    await conn.close()
                except Exception:  # noqa: BLE001 - already failing
                    pass
        if isinstance(exc, sqlite3.DatabaseError) and getattr(exc, "sqlite_errorcode", None) in _CORRUPT_CODES:
            raise _Corrupt(str(exc)) from exc
        if isinstance(exc, sqlite3.Error):
            raise OutboxError(f"outbox {path}: cannot open as an SQLite database: {exc}") from exc
        raise


async def count_quarantine(writer: aiosqlite.Connection) -> dict[bytes, list[int]]:
    """[rows, bytes] in the quarantine table per device, keyed by the device id's bytes as stored (a damaged id that
    is not valid UTF-8 must still be found again to delete its rows): one GROUP BY over the index."""
    counts: dict[bytes, list[int]] = {}
    async with writer.execute(QUARANTINE_BY_DEVICE.format("")) as cur:
        for raw, rows, size in await cur.fetchall():
            entry = counts.setdefault(bytes(raw), [0, 0])
            entry[0] += rows
            entry[1] += size or 0
    return counts


async def _schema_version(writer: aiosqlite.Connection) -> int:
    async with writer.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='meta'") as cur:
        if await cur.fetchone() is None:
            return 0
    async with writer.execute("SELECT value FROM meta WHERE key='schema_version'") as cur:
        row = await cur.fetchone()
    return int(device_key(row[0])) if row else 0


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    try:
        os.replace(path, aside)
        for suffix in ("-wal", "-shm"):
            side = Path(f"{path}{suffix}")
            if side.exists():
                os.replace(side, Path(f"{aside}{suffix}"))
    except OSError as exc:
        raise OutboxError(f"outbox {path} is corrupt and cannot be moved aside to {aside}: {exc.strerror}") from exc
    return aside
