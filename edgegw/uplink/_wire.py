"""What the uplink puts on the wire besides paho's own packets: MQTT 5 user properties encoded once, PUBLISH
sizes, and the checks that set a record aside rather than get the connection dropped for it."""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import paho.mqtt.client as mqtt

from edgegw.mqtt.forward import _TP_ONLY
from edgegw.outbox.store import Record


class _PackedProperties:
    """MQTT 5 PUBLISH properties encoded once by us. paho only calls ``pack()`` on them; its own ``Properties``
    costs ~44 us per message to build and pack, about the whole budget of a publish."""

    __slots__ = ("_packed",)

    def __init__(self, packed: bytes) -> None:
        self._packed = packed

    def pack(self) -> bytes:
        return self._packed

    def __str__(self) -> str:  # paho may log it
        return f"<{len(self._packed)} bytes of properties>"


def _utf8_pair(key: str, value: str) -> bytes:
    """One User Property (0x26) with its UTF-8 string pair (MQTT 5 §1.5.7, §3.3.2.3.7)."""
    k, v = key.encode(), value.encode()
    return b"\x26" + len(k).to_bytes(2, "big") + k + len(v).to_bytes(2, "big") + v


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _frame_properties(compressed: bool, count: int) -> _PackedProperties:
    body = (_utf8_pair("edgegw-frame", "msgpack+zlib/1" if compressed else "msgpack/1")
            + _utf8_pair("edgegw-records", str(count)))
    return _PackedProperties(_varint(len(body)) + body)


def _packet_size(topic: str, payload: bytes, properties: _PackedProperties | None) -> int:
    """Bytes of a QoS 1 PUBLISH packet (MQTT 5 properties included when given; MQTT 3.1.1 has none)."""
    remaining = 2 + len(topic.encode()) + 2 + (len(properties.pack()) if properties is not None else 0) + len(payload)
    return 1 + len(_varint(remaining)) + remaining


def _user_properties(record: Record) -> _PackedProperties:
    body = _record_pairs(record)
    return _PackedProperties((bytes((len(body),)) if len(body) < 128 else _varint(len(body))) + body)


_RECORD_ID = b"\x26\x00\x10edgegw-record-id"
_RECEIVED_AT = b"\x26\x00\x12edgegw-received-at"


def _record_pairs(record: Record) -> bytes:
    """The user properties ``edgegw-record-id``, ``edgegw-device-id``, ``edgegw-received-at`` of one record: the
    constant parts encoded once (the key names; the device pair once per device), a few us per message less."""
    rid = b"%d" % record.id
    stamp = iso_utc_ms(record.received_at).encode()
    return b"".join((_RECORD_ID, len(rid).to_bytes(2, "big"), rid, _device_pair(record.device_id),
                     _RECEIVED_AT, len(stamp).to_bytes(2, "big"), stamp))


@functools.lru_cache(maxsize=4096)
def _device_pair(device_id: str) -> bytes:
    return _utf8_pair("edgegw-device-id", device_id)


def _utf8(value: object) -> bytes:
    """A UTF-8 Encoded String (MQTT 5 §1.5.4); ValueError for anything else (a damaged record)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    data = value.encode()
    return len(data).to_bytes(2, "big") + data  # OverflowError past 65535 bytes


def _record_properties(record: Record, carried: dict[str, Any], expiry: int | None,
                       response_topic: str | None) -> _PackedProperties:
    """The MQTT 5 PUBLISH properties of one record: what the device sent (``carried``, the decoded record
    properties of :mod:`edgegw.mqtt.forward`), then our user properties (``traceparent`` from ``tp`` last of them),
    then the device's own, in order.

    ``expiry``: the Message Expiry Interval still left (the caller drops expired records); ``response_topic``: the
    device's Response Topic already rewritten to the upstream namespace, or None to leave it out.
    Raises ValueError / TypeError / OverflowError for values no PUBLISH can carry (a damaged record)."""
    body = bytearray()
    pfi = carried.get("pfi")
    if pfi is not None:
        if pfi not in (0, 1):
            raise ValueError(f"payload format indicator {pfi!r}")
        body += b"\x01" + bytes((pfi,))
    if expiry is not None:
        body += b"\x02" + expiry.to_bytes(4, "big")
    ct = carried.get("ct")
    if ct is not None:
        body += b"\x03" + _utf8(ct)
    if response_topic is not None:
        body += b"\x08" + _utf8(response_topic)
    cd = carried.get("cd")
    if cd is not None:
        if not isinstance(cd, bytes):
            raise ValueError(f"correlation data is {type(cd).__name__}, not bytes")
        body += b"\x09" + len(cd).to_bytes(2, "big") + cd
    body += _record_pairs(record)
    tn = carried.get("tn")
    if tn is not None:  # the tenant [tenants] resolved (edgegw/pipeline): the record keeps it upstream too
        body += b"\x26\x00\x0dedgegw-tenant" + _utf8(tn)  # ValueError for a damaged record (quarantined)
    tp = carried.get("tp")
    if tp is not None:
        body += b"\x26\x00\x0btraceparent" + _utf8(tp)  # W3C trace context (edgegw/tracing.py)
    for pair in carried.get("up", ()):
        key, value = pair  # ValueError / TypeError unless a pair
        body += b"\x26" + _utf8(key) + _utf8(value)
    return _PackedProperties(_varint(len(body)) + bytes(body))


_LEN2 = tuple(n.to_bytes(2, "big") for n in range(256))  # a Two Byte Integer length, for the short strings below
_TRACEPARENT = b"\x26\x00\x0btraceparent\x00\x37"  # the user property's key and its value's length (55)
TP_ONLY = _TP_ONLY
"""The record properties of almost every record start so: msgpack ``{"tp": <55-byte str>}`` as
:func:`edgegw.mqtt.forward.record_properties` writes it, followed by the traceparent's bytes."""
TP_ONLY_SIZE = len(TP_ONLY) + 55
_TOPIC_CACHE_MAX = 8192


