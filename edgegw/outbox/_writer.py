"""The group-commit writer: one task (:meth:`~edgegw.outbox.store.Outbox.run`) lingers for a group, writes it in
one transaction (inserts, deletes and, when due, the upkeep of :mod:`edgegw.outbox._upkeep`), and only then tells
the submitters (``on_commit`` callbacks, :class:`~edgegw.outbox._admission.CommitAcker`), the uplink (handoffs,
listeners) and the held ingress (``when_decongested``, ``when_room``)."""

from __future__ import annotations

import asyncio
import bisect
import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgegw.outbox._admission import ROOM_AGAIN_BELOW, Admission, _Acks, _Pending
from edgegw.outbox._record import Record
from edgegw.outbox._upkeep import (
    _DISK_CHECK_EVERY,
    _EXPIRE_EVERY,
    Upkeep,
    delete_acknowledged,
)
from edgegw.tracing import trace_id_of

_VACUUM_IDLE = 0.5
"""Seconds without work before the writer gives free pages back to the filesystem."""
_DELETES_WINDOW = 0.005
"""A group of deletes alone (upstream PUBACKs, nobody waiting on them) waits at least this long for more: one
transaction and one fsync for several reads of PUBACKs. Records arriving meanwhile end it within their own
``commit_window_ms``."""
_QUIET = 0.001
"""A group of records is committed before ``commit_window_ms`` is over once no record came for this long (and a
loop turn): devices send what their in-flight window allows and then wait for acknowledgements that only this
commit can give, so lingering on adds latency and no records (docs/BENCHMARKS.md "Device-facing hot path")."""
_RETRY_AFTER_FAILURE = 0.5
"""Seconds the writer waits after a failed group commit before the next one. A failure that lasts (a full disk, an
I/O error) fails every retry at once: without a pause the writer would roll back and recount the whole table in a
tight loop, and its deletes, retried with every group, would keep it from ever returning after stop()."""
_TRACE_IDS_LOGGED = 20
"""At most this many trace ids of a failed group commit are logged (``outbox.commit_failed``)."""
_INSERT = ("INSERT INTO records (id, device_id, topic, payload, qos, received_at, properties, priority, size)"
           " VALUES (?,?,?,?,?,?,?,?,?)")
_ROWS_PER_INSERT = 100  # 900 parameters: under SQLite's old limit of 999


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_rows(n: int) -> str:
    """One INSERT of ``n`` rows. One statement per group instead of executemany's step per row: the SQLite thread
    gives up and takes back the GIL once per step, and under load every take waits for the event loop."""
    return _INSERT + ",(?,?,?,?,?,?,?,?,?)" * (n - 1)



