"""Framing: a byte stream -> (first byte, body) frames, with a bound on the buffer. No I/O.

Part of the wire codec (edgegw/mqtt/codec.py re-exports :class:`FrameReader`).
"""

from __future__ import annotations

from edgegw.mqtt._primitives import MalformedPacket, PacketTooLarge


class FrameReader:
    """Splits a byte stream into (first byte, body) frames, refusing any frame over ``max_packet_size``.

    The buffer never holds more than one maximum-size packet plus what arrived with it in a single read, so a peer
    cannot make it grow without bound (h11's ``max_incomplete_event_size``).
    """

    __slots__ = ("_buf", "_max_packet_size", "_start")

    def __init__(self, max_packet_size: int) -> None:
        self._buf = bytearray()
        self._max_packet_size = max_packet_size
        # Frames already returned are skipped by offset and dropped at the next feed: deleting each one from the
        # front would move the rest of the buffer once per packet (many small PUBLISHes arrive in one read).
        self._start = 0

    def feed(self, data: bytes) -> None:
        if self._start:
            del self._buf[: self._start]
            self._start = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._start

    def next_frame(self) -> tuple[int, memoryview] | None:
        buf = self._buf
        start = self._start
        n = len(buf)
        if n - start < 2:
            if start and start == n:
                buf.clear()
                self._start = 0
            return None
        length = 0
        pos = start + 1
        for shift in (0, 7, 14, 21):
            if pos >= n:
                return None
            byte = buf[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
        else:
            raise MalformedPacket("remaining length longer than 4 bytes")
        total = pos + length
        # MQTT 5 §3.1.2.11.4: Maximum Packet Size counts the whole packet, fixed header included.
        if total - start > self._max_packet_size:
            raise PacketTooLarge(f"packet of {total - start} bytes exceeds the maximum of {self._max_packet_size}")
        if n < total:
            return None
        first = buf[start]
        body = memoryview(bytes(buf[pos:total]))
        self._start = total
        return first, body
