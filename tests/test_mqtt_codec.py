"""The MQTT wire codec: known bytes, malformed bytes, framing, round trips and the fuzz rule (STYLE.md §5).

Byte strings are written out by hand from the OASIS specs (MQTT 3.1.1 = mqtt-v3.1.1-os, MQTT 5 = mqtt-v5.0-os); the
section is cited where the bytes are (or extend) one of the spec's non-normative examples. Property encodings and
whole CONNECT / PUBLISH packets are also checked against paho-mqtt, an independent implementation.
"""

from __future__ import annotations

import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgegw.mqtt.codec import (
    FrameReader,
    MalformedPacket,
    MQTTProtocolError,
    PacketTooLarge,
    decode_packet,
    encode_packet,
    encode_properties,
    encode_varint,
)
from edgegw.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    NO_PROPERTIES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    PropertyId,
    Puback,
    Pubcomp,
    Publish,
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

P = PropertyId


def h(text: str) -> bytes:
    """Hex with spaces and ``|`` separators for readability; ``'...'`` spans are ASCII."""
    out = bytearray()
    for i, seg in enumerate(text.split("'")):
        if i % 2:
            out += seg.encode("ascii")
        else:
            out += bytes.fromhex(seg.replace("|", " "))
    return bytes(out)


def decode_one(data: bytes, version: int) -> Packet:
    reader = FrameReader(max_packet_size=1 << 20)
    reader.feed(data)
    frame = reader.next_frame()
    assert frame is not None, "incomplete frame"
    assert reader.buffered == 0, "frame shorter than the input"
    return decode_packet(frame[0], frame[1], version)


def decode_all(data: bytes, version: int, max_packet_size: int = 1 << 20) -> list[Packet]:
    reader = FrameReader(max_packet_size)
    reader.feed(data)
    packets = []
    while (frame := reader.next_frame()) is not None:
        packets.append(decode_packet(frame[0], frame[1], version))
    return packets


# ---------------------------------------------------------------------------------------------------------------
# Known byte strings: decode to the packet, encode back to the same bytes.

