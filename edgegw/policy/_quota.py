"""Quota usage: per device, per UTC day and month, counted in memory and written to a small SQLite file.

Nothing is written per message: the limiter counts in :class:`Usage` objects and marks the device dirty; every
``limits.flush_interval`` seconds (and at stop) the dirty rows are upserted in one transaction, off the event loop.
A crash (kill -9, power cut) forgets at most the usage of the last interval: a device may then exceed its quota by
that much, never be refused for usage it did not have. The file is its own (``usage.db`` next to the outbox), so
a damaged usage file never touches a record; an unreadable one is moved aside and usage starts again from zero.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

log = structlog.get_logger("edgegw.limits")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    device_id TEXT NOT NULL,
    period TEXT NOT NULL,        -- 'd:2026-11-29' (UTC day) or 'm:2026-11' (UTC month)
    messages INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (device_id, period)
) WITHOUT ROWID;
"""

KEEP_DAYS = 62
"""Day rows older than this (and month rows older than a year) are deleted at start: the file stays small."""


class Usage:
    """One device's counters for the current day and month (reset lazily when the period changes)."""

    __slots__ = ("day", "day_bytes", "day_messages", "month", "month_bytes", "month_messages")

    def __init__(self, day: str, month: str) -> None:
        self.day = day
        self.day_messages = 0
        self.day_bytes = 0
        self.month = month
        self.month_messages = 0
        self.month_bytes = 0


@dataclass(frozen=True, slots=True)
class Periods:
    """The current UTC day and month, and when each ends (unix seconds)."""

    day: str
    day_end: float
    month: str
    month_end: float

    @classmethod
    def at(cls, wall: float) -> Periods:
        now = datetime.fromtimestamp(wall, UTC)
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month_start = day_start.replace(day=1)
        next_month = (month_start + timedelta(days=32)).replace(day=1)
        return cls(day_start.strftime("%Y-%m-%d"), (day_start + timedelta(days=1)).timestamp(),
                   month_start.strftime("%Y-%m"), next_month.timestamp())


class UsageStore:
    """The usage file. Its methods block (sqlite3): call them at start/stop or through ``asyncio.to_thread``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # a flush cancelled at stop may still be running in its thread

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
            except sqlite3.Error:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def load(self, periods: Periods) -> dict[str, Usage]:
        """Usage of the current day and month per device. A file that cannot be read is moved aside (logged)."""
        if not self.path.exists():
            return {}
        try:
            return self._load(periods)
        except sqlite3.Error as exc:
            self.close()
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            with contextlib.suppress(OSError):
                self.path.rename(aside)
            log.error("limits.usage_unreadable", path=str(self.path), moved_to=str(aside), error=str(exc),
                      consequence="quota usage starts again from zero")
            return {}

    def _load(self, periods: Periods) -> dict[str, Usage]:
        conn = self._connect()
        oldest_day = (datetime.strptime(periods.day, "%Y-%m-%d") - timedelta(days=KEEP_DAYS)).strftime("%Y-%m-%d")
        oldest_month = f"{int(periods.month[:4]) - 1}{periods.month[4:]}"
        conn.execute("DELETE FROM usage WHERE (period LIKE 'd:%' AND period < ?) OR (period LIKE 'm:%' AND period < ?)",
                     (f"d:{oldest_day}", f"m:{oldest_month}"))
        out: dict[str, Usage] = {}
        day, month = f"d:{periods.day}", f"m:{periods.month}"
        for device_id, period, messages, nbytes in conn.execute(
                "SELECT device_id, period, messages, bytes FROM usage WHERE period IN (?, ?)", (day, month)):
            usage = out.get(device_id)
            if usage is None:
                usage = out[device_id] = Usage(periods.day, periods.month)
            if period == day:
                usage.day_messages, usage.day_bytes = int(messages), int(nbytes)
            else:
                usage.month_messages, usage.month_bytes = int(messages), int(nbytes)
        return out

    def save(self, rows: list[tuple[str, str, int, int]]) -> None:
        """Upsert ``(device_id, period, messages, bytes)`` rows in one transaction (absolute values: idempotent).
        Counts within a period only grow: a device whose counters the limiter forgot (past ``max_devices``) and
        that counts from zero again never lowers what the file holds."""
        if not rows:
            return
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN")
            try:
                conn.executemany(
                    "INSERT INTO usage (device_id, period, messages, bytes) VALUES (?, ?, ?, ?) ON CONFLICT "
                    "(device_id, period) DO UPDATE SET messages = max(messages, excluded.messages),"
                    " bytes = max(bytes, excluded.bytes)", rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