class GroupWriter(Admission, Upkeep):
    """Mixed into :class:`~edgegw.outbox.store.Outbox`; runs only in its writer task."""

    _deleting: set[int]
    _committed: asyncio.Condition
    _committed_id: int
    _expire_due: float
    _listeners: list[Callable[[], None]]
    _handoffs: list[Callable[[int, list[Record]], None]]
    commits: int
    committed_records: int
    expired: dict[str, int]
    quarantined: int

    # --- the group-commit writer ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Commit groups until :meth:`close` asks to stop and everything queued is on disk."""
        loop = asyncio.get_running_loop()
        window = self._settings.commit_window_ms / 1000
        while True:
            due = self._upkeep_due()
            if due is not None and not self._wake.is_set():
                timeout = max(0.0, due - time.monotonic())
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.05))
                except TimeoutError:
                    pass
            else:
                await self._wake.wait()
            self._wake.clear()
            # Records wait at most ``window`` (0 by default: a group is what came in while the previous commit
            # ran, the devices' PUBACKs wait for nothing else). Deletes alone wait _DELETES_WINDOW: a group of them
            # is one transaction (one fsync) instead of one per read of upstream PUBACKs; a delete committed late
            # only means a resend after a crash.
            limit = window if self._pending else max(window, _DELETES_WINDOW)
            if (self._pending or self._to_delete) and limit > 0 and not self._stopping and \
                    len(self._pending) < self._settings.commit_max_records:
                self._group_full = loop.create_future()
                await self._linger(loop, limit, window)
                self._group_full = None
            if not await self._commit_group():
                if self._stopping:
                    self._abandon_settlements()
                else:
                    await self._pause_after_failure(loop)
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

    async def _pause_after_failure(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait _RETRY_AFTER_FAILURE (records submitted meanwhile wait with the retried deletes), or until stop()."""
        deadline = loop.time() + _RETRY_AFTER_FAILURE
        while not self._stopping and (remaining := deadline - loop.time()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                pass

    def _abandon_settlements(self) -> None:
        """Stopping and the commit failed: give up the deletes and quarantine moves it carried, so the writer can
        return. The records stay in the file and are sent again after the restart (at-least-once, as after a
        crash)."""
        if self._to_delete or self._to_quarantine:
            self._log.warning("outbox.deletes_abandoned", deletes=len(self._to_delete),
                              quarantine=len(self._to_quarantine),
                              action="the records stay in the outbox and are sent again after the restart")
        self._to_delete = set()
        self._to_quarantine = []

    def _upkeep_due(self) -> float | None:
        """When (monotonic) the idle writer must wake for upkeep by itself: the TTL sweep, and while the disk guard
        lowers the byte limit, the next free-space reading. Without it a limit lowered by a full disk would stay
        until some commit, and while every record is refused nothing commits (with ``ttl = 0``, for good)."""
        due = self._expire_due if self._settings.ttl > 0 else None
        if self._disk_limited:
            check = self._disk_checked + _DISK_CHECK_EVERY
            due = check if due is None else min(due, check)
        return due

    async def _linger(self, loop: asyncio.AbstractEventLoop, limit: float, window: float) -> None:
        """Wait for more: until ``limit`` is over, the group is full, or (records) a quiet spell. Records that join
        a group of deletes cut its wait to their own ``window`` (submit() ends it at once when that is 0)."""
        full = self._group_full
        assert full is not None
        deadline = loop.time() + limit
        seen = len(self._pending)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            # Deletes alone have nobody waiting for them: they take the whole limit (fewer fsyncs).
            await asyncio.wait((full,), timeout=min(remaining, _QUIET) if seen else remaining)
            if full.done() or len(self._pending) == seen:
                return
            if not seen:
                deadline = min(deadline, loop.time() + window)
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

    async def _commit_group(self) -> bool:
        """One group transaction and what follows it; False if its commit failed."""
        group = self._pending[: self._settings.commit_max_records]
        del self._pending[: len(group)]
        acks = self._take_acks(group)
        deletes = self._to_delete
        self._to_delete = set()
        quarantine = self._to_quarantine
        self._to_quarantine = []
        # Settled while this commit runs (_settled_ids): the uplink's reads must not hand these out again, moves
        # into quarantine included.
        self._deleting = deletes | {rid for rid, _ in quarantine} if quarantine else deletes
        now = time.monotonic()
        expire = self._settings.ttl > 0 and now >= self._expire_due
        disk_due = self._disk_limited and now - self._disk_checked >= _DISK_CHECK_EVERY  # read free space again
        if not (group or deletes or quarantine or expire or disk_due):
            return True
        if expire:
            self._expire_due = now + _EXPIRE_EVERY
        ok = True
        expired: dict[str, int] = {}
        dropped: dict[str, int] = {}
        quarantine_dropped: dict[str, int] = {}
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
                await self._commit_slow(group, deletes, quarantine, expire, now, expired, dropped,
                                        quarantine_dropped)
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
            if deletes or expired or dropped or quarantine_dropped:
                self._vacuum_due = True
            for counts, into in ((expired, self.expired), (dropped, self.dropped),
                                 (quarantine_dropped, self.quarantine_dropped)):
                for device, n in counts.items():
                    into[device] = into.get(device, 0) + n
            if expired:
                self._log.warning("outbox.expired", records=sum(expired.values()), devices=len(expired),
                                  ttl=self._settings.ttl)
            if dropped:
                self._log_full("evicted", max(dropped, key=dropped.__getitem__))
            if quarantine_dropped:
                self._log_quarantine_full(quarantine_dropped)
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
        return ok

    async def _commit_slow(self, group: list[_Pending], deletes: set[int],
                           quarantine: list[tuple[int, str]], expire: bool, now: float, expired: dict[str, int],
                           dropped: dict[str, int], quarantine_dropped: dict[str, int]) -> None:
        """A group transaction with upkeep (quarantine and its caps, TTL sweep, disk check, eviction): statement by
        statement."""
        if quarantine:
            deletes = deletes | await self._move_to_quarantine(quarantine, quarantine_dropped)
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
