"""The durable outbox: every accepted device message is a row in SQLite (WAL) until the upstream acknowledged it.

Group commit: :meth:`Outbox.submit` is synchronous and cheap (no await, no task): it gives the record its id and
queues it. One writer task (:meth:`Outbox.run`) lingers up to ``commit_window`` or until ``commit_max_records`` are
queued, writes the whole group in one transaction, and only then tells the submitters: each record's ``on_commit``
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
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from edgegw.config import OutboxSettings
from edgegw.errors import OutboxError
from edgegw.outbox._record import (
    MAX_PRIORITY,
    PRIORITY_ALARM,
    PRIORITY_BULK,
    PRIORITY_TELEMETRY,
    FullReason,
    OutboxFull,
    Record,
    decode_row,
    record_size,
)
from edgegw.outbox._schema import RECORD_OVERHEAD, SCHEMA_VERSION, Opened, open_database
from edgegw.outbox._upkeep import (
    _DISK_CHECK_EVERY,
    _EXPIRE_EVERY,
    Upkeep,
    _statvfs_free,
    delete_acknowledged,
)
from edgegw.tracing import trace_id_of

__all__ = ["CommitAcker", "CommitCallback", "Outbox", "OutboxFull", "Record", "RECORD_OVERHEAD", "SCHEMA_VERSION",
           "PRIORITY_BULK", "PRIORITY_TELEMETRY", "PRIORITY_ALARM", "MAX_PRIORITY", "record_size"]

CommitCallback = Callable[[bool], None]
"""Called once with True after the record's transaction committed, or False if the commit failed."""


class CommitAcker(Protocol):
    """Who submitted records with ``acker=``: told once per group commit about all of its records in the group."""

    def records_committed(self, tokens: list[int], ok: bool) -> None:
        """``tokens`` (as given to :meth:`Outbox.submit`, in submit order) of this acker's records in the group:
        committed if ``ok``, else the transaction failed and they are not stored."""


_Acks = dict[CommitAcker, tuple[list[int], list[int]]]
"""Per acker, the ids of its records awaiting commit and their tokens (two lists in step, ids ascending)."""
_Pending = tuple[Record, tuple[Any, ...], CommitCallback | None]
"""A record awaiting commit: the record, its ``_INSERT`` parameters (the size last), its callback."""

FAIR_SHARE_FROM = 0.9
"""Past this fill (records or bytes), a device holding more than its fair share (limit / devices) is refused or
evicted first, so the last 10 % stays for the quiet devices."""
ROOM_AGAIN_BELOW = 0.85
""":meth:`Outbox.when_room` callbacks run once the fill is below this (hysteresis below FAIR_SHARE_FROM)."""
_VACUUM_IDLE = 0.5
"""Seconds without work before the writer gives free pages back to the filesystem."""
_QUIET = 0.001
"""A group of records is committed before ``commit_window_ms`` is over once no record came for this long (and a
loop turn): devices send what their in-flight window allows and then wait for acknowledgements that only this
commit can give, so lingering on adds latency and no records (docs/BENCHMARKS.md "Device-facing hot path")."""
_TRACE_IDS_LOGGED = 20
"""At most this many trace ids of a failed group commit are logged (``outbox.commit_failed``)."""
_INSERT = ("INSERT INTO records (id, device_id, topic, payload, qos, received_at, properties, priority, size)"
           " VALUES (?,?,?,?,?,?,?,?,?)")
_COLUMNS = "id, device_id, topic, payload, qos, received_at, properties, priority"
_ROWS_PER_INSERT = 100  # 900 parameters: under SQLite's old limit of 999


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_rows(n: int) -> str:
    """One INSERT of ``n`` rows. One statement per group instead of executemany's step per row: the SQLite thread
    gives up and takes back the GIL once per step, and under load every take waits for the event loop."""
    return _INSERT + ",(?,?,?,?,?,?,?,?,?)" * (n - 1)


