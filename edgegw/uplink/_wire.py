"""What the uplink puts on the wire besides paho's own packets: MQTT 5 user properties encoded once, PUBLISH
sizes, and the checks that set a record aside rather than get the connection dropped for it."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt

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
    body = (_utf8_pair("edgegw-record-id", str(record.id)) + _utf8_pair("edgegw-device-id", record.device_id)
            + _utf8_pair("edgegw-received-at", iso_utc_ms(record.received_at)))
    return _PackedProperties(_varint(len(body)) + body)


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
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{int((ts - secs) * 1000):03d}Z"


def _close_socket(client: mqtt.Client) -> None:
    sock = client.socket()
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