KNOWN: list[tuple[str, int, bytes, Packet]] = [
    # MQTT 3.1.1 §3.1.2.10, the variable header example (flags 0xCE = user, password, will QoS 1, will, clean
    # session; keep alive 10), with a payload in §3.1.3 order: client id, will topic, will message, user, password.
    ("connect-311-spec-example", MQTT_311,
     h("10 1f | 0004 'MQTT' 04 ce 000a | 0003 'dev' | 0003 'a/b' | 0003 'bye' | 0001 'u' | 0001 'p'"),
     Connect(MQTT_311, "dev", True, 10, "u", b"p", Will("a/b", b"bye", 1, False))),
    ("connect-311-minimal", MQTT_311,
     h("10 0e | 0004 'MQTT' 04 02 003c | 0002 'c1'"),
     Connect(MQTT_311, "c1", True, 60)),
    # Empty client id, clean session 0, will retain at QoS 2 with no user name (flags 0x34).
    ("connect-311-will-retain", MQTT_311,
     h("10 17 | 0004 'MQTT' 04 34 0000 | 0000 | 0003 'w/t' | 0004 00ff0102"),
     Connect(MQTT_311, "", False, 0, will=Will("w/t", b"\x00\xff\x01\x02", 2, True))),
    # MQTT 5 §3.1.2.12, the variable header example (level 5, keep alive 10, Session Expiry Interval 10), with
    # flags 0xC2 (user, password, clean start), Receive Maximum 20 and two user properties (§3.1.2.11.8: they may
    # repeat, order kept).
    ("connect-5-props-user", MQTT_5,
     h("10 33 | 0004 'MQTT' 05 c2 000a | 1d 11 0000000a 21 0014 26 0004 'site' 0005 'north' 26 0001 'k' 0001 'v'"
       " | 0003 'dev' | 0001 'u' | 0001 'p'"),
     Connect(MQTT_5, "dev", True, 10, "u", b"p", None,
             Properties({P.SESSION_EXPIRY_INTERVAL: 10, P.RECEIVE_MAXIMUM: 20}, user=(("site", "north"), ("k", "v"))))),
    # MQTT 5 §3.1.3.2: Will Properties come before the Will Topic. Password without user name is legal in 5
    # (flags 0x6e: password, will retain, will QoS 1, will, clean start).
    ("connect-5-will-props", MQTT_5,
     h("10 31 | 0004 'MQTT' 05 6e 003c | 00 | 0002 'id' | 14 18 00000005 01 01 03 000a 'text/plain' | 0003 'a/b'"
       " | 0002 'hi' | 0002 'pw'"),
     Connect(MQTT_5, "id", True, 60, None, b"pw",
             Will("a/b", b"hi", 1, True, Properties({
                 P.WILL_DELAY_INTERVAL: 5, P.PAYLOAD_FORMAT_INDICATOR: 1, P.CONTENT_TYPE: "text/plain"})))),
    # MQTT 3.1.1 §3.2.2.3: return codes.
    ("connack-311-accepted", MQTT_311, h("20 02 00 00"), Connack(False, ReasonCode.SUCCESS)),
    ("connack-311-session-present", MQTT_311, h("20 02 01 00"), Connack(True, ReasonCode.SUCCESS)),
    ("connack-311-not-authorized", MQTT_311, h("20 02 00 05"), Connack(False, ReasonCode.NOT_AUTHORIZED)),
    ("connack-311-bad-version", MQTT_311, h("20 02 00 01"), Connack(False, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION)),
    ("connack-5", MQTT_5, h("20 03 00 00 00"), Connack(False, ReasonCode.SUCCESS)),
    ("connack-5-refused", MQTT_5, h("20 03 00 87 00"), Connack(False, ReasonCode.NOT_AUTHORIZED)),
    ("connack-5-props", MQTT_5, h("20 08 00 00 | 05 21 000a 24 01"),
     Connack(False, ReasonCode.SUCCESS, Properties({P.RECEIVE_MAXIMUM: 10, P.MAXIMUM_QOS: 1}))),
    ("publish-311-qos0", MQTT_311, h("30 0a 0003 'a/b' 'hello'"), Publish("a/b", b"hello")),
    # MQTT 3.1.1 §3.3.2.3, the variable header example: topic "a/b", packet identifier 10.
    ("publish-311-qos1-spec-example", MQTT_311, h("32 0a 0003 612f62 000a 'hi!'"),
     Publish("a/b", b"hi!", qos=1, packet_id=10)),
    ("publish-311-qos2-dup-retain", MQTT_311, h("3d 08 0003 'a/b' 000b 'x'"),
     Publish("a/b", b"x", qos=2, retain=True, dup=True, packet_id=11)),
    ("publish-311-empty-payload", MQTT_311, h("31 05 0003 'a/b'"), Publish("a/b", b"", retain=True)),
    # MQTT 3.1.1 §1.5.3, the UTF-8 example: "A\U0002A6D4" is 00 05 41 F0 AA 9B 94.
    ("publish-311-utf8-spec-example", MQTT_311, h("30 07 0005 41 f0aa9b94"), Publish("A\U0002a6d4", b"")),
    ("publish-5-qos0", MQTT_5, h("30 0b 0003 'a/b' 00 'hello'"), Publish("a/b", b"hello")),
    ("publish-5-qos1-props", MQTT_5,
     h("32 2c 0003 'a/b' 0001 | 22 01 01 02 0000003c 03 0004 'json' 08 0005 'reply' 09 0002 cafe 26 0001 'k' 0001 'v'"
       " | '{}'"),
     Publish("a/b", b"{}", qos=1, packet_id=1,
             properties=Properties({P.PAYLOAD_FORMAT_INDICATOR: 1, P.MESSAGE_EXPIRY_INTERVAL: 60,
                                    P.CONTENT_TYPE: "json", P.RESPONSE_TOPIC: "reply",
                                    P.CORRELATION_DATA: b"\xca\xfe"}, user=(("k", "v"),)))),
    ("publish-5-qos2", MQTT_5, h("34 0b 0003 'a/b' ffff 00 'abc'"),
     Publish("a/b", b"abc", qos=2, packet_id=0xFFFF)),
    # MQTT 3.1.1 §3.4: PUBACK is just the packet identifier.
    ("puback-311", MQTT_311, h("40 02 000a"), Puback(10)),
    # MQTT 5 §3.4.2.1: reason code and property length may be omitted for Success with no properties.
    ("puback-5-short", MQTT_5, h("40 02 000a"), Puback(10)),
    ("puback-5-reason", MQTT_5, h("40 03 000a 10"), Puback(10, ReasonCode.NO_MATCHING_SUBSCRIBERS)),
    ("puback-5-reason-string", MQTT_5, h("40 0a 000a 80 06 1f 0003 'bad'"),
     Puback(10, ReasonCode.UNSPECIFIED_ERROR, Properties({P.REASON_STRING: "bad"}))),
    ("pubrec-311", MQTT_311, h("50 02 000a"), Pubrec(10)),
    ("pubrel-311", MQTT_311, h("62 02 000a"), Pubrel(10)),  # MQTT 3.1.1 §3.6.1: flags 0010
    ("pubcomp-311", MQTT_311, h("70 02 000a"), Pubcomp(10)),
    ("pubrec-5-quota", MQTT_5, h("50 03 000a 97"), Pubrec(10, ReasonCode.QUOTA_EXCEEDED)),
    ("pubcomp-5-not-found", MQTT_5, h("70 03 000a 92"), Pubcomp(10, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)),
    ("pingreq", MQTT_311, h("c0 00"), Pingreq()),  # MQTT 3.1.1 §3.12
    ("pingresp", MQTT_311, h("d0 00"), Pingresp()),  # MQTT 3.1.1 §3.13
    ("pingreq-5", MQTT_5, h("c0 00"), Pingreq()),
    ("disconnect-311", MQTT_311, h("e0 00"), Disconnect()),  # MQTT 3.1.1 §3.14
    ("disconnect-5", MQTT_5, h("e0 02 00 00"), Disconnect()),
    ("disconnect-5-will-props", MQTT_5, h("e0 07 04 05 11 00000000"),
     Disconnect(ReasonCode.DISCONNECT_WITH_WILL, Properties({P.SESSION_EXPIRY_INTERVAL: 0}))),
    # MQTT 3.1.1 §3.8.2 / §3.8.3 examples: packet identifier 10; "a/b" at QoS 1, "c/d" at QoS 2.
    ("subscribe-311-spec-example", MQTT_311, h("82 0e 000a | 0003 612f62 01 | 0003 632f64 02"),
     Subscribe(10, (("a/b", SubscriptionOptions(1)), ("c/d", SubscriptionOptions(2))))),
    # MQTT 5 §3.8.3.1: options 0x2d = retain handling 2, retain as published, no local, QoS 1; §3.8.2.1.2
    # Subscription Identifier 5.
    ("subscribe-5-options", MQTT_5, h("82 0b 000a | 02 0b 05 | 0003 'a/b' 2d"),
     Subscribe(10, (("a/b", SubscriptionOptions(1, True, True, 2)),), Properties(subscription_ids=(5,)))),
    # MQTT 3.1.1 §3.9.3 example: Success QoS 0, Success QoS 2, Failure.
    ("suback-311-spec-example", MQTT_311, h("90 05 000a 00 02 80"), Suback(10, (0, 2, 0x80))),
    ("suback-5", MQTT_5, h("90 06 000a 00 01 87 a2"), Suback(10, (1, 0x87, 0xA2))),
    # MQTT 3.1.1 §3.10.3 example: "a/b", "c/d".
    ("unsubscribe-311-spec-example", MQTT_311, h("a2 0c 000b | 0003 612f62 | 0003 632f64"),
     Unsubscribe(11, ("a/b", "c/d"))),
    ("unsubscribe-5", MQTT_5, h("a2 13 000b | 07 26 0001 'k' 0001 'v' | 0007 'sensors'"),
     Unsubscribe(11, ("sensors",), Properties(user=(("k", "v"),)))),
    ("unsuback-311", MQTT_311, h("b0 02 000b"), Unsuback(11)),
    ("unsuback-5", MQTT_5, h("b0 05 000b 00 00 11"), Unsuback(11, (0x00, 0x11))),
    ("auth-5", MQTT_5, h("f0 0a 00 | 08 15 0005 'SCRAM'"),
     Auth(ReasonCode.SUCCESS, Properties({P.AUTHENTICATION_METHOD: "SCRAM"}))),
]


