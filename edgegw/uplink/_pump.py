"""The uplink's pump (mixed into :class:`~edgegw.uplink.paho_bridge.Uplink`): keeps the upstream's window full from
two lanes, live records (handed over in memory by the outbox, or read from SQLite when the pump fell behind) and the
backlog (:class:`~edgegw.uplink._backfill.Backfill`, at its pace), and refills it in the loop turn that read the
PUBACKs (``refill``). What one record or frame becomes on the wire is :mod:`edgegw.uplink._sending`."""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from edgegw.outbox.store import Outbox, Record
from edgegw.uplink._backfill import Backfill
from edgegw.uplink._linkbase import LinkBase

if TYPE_CHECKING:
    from edgegw.config import UplinkSettings

_POLL_MAX = 1.0  # the longest the pump sleeps without news (a PUBACK, a commit, a lost link)
_FETCH_MIN, _FETCH_MAX = 256, 4096  # records per outbox read (4 windows within these bounds): one await each
_HANDOFF_MAX = 8192  # live records held in memory; past it the pump reads them from SQLite when it catches up


class Pump:
    """The pump and its lanes; the attributes are :class:`~edgegw.uplink.paho_bridge.Uplink`'s."""

    _outbox: Outbox
    _settings: UplinkSettings
    _backfill: Backfill | None
    _log: Any
    sent: int
    acked: int
    handed_off: int
    _acked_at_resume: int

    if TYPE_CHECKING:
        def _send(self, link: LinkBase, record: Record) -> bool | None: ...

        def _publish_frames(self, link: LinkBase, live: deque[Record], backfill: Backfill | None,
                            room: int) -> tuple[int, float | None]: ...

    async def _pump(self, link: LinkBase) -> str:
        """Keep up to ``link.window`` publishes in flight until the connection is lost; returns the reason.

        Two lanes (``live_first``): records committed after this connection came up go first, in id order and
        unpaced; the backlog (ids up to ``boundary``) fills the rest of the window at the configured pace."""
        outbox = self._outbox
        s = self._settings
        fetch_size = min(max(4 * link.window, _FETCH_MIN), _FETCH_MAX)
        backfill: Backfill | None = None
        cursor = 0
        live: deque[Record] = deque()
        batching = s.batch_max_records > 1
        fetching = backfill_fetching = False

        def start_lanes() -> None:
            """The lanes from what the outbox holds unsettled: at connect, and again after a throttle's backoff,
            when the records the upstream did not take (0x97) must go again before anything behind them."""
            nonlocal backfill, cursor
            boundary = outbox.committed_id if s.live_first else 0
            backfill = None
            if s.live_first:
                backfill = self._backfill = Backfill(outbox, s, boundary, fetch_size,
                                                     max(0, outbox.depth - outbox.pending_count))
                link.boundary = boundary
            cursor = boundary
            live.clear()

        start_lanes()

        def send_one(record: Record) -> bool | None:
            return self._send(link, record)

        def refill() -> bool:
            """Room in the window (PUBACKs just read) or a group just handed over: fill it now, in this loop turn,
            as the pump would (the live lane first, then the backlog at its pace), rather than wake the pump task:
            a task wake and a loop turn per read of PUBACKs is latency that the upstream's Receive Maximum turns
            into lost throughput. Returns True when the pump must run: a read of SQLite is due (or under way), the
            pace says wait, frames are on, the socket buffer is full, or the link is lost."""
            if batching or fetching or backfill_fetching or link.paused or link.throttled_until or link.lost.done():
                return True
            room = link.window - len(link.inflight)
            if live:
                if room > 0:
                    room -= self._publish(link, live, room)
                if live or link.lost.done():
                    return link.lost.done()
            if outbox.committed_id > cursor:
                return True  # live records that were not handed over: read from SQLite first
            if backfill is None or room <= 0 or backfill.done:
                return False
            if backfill.needs_fetch:
                return True
            paced, delay = backfill.send(room, send_one)
            self.sent += paced
            self._probe(link)
            return delay is not None or backfill.needs_fetch or link.lost.done() or not paced

        def handoff(before: int, records: list[Record]) -> None:
            """A group the outbox just committed. Taken only when it is exactly what the live lane would read
            next and no read is under way (whose snapshot may or may not hold it); otherwise the pump reads it
            from SQLite when it gets there. Memory stays bounded by _HANDOFF_MAX."""
            nonlocal cursor
            if cursor == before and not fetching and len(live) < _HANDOFF_MAX:
                live.extend(records)
                cursor = records[-1].id
                self.handed_off += len(records)
            if link.refill is None or refill():
                link.poke()

        outbox.add_handoff(handoff)
        if link.encoded:
            link.refill = refill
        try:
            while not link.lost.done():
                if link.throttled_until:
                    # PUBACK 0x97: nothing new goes up until the backoff is over and every PUBLISH in flight is
                    # answered (nothing sent twice at once); then the records not settled, refused ones included,
                    # are read again in order, as after a reconnect, and the link takes them from the start.
                    left = link.throttled_until - time.monotonic()
                    if left > 0 or link.inflight:
                        await link.wait(left if left > 0 else _POLL_MAX)
                        continue
                    link.throttled_until = 0.0
                    self._acked_at_resume = self.acked
                    start_lanes()
                    continue
                high = outbox.committed_id
                try:
                    if not live and high > cursor:
                        fetching = True
                        try:
                            records = await outbox.fetch_after(cursor, fetch_size)
                        finally:
                            fetching = False
                        if records:
                            live.extend(records)
                            cursor = records[-1].id
                        else:
                            cursor = high  # every record up to ``high`` is settled (acknowledged, quarantined)
                        continue
                    if backfill is not None and backfill.needs_fetch:
                        backfill_fetching = True  # refill() leaves the lanes to the pump until it is in
                        try:
                            await backfill.fetch()
                        finally:
                            backfill_fetching = False
                        continue
                except sqlite3.Error as exc:
                    self._log.error("uplink.fetch_failed", error=str(exc))
                    await link.wait(_POLL_MAX)
                    continue
                room = link.window - len(link.inflight) if not link.paused else 0
                delay: float | None = None
                if room > 0 and batching:
                    sent, delay = self._publish_frames(link, live, backfill, room)
                    if link.lost.done():
                        break
                    if sent:
                        continue
                elif room > 0:
                    sent = self._publish(link, live, room) if live else 0
                    if link.lost.done():
                        break
                    if sent < room and not live and backfill is not None:
                        paced, delay = backfill.send(room - sent, send_one)
                        sent += paced
                        self.sent += paced
                        self._probe(link)
                    if sent:
                        continue
                if backfill is not None and backfill.needs_fetch:
                    continue  # the backlog's records just read were all let go (spilled): read on now
                await link.wait(delay if delay is not None else _POLL_MAX)
            return link.lost.result()
        finally:
            link.refill = None
            outbox.remove_handoff(handoff)

    def _publish(self, link: LinkBase, buffered: deque[Record], room: int) -> int:
        """Up to ``room`` records from ``buffered`` into flight; returns how many."""
        n = 0
        while buffered and n < room:
            result = self._send(link, buffered[0])
            if result is None:
                break
            buffered.popleft()
            n += result
        self.sent += n
        self._probe(link)
        return n

    def _probe(self, link: LinkBase) -> None:
        if link.probe_mid == 0 and link.probe_next:
            link.probe_mid, link.probe_t = link.probe_next, time.monotonic()
        link.probe_next = 0
