"""What the uplink puts on the wire for a record (mixed into :class:`~edgegw.uplink.paho_bridge.Uplink`): one QoS 1
PUBLISH per record (the common record through :class:`~edgegw.uplink._wire.RecordWire`'s cached bytes, any other
through its carried properties), or many records in one msgpack frame (``batch_max_records`` > 1); a record that
cannot be sent is quarantined with the reason, an expired one deleted and counted."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from edgegw.mqtt.forward import decode_record_properties
from edgegw.ops.otel import Spans
from edgegw.outbox.store import Outbox, Record
from edgegw.tracing import trace_id
from edgegw.uplink._backfill import Backfill
from edgegw.uplink._linkbase import LinkBase
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
    upstream_topic,
)
from edgegw.uplink.frames import RECORD_COST, encode_frame, frame_envelope, record_cost

if TYPE_CHECKING:
    from edgegw.config import UplinkSettings


class Sending:
    """Records to PUBLISHes; the attributes are :class:`~edgegw.uplink.paho_bridge.Uplink`'s."""

    _outbox: Outbox
    _settings: UplinkSettings
    _wire: RecordWire
    _backfill: Backfill | None
    _log: Any
    otel: Spans | None
    commands: Any
    sent: int
    frames_sent: int
    bytes_sent: int
    expired: dict[str, int]

    if TYPE_CHECKING:
        def _quarantine(self, record_id: int, reason: str, trace: str | None = None) -> None: ...

        def _probe(self, link: LinkBase) -> None: ...

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
            # Everything a frame's PUBLISH adds to its records' costs comes off the server's Maximum Packet Size, so
            # a frame of records that fit is never refused as a whole (every record in it quarantined): the fixed
            # header (at most 5 bytes), topic, packet id, properties, msgpack envelope and zlib's worst case.
            compress = s.batch_compression == "zlib"
            properties = _frame_properties(compress, limit_n) if link.mqtt5 else None
            around = (5 + 2 + len(self._frame_topic().encode()) + 2
                      + (len(properties.pack()) if properties is not None else 0)
                      + frame_envelope(link.max_packet, compress))
            limit_b = min(limit_b, link.max_packet - around)  # below one record's cost: frames of one record
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

    def _frame_topic(self) -> str:
        s = self._settings
        return f"{s.topic_prefix}/_batch" + ("/zlib" if s.batch_compression == "zlib" else "")

    def _send_frame(self, link: LinkBase, frame: list[tuple[Record, str, str | None]]) -> bool:
        """PUBLISH one frame; False if the link failed."""
        compress = self._settings.batch_compression == "zlib"
        topic = self._frame_topic()
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