@pytest.mark.parametrize(("version", "data", "packet"), [k[1:] for k in KNOWN], ids=[k[0] for k in KNOWN])
def test_known_bytes_decode(version: int, data: bytes, packet: Packet) -> None:
    assert decode_one(data, version) == packet


@pytest.mark.parametrize(("version", "data", "packet"), [k[1:] for k in KNOWN], ids=[k[0] for k in KNOWN])
def test_known_bytes_encode(version: int, data: bytes, packet: Packet) -> None:
    assert encode_packet(packet, version) == data


DECODE_ONLY = [
    # MQTT 5 §3.14.2.1: a DISCONNECT may omit reason code and properties (we always send them).
    ("disconnect-5-short", MQTT_5, h("e0 00"), Disconnect()),
    # MQTT 5 §3.14.2.2.1: with a reason code but no property length, the property length is 0.
    ("disconnect-5-reason-only", MQTT_5, h("e0 01 8b"), Disconnect(ReasonCode.SERVER_SHUTTING_DOWN)),
    # MQTT 5 §3.4.2.2.1: a PUBACK with a reason code but no property length.
    ("puback-5-success-explicit", MQTT_5, h("40 03 000a 00"), Puback(10)),
    ("puback-5-empty-props", MQTT_5, h("40 04 000a 00 00"), Puback(10)),
    # User properties interleaved with others still decode (we re-encode them last).
    ("publish-5-user-first", MQTT_5, h("30 0e 0001 't' | 09 26 0001 'k' 0001 'v' 01 01 | 'p'"),
     Publish("t", b"p", properties=Properties({P.PAYLOAD_FORMAT_INDICATOR: 1}, user=(("k", "v"),)))),
    # A four-byte remaining length (MQTT 3.1.1 §2.2.3 Table 2.4: 2 097 152 = 80 80 80 01) decodes through the frame.
    ("publish-311-long-payload", MQTT_311, h("30 80 80 80 01 0001 't'") + b"\x00" * (2_097_152 - 3),
     Publish("t", b"\x00" * (2_097_152 - 3))),
]


@pytest.mark.parametrize(("version", "data", "packet"), [k[1:] for k in DECODE_ONLY], ids=[k[0] for k in DECODE_ONLY])
def test_decode_only(version: int, data: bytes, packet: Packet) -> None:
    reader = FrameReader(max_packet_size=1 << 22)
    reader.feed(data)
    frame = reader.next_frame()
    assert frame is not None and reader.buffered == 0
    assert decode_packet(frame[0], frame[1], version) == packet


# MQTT 3.1.1 §2.2.3 Table 2.4: the bounds of each remaining-length size.
@pytest.mark.parametrize(("value", "encoded"), [
    (0, "00"), (127, "7f"), (128, "8001"), (16_383, "ff7f"), (16_384, "808001"), (2_097_151, "ffff7f"),
    (2_097_152, "80808001"), (268_435_455, "ffffff7f"),
])
def test_varint_spec_table(value: int, encoded: str) -> None:
    assert encode_varint(value) == bytes.fromhex(encoded)
    # The same integer as a subscription identifier decodes back through the property reader.
    if value:
        sub = Subscribe(1, (("t", SubscriptionOptions()),), Properties(subscription_ids=(value,)))
        assert decode_one(encode_packet(sub, MQTT_5), MQTT_5) == sub


@pytest.mark.parametrize("value", [-1, 268_435_456])
def test_varint_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


