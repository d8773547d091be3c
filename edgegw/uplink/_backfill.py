"""The backfill lane: what was in the outbox when the uplink connected, sent behind live records, paced.

Order: priority classes from the highest down; within a class, by record id, so each device's records of one class
leave in the order they arrived. A device over its own rate is held back (its records wait in order) while other
devices go on. Pacing uses token buckets with a one-second burst: a bucket may go negative by one record, and the
next record waits until it is back to zero.

Held records are bounded (``fetch_size``): past that, a held device's further records are read and let go
("spilled", the first such id noted per device) and the lane reads on, so the devices behind a long held backlog
are not held with it; a spilled device's further rows are left out of the pass's reads (in SQL: never decoded only
to be let go). At the end of the class the lane reads it again from the first spilled id, taking only the
spilled devices' records from their noted ids (the others were handed out already), once half of the held room is
free; such a pass ends as soon as each of its devices was let go again. A device's records are never taken out of
order (once spilled, all its later records of that pass are too).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from edgegw.config import UplinkSettings
from edgegw.outbox.store import MAX_PRIORITY, Outbox, Record


class _Bucket:
    __slots__ = ("rate", "tokens", "stamp")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = rate  # one second of burst
        self.stamp = now

    def wait(self, now: float) -> float:
        """Seconds until a send is allowed (0: now)."""
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Backfill:
    """One connection's backlog: records with id <= ``boundary`` (the last id committed when it connected)."""

    def __init__(self, outbox: Outbox, settings: UplinkSettings, boundary: int, fetch_size: int,
                 backlog: int) -> None:
        self.outbox = outbox
        self.boundary = boundary
        self.fetch_size = fetch_size
        self.total = backlog
        """Records in the backlog at connect (an estimate: some may be acknowledged from before)."""
        self.acked = 0
        self.started = time.monotonic()
        self._priority = MAX_PRIORITY
        self._cursor = 0
        self._exhausted = False
        self.buf: deque[Record] = deque()
        self.held: dict[str, deque[Record]] = {}
        self.held_count = 0
        self._spilled: dict[str, int] = {}  # device -> its first record this pass read and did not keep
        self._rewind: dict[str, int] | None = None  # a pass over the class again: only these devices, from these ids
        self._rewind_due = False  # the class was read to its end with records spilled: again once held has room
        now = time.monotonic()
        s = settings
        self._records = _Bucket(s.backfill_rate, now) if s.backfill_rate > 0 else None
        self._bytes = _Bucket(s.backfill_bytes_rate, now) if s.backfill_bytes_rate > 0 else None
        self._device_rate = s.backfill_device_rate
        self._device_bytes_rate = s.backfill_device_bytes_rate
        self._devices: dict[str, _Bucket] = {}
        self._device_bytes: dict[str, _Bucket] = {}
        self.paced_rate = s.backfill_rate or None

    @property
    def done(self) -> bool:
        return self._exhausted and not self.buf and not self.held

    @property
    def needs_fetch(self) -> bool:
        # Reading on while records are held is what lets the devices behind a held one go on (the held ones past
        # the bound are spilled, not kept); reading the class again waits for half of the held room, so a device
        # held by its pace does not make the lane read the class once per record it sends.
        return (not self._exhausted and not self.buf
                and (not self._rewind_due or self.held_count < self.fetch_size // 2))

    async def fetch(self) -> None:
        self._rewind_due = False
        while self._priority >= 0:
            rewind = self._rewind
            if rewind is not None and self._spilled.keys() >= rewind.keys():
                records = []  # every device this pass takes was let go again: the rest of it is for the next one
            else:
                # Not the devices let go in this pass: send() would let their records go too (order), so reading
                # them would only decode a held device's whole backlog, page by page, to throw it away.
                records = await self.outbox.fetch_backlog(self._priority, self._cursor, self.boundary,
                                                          self.fetch_size, self._spilled.keys())
            if records:
                self._cursor = records[-1].id
                if rewind is not None:  # again over the class: only what the last pass read and let go
                    records = [r for r in records if r.device_id in rewind and r.id >= rewind[r.device_id]]
                    if not records:
                        continue
                self.buf.extend(records)
                return
            if self._spilled:  # read to the end of the class, records let go on the way: read them again
                self._rewind, self._spilled = self._spilled, {}
                self._cursor = min(self._rewind.values()) - 1
                if self.held_count >= self.fetch_size // 2:
                    self._rewind_due = True
                    return
                continue
            self._priority -= 1
            self._cursor = 0
            self._rewind = None
        self._exhausted = True

    def remaining(self) -> int:
        return max(0, min(self.total - self.acked, self.outbox.depth))

    def eta(self) -> float | None:
        """Seconds until the backlog is drained at the rate seen so far, never faster than the configured pace."""
        left = self.remaining()
        if left == 0 or self.done:
            return 0.0
        elapsed = time.monotonic() - self.started
        seen = self.acked / elapsed if self.acked and elapsed > 0 else None
        # The buckets' one-second burst makes the first moments look far faster than the pace allows (an ETA of
        # 0.3 s for a 5 s drain was observed): the sustained rate cannot exceed backfill_rate.
        rates = [r for r in (seen, self.paced_rate) if r]
        return left / min(rates) if rates else None

    def _wait(self, record: Record, now: float) -> tuple[float, bool]:
        """(seconds to wait, True if the whole lane must wait rather than only this device)."""
        size = len(record.payload)
        for bucket in (self._records, self._bytes):
            if bucket is not None:
                w = bucket.wait(now)
                if w:
                    return w, True
        device = record.device_id
        if self._device_rate:
            b = self._devices.get(device)
            if b is None:
                b = self._devices[device] = _Bucket(self._device_rate, now)
            w = b.wait(now)
            if w:
                return w, False
        if self._device_bytes_rate:
            b = self._device_bytes.get(device)
            if b is None:
                b = self._device_bytes[device] = _Bucket(self._device_bytes_rate, now)
            w = b.wait(now)
            if w:
                return w, False
        # allowed: take the tokens
        if self._records is not None:
            self._records.tokens -= 1
        if self._bytes is not None:
            self._bytes.tokens -= size
        if self._device_rate:
            self._devices[device].tokens -= 1
        if self._device_bytes_rate:
            self._device_bytes[device].tokens -= size
        return 0.0, False

    def send(self, room: int, publish: Callable[[Record], bool | None]) -> tuple[int, float | None]:
        """Hand up to ``room`` records to ``publish`` (True: in flight; False: set aside; None: the link failed,
        the record stays first). Returns (records in flight now, seconds until pacing allows more or None)."""
        now = time.monotonic()
        sent = 0
        delay: float | None = None
        # Devices held back first: their records are older than anything of theirs still in buf.
        for device in list(self.held):
            queue = self.held[device]
            while queue and sent < room:
                wait, lane = self._wait(queue[0], now)
                if wait:
                    delay = wait if delay is None else min(delay, wait)
                    if lane:
                        return sent, delay
                    break
                result = publish(queue[0])
                if result is None:
                    return sent, None
                queue.popleft()
                self.held_count -= 1
                sent += result
            if not queue:
                del self.held[device]
        spilled = self._spilled
        while self.buf and sent < room:
            record = self.buf[0]
            device = record.device_id
            if spilled and device in spilled:  # an earlier record of the device was let go: so is this (order)
                self.buf.popleft()
                continue
            if device in self.held:  # keep the device's order
                if self.held_count >= self.fetch_size:  # held at its bound: read again at the next pass
                    spilled[device] = self.buf.popleft().id
                    continue
                self.held[device].append(self.buf.popleft())
                self.held_count += 1
                continue
            wait, lane = self._wait(record, now)
            if wait:
                delay = wait if delay is None else min(delay, wait)
                if lane:
                    break
                if self.held_count >= self.fetch_size:
                    spilled[device] = self.buf.popleft().id
                    continue
                self.held[device] = deque([self.buf.popleft()])
                self.held_count += 1
                continue
            result = publish(record)
            if result is None:
                break
            self.buf.popleft()
            sent += result
        return sent, delay
