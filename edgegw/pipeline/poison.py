"""Where poison messages go: ``quarantine.db`` in the state dir (next to the outbox), one writer, group commit.

Why not the outbox's own ``quarantine`` table: a record can only get there by first being committed to ``records``,
and between that commit and the move the uplink may already read and send it (seen in tests: a message that is not
even JSON went upstream). A second writer on the outbox file would risk the outbox writer's transactions (a busy
snapshot fails its commit, which closes device connections). So the pipeline writes its own file, with the same
columns; ``edgegw quarantine`` shows both, pipeline rows with negative ids (``-rowid``) so one id names one row.

The device is acknowledged after the commit holding its message (the ack-after-commit contract: the message is
durably kept, just not forwarded). ``put`` is synchronous (no await, no task per message). Bounded: at most
``MAX_PENDING`` awaiting commit (past it ``put`` raises OutboxFull and the device is refused or held like for a full
outbox), ``quarantine.max_rows`` and ``quarantine.max_bytes`` kept (past them rows are deleted, counted and logged:
the oldest of the device holding the most rows first, so one device's poison stream cannot push out what every
other device had quarantined).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from edgegw.outbox._record import OutboxFull
from edgegw.pipeline.settings import QuarantineSettings

log = structlog.get_logger("edgegw.pipeline")

FILE = "quarantine.db"
PIPELINE_REASON = "pipeline: "
MAX_PENDING = 10_000
MAX_ROWS = QuarantineSettings().max_rows
MAX_BYTES = QuarantineSettings().max_bytes
"""Defaults of ``[quarantine] max_rows / max_bytes`` (payload + properties bytes)."""
_RECOUNT_EVERY = 60.0
"""Seconds between recounts of the file (``edgegw quarantine purge`` may have deleted rows meanwhile)."""
_SIZE = "length(payload) + coalesce(length(properties), 0)"
SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    received_at REAL NOT NULL,
    properties BLOB,
    reason TEXT NOT NULL,
    quarantined_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS quarantine_device ON quarantine (device_id, id);
"""

_Row = tuple[str, str, bytes, int, float, "bytes | None", str, float]


def fair_shares(counts: list[tuple[str, int]], excess: int) -> list[tuple[str, int]]:
    """How many rows to delete per device to remove ``excess`` rows: from the fullest devices first, levelling
    them down (water-filling), so a device with few rows loses none while another holds more."""
    excess = min(excess, sum(n for _, n in counts))
    if excess <= 0:
        return []

    def above(level: int) -> int:
        return sum(n - level for _, n in counts if n > level)

    lo, hi = 0, max(n for _, n in counts)  # the highest level whose surplus covers the excess: above(lo) >= excess
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if above(mid) >= excess:
            lo = mid
        else:
            hi = mid - 1
    level = lo + 1  # above(level) < excess <= above(lo): trim all to `level`, then one more from some at it
    shares = {d: n - level for d, n in counts if n > level}
    extra = excess - sum(shares.values())
    for d, n in sorted(counts, key=lambda c: -c[1]):
        if extra <= 0:
            break
        if n >= level:
            shares[d] = shares.get(d, 0) + 1
            extra -= 1
    return [(d, n) for d, n in shares.items() if n > 0]


