"""MQTT 3.1.1 / 5.0 wire codec: framing, one decode and one encode per packet type. No I/O.

The rule (as in h11's fuzzer): any byte string either decodes, or raises :class:`MalformedPacket` /
:class:`PacketTooLarge`; never any other exception. Running short *inside* a packet whose length the fixed header
already told us is malformed input, not a bug, because the remaining length is the peer's claim.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import cast

from edgegw.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    NO_PROPERTIES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Properties,
    PropertyId,
    Puback,
    Pubcomp,
    Publish,
    PublishAckBase,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Unsuback,
    Unsubscribe,
    Will,
    connack_code_311,
)


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


# ---------------------------------------------------------------------------------------------------------------
# MQTT 5 properties (§2.2.2).

_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES: dict[int, int] = {
    PropertyId.PAYLOAD_FORMAT_INDICATOR: _BYTE,
    PropertyId.MESSAGE_EXPIRY_INTERVAL: _U32,
    PropertyId.CONTENT_TYPE: _UTF8,
    PropertyId.RESPONSE_TOPIC: _UTF8,
    PropertyId.CORRELATION_DATA: _BINARY,
    PropertyId.SUBSCRIPTION_IDENTIFIER: _VARINT,
    PropertyId.SESSION_EXPIRY_INTERVAL: _U32,
    PropertyId.ASSIGNED_CLIENT_IDENTIFIER: _UTF8,
    PropertyId.SERVER_KEEP_ALIVE: _U16,
    PropertyId.AUTHENTICATION_METHOD: _UTF8,
    PropertyId.AUTHENTICATION_DATA: _BINARY,
    PropertyId.REQUEST_PROBLEM_INFORMATION: _BYTE,
    PropertyId.WILL_DELAY_INTERVAL: _U32,
    PropertyId.REQUEST_RESPONSE_INFORMATION: _BYTE,
    PropertyId.RESPONSE_INFORMATION: _UTF8,
    PropertyId.SERVER_REFERENCE: _UTF8,
    PropertyId.REASON_STRING: _UTF8,
    PropertyId.RECEIVE_MAXIMUM: _U16,
    PropertyId.TOPIC_ALIAS_MAXIMUM: _U16,
    PropertyId.TOPIC_ALIAS: _U16,
    PropertyId.MAXIMUM_QOS: _BYTE,
    PropertyId.RETAIN_AVAILABLE: _BYTE,
    PropertyId.USER_PROPERTY: _PAIR,
    PropertyId.MAXIMUM_PACKET_SIZE: _U32,
    PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE: _BYTE,
    PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE: _BYTE,
    PropertyId.SHARED_SUBSCRIPTION_AVAILABLE: _BYTE,
}


_P = PropertyId
_ACK_PROPS = frozenset({_P.REASON_STRING, _P.USER_PROPERTY})
_PROPERTIES_OF: dict[str, frozenset[int]] = {
    # MQTT 5 §2.2.2.2: which property may appear in which packet; any other is a Malformed Packet.
    "CONNECT": frozenset({_P.SESSION_EXPIRY_INTERVAL, _P.AUTHENTICATION_METHOD, _P.AUTHENTICATION_DATA,
                          _P.REQUEST_PROBLEM_INFORMATION, _P.REQUEST_RESPONSE_INFORMATION, _P.RECEIVE_MAXIMUM,
                          _P.TOPIC_ALIAS_MAXIMUM, _P.USER_PROPERTY, _P.MAXIMUM_PACKET_SIZE}),
    "WILL": frozenset({_P.PAYLOAD_FORMAT_INDICATOR, _P.MESSAGE_EXPIRY_INTERVAL, _P.CONTENT_TYPE, _P.RESPONSE_TOPIC,
                       _P.CORRELATION_DATA, _P.WILL_DELAY_INTERVAL, _P.USER_PROPERTY}),
    "PUBLISH": frozenset({_P.PAYLOAD_FORMAT_INDICATOR, _P.MESSAGE_EXPIRY_INTERVAL, _P.CONTENT_TYPE, _P.RESPONSE_TOPIC,
                          _P.CORRELATION_DATA, _P.SUBSCRIPTION_IDENTIFIER, _P.TOPIC_ALIAS, _P.USER_PROPERTY}),
    "ACK": _ACK_PROPS,  # PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK
    "SUBSCRIBE": frozenset({_P.SUBSCRIPTION_IDENTIFIER, _P.USER_PROPERTY}),
    "UNSUBSCRIBE": frozenset({_P.USER_PROPERTY}),
    "DISCONNECT": frozenset({_P.SESSION_EXPIRY_INTERVAL, _P.SERVER_REFERENCE, _P.REASON_STRING, _P.USER_PROPERTY}),
    "AUTH": frozenset({_P.AUTHENTICATION_METHOD, _P.AUTHENTICATION_DATA, _P.REASON_STRING, _P.USER_PROPERTY}),
    "CONNACK": frozenset(set(_PROPERTY_TYPES) - {_P.PAYLOAD_FORMAT_INDICATOR, _P.MESSAGE_EXPIRY_INTERVAL,
                                                  _P.CONTENT_TYPE, _P.RESPONSE_TOPIC, _P.CORRELATION_DATA,
                                                  _P.SUBSCRIPTION_IDENTIFIER, _P.REQUEST_PROBLEM_INFORMATION,
                                                  _P.WILL_DELAY_INTERVAL, _P.REQUEST_RESPONSE_INFORMATION,
                                                  _P.TOPIC_ALIAS}),
}


_KIND_OF: dict[type, str] = {
    Connack: "CONNACK", Publish: "PUBLISH", Puback: "ACK", Pubrec: "ACK", Pubrel: "ACK", Pubcomp: "ACK",
    Subscribe: "SUBSCRIBE", Suback: "ACK", Unsubscribe: "UNSUBSCRIBE", Unsuback: "ACK", Disconnect: "DISCONNECT",
    Auth: "AUTH",
}


def misplaced_property(packet: Packet) -> str | None:
    """The first property ``packet`` (as received over MQTT 5) carries that its packet type may not, else None.
    Decoding accepts any known property anywhere (so the codec round-trips); the engine refuses these as a
    Malformed Packet (MQTT 5 §2.2.2.2)."""
    if isinstance(packet, Connect):
        found = _misplaced(packet.properties, "CONNECT")
        if found is None and packet.will is not None:
            found = _misplaced(packet.will.properties, "WILL")
        return found
    kind = _KIND_OF.get(type(packet))
    props = getattr(packet, "properties", None)
    if kind is None or props is None:
        return None
    return _misplaced(props, kind)


def _misplaced(props: Properties, kind: str) -> str | None:
    if not props:
        return None
    allowed = _PROPERTIES_OF[kind]
    for pid in props.values:
        if pid not in allowed:
            return f"property {PropertyId(pid).name} is not allowed in {kind}"
    if props.user and _P.USER_PROPERTY not in allowed:
        return f"user properties are not allowed in {kind}"
    if props.subscription_ids and _P.SUBSCRIPTION_IDENTIFIER not in allowed:
        return f"property SUBSCRIPTION_IDENTIFIER is not allowed in {kind}"
    return None


def decode_properties(r: Reader) -> Properties:
    length = r.varint()
    if length > r.remaining:
        raise MalformedPacket("property length exceeds packet")
    end = r.pos + length
    values: dict[PropertyId, int | str | bytes] = {}
    user: list[tuple[str, str]] = []
    sub_ids: list[int] = []
    sub = Reader(r.buf, r.pos, end)
    while sub.remaining:
        ident = sub.varint()
        kind = _PROPERTY_TYPES.get(ident)
        if kind is None:
            raise MalformedPacket(f"unknown property identifier 0x{ident:02x}")
        pid = PropertyId(ident)
        value: int | str | bytes
        if kind == _PAIR:
            user.append((sub.utf8(), sub.utf8()))
            continue
        if kind == _BYTE:
            value = sub.u8()
        elif kind == _U16:
            value = sub.u16()
        elif kind == _U32:
            value = sub.u32()
        elif kind == _VARINT:
            value = sub.varint()
        elif kind == _UTF8:
            value = sub.utf8()
        else:
            value = sub.binary()
        if pid == PropertyId.SUBSCRIPTION_IDENTIFIER:
            sub_ids.append(cast(int, value))
            continue
        # MQTT 5 §2.2.2.2: including a property more than once is a Protocol Error (user properties excepted).
        if pid in values:
            raise MQTTProtocolError(f"property {pid.name} given twice")
        values[pid] = value
    r.pos = end
    if not (values or user or sub_ids):
        return NO_PROPERTIES
    return Properties(values=values, user=tuple(user), subscription_ids=tuple(sub_ids))


def encode_properties(props: Properties) -> bytes:
    out = bytearray()
    for pid, value in props.values.items():
        kind = _PROPERTY_TYPES[pid]
        out += encode_varint(pid)
        if kind == _BYTE:
            out.append(cast(int, value))
        elif kind == _U16:
            out += struct.pack("!H", value)
        elif kind == _U32:
            out += struct.pack("!I", value)
        elif kind == _VARINT:
            out += encode_varint(cast(int, value))
        elif kind == _UTF8:
            out += _utf8(cast(str, value))
        else:
            out += _binary(cast(bytes, value))
    for sid in props.subscription_ids:
        out += encode_varint(PropertyId.SUBSCRIPTION_IDENTIFIER) + encode_varint(sid)
    for key, val in props.user:
        out += encode_varint(PropertyId.USER_PROPERTY) + _utf8(key) + _utf8(val)
    return encode_varint(len(out)) + bytes(out)


# ---------------------------------------------------------------------------------------------------------------
# Framing.


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


# ---------------------------------------------------------------------------------------------------------------
# Decoders: (flags, body, protocol version) -> packet.


def _check_flags(first: int, expected: int, name: str) -> None:
    # MQTT 3.1.1 §2.2.2 / MQTT-2.2.2-2: reserved flags must be exactly as specified.
    if first & 0x0F != expected:
        raise MalformedPacket(f"invalid fixed header flags for {name}")


def _decode_connect(first: int, body: memoryview, _version: int) -> Connect:
    _check_flags(first, 0, "CONNECT")
    r = Reader(body)
    protocol_name = r.utf8()
    level = r.u8()
    if (protocol_name, level) not in (("MQTT", MQTT_311), ("MQTT", MQTT_5)):
        # Enough to answer with the right CONNACK; the caller refuses the version (MQTT-3.1.2-2).
        return Connect(protocol_level=level, client_id="", clean_start=True, keepalive=0, protocol_name=protocol_name)
    flags = r.u8()
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag set")  # MQTT-3.1.2-3
    keepalive = r.u16()
    props = decode_properties(r) if level == MQTT_5 else NO_PROPERTIES
    client_id = r.utf8()
    will = None
    will_qos = (flags >> 3) & 0x03
    if flags & 0x04:
        if will_qos == 3:
            raise MalformedPacket("will QoS 3")  # MQTT-3.1.2-14
        will_props = decode_properties(r) if level == MQTT_5 else NO_PROPERTIES
        will = Will(r.utf8(), r.binary(), will_qos, bool(flags & 0x20), will_props)
    elif will_qos or flags & 0x20:
        raise MalformedPacket("will QoS or retain set without will flag")  # MQTT-3.1.2-11/13/15
    username = r.utf8() if flags & 0x80 else None
    if flags & 0x40:
        if level == MQTT_311 and username is None:
            raise MalformedPacket("password without user name")  # MQTT-3.1.2-22
        password: bytes | None = r.binary()
    else:
        password = None
    if r.remaining:
        raise MalformedPacket("trailing bytes after CONNECT payload")
    return Connect(level, client_id, bool(flags & 0x02), keepalive, username, password, will, props, protocol_name)


def decode_publish(first: int, body: memoryview, version: int) -> Publish:
    """A PUBLISH (``first >> 4 == 3``). Public for the engine's hot path, which calls it without
    :func:`decode_packet`'s dispatch."""
    # The hot path of the gateway (one call per device message): fields read by index rather than through a
    # Reader; the same checks and errors as Reader.utf8 / u16.
    qos = (first >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")  # MQTT-3.3.1-4
    dup = bool(first & 0x08)
    if dup and qos == 0:
        raise MalformedPacket("PUBLISH with DUP set at QoS 0")  # MQTT-3.3.1-2
    n = len(body)
    pos = 2 + ((body[0] << 8 | body[1]) if n >= 2 else n)
    if pos > n:
        raise MalformedPacket("packet shorter than its fields")
    try:
        topic = str(body[2:pos], "utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("string is not valid UTF-8") from None
    if "\x00" in topic:
        raise MalformedPacket("string contains U+0000")  # MQTT-1.5.3-2
    packet_id = None
    if qos:
        if pos + 2 > n:
            raise MalformedPacket("packet shorter than its fields")
        packet_id = body[pos] << 8 | body[pos + 1]
        pos += 2
        if packet_id == 0:
            raise MalformedPacket("PUBLISH with packet identifier 0")  # MQTT-2.3.1-1
    if version == MQTT_5:
        r = Reader(body, pos)
        props = decode_properties(r)
        pos = r.pos
    else:
        props = NO_PROPERTIES
    return Publish(topic, bytes(body[pos:]), qos, bool(first & 0x01), dup, packet_id, props)


def _ack_decoder(cls: type[PublishAckBase], flags: int) -> Callable[[int, memoryview, int], PublishAckBase]:
    def decode(first: int, body: memoryview, version: int) -> PublishAckBase:
        _check_flags(first, flags, cls.__name__.upper())
        r = Reader(body)
        packet_id = r.u16()
        reason = ReasonCode.SUCCESS
        props = NO_PROPERTIES
        if version == MQTT_5 and r.remaining:
            reason = _reason(r.u8())
            if r.remaining:
                props = decode_properties(r)
        if r.remaining:
            raise MalformedPacket(f"trailing bytes in {cls.__name__.upper()}")
        return cls(packet_id, reason, props)

    return decode


def _reason(value: int) -> ReasonCode:
    try:
        return ReasonCode(value)
    except ValueError:
        raise MalformedPacket(f"unknown reason code 0x{value:02x}") from None


def _decode_subscribe(first: int, body: memoryview, version: int) -> Subscribe:
    _check_flags(first, 0x02, "SUBSCRIBE")  # MQTT-3.8.1-1
    r = Reader(body)
    packet_id = r.u16()
    if packet_id == 0:
        raise MalformedPacket("SUBSCRIBE with packet identifier 0")  # MQTT-2.3.1-1
    props = decode_properties(r) if version == MQTT_5 else NO_PROPERTIES
    subs: list[tuple[str, SubscriptionOptions]] = []
    while r.remaining:
        topic_filter = r.utf8()
        opts = r.u8()
        if opts & 0xC0 or (version == MQTT_311 and opts & 0xFC):
            raise MalformedPacket("SUBSCRIBE reserved option bits set")  # MQTT-3.8.3-4 / MQTT 5 §3.8.3.1
        qos = opts & 0x03
        if qos == 3 or (opts >> 4) & 0x03 == 3:
            raise MalformedPacket("SUBSCRIBE invalid QoS or retain handling")
        subs.append((topic_filter, SubscriptionOptions(qos, bool(opts & 0x04), bool(opts & 0x08), (opts >> 4) & 0x03)))
    if not subs:
        raise MalformedPacket("SUBSCRIBE without topic filters")  # MQTT-3.8.3-3
    return Subscribe(packet_id, tuple(subs), props)


def _decode_unsubscribe(first: int, body: memoryview, version: int) -> Unsubscribe:
    _check_flags(first, 0x02, "UNSUBSCRIBE")  # MQTT-3.10.1-1
    r = Reader(body)
    packet_id = r.u16()
    if packet_id == 0:
        raise MalformedPacket("UNSUBSCRIBE with packet identifier 0")  # MQTT-2.3.1-1
    props = decode_properties(r) if version == MQTT_5 else NO_PROPERTIES
    filters: list[str] = []
    while r.remaining:
        filters.append(r.utf8())
    if not filters:
        raise MalformedPacket("UNSUBSCRIBE without topic filters")  # MQTT-3.10.3-2
    return Unsubscribe(packet_id, tuple(filters), props)


def _decode_empty(cls: type[Pingreq] | type[Pingresp]) -> Callable[[int, memoryview, int], Packet]:
    def decode(first: int, body: memoryview, _version: int) -> Packet:
        _check_flags(first, 0, cls.__name__.upper())
        if len(body):
            raise MalformedPacket(f"{cls.__name__.upper()} with a body")
        return cls()

    return decode


def _decode_disconnect(first: int, body: memoryview, version: int) -> Disconnect:
    _check_flags(first, 0, "DISCONNECT")
    r = Reader(body)
    if version == MQTT_311:
        if r.remaining:
            raise MalformedPacket("DISCONNECT with a body")
        return Disconnect()
    reason = _reason(r.u8()) if r.remaining else ReasonCode.SUCCESS
    props = decode_properties(r) if r.remaining else NO_PROPERTIES
    if r.remaining:
        raise MalformedPacket("trailing bytes in DISCONNECT")  # MQTT 5 §3.14.3: no payload
    return Disconnect(reason, props)


def _decode_auth(first: int, body: memoryview, version: int) -> Auth:
    if version != MQTT_5:
        raise MalformedPacket("AUTH before MQTT 5")
    _check_flags(first, 0, "AUTH")
    r = Reader(body)
    reason = _reason(r.u8()) if r.remaining else ReasonCode.SUCCESS
    props = decode_properties(r) if r.remaining else NO_PROPERTIES
    if r.remaining:
        raise MalformedPacket("trailing bytes in AUTH")  # MQTT 5 §3.15.3: no payload
    return Auth(reason, props)


def _decode_connack(first: int, body: memoryview, version: int) -> Connack:
    _check_flags(first, 0, "CONNACK")
    r = Reader(body)
    flags = r.u8()
    code = r.u8()
    if version == MQTT_5:
        return Connack(bool(flags & 1), _reason(code), decode_properties(r))
    reason = {0: ReasonCode.SUCCESS, 1: ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, 2: ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
              3: ReasonCode.SERVER_UNAVAILABLE, 4: ReasonCode.BAD_USERNAME_OR_PASSWORD,
              5: ReasonCode.NOT_AUTHORIZED}.get(code)
    if reason is None:
        raise MalformedPacket(f"unknown CONNACK return code {code}")
    return Connack(bool(flags & 1), reason)


def _decode_suback(first: int, body: memoryview, version: int) -> Suback:
    _check_flags(first, 0, "SUBACK")
    r = Reader(body)
    packet_id = r.u16()
    props = decode_properties(r) if version == MQTT_5 else NO_PROPERTIES
    return Suback(packet_id, tuple(r.rest()), props)


def _decode_unsuback(first: int, body: memoryview, version: int) -> Unsuback:
    _check_flags(first, 0, "UNSUBACK")
    r = Reader(body)
    packet_id = r.u16()
    if version == MQTT_5:
        props = decode_properties(r)
        return Unsuback(packet_id, tuple(r.rest()), props)
    return Unsuback(packet_id)


_DECODERS: dict[int, Callable[[int, memoryview, int], Packet]] = {
    PacketType.CONNECT: _decode_connect,
    PacketType.CONNACK: _decode_connack,
    PacketType.PUBLISH: decode_publish,
    PacketType.PUBACK: _ack_decoder(Puback, 0),
    PacketType.PUBREC: _ack_decoder(Pubrec, 0),
    PacketType.PUBREL: _ack_decoder(Pubrel, 0x02),  # MQTT-3.6.1-1
    PacketType.PUBCOMP: _ack_decoder(Pubcomp, 0),
    PacketType.SUBSCRIBE: _decode_subscribe,
    PacketType.SUBACK: _decode_suback,
    PacketType.UNSUBSCRIBE: _decode_unsubscribe,
    PacketType.UNSUBACK: _decode_unsuback,
    PacketType.PINGREQ: _decode_empty(Pingreq),
    PacketType.PINGRESP: _decode_empty(Pingresp),
    PacketType.DISCONNECT: _decode_disconnect,
    PacketType.AUTH: _decode_auth,
}


def decode_packet(first: int, body: memoryview, version: int) -> Packet:
    """Decode one framed packet. ``version`` is the connection's protocol level (4 or 5)."""
    decoder = _DECODERS.get(first >> 4)
    if decoder is None:
        raise MalformedPacket(f"reserved packet type {first >> 4}")  # type 0 is reserved
    return decoder(first, body, version)


# ---------------------------------------------------------------------------------------------------------------
# Encoders: packet -> bytes.


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def _props(version: int, props: Properties) -> bytes:
    return encode_properties(props) if version == MQTT_5 else b""


def encode_packet(packet: Packet, version: int) -> bytes:
    if isinstance(packet, Publish):
        return encode_publish(packet, version)
    if isinstance(packet, PublishAckBase):
        ptype, flags = _ACK_TYPES[type(packet)]
        body = struct.pack("!H", packet.packet_id)
        if version == MQTT_5 and (packet.reason_code or packet.properties):
            body += bytes((packet.reason_code,))
            if packet.properties:
                body += encode_properties(packet.properties)
        return _frame(ptype << 4 | flags, body)
    if isinstance(packet, Connack):
        if version == MQTT_5:
            body = bytes((int(packet.session_present), packet.reason_code)) + encode_properties(packet.properties)
        else:
            body = bytes((int(packet.session_present), connack_code_311(packet.reason_code)))
        return _frame(PacketType.CONNACK << 4, body)
    if isinstance(packet, Pingresp):
        return b"\xd0\x00"
    if isinstance(packet, Pingreq):
        return b"\xc0\x00"
    if isinstance(packet, Disconnect):
        if version != MQTT_5:
            return b"\xe0\x00"
        return _frame(PacketType.DISCONNECT << 4, bytes((packet.reason_code,)) + encode_properties(packet.properties))
    if isinstance(packet, Suback):
        body = struct.pack("!H", packet.packet_id) + _props(version, packet.properties) + bytes(packet.reason_codes)
        return _frame(PacketType.SUBACK << 4, body)
    if isinstance(packet, Unsuback):
        body = struct.pack("!H", packet.packet_id)
        if version == MQTT_5:
            body += encode_properties(packet.properties) + bytes(packet.reason_codes)
        return _frame(PacketType.UNSUBACK << 4, body)
    if isinstance(packet, Connect):
        return _encode_connect(packet)
    if isinstance(packet, Subscribe):
        body = struct.pack("!H", packet.packet_id) + _props(version, packet.properties)
        for topic_filter, o in packet.subscriptions:
            opts = o.qos | o.no_local << 2 | o.retain_as_published << 3 | o.retain_handling << 4
            body += _utf8(topic_filter) + bytes((opts,))
        return _frame(PacketType.SUBSCRIBE << 4 | 0x02, body)
    if isinstance(packet, Unsubscribe):
        body = struct.pack("!H", packet.packet_id) + _props(version, packet.properties)
        body += b"".join(_utf8(f) for f in packet.topic_filters)
        return _frame(PacketType.UNSUBSCRIBE << 4 | 0x02, body)
    if isinstance(packet, Auth):
        return _frame(PacketType.AUTH << 4, bytes((packet.reason_code,)) + encode_properties(packet.properties))
    raise TypeError(f"cannot encode {packet!r}")


_PUBACK_OK = struct.Struct("!BBH")


def encode_puback_ok(packet_id: int) -> bytes:
    """PUBACK with reason Success and no properties: the same bytes in 3.1.1 and 5 (MQTT 5 §3.4.2.1 lets the
    reason code go when it is 0x00 and there are no properties). The gateway sends one per device message."""
    return _PUBACK_OK.pack(PacketType.PUBACK << 4, 2, packet_id)


_ACK_TYPES: dict[type, tuple[int, int]] = {
    Puback: (PacketType.PUBACK, 0),
    Pubrec: (PacketType.PUBREC, 0),
    Pubrel: (PacketType.PUBREL, 0x02),
    Pubcomp: (PacketType.PUBCOMP, 0),
}


def encode_publish(p: Publish, version: int) -> bytes:
    first = PacketType.PUBLISH << 4 | p.dup << 3 | p.qos << 1 | p.retain
    body = _utf8(p.topic)
    if p.qos:
        if not p.packet_id:
            raise ValueError("QoS > 0 PUBLISH needs a packet identifier")
        body += struct.pack("!H", p.packet_id)
    body += _props(version, p.properties) + p.payload
    return _frame(first, body)


def _encode_connect(c: Connect) -> bytes:
    flags = (c.clean_start << 1) | ((c.username is not None) << 7) | ((c.password is not None) << 6)
    if c.will is not None:
        flags |= 0x04 | c.will.qos << 3 | c.will.retain << 5
    body = _utf8(c.protocol_name) + bytes((c.protocol_level, flags)) + struct.pack("!H", c.keepalive)
    body += _props(c.protocol_level, c.properties) + _utf8(c.client_id)
    if c.will is not None:
        body += _props(c.protocol_level, c.will.properties) + _utf8(c.will.topic) + _binary(c.will.payload)
    if c.username is not None:
        body += _utf8(c.username)
    if c.password is not None:
        body += _binary(c.password)
    return _frame(PacketType.CONNECT << 4, body)
