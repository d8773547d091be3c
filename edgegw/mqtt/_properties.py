"""MQTT 5 properties (§2.2.2): their wire types, decode and encode, and which packet may carry which. No I/O.

Part of the wire codec (edgegw/mqtt/codec.py re-exports the public names).
"""

from __future__ import annotations

import struct
from typing import cast

from edgegw.mqtt._primitives import (
    MalformedPacket,
    MQTTProtocolError,
    Reader,
    _binary,
    _utf8,
    encode_varint,
)
from edgegw.mqtt.packets import (
    NO_PROPERTIES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Properties,
    PropertyId,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)

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