def test_properties_match_paho() -> None:
    """Property blocks as paho-mqtt's independent encoder writes them (same order of properties)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties

    paho = PahoProperties(PacketTypes.PUBLISH)
    paho.PayloadFormatIndicator = 1
    paho.MessageExpiryInterval = 60
    paho.ContentType = "json"
    paho.ResponseTopic = "reply"
    paho.CorrelationData = b"\xca\xfe"
    paho.UserProperty = ("k", "v")
    ours = Properties({P.PAYLOAD_FORMAT_INDICATOR: 1, P.MESSAGE_EXPIRY_INTERVAL: 60, P.CONTENT_TYPE: "json",
                       P.RESPONSE_TOPIC: "reply", P.CORRELATION_DATA: b"\xca\xfe"}, user=(("k", "v"),))
    assert encode_properties(ours) == paho.pack()

    paho = PahoProperties(PacketTypes.CONNECT)
    paho.SessionExpiryInterval = 10
    paho.ReceiveMaximum = 20
    paho.UserProperty = ("site", "north")
    paho.UserProperty = ("k", "v")
    ours = Properties({P.SESSION_EXPIRY_INTERVAL: 10, P.RECEIVE_MAXIMUM: 20}, user=(("site", "north"), ("k", "v")))
    assert encode_properties(ours) == paho.pack()

    paho = PahoProperties(PacketTypes.SUBSCRIBE)
    paho.SubscriptionIdentifier = 268_435_455
    assert encode_properties(Properties(subscription_ids=(268_435_455,))) == paho.pack()


def _paho_capture(protocol: int, configure, then=None) -> bytes:  # type: ignore[no-untyped-def]
    """Bytes a real paho-mqtt client writes to a loopback listener (a local peer, never a public broker)."""
    import paho.mqtt.client as mqtt

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=protocol)
        try:
            connect_kwargs = configure(client) or {}
            client.connect("127.0.0.1", server.getsockname()[1], keepalive=60, **connect_kwargs)
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5)
                data = conn.recv(65536)
                if then is not None:
                    data += then(client, conn)
            return data
        finally:
            client._sock_close()


def test_paho_connect_311() -> None:
    def configure(client):  # type: ignore[no-untyped-def]
        client.username_pw_set("alice", "s3cret")
        client.will_set("dev/1/status", b"offline", qos=1, retain=True)

    data = _paho_capture(4, configure)
    expected = Connect(MQTT_311, "dev-1", True, 60, "alice", b"s3cret", Will("dev/1/status", b"offline", 1, True))
    assert decode_one(data, MQTT_311) == expected
    assert encode_packet(expected, MQTT_311) == data


def test_paho_connect_5_and_publish() -> None:
    """paho's MQTT 5 CONNECT (properties, user property, will) and, after our CONNACK, its QoS 1 and 2 PUBLISHes."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties

    def configure(client):  # type: ignore[no-untyped-def]
        client.username_pw_set("alice", "s3cret")
        client.will_set("dev/1/status", b"offline", qos=1, retain=True)
        props = PahoProperties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 30
        props.UserProperty = ("site", "north")
        return {"properties": props, "clean_start": True}

    def then(client, conn):  # type: ignore[no-untyped-def]
        conn.sendall(encode_packet(Connack(False, ReasonCode.SUCCESS), MQTT_5))
        client.loop_read()
        assert client.is_connected()
        props = PahoProperties(PacketTypes.PUBLISH)
        props.UserProperty = ("k", "v")
        client.publish("dev/1/temp", b"21.5", qos=1, properties=props)
        client.publish("dev/1/temp", b"21.6", qos=2)
        out = b""
        while out.count(b"dev/1/temp") < 2:
            chunk = conn.recv(65536)
            assert chunk
            out += chunk
        return out

    data = _paho_capture(mqtt.MQTTv5, configure, then)
    connect, pub1, pub2 = decode_all(data, MQTT_5)
    expected = Connect(MQTT_5, "dev-1", True, 60, "alice", b"s3cret", Will("dev/1/status", b"offline", 1, True),
                       Properties({P.SESSION_EXPIRY_INTERVAL: 30}, user=(("site", "north"),)))
    assert connect == expected
    assert encode_packet(expected, MQTT_5) == data[: len(encode_packet(expected, MQTT_5))]
    assert pub1 == Publish("dev/1/temp", b"21.5", 1, packet_id=1, properties=Properties(user=(("k", "v"),)))
    assert pub2 == Publish("dev/1/temp", b"21.6", 2, packet_id=2)


# ---------------------------------------------------------------------------------------------------------------
# Malformed input.