class PoisonStore:
    def __init__(self, path: Path, *, max_rows: int | None = None, max_bytes: int | None = None) -> None:
        self.path = path
        self.max_rows = MAX_ROWS if max_rows is None else max_rows
        self.max_bytes = MAX_BYTES if max_bytes is None else max_bytes
        """Caps; the daemon sets them again on a reload ([quarantine])."""
        self._db: aiosqlite.Connection | None = None
        self._pending: list[tuple[_Row, Callable[[bool], None] | None]] = []
        self._edits: list[tuple[str, tuple[Any, ...], asyncio.Future[bool]]] = []  # operator actions (replay)
        self._wake = asyncio.Event()
        self._stopping = False
        self.stored = 0
        self.evicted = 0
        self.failed = 0
        self._rows = 0
        self._bytes = 0
        self._counted = 0.0

    async def open(self) -> PoisonStore:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")  # as the outbox: acknowledged means on disk, power cuts too
        await db.executescript(SCHEMA)
        self._db = db
        await self._recount()
        return self

    async def _recount(self) -> None:
        assert self._db is not None
        async with self._db.execute(f"SELECT count(*), coalesce(sum({_SIZE}), 0) FROM quarantine") as cur:
            self._rows, self._bytes = await cur.fetchone()  # type: ignore[misc]
        self._counted = time.monotonic()

    def put(self, device_id: str, topic: str, payload: bytes, qos: int, properties: bytes | None, reason: str,
            received_at: float, on_commit: Callable[[bool], None] | None) -> None:
        if self._stopping or self._db is None:
            raise OutboxFull(device_id, "records", "the quarantine is closing")
        if len(self._pending) >= MAX_PENDING:
            raise OutboxFull(device_id, "records", f"{MAX_PENDING} poison messages await commit")
        self._pending.append(((device_id, topic, payload, qos, received_at, properties, reason, time.time()),
                              on_commit))
        self._wake.set()

    async def run(self) -> None:
        """Commit what was put, in groups, until :meth:`stop`; then the rest, and return."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending or self._edits:
                await self._commit()
            if self._stopping:
                return

    async def _commit(self) -> None:
        assert self._db is not None
        group, self._pending = self._pending, []
        edits, self._edits = self._edits, []
        ok = True
        try:
            await self._db.execute("BEGIN IMMEDIATE")
            for sql, params, _ in edits:
                await self._db.execute(sql, params)
            await self._db.executemany(
                "INSERT INTO quarantine (device_id, topic, payload, qos, received_at, properties, reason,"
                " quarantined_at) VALUES (?,?,?,?,?,?,?,?)", [row for row, _ in group])
            if edits or time.monotonic() - self._counted >= _RECOUNT_EVERY:
                await self._recount()
            else:
                self._rows += len(group)
                self._bytes += sum(len(r[2]) + len(r[5] or b"") for r, _ in group)
            await self._evict()
            await self._db.execute("COMMIT")
            self.stored += len(group)
        except Exception as exc:  # noqa: BLE001 - sqlite3.Error, a full disk...: not acknowledged, device resends
            ok = False
            self.failed += len(group)
            log.error("pipeline.quarantine_commit_failed", path=str(self.path), error=str(exc), records=len(group))
            with contextlib.suppress(Exception):  # nothing to roll back if BEGIN itself failed
                await self._db.execute("ROLLBACK")
        for _, _, done in edits:
            if not done.done():
                done.set_result(ok)
        for _, callback in group:
            if callback is not None:
                try:
                    callback(ok)
                except Exception:
                    log.exception("pipeline.callback_failed")

    async def _evict(self) -> None:
        """Past max_rows or max_bytes: delete rows (in this transaction), the oldest of the device holding the most
        rows first. Oldest overall would let one device sending poison push out every other device's rows."""
        assert self._db is not None
        max_rows, max_bytes = self.max_rows, self.max_bytes
        evicted = 0
        while self._rows > max_rows or self._bytes > max_bytes:
            if self._rows > max_rows:
                excess = self._rows - max_rows
            else:  # enough average-sized rows to get under the byte cap (the loop takes more if needed)
                excess = max(1, -(-(self._bytes - max_bytes) * self._rows // max(1, self._bytes)))
            # Only past a cap (poison messages are rare): one indexed GROUP BY, then one DELETE per device trimmed.
            async with self._db.execute("SELECT device_id, count(*) FROM quarantine GROUP BY device_id") as cur:
                counts = [(str(d), int(n)) for d, n in await cur.fetchall()]
            removed = 0
            for device, n in fair_shares(counts, excess):
                async with self._db.execute(
                        f"DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine WHERE device_id = ?"
                        f" ORDER BY id LIMIT ?) RETURNING {_SIZE}", (device, n)) as cur:
                    sizes = [row[0] for row in await cur.fetchall()]
                removed += len(sizes)
                self._rows -= len(sizes)
                self._bytes -= sum(sizes)
            if not removed:
                break
            evicted += removed
        if evicted:
            self.evicted += evicted
            log.warning("pipeline.quarantine_full", evicted=evicted, evicted_total=self.evicted, rows=self._rows,
                        bytes=self._bytes, max_rows=max_rows, max_bytes=max_bytes, path=str(self.path))

    async def edit(self, sql: str, params: tuple[Any, ...]) -> bool:
        """Run one statement in the writer's next commit (the only writer of this file); True once committed."""
        if self._stopping or self._db is None:
            return False
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._edits.append((sql, params, done))
        self._wake.set()
        return await done

    async def read(self, ids: list[int] | None) -> list[tuple[Any, ...]]:
        """Rows (id, device_id, topic, payload, qos, received_at, properties, reason) by rowid, or all."""
        assert self._db is not None
        sql = ("SELECT id, device_id, topic, payload, qos, received_at, properties, reason FROM quarantine")
        if ids is None:
            async with self._db.execute(sql + " ORDER BY id") as cur:
                return [tuple(r) for r in await cur.fetchall()]
        out = []
        for rid in ids:
            async with self._db.execute(sql + " WHERE id = ?", (rid,)) as cur:
                row = await cur.fetchone()
            if row is not None:
                out.append(tuple(row))
        return out

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