class Outbox(Upkeep):
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
        self.vacuumed_pages = 0

    # --- opening ---------------------------------------------------------------------------------------------

    @classmethod
    async def open(cls, settings: OutboxSettings) -> Outbox:
        path = settings.path
        _check_writable(path)
        opened = await open_database(path, settings.synchronous)
        outbox = cls(settings, opened)
        outbox._refresh_disk_limit(await outbox._freelist_bytes())
        outbox._log.info("outbox.opened", path=str(path), depth=outbox._count, bytes=outbox._bytes,
                         next_id=opened.next_id, synchronous=settings.synchronous, devices=len(outbox._usage),
                         byte_limit=outbox._byte_limit, full_policy=settings.full_policy)
        return outbox

    # --- the hot path (synchronous, no await) ---------------------------------------------------------------

    def submit(self, device_id: str, topic: str, payload: bytes, qos: int,
               on_commit: CommitCallback | None = None, properties: bytes | None = None,
               priority: int = PRIORITY_TELEMETRY, *, acker: CommitAcker | None = None, token: int = 0) -> Record:
        """Queue a record for the next group commit. Raises :class:`OutboxFull` if it may not be stored.

        Once the group holding it committed (or failed), ``on_commit`` is called for this record, and ``acker``'s
        :meth:`~CommitAcker.records_committed` once for all of its records in the group, ``token`` among them: a
        device connection acknowledges a whole group at once instead of running a callback per message."""
        if self._stopping:
            raise OutboxError("outbox is closing")
        if not 0 <= priority <= MAX_PRIORITY:
            raise ValueError(f"priority must be 0..{MAX_PRIORITY}, got {priority}")
        size = len(payload) + len(topic) + len(device_id) + (len(properties) if properties else 0) + RECORD_OVERHEAD
        usage = self._usage.get(device_id)
        if self._reject_new:
            if (self._count + 1 > FAIR_SHARE_FROM * self._settings.max_records
                    or self._bytes + size > FAIR_SHARE_FROM * self._byte_limit):
                refusal = self._refusal(device_id, usage, size)
                if refusal is not None:
                    self._refuse(device_id, *refusal)
        elif size > self._byte_limit:
            self._refuse(device_id, "disk" if self._disk_limited else "bytes",
                         f"a record of {size} bytes exceeds the limit of {self._byte_limit}")
        rid, now = self._next_id, time.time()
        record = Record(rid, device_id, topic, payload, qos, now, properties, priority)
        self._next_id = rid + 1
        if usage is None:
            self._usage[device_id] = [1, size]
        else:
            usage[0] += 1
            usage[1] += size
        self._count += 1
        self._bytes += size
        # The INSERT's parameters are built here from the arguments: cheaper than from the record's attributes at
        # commit time (both on the event loop).
        self._pending.append((record, (rid, device_id, topic, payload, qos, now, properties, priority, size),
                              on_commit))
        if acker is not None:
            acks = self._acks.get(acker)
            if acks is None:
                self._acks[acker] = ([rid], [token])
            else:
                acks[0].append(rid)
                acks[1].append(token)
        if len(self._pending) == 1:
            self._wake.set()
        elif len(self._pending) >= self._settings.commit_max_records and self._group_full is not None:
            if not self._group_full.done():
                self._group_full.set_result(None)
        return record

    def _refusal(self, device_id: str, usage: list[int] | None, size: int) -> tuple[FullReason, str] | None:
        """reject-new, near the limits: why this record may not be stored, or None if it fits and the device is
        within its fair share."""
        max_records, limit = self._settings.max_records, self._byte_limit
        if self._count + 1 > max_records:
            return "records", f"{self._count} records held, max_records is {max_records}"
        if self._bytes + size > limit:
            return ("disk" if self._disk_limited else "bytes"), f"{self._bytes} + {size} bytes exceeds {limit}"
        devices = len(self._usage) + (usage is None)
        held, held_bytes = usage if usage is not None else (0, 0)
        if held + 1 > max_records / devices and self._count + 1 > FAIR_SHARE_FROM * max_records:
            return "device_share", f"holds {held} of {self._count} records ({devices} devices)"
        if held_bytes + size > limit / devices and self._bytes + size > FAIR_SHARE_FROM * limit:
            return "device_share", f"holds {held_bytes} of {self._bytes} bytes ({devices} devices)"
        return None

    def _refuse(self, device_id: str, reason: FullReason, detail: str) -> None:
        self.rejected[device_id] = self.rejected.get(device_id, 0) + 1
        self._log_full(reason, device_id)
        raise OutboxFull(device_id, reason, detail)

    def _log_full(self, reason: str, device_id: str) -> None:
        now = time.monotonic()
        if now - self._full_logged >= 10.0:  # one line per 10 s while full, never one per message
            self._full_logged = now
            self._log.warning("outbox.full", reason=reason, device_id=device_id, policy=self._settings.full_policy,
                              records=self._count, bytes=self._bytes, byte_limit=self._byte_limit,
                              dropped=sum(self.dropped.values()), rejected=sum(self.rejected.values()))

    def has_room(self, device_id: str, size: int = RECORD_OVERHEAD) -> bool:
        """Would :meth:`submit` accept a record of ``size`` bytes from this device now? (No side effects.)"""
        if not self._reject_new:
            return size <= self._byte_limit
        return self._refusal(device_id, self._usage.get(device_id), size) is None

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once (from the writer task) when the fill drops below ROOM_AGAIN_BELOW (soon, from
        the loop, if it already is)."""
        if self._count < ROOM_AGAIN_BELOW * self._settings.max_records \
                and self._bytes < ROOM_AGAIN_BELOW * self._byte_limit:
            asyncio.get_running_loop().call_soon(callback)
            return
        self._room_waiters.append(callback)

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
        return self._count

    @property
    def bytes_held(self) -> int:
        return self._bytes

    @property
    def byte_limit(self) -> int:
        """``max_bytes``, or less when the disk headroom guard applies."""
        return self._byte_limit

    def usage(self, device_id: str) -> tuple[int, int]:
        """(records, bytes) this device holds in the outbox."""
        u = self._usage.get(device_id)
        return (u[0], u[1]) if u else (0, 0)

    # --- the group-commit writer ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Commit groups until :meth:`close` asks to stop and everything queued is on disk."""
        loop = asyncio.get_running_loop()
        window = self._settings.commit_window_ms / 1000
        while True:
            if self._settings.ttl > 0 and not self._wake.is_set():
                timeout = max(0.0, self._expire_due - time.monotonic())
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.05))
                except TimeoutError:
                    pass
            else:
                await self._wake.wait()
            self._wake.clear()
            # Deletes wait for the window too: a group of them is one transaction (one fsync) instead of one per
            # batch of upstream PUBACKs; a delete committed late only means a resend after a crash.
            if (self._pending or self._to_delete) and window > 0 and not self._stopping and \
                    len(self._pending) < self._settings.commit_max_records:
                self._group_full = loop.create_future()
                await self._linger(loop, window)
                self._group_full = None
            await self._commit_group()
            if self._pending or self._to_delete or self._to_quarantine:
                self._wake.set()
            elif self._stopping:
                async with self._committed:
                    self._committed.notify_all()  # waiters see _stopping and return
                return
            elif self._vacuum_due:
                # Free pages go back only once the writer has been idle for a moment: under load a step (freelist
                # check, WAL checkpoint and its fsyncs) after every group of deletes would cost as much as the group.
                try:
                    await asyncio.wait_for(self._wake.wait(), _VACUUM_IDLE)
                except TimeoutError:
                    if await self._vacuum_step():
                        self._wake.set()

    async def _linger(self, loop: asyncio.AbstractEventLoop, window: float) -> None:
        """Wait for more records: until ``window`` is over, the group is full, or (records only) a quiet spell."""
        full = self._group_full
        assert full is not None
        deadline = loop.time() + window
        seen = len(self._pending)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            # Deletes alone have nobody waiting for them: they take the whole window (fewer fsyncs).
            await asyncio.wait((full,), timeout=min(remaining, _QUIET) if seen else remaining)
            if full.done() or len(self._pending) == seen:
                return
            seen = len(self._pending)

    def _take_acks(self, group: list[_Pending]) -> _Acks:
        """The acker tokens of the records in ``group`` (just taken off the front of the queue)."""
        acks = self._acks
        if not acks:
            return {}  # not ``acks``: records submitted during this commit go into self._acks, for the next group
        if not self._pending:  # the common case: the group is the whole queue
            self._acks = {}
            return acks
        # The group is a prefix of the queue, whose ids ascend: each acker's first records up to the group's last id.
        last = group[-1][0].id
        taken: _Acks = {}
        for acker, (ids, tokens) in acks.items():
            k = bisect.bisect_right(ids, last)
            if k:
                taken[acker] = (ids[:k], tokens[:k])
                del ids[:k], tokens[:k]
        self._acks = {acker: entry for acker, entry in acks.items() if entry[0]}
        return taken

    async def _commit_group(self) -> None:
        group = self._pending[: self._settings.commit_max_records]
        del self._pending[: len(group)]
        acks = self._take_acks(group)
        deletes = self._to_delete
        self._to_delete = set()
        self._deleting = deletes
        quarantine = self._to_quarantine
        self._to_quarantine = []
        now = time.monotonic()
        expire = self._settings.ttl > 0 and now >= self._expire_due
        if not (group or deletes or quarantine or expire):
            return
        if expire:
            self._expire_due = now + _EXPIRE_EVERY
        ok = True
        expired: dict[str, int] = {}
        dropped: dict[str, int] = {}
        # The group's columns in one C-level pass instead of a comprehension (or a loop) over the records for each.
        records, rows, on_commits = zip(*group) if group else ((), (), ())
        # The common group (inserts and deletes, no upkeep due): one hop to the SQLite thread for the whole
        # transaction instead of one per statement (each hop is a thread wake-up and a GIL hand-off).
        fast = not (quarantine or expire or now - self._disk_checked >= _DISK_CHECK_EVERY
                    or (not self._reject_new and (self._count > self._settings.max_records
                                                  or self._bytes > self._byte_limit)))
        try:
            if fast:
                self._forget_counted(await self._writer._execute(  # aiosqlite is pinned exactly (pyproject.toml)
                    self._write_group, deletes, rows))
            else:
                await self._commit_slow(group, deletes, quarantine, expire, now, expired, dropped)
        except sqlite3.Error as exc:
            ok = False
            self._log.error("outbox.commit_failed", path=str(self._settings.path), error=str(exc),
                            records=len(group), deletes=len(deletes),
                            trace_ids=[t for t in (trace_id_of(r.properties) for r, _, _ in group[:_TRACE_IDS_LOGGED])
                                       if t is not None])
            for statement in ("ROLLBACK", "BEGIN"):
                try:
                    await self._writer.execute(statement)
                except sqlite3.Error:
                    pass
            # Deletes are retried with the next group; records are not: their devices were not acknowledged and
            # will resend.
            self._to_delete |= deletes - {rid for rid, _ in quarantine}
            self._to_quarantine = quarantine + self._to_quarantine
            await self._recount()
        finally:
            self._deleting = set()
        if ok:
            self.commits += 1
            self.committed_records += len(group)
            self.quarantined += len(quarantine)
            if deletes or expired or dropped:
                self._vacuum_due = True
            for counts, into in ((expired, self.expired), (dropped, self.dropped)):
                for device, n in counts.items():
                    into[device] = into.get(device, 0) + n
            if expired:
                self._log.warning("outbox.expired", records=sum(expired.values()), devices=len(expired),
                                  ttl=self._settings.ttl)
            if dropped:
                self._log_full("evicted", max(dropped, key=dropped.__getitem__))
            if group:
                before = self._committed_id
                self._committed_id = group[-1][0].id
        if on_commits.count(None) != len(on_commits):  # device connections use ``acks``: often no callback at all
            for record, callback in zip(records, on_commits):
                if callback is not None:
                    try:
                        callback(ok)
                    except Exception:  # one broken connection must not stop the writer
                        self._log.exception("outbox.callback_failed", record_id=record.id)
        for acker, (ids, tokens) in acks.items():
            try:
                acker.records_committed(tokens, ok)
            except Exception:  # noqa: BLE001 - one broken connection must not stop the writer
                self._log.exception("outbox.callback_failed", record_id=ids[0], records=len(ids))
        if ok and group:
            if self._handoffs:
                handed = list(records)
                for handoff in list(self._handoffs):
                    try:
                        handoff(before, handed)
                    except Exception:  # the uplink's problem must not stop the writer
                        self._log.exception("outbox.callback_failed", callback="handoff")
            for listener in list(self._listeners):
                listener()
            async with self._committed:
                self._committed.notify_all()
        if self._decongested and len(self._pending) < self._settings.max_pending // 2:
            callbacks, self._decongested = self._decongested, []
            for cb in callbacks:
                cb()
        if self._room_waiters and self._count < ROOM_AGAIN_BELOW * self._settings.max_records \
                and self._bytes < ROOM_AGAIN_BELOW * self._byte_limit:
            callbacks, self._room_waiters = self._room_waiters, []
            for cb in callbacks:
                try:
                    cb()
                except Exception:
                    self._log.exception("outbox.callback_failed", callback="when_room")

    async def _commit_slow(self, group: list[_Pending], deletes: set[int],
                           quarantine: list[tuple[int, str]], expire: bool, now: float, expired: dict[str, int],
                           dropped: dict[str, int]) -> None:
        """A group transaction with upkeep (quarantine, TTL sweep, disk check, eviction): statement by statement."""
        if quarantine:
            await self._writer.executemany(
                "INSERT OR REPLACE INTO quarantine SELECT id, coalesce(device_id, ''), coalesce(topic, ''),"
                " coalesce(payload, x''), coalesce(qos, 0), coalesce(received_at, 0), properties, ?, ?"
                " FROM records WHERE id=?",
                [(reason, time.time(), rid) for rid, reason in quarantine])
            deletes = deletes | {rid for rid, _ in quarantine}
        if deletes:
            conn = self._writer._conn
            self._forget_counted(await self._writer._execute(delete_acknowledged, conn, deletes))
        if group:
            await self._writer.executemany(_INSERT, [row for _, row, _ in group])
        if expire:
            await self._expire(expired)
        if now - self._disk_checked >= _DISK_CHECK_EVERY:
            self._refresh_disk_limit(await self._freelist_bytes())
        if not self._reject_new and (self._count > self._settings.max_records or self._bytes > self._byte_limit):
            await self._evict(dropped)
        await self._writer.execute("COMMIT")
        await self._writer.execute("BEGIN")

    def _write_group(self, deletes: set[int], rows: Sequence[tuple[Any, ...]]) -> list[tuple[bytes, int, int]]:
        """On the SQLite thread: a whole common group transaction; returns what was deleted, per device."""
        conn = self._writer._conn
        gone = delete_acknowledged(conn, deletes)
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            chunk = rows[start:start + _ROWS_PER_INSERT]
            conn.execute(_insert_rows(len(chunk)), [value for row in chunk for value in row])
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        return gone

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
        return self._decode_rows(rows, gone, limit)

    async def fetch_backlog(self, priority: int, after_id: int, upto_id: int, limit: int) -> list[Record]:
        """Like :meth:`fetch_after` within one priority class and ids in (``after_id``, ``upto_id``]."""
        gone = self._settled_ids()
        # The class is a literal so SQLite can use the partial index (priority != 1); the default class is read
        # along the primary key.
        async with self._reader.execute(
            f"SELECT {_COLUMNS} FROM records"
            f"{'' if priority == 1 else ' INDEXED BY records_by_priority'}"
            f" WHERE priority = {int(priority)}{'' if priority == 1 else ' AND priority != 1'} AND id > ? AND id <= ?"
            " ORDER BY id LIMIT ?", (after_id, upto_id, limit + len(gone))
        ) as cur:
            rows = await cur.fetchall()
        gone |= self._settled_ids()
        return self._decode_rows(rows, gone, limit)

    def add_commit_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously, from the writer) after every commit that added records."""
        self._listeners.append(callback)

    def remove_commit_listener(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def add_handoff(self, callback: Callable[[int, list[Record]], None]) -> None:
        """Hand every committed group to ``callback(before, records)`` (synchronously, from the writer, after the
        commit): ``records`` in id order, and every id up to ``before`` was committed (or dropped) by earlier
        groups. So a reader that has seen everything up to ``before`` can take ``records`` without a query."""
        self._handoffs.append(callback)

    def remove_handoff(self, callback: Callable[[int, list[Record]], None]) -> None:
        if callback in self._handoffs:
            self._handoffs.remove(callback)

    @property
    def pending_count(self) -> int:
        """Records submitted and not committed yet."""
        return len(self._pending)

    def _decode_rows(self, rows: Iterable[Any], gone: set[int], limit: int) -> list[Record]:
        out: list[Record] = []
        for row in rows:
            rid = row[0]
            if rid in gone:
                continue
            try:
                out.append(decode_row(row))
            except (ValueError, TypeError, AttributeError) as exc:  # a damaged row: set it aside, keep going
                self._log.error("outbox.record_undecodable", record_id=rid, error=str(exc))
                self.quarantine(rid, f"cannot decode record: {exc}")
                continue
            if len(out) >= limit:
                break
        return out

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
        self._log.info("outbox.closed", depth=self._count, commits=self.commits,
                       dropped=sum(self.dropped.values()), expired=sum(self.expired.values()),
                       rejected=sum(self.rejected.values()), quarantined=self.quarantined)


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