MALFORMED: list[tuple[str, int, bytes, type[MQTTProtocolError], str]] = [
    ("publish-qos3", MQTT_311, h("36 06 0001 'a' 0001 'x'"), MalformedPacket, "QoS 3"),  # MQTT-3.3.1-4
    ("publish-dup-qos0", MQTT_311, h("38 03 0001 'a'"), MalformedPacket, "DUP"),  # MQTT-3.3.1-2
    ("publish-packet-id-0", MQTT_311, h("32 05 0001 'a' 0000"), MalformedPacket, "packet identifier 0"),  # MQTT-2.3.1-1
    ("publish-packet-id-0-v5", MQTT_5, h("34 06 0001 'a' 0000 00"), MalformedPacket, "packet identifier 0"),
    ("reserved-type-0", MQTT_311, h("00 00"), MalformedPacket, "reserved packet type"),
    ("reserved-type-0-v5", MQTT_5, h("00 02 0000"), MalformedPacket, "reserved packet type"),
    ("auth-in-311", MQTT_311, h("f0 00"), MalformedPacket, "AUTH before"),  # type 15 is reserved in 3.1.1
    ("subscribe-flags-0", MQTT_311, h("80 06 0001 0001 'a' 00"),
     MalformedPacket, "flags for SUBSCRIBE"),  # MQTT-3.8.1-1
    ("subscribe-flags-3", MQTT_311, h("83 06 0001 0001 'a' 00"), MalformedPacket, "flags for SUBSCRIBE"),
    ("unsubscribe-flags-0", MQTT_311, h("a0 05 0001 0001 'a'"),
     MalformedPacket, "flags for UNSUBSCRIBE"),  # MQTT-3.10.1-1
    ("pubrel-flags-0", MQTT_311, h("60 02 0001"), MalformedPacket, "flags for PUBREL"),  # MQTT-3.6.1-1
    ("pubrel-flags-0-v5", MQTT_5, h("60 02 0001"), MalformedPacket, "flags for PUBREL"),
    ("puback-flags", MQTT_311, h("42 02 0001"), MalformedPacket, "flags for PUBACK"),
    ("connect-flags", MQTT_311, h("11 0e 0004 'MQTT' 04 02 003c 0002 'c1'"), MalformedPacket, "flags for CONNECT"),
    ("pingreq-flags", MQTT_311, h("c1 00"), MalformedPacket, "flags for PINGREQ"),
    ("disconnect-flags", MQTT_311, h("e8 00"), MalformedPacket, "flags for DISCONNECT"),
    # A 5-byte variable byte integer: in the fixed header, and as a property length (MQTT 5 §1.5.5).
    ("remaining-length-5-bytes", MQTT_311, h("30 ff ff ff ff 01"), MalformedPacket, "longer than 4 bytes"),
    ("property-length-5-bytes", MQTT_5, h("30 0a 0001 'a' ff ff ff ff 01 00 00"),
     MalformedPacket, "longer than 4 bytes"),
    ("property-varint-5-bytes", MQTT_5, h("30 0a 0001 'a' 06 0b ff ff ff ff 01"),
     MalformedPacket, "longer than 4 bytes"),
    ("utf8-invalid", MQTT_311, h("30 05 0003 61 ff 62"), MalformedPacket, "not valid UTF-8"),  # MQTT-1.5.3-1
    ("utf8-surrogate", MQTT_311, h("30 05 0003 ed a0 80"), MalformedPacket, "not valid UTF-8"),  # MQTT-1.5.3-1: U+D800
    ("utf8-overlong", MQTT_311, h("30 04 0002 c0 af"), MalformedPacket, "not valid UTF-8"),
    ("utf8-nul-topic", MQTT_311, h("30 05 0003 61 00 62"), MalformedPacket, "contains U.0000"),  # MQTT-1.5.3-2
    ("utf8-nul-client-id", MQTT_311, h("10 0f 0004 'MQTT' 04 02 003c 0003 61 00 62"),
     MalformedPacket, "contains U.0000"),
    ("utf8-nul-user-property", MQTT_5, h("30 0b 0001 'a' 07 26 0001 00 0001 'v'"), MalformedPacket, "contains U.0000"),
    ("truncated-puback", MQTT_311, h("40 01 00"), MalformedPacket, "shorter"),
    ("truncated-topic", MQTT_311, h("30 02 0005"), MalformedPacket, "shorter"),
    ("truncated-topic-length", MQTT_311, h("30 01 00"), MalformedPacket, "shorter"),
    ("truncated-packet-id", MQTT_311, h("32 04 0001 'a' 00"), MalformedPacket, "shorter"),
    ("truncated-protocol-name", MQTT_311, h("10 05 0004 'MQT'"), MalformedPacket, "shorter"),
    ("truncated-connect-flags", MQTT_311, h("10 07 0004 'MQTT' 04"), MalformedPacket, "shorter"),
    ("truncated-client-id", MQTT_311, h("10 0d 0004 'MQTT' 04 02 003c 0002 'c'"), MalformedPacket, "shorter"),
    ("truncated-password", MQTT_311, h("10 13 0004 'MQTT' 04 c2 003c 0002 'c1' 0001 'u' 0002"),
     MalformedPacket, "shorter"),
    ("truncated-subscribe-options", MQTT_311, h("82 05 0001 0001 'a'"), MalformedPacket, "shorter"),
    ("truncated-property-value", MQTT_5, h("30 07 0001 'a' 03 02 0000"), MalformedPacket, "shorter"),
    ("property-length-past-end", MQTT_5, h("30 05 0001 'a' 09 01"), MalformedPacket, "property length exceeds"),
    ("empty-connect", MQTT_311, h("10 00"), MalformedPacket, "shorter"),
    # MQTT 5 §2.2.2.2: a property other than User Property twice is a Protocol Error, not malformed.
    ("duplicate-property", MQTT_5, h("30 0f 0001 'a' 0a 02 00000001 02 00000002 'x'"),
     MQTTProtocolError, "given twice"),
    ("duplicate-connect-property", MQTT_5, h("10 13 0004 'MQTT' 05 02 003c | 06 21 0001 21 0002 | 0000"),
     MQTTProtocolError, "given twice"),
    ("unknown-property", MQTT_5, h("30 06 0001 'a' 02 7f 00"), MalformedPacket, "unknown property"),
    ("unknown-property-0", MQTT_5, h("30 06 0001 'a' 02 00 00"), MalformedPacket, "unknown property"),
    ("connect-reserved-flag", MQTT_311, h("10 0e 0004 'MQTT' 04 03 003c 0002 'c1'"),
     MalformedPacket, "reserved flag"),  # MQTT-3.1.2-3
    ("connect-will-qos3", MQTT_311, h("10 14 0004 'MQTT' 04 1e 003c 0002 'c1' 0001 't' 0001 'x'"),
     MalformedPacket, "will QoS 3"),  # MQTT-3.1.2-14
    ("connect-will-qos3-v5", MQTT_5, h("10 16 0004 'MQTT' 05 1e 003c 00 0002 'c1' 00 0001 't' 0001 'x'"),
     MalformedPacket, "will QoS 3"),
    ("connect-will-qos-without-will", MQTT_311, h("10 0e 0004 'MQTT' 04 0a 003c 0002 'c1'"),
     MalformedPacket, "without will flag"),
    ("connect-will-retain-without-will", MQTT_311, h("10 0e 0004 'MQTT' 04 22 003c 0002 'c1'"),
     MalformedPacket, "without will flag"),
    ("connect-password-without-user-311", MQTT_311, h("10 11 0004 'MQTT' 04 42 003c 0002 'c1' 0001 'p'"),
     MalformedPacket, "password without user"),  # MQTT-3.1.2-22
    ("connect-trailing", MQTT_311, h("10 0f 0004 'MQTT' 04 02 003c 0002 'c1' 00"), MalformedPacket, "trailing"),
    ("pingreq-with-body", MQTT_311, h("c0 01 00"), MalformedPacket, "with a body"),
    ("disconnect-311-with-body", MQTT_311, h("e0 01 00"), MalformedPacket, "with a body"),
    ("puback-311-trailing", MQTT_311, h("40 03 0001 00"), MalformedPacket, "trailing"),
    ("puback-5-trailing", MQTT_5, h("40 05 0001 00 00 00"), MalformedPacket, "trailing"),
    ("puback-5-unknown-reason", MQTT_5, h("40 03 0001 ff"), MalformedPacket, "unknown reason code"),
    ("disconnect-5-unknown-reason", MQTT_5, h("e0 01 03"), MalformedPacket, "unknown reason code"),
    ("subscribe-no-filters", MQTT_311, h("82 02 0001"), MalformedPacket, "without topic filters"),  # MQTT-3.8.3-3
    ("subscribe-311-reserved-options", MQTT_311, h("82 06 0001 0001 'a' 04"),
     MalformedPacket, "reserved option"),  # MQTT-3.8.3-4
    ("subscribe-qos3", MQTT_311, h("82 06 0001 0001 'a' 03"), MalformedPacket, "invalid QoS"),
    ("subscribe-5-reserved-options", MQTT_5, h("82 07 0001 00 0001 'a' 40"), MalformedPacket, "reserved option"),
    ("subscribe-5-retain-handling-3", MQTT_5, h("82 07 0001 00 0001 'a' 30"), MalformedPacket, "retain handling"),
    ("unsubscribe-no-filters", MQTT_311, h("a2 02 0001"), MalformedPacket, "without topic filters"),  # MQTT-3.10.3-2
    ("connack-311-unknown-code", MQTT_311, h("20 02 00 06"), MalformedPacket, "CONNACK return code"),
    ("subscribe-packet-id-0", MQTT_311, h("82 06 0000 0001 'a' 00"), MalformedPacket, "packet identifier 0"),
    ("unsubscribe-packet-id-0", MQTT_5, h("a2 06 0000 00 0001 'a'"), MalformedPacket, "packet identifier 0"),
    ("disconnect-5-trailing", MQTT_5, h("e0 03 00 00 ff"), MalformedPacket, "trailing"),  # MQTT 5 §3.14.3
    ("auth-5-trailing", MQTT_5, h("f0 03 00 00 ff"), MalformedPacket, "trailing"),  # MQTT 5 §3.15.3
]


