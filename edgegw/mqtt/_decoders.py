"""Decoders: (first byte, body, protocol version) -> packet, one per packet type, and :func:`decode_packet`'s
dispatch. :func:`decode_publish` is the gateway's hot path (one call per device message). No I/O.

The rule (as in h11's fuzzer): any byte string either decodes, or raises :class:`MalformedPacket` /
:class:`PacketTooLarge`; never any other exception. Running short *inside* a packet whose length the fixed header
already told us is malformed input, not a bug, because the remaining length is the peer's claim.

Part of the wire codec (edgegw/mqtt/codec.py re-exports the public names).
"""

from __future__ import annotations

from collections.abc import Callable

from edgegw.mqtt._primitives import MalformedPacket, Reader
from edgegw.mqtt._properties import decode_properties
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
)


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
