"""The writer's upkeep inside a group transaction: deletes with usage accounting, TTL expiry, drop-oldest
eviction, the disk headroom guard, and giving free pages back to the filesystem when idle (docs/OUTBOX.md)."""

from __future__ import annotations

import functools
import heapq
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from edgegw.config import OutboxSettings
from edgegw.outbox._schema import (
    QUARANTINE_BY_DEVICE,
    QUARANTINE_SIZE,
    count_quarantine,
    device_key,
)

_DISK_CHECK_EVERY = 0.5  # seconds between statvfs calls (one per group commit at most)
_EXPIRE_EVERY = 1.0  # seconds between TTL sweeps
_EXPIRE_BATCH = 2000
_VACUUM_MIN_PAGES = 256  # free pages before the idle writer returns them to the filesystem
_VACUUM_STEP_PAGES = 2048  # pages per incremental_vacuum step, so a waiting group is not held long
_GONE = "RETURNING CAST(device_id AS BLOB), size"
_IDS = "(SELECT value FROM json_each(?))"
_RUNS_PER_STATEMENT = 8
"""Acknowledged ids go to SQL as up to this many ``id BETWEEN`` ranges (the uplink acknowledges in id order, so a
group's deletes are a run or a few); more scattered ids as a JSON list."""
_QUARANTINE_BATCH = 4096  # quarantined rows deleted per statement when the table is over a cap
_QUARANTINE_LOG_EVERY = 10.0  # seconds between outbox.quarantine_full warnings: never one line per record
_DELETED_BY_DEVICE = "SELECT CAST(device_id AS BLOB), count(*), sum(size) FROM records WHERE {} GROUP BY device_id"


