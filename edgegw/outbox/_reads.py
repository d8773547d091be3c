"""Reads for the uplink, on the second (read-only) connection, which in WAL mode sees only committed transactions:
pages of records (live and per priority class for the backfill), the writer's commit listeners and handoffs, and
undecodable rows set aside for quarantine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection, Iterable
from typing import Any

import aiosqlite

from edgegw.outbox._admission import Admission
from edgegw.outbox._record import MAX_PRIORITY, Record, decode_row

_COLUMNS = "id, device_id, topic, payload, qos, received_at, properties, priority"
_UNCLASSED = ("SELECT id, priority FROM records INDEXED BY records_by_device"  # covers both: the table is not read
              f" WHERE NOT coalesce(priority BETWEEN 0 AND {MAX_PRIORITY} AND priority = CAST(priority AS INTEGER), 0)")
"""Rows no backlog class (``priority = N``, N in 0..MAX_PRIORITY) matches: out of range, fractional, text, NULL."""


class UplinkReads(Admission):
    """Mixed into :class:`~edgegw.outbox.store.Outbox`; called by the uplink, on the event loop."""

    _reader: aiosqlite.Connection
    _deleting: set[int]
    _committed: asyncio.Condition
    _committed_id: int
    _listeners: list[Callable[[], None]]
    _handoffs: list[Callable[[int, list[Record]], None]]

    # --- reads for the uplink -------------------------------------------------------------------------------

    async def fetch_after(self, after_id: int, limit: int) -> list[Record]:
        """Up to ``limit`` committed records with id > ``after_id``, oldest first, minus those being deleted."""
        return await self._read_page(f"SELECT {_COLUMNS} FROM records WHERE id > ? ORDER BY id LIMIT ?",
                                     after_id, (), limit)

    async def fetch_backlog(self, priority: int, after_id: int, upto_id: int, limit: int,
                            skip_devices: Collection[str] = ()) -> list[Record]:
        """Like :meth:`fetch_after` within one priority class and ids in (``after_id``, ``upto_id``], without the
        records of ``skip_devices`` (the backfill's devices let go in this pass: their rows would be decoded on the
        event loop only to be thrown away, a whole class of them for one device held by its pace)."""
        # The device filter is an uncorrelated subquery (one ephemeral list per query): the plan stays the same
        # walk of the primary key or of records_by_priority, the skipped rows never leave SQLite's thread.
        skip = " AND device_id NOT IN (SELECT value FROM json_each(?))" if skip_devices else ""
        devices = (json.dumps(list(skip_devices)),) if skip_devices else ()
        # The class is a literal so SQLite can use the partial index (priority != 1); the default class is read
        # along the primary key.
        return await self._read_page(
            f"SELECT {_COLUMNS} FROM records"
            f"{'' if priority == 1 else ' INDEXED BY records_by_priority'}"
            f" WHERE priority = {int(priority)}{'' if priority == 1 else ' AND priority != 1'} AND id > ?"
            f" AND id <= ?{skip} ORDER BY id LIMIT ?", after_id, (upto_id, *devices), limit)

    async def _read_page(self, sql: str, after_id: int, params: tuple[Any, ...], limit: int) -> list[Record]:
        """Up to ``limit`` decoded records of ``sql`` (parameters: ``after_id``, ``params``, the LIMIT), minus
        those settled. A delete may commit while the query runs, and the read snapshot may predate it; an id
        acknowledged before the query started is in one of the settled sets at the start, so the union of both ends
        catches it."""
        while True:
            gone = self._settled_ids()
            # Rows being deleted still count against LIMIT in SQL; ask for that many more so a page is never short.
            async with self._reader.execute(sql, (after_id, *params, limit + len(gone))) as cur:
                rows = list(await cur.fetchall())
            gone |= self._settled_ids()
            out = self._decode_rows(rows, gone, limit)
            if out or not rows:
                return out
            # A page of rows all settled or undecodable (now quarantined): an empty answer would tell the uplink
            # there is nothing left up to here (or end the class), and the rows behind would wait for the next
            # connection.
            after_id = rows[-1][0]

    async def quarantine_unclassed(self) -> int:
        """At open: quarantine the rows whose priority is no class (a damaged file). The backlog is read class by
        class (:meth:`fetch_backlog`), so such a row would be neither sent nor quarantined: stranded, counted
        against its device. One scan of the device index (it holds both columns), not of the table."""
        async with self._reader.execute(_UNCLASSED) as cur:
            rows = list(await cur.fetchall())
        for rid, priority in rows:
            reason = f"cannot decode record: priority {priority!r} is not a class 0..{MAX_PRIORITY}"
            self._log.error("outbox.record_undecodable", record_id=rid, error=reason)
            self.quarantine(rid, reason)
        return len(rows)

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
