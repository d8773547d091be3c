"""The codec's error classes and primitive fields: the Reader that walks one framed packet body, variable byte
integers, UTF-8 strings and binary data (MQTT 3.1.1 §1.5, MQTT 5 §1.5). No I/O.

Part of the wire codec (edgegw/mqtt/codec.py re-exports the public names); every other codec module builds on this
one and this one imports none of them.
"""

from __future__ import annotations

import struct
from typing import cast

from edgegw.mqtt.packets import ReasonCode


class MQTTProtocolError(Exception):
    """The peer broke the protocol. ``reason_code`` is what to tell it (CONNACK or DISCONNECT) if we still can."""

    reason_code: ReasonCode = ReasonCode.PROTOCOL_ERROR

    def __init__(self, message: str, reason_code: ReasonCode | None = None) -> None:
        super().__init__(message)
        if reason_code is not None:
            self.reason_code = reason_code


class MalformedPacket(MQTTProtocolError):
    reason_code = ReasonCode.MALFORMED_PACKET


class PacketTooLarge(MQTTProtocolError):
    reason_code = ReasonCode.PACKET_TOO_LARGE


MAX_REMAINING_LENGTH = 268_435_455  # MQTT 3.1.1 §2.2.3: four bytes of variable byte integer


# ---------------------------------------------------------------------------------------------------------------
# Primitive readers. A Reader walks one framed packet body; every short read is the peer's fault.


class Reader:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: memoryview | bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = memoryview(buf)
        self.pos = pos
        self.end = len(self.buf) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def _take(self, n: int) -> memoryview:
        if n > self.end - self.pos:
            raise MalformedPacket("packet shorter than its fields")
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        if self.pos >= self.end:
            raise MalformedPacket("packet shorter than its fields")
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def u16(self) -> int:
        return cast(int, struct.unpack_from("!H", self._take(2))[0])

    def u32(self) -> int:
        return cast(int, struct.unpack_from("!I", self._take(4))[0])

    def varint(self) -> int:
        value = 0
        for shift in (0, 7, 14, 21):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise MalformedPacket("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return bytes(self._take(self.u16()))

    def utf8(self) -> str:
        raw = self._take(self.u16())
        try:
            text = str(raw, "utf-8")
        except UnicodeDecodeError:
            raise MalformedPacket("string is not valid UTF-8") from None
        # MQTT 3.1.1 §1.5.3 / MQTT-1.5.3-2: a UTF-8 string MUST NOT include U+0000.
        if "\x00" in text:
            raise MalformedPacket("string contains U+0000")
        return text

    def rest(self) -> bytes:
        return bytes(self._take(self.end - self.pos))


def encode_varint(value: int) -> bytes:
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("!H", len(raw)) + raw


def _binary(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data
