"""Taking records in: :meth:`~edgegw.outbox.store.Outbox.submit` (the hot path: synchronous, no await, no task),
the caps and fair shares it decides on synchronously (reject-new, FAIR_SHARE_FROM), the signals ingress holds on
(``congested``, ``when_room``), upstream acknowledgements and quarantine requests queued for the writer, and the
usage figures (docs/OUTBOX.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import structlog

from edgegw.config import OutboxSettings
from edgegw.errors import OutboxError
from edgegw.outbox._record import (
    MAX_PRIORITY,
    PRIORITY_TELEMETRY,
    FullReason,
    OutboxFull,
    Record,
)
from edgegw.outbox._schema import RECORD_OVERHEAD

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


class Admission:
    """Mixed into :class:`~edgegw.outbox.store.Outbox`; everything here runs on the event loop, synchronously."""

    _settings: OutboxSettings
    _log: structlog.typing.FilteringBoundLogger
    _stopping: bool
    _next_id: int
    _pending: list[_Pending]
    _acks: _Acks
    _to_delete: set[int]
    _to_quarantine: list[tuple[int, str]]
    _wake: asyncio.Event
    _group_full: asyncio.Future[None] | None
    _decongested: list[Callable[[], None]]
    _room_waiters: list[Callable[[], None]]
    _usage: dict[str, list[int]]
    _count: int
    _bytes: int
    _reject_new: bool
    _byte_limit: int
    _disk_limited: bool
    _full_logged: float
    _quarantine_rows: int
    _quarantine_bytes: int
    dropped: dict[str, int]
    rejected: dict[str, int]

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
            full = self._group_full
            if full is not None and not self._settings.commit_window_ms and not full.done():
                full.set_result(None)  # the writer lingers for deletes: a device waits for this one, commit now
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

    @property
    def quarantine_held(self) -> tuple[int, int]:
        """(rows, bytes) in the quarantine table, as counted against ``quarantine_max_records`` / ``_bytes``."""
        return self._quarantine_rows, self._quarantine_bytes

    def usage(self, device_id: str) -> tuple[int, int]:
        """(records, bytes) this device holds in the outbox."""
        u = self._usage.get(device_id)
        return (u[0], u[1]) if u else (0, 0)