@pytest.mark.parametrize(("version", "data", "error", "match"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed(version: int, data: bytes, error: type[MQTTProtocolError], match: str) -> None:
    with pytest.raises(MQTTProtocolError, match=match) as info:
        decode_all(data, version)
    assert type(info.value) is error
    expected_reason = ReasonCode.MALFORMED_PACKET if error is MalformedPacket else ReasonCode.PROTOCOL_ERROR
    assert info.value.reason_code == expected_reason


def test_protocol_error_reason_code_override() -> None:
    assert MQTTProtocolError("x", ReasonCode.TOPIC_NAME_INVALID).reason_code == ReasonCode.TOPIC_NAME_INVALID
    assert MQTTProtocolError("x").reason_code == ReasonCode.PROTOCOL_ERROR
    assert PacketTooLarge("x").reason_code == ReasonCode.PACKET_TOO_LARGE


@pytest.mark.parametrize(("name", "level"), [("MQIsdp", 3), ("MQTT", 3), ("MQTT", 6), ("MQTT", 0), ("mqtt", 4)])
def test_unsupported_protocol_decodes_enough_to_refuse(name: str, level: int) -> None:
    """An unknown protocol name / level is not malformed: the server must answer it with a CONNACK (MQTT-3.1.2-2)."""
    raw = name.encode()
    body = len(raw).to_bytes(2, "big") + raw + bytes((level, 0x02)) + b"\x00\x3c\x00\x02c1"
    connect = decode_one(b"\x10" + bytes((len(body),)) + body, MQTT_311)
    assert isinstance(connect, Connect)
    assert (connect.protocol_name, connect.protocol_level) == (name, level)


def test_encode_publish_requires_packet_id() -> None:
    with pytest.raises(ValueError):
        encode_packet(Publish("t", b"", qos=1), MQTT_311)


# ---------------------------------------------------------------------------------------------------------------
# Framing (h11 tests/test_io.py::tr style): whole, byte at a time, with trailing data.

FRAMING = [k for k in KNOWN if k[0] in {
    "connect-311-spec-example", "connect-5-props-user", "publish-5-qos1-props", "pingreq", "subscribe-311-spec-example",
    "disconnect-5", "puback-5-reason-string",
}]


@pytest.mark.parametrize(("version", "data", "packet"), [k[1:] for k in FRAMING], ids=[k[0] for k in FRAMING])
def test_frame_reader_whole_bytewise_trailing(version: int, data: bytes, packet: Packet) -> None:
    # Whole input.
    reader = FrameReader(max_packet_size=1024)
    reader.feed(data)
    frame = reader.next_frame()
    assert frame is not None
    assert decode_packet(frame[0], frame[1], version) == packet
    assert reader.next_frame() is None
    assert reader.buffered == 0

    # Byte at a time: None until the last byte.
    reader = FrameReader(max_packet_size=1024)
    for i in range(len(data) - 1):
        reader.feed(data[i : i + 1])
        assert reader.next_frame() is None
        assert reader.buffered == i + 1
    reader.feed(data[-1:])
    frame = reader.next_frame()
    assert frame is not None
    assert decode_packet(frame[0], frame[1], version) == packet
    assert reader.next_frame() is None

    # With trailing data: the start of the next packet stays buffered for the next frame.
    reader = FrameReader(max_packet_size=1024)
    reader.feed(data + b"\xc0")
    frame = reader.next_frame()
    assert frame is not None
    assert decode_packet(frame[0], frame[1], version) == packet
    assert reader.next_frame() is None
    assert reader.buffered == 1
    reader.feed(b"\x00" + data)
    frame = reader.next_frame()
    assert frame is not None and decode_packet(frame[0], frame[1], version) == Pingreq()
    frame = reader.next_frame()
    assert frame is not None and decode_packet(frame[0], frame[1], version) == packet
    assert reader.next_frame() is None
    assert reader.buffered == 0


def test_frame_reader_many_packets_in_one_read() -> None:
    packets = [Publish("a", b"1"), Pingreq(), Publish("b", b"2" * 200, qos=1, packet_id=3), Disconnect()]
    data = b"".join(encode_packet(p, MQTT_311) for p in packets)
    assert decode_all(data, MQTT_311) == packets


def test_frame_reader_partial_remaining_length() -> None:
    data = encode_packet(Publish("t", b"x" * 300), MQTT_311)  # remaining length takes two bytes
    assert data[1] & 0x80
    reader = FrameReader(max_packet_size=1024)
    reader.feed(data[:2])  # the length's first byte has its continuation bit set
    assert reader.next_frame() is None
    reader.feed(data[2:])
    assert reader.next_frame() is not None


def test_packet_too_large_before_body() -> None:
    reader = FrameReader(max_packet_size=100)
    reader.feed(b"\x30\xe8\x07")  # remaining length 1000, no body yet
    with pytest.raises(PacketTooLarge):
        reader.next_frame()


def test_packet_too_large_counts_fixed_header() -> None:
    """MQTT 5 §3.1.2.11.4: the maximum packet size covers the whole packet, fixed header included."""
    data = encode_packet(Publish("t", b"x" * 10), MQTT_311)
    reader = FrameReader(max_packet_size=len(data))
    reader.feed(data)
    assert reader.next_frame() is not None
    reader = FrameReader(max_packet_size=len(data) - 1)
    reader.feed(data[:2])
    with pytest.raises(PacketTooLarge):
        reader.next_frame()


def test_five_byte_remaining_length_fails_without_waiting() -> None:
    reader = FrameReader(max_packet_size=1 << 30)
    reader.feed(b"\x30\xff\xff\xff")
    assert reader.next_frame() is None  # could still be a 4-byte length
    reader.feed(b"\xff")
    with pytest.raises(MalformedPacket):
        reader.next_frame()


def test_frame_reader_empty_and_single_byte() -> None:
    reader = FrameReader(max_packet_size=10)
    assert reader.next_frame() is None
    reader.feed(b"")
    assert reader.next_frame() is None
    reader.feed(b"\xc0")
    assert reader.next_frame() is None
    assert reader.buffered == 1


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis: encode -> FrameReader -> decode_packet is the identity.

texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
varints = st.integers(1, 268_435_455)
packet_ids = st.integers(1, 0xFFFF)
small_bytes = st.binary(max_size=40)

_VALUE_STRATEGIES = {
    P.PAYLOAD_FORMAT_INDICATOR: u8, P.MESSAGE_EXPIRY_INTERVAL: u32, P.CONTENT_TYPE: texts,
    P.RESPONSE_TOPIC: texts, P.CORRELATION_DATA: small_bytes, P.SESSION_EXPIRY_INTERVAL: u32,
    P.ASSIGNED_CLIENT_IDENTIFIER: texts, P.SERVER_KEEP_ALIVE: u16, P.AUTHENTICATION_METHOD: texts,
    P.AUTHENTICATION_DATA: small_bytes, P.REQUEST_PROBLEM_INFORMATION: u8, P.WILL_DELAY_INTERVAL: u32,
    P.REQUEST_RESPONSE_INFORMATION: u8, P.RESPONSE_INFORMATION: texts, P.SERVER_REFERENCE: texts,
    P.REASON_STRING: texts, P.RECEIVE_MAXIMUM: u16, P.TOPIC_ALIAS_MAXIMUM: u16, P.TOPIC_ALIAS: u16,
    P.MAXIMUM_QOS: u8, P.RETAIN_AVAILABLE: u8, P.MAXIMUM_PACKET_SIZE: u32, P.WILDCARD_SUBSCRIPTION_AVAILABLE: u8,
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8, P.SHARED_SUBSCRIPTION_AVAILABLE: u8,
}


@st.composite
def properties(draw: st.DrawFn) -> Properties:
    pids = draw(st.lists(st.sampled_from(sorted(_VALUE_STRATEGIES)), unique=True, max_size=4))
    values = {pid: draw(_VALUE_STRATEGIES[pid]) for pid in pids}
    user = tuple(draw(st.lists(st.tuples(texts, texts), max_size=3)))
    sub_ids = tuple(draw(st.lists(varints, max_size=2)))
    return Properties(values, user, sub_ids)


def props_for(version: int) -> st.SearchStrategy[Properties]:
    return properties() if version == MQTT_5 else st.just(NO_PROPERTIES)


reason_codes = st.sampled_from(list(ReasonCode))
versions = st.sampled_from([MQTT_311, MQTT_5])


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    will = None
    if draw(st.booleans()):
        will = Will(draw(texts), draw(small_bytes), draw(st.integers(0, 2)), draw(st.booleans()),
                    draw(props_for(version)))
    username = draw(st.none() | texts)
    password = draw(st.none() | small_bytes)
    if version == MQTT_311 and username is None:
        password = None  # MQTT-3.1.2-22
    return Connect(version, draw(texts), draw(st.booleans()), draw(u16), username, password, will,
                   draw(props_for(version)))


@st.composite
def publishes(draw: st.DrawFn, version: int) -> Publish:
    qos = draw(st.integers(0, 2))
    return Publish(draw(texts), draw(small_bytes), qos, draw(st.booleans()), qos > 0 and draw(st.booleans()),
                   draw(packet_ids) if qos else None, draw(props_for(version)))


@st.composite
def pub_acks(draw: st.DrawFn, version: int) -> Packet:
    cls = draw(st.sampled_from([Puback, Pubrec, Pubrel, Pubcomp]))
    if version == MQTT_311:
        return cls(draw(packet_ids))
    return cls(draw(packet_ids), draw(reason_codes), draw(properties()))


@st.composite
def subscribes(draw: st.DrawFn, version: int) -> Subscribe:
    if version == MQTT_5:
        options = st.builds(SubscriptionOptions, st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 2))
    else:
        options = st.builds(SubscriptionOptions, st.integers(0, 2))
    subs = draw(st.lists(st.tuples(texts, options), min_size=1, max_size=4))
    return Subscribe(draw(packet_ids), tuple(subs), draw(props_for(version)))


@st.composite
def unsubscribes(draw: st.DrawFn, version: int) -> Unsubscribe:
    filters = draw(st.lists(texts, min_size=1, max_size=4))
    return Unsubscribe(draw(packet_ids), tuple(filters), draw(props_for(version)))


@st.composite
def disconnects(draw: st.DrawFn, version: int) -> Disconnect:
    if version == MQTT_311:
        return Disconnect()
    return Disconnect(draw(reason_codes), draw(properties()))


@st.composite
def subacks(draw: st.DrawFn, version: int) -> Suback:
    return Suback(draw(packet_ids), tuple(draw(st.lists(u8, min_size=1, max_size=5))), draw(props_for(version)))


@st.composite
def unsubacks(draw: st.DrawFn, version: int) -> Unsuback:
    if version == MQTT_311:
        return Unsuback(draw(packet_ids))
    return Unsuback(draw(packet_ids), tuple(draw(st.lists(u8, min_size=1, max_size=5))), draw(properties()))


_CONNACK_311_REASONS = [ReasonCode.SUCCESS, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
                        ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, ReasonCode.SERVER_UNAVAILABLE,
                        ReasonCode.BAD_USERNAME_OR_PASSWORD, ReasonCode.NOT_AUTHORIZED]


@st.composite
def connacks(draw: st.DrawFn, version: int) -> Connack:
    if version == MQTT_311:
        return Connack(draw(st.booleans()), draw(st.sampled_from(_CONNACK_311_REASONS)))
    return Connack(draw(st.booleans()), draw(reason_codes), draw(properties()))


@st.composite
def any_packet(draw: st.DrawFn, version: int) -> Packet:
    kinds = [connects, publishes, pub_acks, subscribes, unsubscribes, disconnects, subacks, unsubacks, connacks]
    packet: Packet = draw(st.one_of(*(kind(version) for kind in kinds), st.just(Pingreq()), st.just(Pingresp())))
    return packet


@st.composite
def versioned_packets(draw: st.DrawFn) -> tuple[int, Packet]:
    version = draw(versions)
    return version, draw(any_packet(version))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(versioned_packets())
def test_round_trip(vp: tuple[int, Packet]) -> None:
    version, packet = vp
    data = encode_packet(packet, version)
    reader = FrameReader(max_packet_size=len(data))
    reader.feed(data)
    frame = reader.next_frame()
    assert frame is not None
    assert reader.buffered == 0
    assert decode_packet(frame[0], frame[1], version) == packet


@settings(max_examples=100, deadline=None)
@given(versions.flatmap(lambda v: st.tuples(st.just(v), st.lists(any_packet(v), min_size=1, max_size=6))),
       st.lists(st.integers(1, 64), min_size=1, max_size=50))
def test_round_trip_stream_in_chunks(vp: tuple[int, list[Packet]], cuts: list[int]) -> None:
    """Several packets back to back, fed in arbitrary chunks, come out whole and in order."""
    version, packets = vp
    data = b"".join(encode_packet(p, version) for p in packets)
    reader = FrameReader(max_packet_size=1 << 16)
    out: list[Packet] = []
    pos = 0
    i = 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        i += 1
        reader.feed(data[pos : pos + step])
        pos += step
        while (frame := reader.next_frame()) is not None:
            out.append(decode_packet(frame[0], frame[1], version))
    assert out == packets
    assert reader.buffered == 0


# ---------------------------------------------------------------------------------------------------------------
# Fuzz rule (h11 fuzz/afl-server.py): any byte string either decodes, or raises MQTTProtocolError; nothing else.


def _decode_stream(data: bytes, version: int) -> None:
    reader = FrameReader(max_packet_size=512)
    reader.feed(data)
    try:
        while (frame := reader.next_frame()) is not None:
            decode_packet(frame[0], frame[1], version)
    except MQTTProtocolError:
        pass


@settings(max_examples=500, deadline=None)
@given(versions, st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(version: int, data: bytes) -> None:
    _decode_stream(data, version)


@settings(max_examples=500, deadline=None)
@given(versions, st.integers(0, 15), st.integers(0, 15), st.binary(max_size=120))
def test_fuzz_every_packet_type(version: int, ptype: int, flags: int, body: bytes) -> None:
    """Well-framed bodies of every type and flag combination, so that the fuzz gets past the fixed header."""
    _decode_stream(bytes((ptype << 4 | flags,)) + encode_varint(len(body)) + body, version)


@st.composite
def mutated_packets(draw: st.DrawFn) -> tuple[int, bytes]:
    """A valid packet with a few bytes replaced, inserted or removed: close enough to valid to reach deep code."""
    version = draw(versions)
    data = bytearray(encode_packet(draw(any_packet(version)), version))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "replace" and data:
            data[pos] = draw(u8)
        elif op == "insert":
            data.insert(pos, draw(u8))
        elif op == "delete" and data:
            del data[pos]
        elif op == "truncate":
            del data[pos:]
    return version, bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_packets())
def test_fuzz_mutated_packets(vd: tuple[int, bytes]) -> None:
    version, data = vd
    _decode_stream(data, version)
