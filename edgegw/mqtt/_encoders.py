"""Encoders: packet -> bytes, one branch per packet type in :func:`encode_packet`, plus the two the hot path calls
directly (:func:`encode_publish`, :func:`encode_puback_ok`). No I/O.

Part of the wire codec (edgegw/mqtt/codec.py re-exports the public names).
"""

from __future__ import annotations

import struct

from edgegw.mqtt._primitives import _binary, _utf8, encode_varint
from edgegw.mqtt._properties import encode_properties
from edgegw.mqtt.packets import (
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    PublishAckBase,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    connack_code_311,
)


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
