"""MQTT 3.1.1 / 5.0 wire codec: framing, one decode and one encode per packet type. No I/O.

The rule (as in h11's fuzzer): any byte string either decodes, or raises :class:`MalformedPacket` /
:class:`PacketTooLarge`; never any other exception. Running short *inside* a packet whose length the fixed header
already told us is malformed input, not a bug, because the remaining length is the peer's claim.

This module is the codec's one import path; the code lives in modules of one job each:
_primitives.py (error classes, Reader, varint / UTF-8 / binary fields), _properties.py (MQTT 5 properties),
_framing.py (FrameReader), _decoders.py (bytes -> packet), _encoders.py (packet -> bytes). The names below are the
same objects, so importing them from here costs nothing per message.
"""

from __future__ import annotations

from edgegw.mqtt._decoders import decode_packet, decode_publish
from edgegw.mqtt._encoders import encode_packet, encode_puback_ok, encode_publish
from edgegw.mqtt._framing import FrameReader
from edgegw.mqtt._primitives import (
    MAX_REMAINING_LENGTH,
    MalformedPacket,
    MQTTProtocolError,
    PacketTooLarge,
    Reader,
    encode_varint,
)
from edgegw.mqtt._properties import (
    decode_properties,
    encode_properties,
    misplaced_property,
)

__all__ = [
    "MAX_REMAINING_LENGTH",
    "FrameReader",
    "MQTTProtocolError",
    "MalformedPacket",
    "PacketTooLarge",
    "Reader",
    "decode_packet",
    "decode_properties",
    "decode_publish",
    "encode_packet",
    "encode_properties",
    "encode_puback_ok",
    "encode_publish",
    "encode_varint",
    "misplaced_property",
]