def id_runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive ids as (first, last) ranges, in order."""
    runs: list[tuple[int, int]] = []
    ordered = sorted(ids)
    if not ordered:
        return runs
    first = last = ordered[0]
    for rid in ordered:
        if rid > last + 1:
            runs.append((first, last))
            first = rid
        last = rid
    runs.append((first, last))
    return runs


@functools.lru_cache(maxsize=_RUNS_PER_STATEMENT)
def _where_ranges(n: int) -> str:
    return " OR ".join(["id BETWEEN ? AND ?"] * n)


def delete_acknowledged(conn: sqlite3.Connection, ids: Iterable[int]) -> list[tuple[bytes, int, int]]:
    """On the SQLite thread, inside the group transaction: delete these records; returns what was deleted, as
    (device, records, bytes) per device.

    Counted by one aggregate over the same rows just before the DELETE (same transaction, same snapshot), so an id
    already evicted, expired or quarantined is not counted twice, and there is no ``RETURNING`` row per record:
    each row fetched is a step of the statement, and the sqlite3 module gives up and takes back the GIL per step."""
    runs = id_runs(ids)
    if not runs:
        return []
    if len(runs) <= _RUNS_PER_STATEMENT:
        where = _where_ranges(len(runs))
        params: tuple[Any, ...] = tuple(bound for run in runs for bound in run)
    else:
        where = f"id IN {_IDS}"
        params = (json.dumps([rid for first, last in runs for rid in range(first, last + 1)]),)
    gone = conn.execute(_DELETED_BY_DEVICE.format(where), params).fetchall()
    conn.execute(f"DELETE FROM records WHERE {where}", params)
    return gone


def _statvfs_free(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


class Upkeep:
    """Mixed into :class:`~edgegw.outbox.store.Outbox`; runs only in its writer task."""

    _settings: OutboxSettings
    _writer: aiosqlite.Connection
    _log: structlog.typing.FilteringBoundLogger
    _usage: dict[str, list[int]]
    _count: int
    _bytes: int
    _byte_limit: int
    _disk_limited: bool
    _disk_checked: float
    _vacuum_due: bool
    _to_delete: set[int]
    _pending: list[tuple[Any, tuple[Any, ...], Any]]
    _quarantine_usage: dict[bytes, list[int]]  # device id as stored -> [rows, bytes] in the quarantine table
    _quarantine_rows: int
    _quarantine_bytes: int
    _quarantine_full_logged: float
    quarantine_dropped: dict[str, int]
    vacuumed_pages: int
    free_bytes: Callable[[Path], int]

    async def _delete(self, sql: str, params: tuple[Any, ...], into: dict[str, int] | None = None) -> int:
        """Run a DELETE ... RETURNING device, size and take the rows off the usage counts."""
        async with self._writer.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return self._forget(rows, into)

    def _forget(self, rows: Any, into: dict[str, int] | None = None) -> int:
        """Take deleted rows ((device, size) from ``_GONE``) off the usage counts."""
        usage = self._usage
        for raw, size in rows:
            device = device_key(raw)
            u = usage.get(device)
            if u is not None:
                u[0] -= 1
                u[1] -= size
                if u[0] <= 0:
                    del usage[device]
            self._count -= 1
            self._bytes -= size
            if into is not None:
                into[device] = into.get(device, 0) + 1
        return len(rows)

    def _forget_counted(self, gone: list[tuple[bytes, int, int]]) -> None:
        """Take deleted records ((device, records, bytes) from :func:`delete_acknowledged`) off the usage counts."""
        usage = self._usage
        for raw, count, size in gone:
            size = size or 0
            device = device_key(raw)
            u = usage.get(device)
            if u is not None:
                u[0] -= count
                u[1] -= size
                if u[0] <= 0:
                    del usage[device]
            self._count -= count
            self._bytes -= size

    async def _expire(self, expired: dict[str, int]) -> None:
        """Delete records older than ``ttl``. Ids follow arrival, so the oldest ids are looked at first (a clock
        that jumps back can delay expiry, never expire young records)."""
        cutoff = time.time() - self._settings.ttl
        for _ in range(10):
            n = await self._delete(
                f"DELETE FROM records WHERE id IN (SELECT id FROM records ORDER BY id LIMIT {_EXPIRE_BATCH})"
                f" AND received_at < ? {_GONE}", (cutoff,), expired)
            if n < _EXPIRE_BATCH:
                return

    async def _evict(self, dropped: dict[str, int]) -> None:
        """drop-oldest: delete the oldest, lowest-priority records of the device holding the most (in the
        dimension that is over) until the outbox is within its limits."""
        s = self._settings
        skip: set[str] = set()
        for _ in range(256):
            over_records = self._count - s.max_records
            over_bytes = self._bytes - self._byte_limit
            if over_records <= 0 and over_bytes <= 0:
                return
            dim = 1 if over_bytes > 0 else 0
            top = heapq.nlargest(2, ((u[dim], d) for d, u in self._usage.items() if d not in skip))
            if not top:
                return
            device = top[0][1]
            runner_up = top[1][0] if len(top) > 1 else 0
            held, held_bytes = self._usage[device]
            if dim == 0:  # enough to fix the excess, or to bring it down to the next heaviest device
                want = min(over_records, held - runner_up + 1)
            else:
                avg = max(1, held_bytes // max(1, held))
                want = min(-(-over_bytes // avg), 1 + (held_bytes - runner_up) // avg)  # ceil: no overshoot
            want = max(1, min(want, 4096))
            async with self._writer.execute(
                    "SELECT id FROM records WHERE device_id=? ORDER BY priority, id LIMIT ?",
                    (device, want + len(self._to_delete))) as cur:
                on_disk = [r[0] for r in await cur.fetchall()]
            ids = [rid for rid in on_disk if rid not in self._to_delete][:want]
            if not ids:
                if on_disk or any(r.device_id == device for r, _, _ in self._pending):
                    # The rest of what it holds awaits commit (evicted once written, if still over) or an
                    # acknowledged delete: the excess is its own, never made up for with a neighbour's records.
                    return
                skip.add(device)  # nothing of it can be found by its id (a damaged row): look at the next one
                continue
            await self._delete(f"DELETE FROM records WHERE id IN {_IDS} {_GONE}", (json.dumps(ids),), dropped)

    async def _move_to_quarantine(self, quarantine: list[tuple[int, str]], dropped: dict[str, int]) -> set[int]:
        """Copy these records (id, reason) into the quarantine table, then trim it while it is over
        ``quarantine_max_records`` / ``quarantine_max_bytes``; returns the ids to delete from ``records``."""
        moved = dict(quarantine)  # one move per id (a record may be asked twice): the last reason, as REPLACE keeps
        ids = json.dumps(list(moved))
        before = await self._quarantined(ids)  # a row being replaced (never expected) is not counted twice
        await self._writer.executemany(
            "INSERT OR REPLACE INTO quarantine SELECT id, coalesce(device_id, ''), coalesce(topic, ''),"
            " coalesce(payload, x''), coalesce(qos, 0), coalesce(received_at, 0), properties, ?, ?"
            " FROM records WHERE id=?",
            [(reason, time.time(), rid) for rid, reason in moved.items()])
        after = await self._quarantined(ids)  # records already acknowledged and deleted were not copied
        for raw in before.keys() | after.keys():
            new, old = after.get(raw, (0, 0)), before.get(raw, (0, 0))
            self._quarantine_count(raw, new[0] - old[0], new[1] - old[1])
        await self._trim_quarantine(dropped)
        return set(moved)

    async def _quarantined(self, ids: str) -> dict[bytes, list[int]]:
        """[rows, bytes] per device in the quarantine table among these ids (a JSON list)."""
        counts: dict[bytes, list[int]] = {}
        async with self._writer.execute(QUARANTINE_BY_DEVICE.format(f"WHERE id IN {_IDS}"), (ids,)) as cur:
            for raw, rows, size in await cur.fetchall():
                entry = counts.setdefault(bytes(raw), [0, 0])
                entry[0] += rows
                entry[1] += size or 0
        return counts

    def _quarantine_count(self, raw: bytes, rows: int, size: int) -> None:
        """Add (or with negative numbers take off) quarantined rows of this device to the counts in memory."""
        u = self._quarantine_usage.setdefault(raw, [0, 0])
        u[0] += rows
        u[1] += size
        if u[0] <= 0:
            del self._quarantine_usage[raw]
        self._quarantine_rows += rows
        self._quarantine_bytes += size

    async def _trim_quarantine(self, dropped: dict[str, int]) -> None:
        """Past ``quarantine_max_records`` or ``quarantine_max_bytes``: delete the oldest quarantined rows (lowest
        ids: ids follow arrival) of the device holding the most (in the dimension that is over), as drop-oldest
        does for records. A device the upstream keeps refusing would otherwise fill the disk, and eat the disk
        guard's room for every device; the oldest rows of the whole table would let it delete every other device's
        evidence (one device must never evict another's data beyond its fair share)."""
        s = self._settings
        for _ in range(256):
            usage = self._quarantine_usage  # a recount below replaces it
            over_rows = self._quarantine_rows - s.quarantine_max_records
            over_bytes = self._quarantine_bytes - s.quarantine_max_bytes
            if over_rows <= 0 and over_bytes <= 0:
                return
            dim = 1 if over_bytes > 0 else 0
            top = heapq.nlargest(2, ((u[dim], raw) for raw, u in usage.items()))
            if not top:  # the totals say over, yet no device holds a row (never expected): take the file's counts
                self._set_quarantine_counts(await count_quarantine(self._writer))
                if not self._quarantine_usage:
                    return
                continue
            raw = top[0][1]
            runner_up = top[1][0] if len(top) > 1 else 0
            held, held_bytes = usage[raw]
            if dim == 0:  # enough to fix the excess, or to bring it down to the next heaviest device
                want = min(over_rows, held - runner_up + 1)
            else:
                avg = max(1, held_bytes // max(1, held))
                want = min(-(-over_bytes // avg), 1 + (held_bytes - runner_up) // avg)  # ceil: no overshoot
            want = max(1, min(want, _QUARANTINE_BATCH))
            sizes = await self._delete_quarantined(raw, want)
            if not sizes:  # the counts held rows of it the file does not (never expected): take the file's counts
                self._set_quarantine_counts(await count_quarantine(self._writer))
                continue
            self._quarantine_count(raw, -len(sizes), -sum(sizes))
            device = device_key(raw)
            dropped[device] = dropped.get(device, 0) + len(sizes)

    async def _delete_quarantined(self, raw: bytes, n: int) -> list[int]:
        """Delete the ``n`` oldest quarantined rows of this device (its id's bytes as stored); returns their sizes.
        Through the ``quarantine_by_device`` index; a device id not stored as text (a damaged row, never written
        so by the gateway) is only found by a scan."""
        for where in ("device_id = CAST(? AS TEXT)", "CAST(device_id AS BLOB) = ?"):
            async with self._writer.execute(
                    f"DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine WHERE {where} ORDER BY id LIMIT ?)"
                    f" RETURNING {QUARANTINE_SIZE}", (raw, n)) as cur:
                sizes = [int(row[0]) for row in await cur.fetchall()]
            if sizes:
                return sizes
        return []

    def _set_quarantine_counts(self, counts: dict[bytes, list[int]]) -> None:
        self._quarantine_usage = counts
        self._quarantine_rows = sum(u[0] for u in counts.values())
        self._quarantine_bytes = sum(u[1] for u in counts.values())

    def _log_quarantine_full(self, dropped: dict[str, int]) -> None:
        """After a commit that deleted quarantined rows: one warning per _QUARANTINE_LOG_EVERY at most (the counts
        are in ``quarantine_dropped`` either way)."""
        now = time.monotonic()
        if now - self._quarantine_full_logged >= _QUARANTINE_LOG_EVERY:
            self._quarantine_full_logged = now
            s = self._settings
            self._log.warning("outbox.quarantine_full", device_id=max(dropped, key=dropped.__getitem__),
                              dropped=sum(dropped.values()), quarantine_dropped=sum(self.quarantine_dropped.values()),
                              rows=self._quarantine_rows, bytes=self._quarantine_bytes,
                              max_records=s.quarantine_max_records, max_bytes=s.quarantine_max_bytes,
                              action="the oldest quarantined rows of the device holding the most were deleted")

    async def _recount(self) -> None:
        """After a failed transaction: usage from the file plus what awaits commit."""
        usage: dict[str, list[int]] = {}
        try:
            async with self._writer.execute(
                    "SELECT CAST(device_id AS BLOB), count(*), sum(size) FROM records GROUP BY device_id") as cur:
                for raw, count, size in await cur.fetchall():
                    u = usage.setdefault(device_key(raw), [0, 0])
                    u[0] += count
                    u[1] += size or 0
            quarantine = await count_quarantine(self._writer)
        except sqlite3.Error:
            return  # keep the old counts; the next failure or success corrects them
        self._set_quarantine_counts(quarantine)  # the failed transaction's moves and deletes were rolled back
        for record, row, _ in self._pending:
            u = usage.setdefault(record.device_id, [0, 0])
            u[0] += 1
            u[1] += row[-1]
        self._usage = usage
        self._count = sum(u[0] for u in usage.values())
        self._bytes = sum(u[1] for u in usage.values())

    async def _freelist_bytes(self) -> int:
        async with self._writer.execute("SELECT * FROM pragma_freelist_count, pragma_page_size") as cur:
            row = await cur.fetchone()
        return int(row[0]) * int(row[1]) if row else 0

    def _refresh_disk_limit(self, freelist_bytes: int) -> None:
        """The disk headroom guard: the outbox may grow by half of what is free beyond ``min_free_bytes`` (half:
        pages, indexes and the WAL cost more than the bytes we count), plus the free pages inside the file."""
        self._disk_checked = time.monotonic()
        try:
            free = self.free_bytes(self._settings.path.parent)
        except OSError:
            return
        room = free - self._settings.min_free_bytes + freelist_bytes
        disk_limit = max(0, self._bytes + room // 2)
        self._disk_limited = disk_limit < self._settings.max_bytes
        self._byte_limit = min(self._settings.max_bytes, disk_limit)

    async def _vacuum_step(self) -> bool:
        """When idle: return free pages to the filesystem, a step at a time. True to be called again."""
        try:
            async with self._writer.execute("PRAGMA freelist_count") as cur:
                free_pages = int((await cur.fetchone())[0])  # type: ignore[index]
            if free_pages < _VACUUM_MIN_PAGES:
                self._vacuum_due = False
                await self._writer.execute("COMMIT")
                # Idle and compact: shrink the WAL too (waits at most 50 ms for a reader to finish).
                await self._writer.execute("PRAGMA busy_timeout=50")
                async with self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                    await cur.fetchall()
                await self._writer.execute(f"PRAGMA busy_timeout={round(self._settings.lock_timeout * 1000)}")
                await self._writer.execute("BEGIN")
                return False
            await self._writer.execute("COMMIT")
            # executescript steps the pragma to completion (execute() stops after one page, one row)
            await self._writer.executescript(f"PRAGMA incremental_vacuum({_VACUUM_STEP_PAGES});")
            async with self._writer.execute("PRAGMA wal_checkpoint(PASSIVE)") as cur:
                await cur.fetchall()  # in WAL mode the file is truncated when the checkpoint copies the commit
            await self._writer.execute("BEGIN")
        except sqlite3.Error as exc:
            self._log.warning("outbox.vacuum_failed", error=str(exc))
            self._vacuum_due = False
            try:
                await self._writer.execute("BEGIN")
            except sqlite3.Error:
                pass
            return False
        self.vacuumed_pages += min(free_pages, _VACUUM_STEP_PAGES)
        return True  # look again: another step, or the final WAL truncation