class RecordWire:
    """The uplink's hot path for the common record (no record properties, or only the ingress's traceparent):
    the upstream topic encoded once per (device, topic), ``edgegw-received-at`` once per millisecond, and the MQTT 5
    properties built as one ``bytes.join`` rather than through ``_carried`` (msgpack) and
    :func:`_record_properties` (a bytearray, a dict lookup per optional property). Byte for byte what the general
    path sends (tests/test_uplink_properties.py compares them); any other record takes the general path."""

    __slots__ = ("_prefix", "_stamp", "_stamp_key", "_topics")

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._topics: dict[tuple[str, str], tuple[str, bytes] | None] = {}
        self._stamp_key = -1
        self._stamp = b""

    def topic(self, device: str, topic: str) -> tuple[str, bytes] | None:
        """(upstream topic, its UTF-8 bytes with their two-byte length), or None when :func:`_unsendable` would
        refuse the topic (the general path quarantines the record with the reason)."""
        key = (device, topic)
        entry = self._topics.get(key, False)
        if entry is False:
            upstream = upstream_topic(self._prefix, device, topic)
            encoded = upstream.encode()
            entry = None if _unsendable(upstream, b"", None, None) is not None else (
                upstream, len(encoded).to_bytes(2, "big") + encoded)
            if len(self._topics) >= _TOPIC_CACHE_MAX:  # a fleet beyond the cache: start over rather than grow
                self._topics.clear()
            self._topics[key] = entry
        return entry  # type: ignore[return-value]

    def properties(self, record: Record, tp: bytes | None) -> bytes:
        """The MQTT 5 properties (with their length) of a record whose only record property is ``tp`` (the
        traceparent's 55 ASCII bytes), or that has none: what ``_user_properties`` / ``_record_properties`` give."""
        rid = b"%d" % record.id
        ts = record.received_at
        secs = int(ts)
        ms = int((ts - secs) * 1000)  # the very arithmetic of iso_utc_ms, so the same key means the same text
        if secs * 1000 + ms != self._stamp_key:
            stamp = iso_utc_ms(ts).encode()
            self._stamp = _RECEIVED_AT + len(stamp).to_bytes(2, "big") + stamp
            self._stamp_key = secs * 1000 + ms
        if tp is None:
            body = b"".join((_RECORD_ID, _LEN2[len(rid)], rid, _device_pair(record.device_id), self._stamp))
        else:
            body = b"".join((_RECORD_ID, _LEN2[len(rid)], rid, _device_pair(record.device_id), self._stamp,
                             _TRACEPARENT, tp))
        n = len(body)
        if n < 0x80:
            return bytes((n,)) + body
        if n < 0x4000:
            return bytes((n & 0x7F | 0x80, n >> 7)) + body
        return _varint(n) + body


def expiry_left(mei: int, received_at: float, now: float) -> int | None:
    """Seconds of a Message Expiry Interval of ``mei`` left at ``now`` (MQTT 5 §3.3.2.3.3: the received value
    minus the time waited), rounded up to whole seconds; None once expired. A clock that went back counts as no
    time waited, so a message never lives longer than ``mei``."""
    left = mei - max(0.0, now - received_at)
    if left <= 0:
        return None
    return min(mei, math.ceil(left))


def upstream_topic(prefix: str, device: str, topic: str) -> str:
    """``devices/{device}/rest`` -> ``{prefix}/{device}/rest``; any other topic goes under ``{prefix}/{device}/``.

    A record the pipeline routed (edgegw/pipeline, ``[[routes]]``) is stored as U+0000 + its full upstream topic
    (a device topic never starts with U+0000: MQTT-1.5.3-2): that topic is used as is, without ``prefix``."""
    if topic[:1] == "\x00":
        return topic[1:]
    head = f"devices/{device}/"
    return f"{prefix}/{device}/{topic[len(head):] if topic.startswith(head) else topic}"


def _unsendable(topic: str, payload: bytes, properties: _PackedProperties | None, max_packet: int | None) -> str | None:
    """Why this PUBLISH can never be accepted upstream, or None. Checked here rather than by being disconnected
    for it over and over (a wildcard in a topic name is a protocol error, MQTT-3.3.2-2)."""
    if "+" in topic or "#" in topic:
        return "wildcard in topic name"
    encoded = len(topic.encode())
    if encoded > 65535:
        return f"topic is {encoded} bytes (MQTT allows 65535)"
    if max_packet is not None:
        remaining = 2 + encoded + 2 + (len(properties.pack()) if properties is not None else 0) + len(payload)
        size = 1 + len(_varint(remaining)) + remaining
        if size > max_packet:
            return f"PUBLISH of {size} bytes exceeds the server's Maximum Packet Size {max_packet}"
    return None


def iso_utc_ms(ts: float) -> str:
    """``2024-05-01T12:00:00.123Z`` for a unix time."""
    secs = int(ts)
    return _iso_second(secs) + f".{int((ts - secs) * 1000):03d}Z"


@functools.lru_cache(maxsize=64)
def _iso_second(secs: int) -> str:
    # Records of one group share their second: strftime once per second rather than once per record (2 % of the
    # gateway's CPU in the benchmark's profile).
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))


def _close_socket(client: mqtt.Client) -> None:
    sock = client.socket()
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
