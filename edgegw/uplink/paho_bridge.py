"""The uplink: outbox records to the cloud broker as QoS 1 publishes over MQTT with mutual TLS.

The MQTT client is chosen by ``uplink.client``: ``native`` (:mod:`edgegw.uplink._mqtt_client`, our own on asyncio
and edgegw's codec: PUBLISHes of a loop turn in one TLS write, PUBACKs parsed from bytes) or ``paho``
(:mod:`edgegw.uplink._link`). Everything else is shared and lives here: the pump and its two lanes, properties,
frames, quarantine, failover, commands. Every connection attempt starts a clean session, so nothing is resent by
a client on its own: what was not acknowledged is sent again from the outbox.

Live records reach the pump in memory: the outbox hands each committed group over (:meth:`Outbox.add_handoff`),
so SQLite is read only for a backlog (after a reconnect or restart) or when the pump fell behind.

A record leaves the outbox only when the upstream acknowledged it (PUBACK < 0x80: :meth:`Outbox.ack`) or refused it
(PUBACK >= 0x80: :meth:`Outbox.quarantine`, never retried forever and never silently dropped).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import structlog

from edgegw.config import UplinkSettings
from edgegw.mqtt.forward import decode_record_properties
from edgegw.mqtt.packets import NO_PROPERTIES, Properties, PropertyId
from edgegw.ops.otel import Spans
from edgegw.outbox.store import Outbox, Record
from edgegw.tracing import trace_id
from edgegw.uplink._backfill import Backfill
from edgegw.uplink._endpoints import FLAP_SECONDS, Endpoint, Endpoints
from edgegw.uplink._link import _Link
from edgegw.uplink._linkbase import LinkBase
from edgegw.uplink._mqtt_client import NativeLink
from edgegw.uplink._wire import (
    TP_ONLY,
    TP_ONLY_SIZE,
    RecordWire,
    _frame_properties,
    _packet_size,
    _record_properties,
    _unsendable,
    _user_properties,
    _varint,
    expiry_left,
    iso_utc_ms,
    upstream_topic,
)
from edgegw.uplink.frames import RECORD_COST, encode_frame, record_cost

__all__ = ["Uplink", "UplinkState", "iso_utc_ms"]

UplinkState = Literal["connecting", "connected", "down"]

Downlink = Callable[..., bool]
"""``(device_id, topic, payload, qos, properties, *, message_expiry) -> bool``: :meth:`MQTTServer.deliver_downlink`."""

_POLL_MIN, _POLL_MAX = 0.01, 1.0  # fallback polling when the outbox cannot tell us when to look again
_FETCH_MIN, _FETCH_MAX = 256, 4096  # records per outbox read (4 windows within these bounds): one await each
_HANDOFF_MAX = 8192  # live records held in memory; past it the pump reads them from SQLite when it catches up


class Uplink:
    """Run :meth:`run` as a task; cancel it to stop (it sends DISCONNECT if it can and releases everything)."""

    def __init__(self, settings: UplinkSettings, outbox: Outbox, *, client_id: str,
                 ssl_context: ssl.SSLContext, downlink: Downlink | None = None, otel: Spans | None = None) -> None:
        if not client_id:
            raise ValueError("client_id must not be empty")
        self._settings = settings
        self._outbox = outbox
        self.client_id = client_id
        self._ssl_context = ssl_context
        self._read_buffer: memoryview | None = None  # the native client's TLS read buffer, made at first use
        self._wire = RecordWire(settings.topic_prefix)
        self._link_class: type[LinkBase] = NativeLink if settings.client == "native" else _Link
        self._log = structlog.get_logger("edgegw.uplink")
        self._state: UplinkState = "down"
        self._running = False
        self._backfill: Backfill | None = None
        self._endpoints = Endpoints(settings)
        self.endpoint: str | None = None
        """``host:port`` of the upstream this uplink is connected to, or None."""
        self._link: LinkBase | None = None
        self.otel = otel
        """OpenTelemetry span hooks (edgegw.uplink: PUBLISH -> PUBACK), or None: export off."""
        self.downlink = downlink
        """Where commands from ``command_topic`` go (the daemon wires ``MQTTServer.deliver_downlink``)."""
        self.commands: Any = None
        """With tenants: which filters to subscribe to and which device a command topic names, tenant-aware
        (edgegw/pipeline/commands.py ``TenantCommands``); None: ``{topic_prefix}/{device_id}/rest``."""
        self.commands_delivered = 0
        """Commands from upstream handed to a device session with a matching subscription."""
        self.commands_undeliverable = 0
        """Commands not delivered: no such session or subscription, a topic that names no single device, a
        retained message, or no downlink wired."""
        self.sent = 0
        """Publishes handed to the broker (a record sent again after a reconnect counts again)."""
        self.acked = 0
        """PUBACKs with a success reason code (0x10 "no matching subscribers" included)."""
        self.refused = 0
        """PUBACKs with a reason code >= 0x80; those records were quarantined."""
        self.reconnects = 0
        self.frames_sent = 0
        """Batch frames handed to the broker (``batch_max_records`` > 1)."""
        self.bytes_sent = 0
        """MQTT PUBLISH packet bytes handed to the broker (before TLS), records and frames alike."""
        """Successful connections after the first one."""
        self.connect_failures = 0
        self.writes = 0
        """Writes of PUBLISHes to the upstream connection by the native client (each carries every PUBLISH of one
        loop turn); sent / writes is how many share a TLS write."""
        self.session_takeovers = 0
        """Connections ended because another client connected with our client id (see :meth:`_taken_over`)."""
        self.expired: dict[str, int] = {}
        """Records deleted unsent because their MQTT 5 Message Expiry Interval passed, per device."""
        self.handed_off = 0
        """Live records taken from the outbox's commit hand-off, i.e. not read back from SQLite."""
        self.last_rtt: float | None = None
        """Seconds from PUBLISH to PUBACK of the most recent sampled message (one sample in flight at a time)."""

    @property
    def state(self) -> UplinkState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state == "connected"

    @property
    def inflight(self) -> int:
        return len(self._link.inflight) if self._link is not None else 0

    # --- connection lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        if self._running:
            raise RuntimeError("Uplink.run() is already running")
        self._running = True
        loop = asyncio.get_running_loop()
        s = self._settings
        attempt = 0
        connections = 0
        flaps = 0  # connections in a row the server closed soon after accepting them, without a reason
        endpoints = self._endpoints
        try:
            while True:
                self._state = "connecting"
                endpoint = endpoints.choose()
                link = self._link = self._link_class(self, loop, endpoint.host, endpoint.port)
                graceful = False
                connected_at = 0.0
                failback: asyncio.Task[None] | None = None
                try:
                    error = await link.establish()
                    if error is None:
                        if connections:
                            self.reconnects += 1
                        connections += 1
                        self._state = "connected"
                        self.endpoint = endpoint.name
                        connected_at = time.monotonic()
                        self._log.info("uplink.connected", host=endpoint.host, port=endpoint.port,
                                       protocol=s.protocol, client=s.client, client_id=self.client_id,
                                       window=link.window,
                                       backlog=self._outbox.depth)
                        if endpoints.policy == "priority" and endpoint.rank > 0:
                            failback = loop.create_task(self._failback(link, endpoint), name="uplink-failback")
                        graceful = True
                        reason = await self._pump(link)
                        graceful = False
                        self._log.warning("uplink.disconnected", reason=reason, error=link.error,
                                          host=endpoint.host, port=endpoint.port,
                                          unacked=len(link.inflight), sent=self.sent, acked=self.acked)
                finally:
                    if failback is not None:
                        failback.cancel()
                    link.close(graceful=graceful)
                    self._state = "down"
                    self.endpoint = None
                flapped = (error is None and time.monotonic() - connected_at < FLAP_SECONDS
                           and not link.failing_back)
                flaps = flaps + 1 if flapped and link.closed_by_server else 0
                if error is None and (link.taken_over or flaps >= 2):
                    self._taken_over(link, flaps)
                if error is None and not flapped:
                    attempt = 0  # a connection that lasted: the next attempt starts from reconnect_min again
                    endpoints.succeeded(endpoint)
                elif endpoints.failed(endpoint):
                    attempt = 0  # the next endpoint gets a fresh, short backoff
                    self._log.warning("uplink.circuit_open", host=endpoint.host, port=endpoint.port,
                                      cooldown=endpoints.cooldown, reason=error or "connection lost at once")
                # Full jitter over an exponential cap, spreading a fleet that lost the same broker; the floor of
                # reconnect_min/2 keeps a broker that accepts and drops at once from being hammered. A connection
                # lost within FLAP_SECONDS does not reset ``attempt``: two gateways with one client id take each
                # other's session over at most once per backoff period, not several times a second.
                cap = min(s.reconnect_max, s.reconnect_min * 2 ** min(attempt, 30))
                delay = max(s.reconnect_min / 2, random.uniform(0, cap))
                if error is not None:
                    self.connect_failures += 1
                    self._log.warning("uplink.connect_failed", host=endpoint.host, port=endpoint.port, error=error,
                                      attempt=attempt + 1, retry_in=round(delay, 3))
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            self._state = "down"
            self._link = None
            self._running = False
            self._log.info("uplink.stopped", sent=self.sent, acked=self.acked, refused=self.refused,
                           reconnects=self.reconnects, writes=self.writes)

    def _taken_over(self, link: LinkBase, flaps: int) -> None:
        """Another client connected with our client id and the broker closed us (MQTT-3.1.4-3): two gateways with
        one ``gateway.id``, or a leftover process. Certain with DISCONNECT 0x8E; mosquitto 2.0 sends none (over
        MQTT 5 as over 3.1.1) and only closes the older connection, so a second clean close without a reason
        within FLAP_SECONDS of the CONNACK counts too. The backoff in :meth:`run` keeps growing meanwhile."""
        self.session_takeovers += 1
        evidence = ("DISCONNECT from server: Session taken over (0x8e)" if link.taken_over else
                    f"the server closed {flaps} connections in a row within {FLAP_SECONDS:g} s of accepting "
                    "them, without a reason (mosquitto's way of ending the older of two sessions)")
        self._log.error("uplink.session_taken_over", client_id=self.client_id, evidence=evidence,
                        takeovers=self.session_takeovers, host=link.host, port=link.port,
                        hint="another client uses this client id: is gateway.id unique?")

    async def _failback(self, link: LinkBase, current: Endpoint) -> None:
        """Connected to a lower-priority endpoint: every ``breaker_cooldown`` s, probe the higher ones with a TCP
        connect; when one answers, end this connection gracefully so the next attempt goes there."""
        while not link.lost.done():
            await asyncio.sleep(self._endpoints.cooldown)
            for candidate in self._endpoints.better_than(current):
                try:
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection(candidate.host, candidate.port), self._settings.connect_timeout)
                except (OSError, TimeoutError):
                    continue
                writer.transport.abort()
                self._log.info("uplink.failing_back", to=candidate.name, current=current.name)
                link.failing_back = True
                link.set_lost(f"failing back to {candidate.name}")
                return

    # --- the pump -------------------------------------------------------------------------------------------

    async def _pump(self, link: LinkBase) -> str:
        """Keep up to ``link.window`` publishes in flight until the connection is lost; returns the reason.

        Two lanes (``live_first``): records committed after this connection came up go first, in id order and
        unpaced; the backlog (ids up to ``boundary``) fills the rest of the window at the configured pace."""
        outbox = self._outbox
        s = self._settings
        fetch_size = min(max(4 * link.window, _FETCH_MIN), _FETCH_MAX)
        boundary = outbox.committed_id if s.live_first else 0
        backfill = None
        if s.live_first:
            backfill = self._backfill = Backfill(outbox, s, boundary, fetch_size,
                                                 max(0, outbox.depth - outbox.pending_count))
            link.boundary = boundary
        cursor = boundary
        live: deque[Record] = deque()
        batching = s.batch_max_records > 1
        fetching = backfill_fetching = False

        def send_one(record: Record) -> bool | None:
            return self._send(link, record)

        def refill() -> bool:
            """Room in the window (PUBACKs just read) or a group just handed over: fill it now, in this loop turn,
            as the pump would (the live lane first, then the backlog at its pace), rather than wake the pump task:
            a task wake and a loop turn per read of PUBACKs is latency that the upstream's Receive Maximum turns
            into lost throughput. Returns True when the pump must run: a read of SQLite is due (or under way), the
            pace says wait, frames are on, the socket buffer is full, or the link is lost."""
            if batching or fetching or backfill_fetching or link.paused or link.lost.done():
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

    def _upstream_topic(self, record: Record) -> str:
        return upstream_topic(self._settings.topic_prefix, record.device_id, record.topic)

    def _carried(self, link: LinkBase, record: Record) -> tuple[dict[str, Any], int | None] | None:
        """The record's MQTT 5 properties (decoded) and the Message Expiry Interval left, or None when the record
        expired (then it is deleted and counted here). Raises ValueError for an undecodable properties blob."""
        carried = decode_record_properties(record.properties)
        mei = carried.get("mei")
        if mei is None:
            return carried, None
        if not isinstance(mei, int) or isinstance(mei, bool) or not 0 <= mei <= 0xFFFFFFFF:
            raise ValueError(f"message expiry interval {mei!r}")
        left = expiry_left(mei, record.received_at, time.time())
        if left is None:
            self._expire(link, record, mei, trace_id(carried.get("tp")))
            return None
        return carried, left

    def _expire(self, link: LinkBase, record: Record, mei: int, trace: str | None) -> None:
        """The device's Message Expiry Interval passed before the record could go up: delete it, unsent."""
        device = record.device_id
        self.expired[device] = self.expired.get(device, 0) + 1
        self._outbox.ack((record.id,))
        backfill = self._backfill
        if backfill is not None and record.id <= link.boundary:
            backfill.acked += 1
        self._log.debug("uplink.record_expired", record_id=record.id, device_id=device, expiry=mei,
                        age=round(time.time() - record.received_at, 3), trace_id=trace)

    def _publish_frames(self, link: LinkBase, live: deque[Record], backfill: Backfill | None,
                        room: int) -> tuple[int, float | None]:
        """Up to ``room`` frames: live records first, then the paced backlog. Returns (frames, pacing delay)."""
        s = self._settings
        limit_n = s.batch_max_records
        limit_b = s.batch_max_bytes
        if link.max_packet is not None:
            limit_b = max(1024, min(limit_b, link.max_packet - 1024))
        frames = 0
        delay: float | None = None
        linger = s.batch_linger_ms / 1000.0
        if linger and live and len(live) < limit_n and (backfill is None or backfill.done):
            # A trickle of live records: let the frame fill up for at most ``batch_linger_ms`` after the oldest
            # one arrived (a poke on each commit re-runs this; a frame's worth of records goes at once).
            waited = time.time() - live[0].received_at
            if waited < linger:
                return 0, linger - waited
        while frames < room:
            frame: list[tuple[Record, str, str | None]] = []
            size = 0

            def collect(record: Record) -> bool | None:
                nonlocal size
                tp = None
                if record.properties is not None:
                    try:
                        decoded = self._carried(link, record)
                    except Exception as exc:  # noqa: BLE001 - a damaged blob: set it aside, as _send does
                        self._quarantine(record.id, f"cannot decode record properties: {exc}")
                        return True
                    if decoded is None:
                        return True  # expired: deleted, not framed (frames carry no MQTT 5 properties)
                    tp = decoded[0].get("tp")
                    if not isinstance(tp, str):
                        tp = None
                topic = self._upstream_topic(record)
                cost = record_cost(record, topic, tp)
                if frame and (len(frame) >= limit_n or size + cost > limit_b):
                    return None  # full: the record stays first for the next frame
                frame.append((record, topic, tp))
                size += cost
                return True

            while live and collect(live[0]):
                live.popleft()
            if not live and backfill is not None and len(frame) < limit_n:
                _, delay = backfill.send(limit_n - len(frame), collect)
            if not frame:
                break
            if not self._send_frame(link, frame):
                break
            frames += 1
            if len(frame) < limit_n and size + RECORD_COST < limit_b and not live:
                break  # nothing more to take now (or paced): do not send a stream of tiny frames
        self._probe(link)
        return frames, delay

    def _send_frame(self, link: LinkBase, frame: list[tuple[Record, str, str | None]]) -> bool:
        """PUBLISH one frame; False if the link failed."""
        s = self._settings
        compress = s.batch_compression == "zlib"
        topic = f"{s.topic_prefix}/_batch" + ("/zlib" if compress else "")
        payload = encode_frame(frame, compress)
        properties = _frame_properties(compress, len(frame)) if link.mqtt5 else None
        problem = _unsendable(topic, payload, properties, link.max_packet)
        if problem is not None:
            for record, _, tp in frame:  # only a single oversized record can get here
                self._quarantine(record.id, f"cannot publish upstream in a frame: {problem}", trace_id(tp))
            return True
        mid = link.publish(topic, payload, properties)
        if not mid:
            return False
        link.inflight[mid] = [record for record, _, _ in frame]
        if self.otel is not None:
            for record, _, tp in frame:
                self.otel.uplink_sent(record, tp)
        self.sent += len(frame)
        self.frames_sent += 1
        self.bytes_sent += _packet_size(topic, payload, properties)
        if link.probe_mid == 0 and not link.probe_next:
            link.probe_next = mid
        return True

    def _send(self, link: LinkBase, record: Record) -> bool | None:
        """PUBLISH one record: True if in flight, False if set aside as unsendable, None if the link failed."""
        if link.encoded:
            # The hot path (bench/uplink_record.py: half the Python per record): a record with no record
            # properties or only the ingress's traceparent, over the native client. The same bytes as below.
            props = record.properties
            tp = None
            if props is None or (len(props) == TP_ONLY_SIZE and props.startswith(TP_ONLY)
                                 and (tp := props[len(TP_ONLY):]).isascii()):
                wire = self._wire
                entry = wire.topic(record.device_id, record.topic)
                if entry is not None:
                    packed = wire.properties(record, tp) if link.mqtt5 else b""
                    payload = record.payload
                    remaining = len(entry[1]) + 2 + len(packed) + len(payload)
                    size = remaining + (2 if remaining < 0x80 else 3 if remaining < 0x4000 else
                                        1 + len(_varint(remaining)))
                    if link.max_packet is None or size <= link.max_packet:
                        mid = link.publish_packet(entry[1], payload, packed, remaining)
                        if not mid:
                            return None
                        link.inflight[mid] = record
                        if self.otel is not None:
                            self.otel.uplink_sent(record, tp.decode() if tp is not None else None)
                        self.bytes_sent += size
                        if link.probe_mid == 0 and not link.probe_next:
                            link.probe_next = mid
                        return True
        topic = self._upstream_topic(record)
        carried: dict[str, Any] = {}
        try:
            if record.properties is None:
                properties = _user_properties(record) if link.mqtt5 else None
            else:
                try:
                    decoded = self._carried(link, record)
                except Exception as exc:  # noqa: BLE001 - msgpack raises several kinds for a damaged blob
                    raise ValueError(f"cannot decode record properties: {exc}") from None
                if decoded is None:
                    return False  # expired: deleted and counted
                carried, expiry = decoded
                properties = None
                if link.mqtt5:
                    properties = _record_properties(record, carried, expiry, self._response_topic(record, carried))
            problem = _unsendable(topic, record.payload, properties, link.max_packet)
            if problem is None:
                mid = link.publish(topic, record.payload, properties)
        except (ValueError, TypeError, OverflowError) as exc:
            problem = str(exc)
        if problem is not None:  # sending it again would fail again: set it aside, keep the queue moving
            self._quarantine(record.id, f"cannot publish upstream to {topic[:200]!r}: {problem}",
                             trace_id(carried.get("tp")))
            return False
        if not mid:
            return None
        link.inflight[mid] = record
        if self.otel is not None:
            self.otel.uplink_sent(record, carried.get("tp"))
        self.bytes_sent += _packet_size(topic, record.payload, properties)
        if link.probe_mid == 0 and not link.probe_next:
            link.probe_next = mid
        return True

    def _response_topic(self, record: Record, carried: dict[str, Any]) -> str | None:
        """The device's Response Topic mapped like a topic (``devices/{id}/rest`` -> ``{prefix}/{id}/rest``);
        None (left out) when there is none or it is not a valid topic name (MQTT-3.3.2-14: no wildcards)."""
        rt = carried.get("rt")
        if not isinstance(rt, str) or not rt:
            return None
        # With tenants, under the prefix of the record's tenant, like its topic (edgegw/pipeline/commands.py).
        prefix = (self.commands.prefix_of(carried.get("tn")) if self.commands is not None
                  else self._settings.topic_prefix)
        mapped = upstream_topic(prefix, record.device_id, rt)
        if "+" in mapped or "#" in mapped:
            self._log.debug("uplink.response_topic_dropped", record_id=record.id, response_topic=rt[:200])
            return None
        return mapped

    # --- downlink -------------------------------------------------------------------------------------------

    def _on_command(self, topic: str, payload: bytes, qos: int, retain: bool, props: Properties) -> None:
        """A message on ``command_topic`` (on the loop thread, from the client's read): ``{prefix}/{id}/rest``
        goes to device ``id`` as ``devices/{id}/rest``. Never raises: the read loop must go on."""
        try:
            problem = None
            device_id = rest = device_topic = ""
            prefix = self._settings.topic_prefix + "/"
            if retain:
                problem = "retained message"  # not a live command (Retain Handling 2 keeps these away over MQTT 5)
            elif "+" in topic or "#" in topic:
                problem = "invalid device id"
            elif self.commands is not None:  # tenants: from the device's own tenant's space only
                found = self.commands.target(topic)
                if isinstance(found, str):
                    problem = found
                else:
                    device_id, device_topic = found
            elif not topic.startswith(prefix):
                problem = "topic outside the prefix"
            else:
                device_id, sep, rest = topic[len(prefix):].partition("/")
                device_topic = f"devices/{device_id}/{rest}"
                if not device_id or not sep or not rest:
                    problem = "no device id level and rest"
                elif device_id.startswith("$") or "\x00" in device_id:
                    problem = "invalid device id"
            if problem is None and self.downlink is None:
                problem = "no downlink wired"
            if problem is not None:
                self.commands_undeliverable += 1
                self._log.warning("uplink.command_refused", topic=topic[:200], reason=problem)
                return
            properties, expiry = self._command_properties(props)
            assert self.downlink is not None
            delivered = self.downlink(device_id, device_topic, payload, min(qos, 1), properties,
                                      message_expiry=expiry)
        except Exception:  # noqa: BLE001 - a malformed message or a bug: count it, keep the connection
            self.commands_undeliverable += 1
            self._log.exception("uplink.command_failed")
            return
        if delivered:
            self.commands_delivered += 1
            self._log.debug("uplink.command_delivered", device_id=device_id, topic=device_topic)
        else:
            self.commands_undeliverable += 1
            self._log.info("uplink.command_undeliverable", device_id=device_id, topic=device_topic,
                           reason="no session with a matching subscription")

    @property
    def command_filters(self) -> tuple[str, ...]:
        """The filters the uplink subscribes to for commands (after every connect); () when the downlink is off."""
        if self.commands is not None:
            return tuple(self.commands.filters())
        return (self._settings.command_filter,) if self._settings.command_filter else ()

    def _command_properties(self, props: Properties) -> tuple[Properties, int | None]:
        """The MQTT 5 properties a command carries down (a Response Topic ``{prefix}/{id}/rest`` is mapped back
        to ``devices/{id}/rest``, like the topic), and its Message Expiry Interval."""
        if not props:
            return NO_PROPERTIES, None
        values: dict[PropertyId, int | str | bytes] = {}
        for pid in (PropertyId.PAYLOAD_FORMAT_INDICATOR, PropertyId.CONTENT_TYPE, PropertyId.CORRELATION_DATA):
            value = props.get(pid)
            if value is not None:
                values[pid] = value
        rt = props.get(PropertyId.RESPONSE_TOPIC)
        if isinstance(rt, str) and self.commands is not None:  # tenant-aware: only into the device's own space
            values[PropertyId.RESPONSE_TOPIC] = self.commands.device_response_topic(rt)
        elif isinstance(rt, str):
            prefix = self._settings.topic_prefix + "/"
            values[PropertyId.RESPONSE_TOPIC] = "devices/" + rt[len(prefix):] if rt.startswith(prefix) else rt
        expiry = props.get(PropertyId.MESSAGE_EXPIRY_INTERVAL)
        out = Properties(values=values, user=props.user) if values or props.user else NO_PROPERTIES
        return out, expiry if isinstance(expiry, int) else None

    def _probe(self, link: LinkBase) -> None:
        if link.probe_mid == 0 and link.probe_next:
            link.probe_mid, link.probe_t = link.probe_next, time.monotonic()
        link.probe_next = 0

    @property
    def backlog(self) -> int:
        """Records of the backlog (present when the current connection came up) not yet acknowledged."""
        return self._backfill.remaining() if self._backfill is not None else 0

    @property
    def backfill_eta(self) -> float | None:
        """Seconds until the backlog is drained at the rate seen so far (or the configured pace); 0 when there
        is none; None while disconnected or before the first acknowledgement of an unpaced backlog."""
        if self._state != "connected" or self._backfill is None:
            return None
        return self._backfill.eta()

    def _quarantine(self, record_id: int, reason: str, trace: str | None = None) -> None:
        self.refused += 1
        self._outbox.quarantine(record_id, reason)
        self._log.warning("uplink.publish_refused", record_id=record_id, reason=reason, trace_id=trace)
