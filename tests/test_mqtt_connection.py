"""The server-side MQTT connection state machine, driven with bytes only: no sockets, no clocks (STYLE.md §5).

Inputs are built with the codec (tested on known bytes in test_mqtt_codec.py); what the server sends is compared
with literal bytes where it is short.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgegw.mqtt.codec import FrameReader, decode_packet, encode_packet
from edgegw.mqtt.connection import (
    ConnectionClosed,
    ConnectionState,
    ConnectRequested,
    Event,
    MQTTConnection,
    PublishReceived,
    SubscribeRequested,
    UnsubscribeRequested,
)
from edgegw.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Properties,
    PropertyId,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Subscribe,
    SubscriptionOptions,
    Unsubscribe,
)

MAX_PACKET = 4096


def connect_bytes(version: int = MQTT_311, client_id: str = "dev-1", keepalive: int = 30) -> bytes:
    return encode_packet(Connect(version, client_id, True, keepalive), version)


def enc(packet: Packet, version: int = MQTT_311) -> bytes:
    return encode_packet(packet, version)


def sent_packets(conn: MQTTConnection) -> list[Packet]:
    """Decode everything the server wants to send."""
    reader = FrameReader(1 << 20)
    reader.feed(conn.data_to_send())
    packets = []
    while (frame := reader.next_frame()) is not None:
        packets.append(decode_packet(frame[0], frame[1], conn.protocol_level))
    assert reader.buffered == 0
    return packets


def connected(version: int = MQTT_311, **kwargs: int) -> MQTTConnection:
    """A connection past CONNECT / accept(), with the CONNACK already taken."""
    conn = MQTTConnection(max_packet_size=kwargs.pop("max_packet_size", MAX_PACKET), **kwargs)
    events = conn.receive_data(connect_bytes(version))
    assert [type(e) for e in events] == [ConnectRequested]
    conn.accept()
    conn.data_to_send()
    assert conn.state is ConnectionState.CONNECTED
    return conn


def closed_event(events: list[Event]) -> ConnectionClosed:
    assert events and isinstance(events[-1], ConnectionClosed), events
    return events[-1]


# ---------------------------------------------------------------------------------------------------------------
# CONNECT / CONNACK.


def test_connect_then_accept_311() -> None:
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    assert conn.state is ConnectionState.AWAIT_CONNECT
    events = conn.receive_data(connect_bytes(MQTT_311, "dev-1", 45))
    assert events == [ConnectRequested(Connect(MQTT_311, "dev-1", True, 45))]
    assert conn.state is ConnectionState.AUTHORIZING
    assert (conn.client_id, conn.keepalive, conn.protocol_level) == ("dev-1", 45, MQTT_311)
    assert conn.data_to_send() == b""  # nothing until the shell decides
    conn.accept()
    assert conn.data_to_send() == b"\x20\x02\x00\x00"
    assert conn.state is ConnectionState.CONNECTED
    assert conn.data_to_send() == b""


def test_accept_session_present() -> None:
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    conn.receive_data(connect_bytes())
    conn.accept(session_present=True)
    assert conn.data_to_send() == b"\x20\x02\x01\x00"


def test_accept_5_advertises_limits() -> None:
    conn = MQTTConnection(max_packet_size=MAX_PACKET, receive_maximum=7)
    conn.receive_data(connect_bytes(MQTT_5))
    conn.accept()
    (connack,) = sent_packets(conn)
    assert isinstance(connack, Connack)
    assert connack.reason_code is ReasonCode.SUCCESS
    assert connack.properties.get(PropertyId.RECEIVE_MAXIMUM) == 7
    assert connack.properties.get(PropertyId.MAXIMUM_PACKET_SIZE) == MAX_PACKET
    assert connack.properties.get(PropertyId.TOPIC_ALIAS_MAXIMUM) == 0


def test_accept_5_with_explicit_properties() -> None:
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    conn.receive_data(connect_bytes(MQTT_5))
    conn.accept(properties=Properties({PropertyId.SERVER_KEEP_ALIVE: 60}))
    assert conn.data_to_send() == b"\x20\x06\x00\x00\x03\x13\x00\x3c"


def test_refuse_311_not_authorized() -> None:
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    conn.receive_data(connect_bytes())
    closed = conn.refuse(ReasonCode.NOT_AUTHORIZED, "no certificate for dev-1")
    assert conn.data_to_send() == b"\x20\x02\x00\x05"  # MQTT 3.1.1 §3.2.2.3: 0x05 Not authorized
    assert conn.state is ConnectionState.CLOSED
    assert closed == ConnectionClosed(ReasonCode.NOT_AUTHORIZED, "no certificate for dev-1", by_peer=False)
    assert conn.close_reason == closed


def test_refuse_5_not_authorized() -> None:
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    conn.receive_data(connect_bytes(MQTT_5))
    conn.refuse(ReasonCode.NOT_AUTHORIZED, "nope")
    assert conn.data_to_send() == b"\x20\x03\x00\x87\x00"
    assert conn.state is ConnectionState.CLOSED


def test_actions_in_the_wrong_state_are_shell_bugs() -> None:
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    with pytest.raises(RuntimeError):
        conn.accept()
    with pytest.raises(RuntimeError):
        conn.refuse(ReasonCode.NOT_AUTHORIZED, "x")
    conn.receive_data(connect_bytes())
    conn.accept()
    with pytest.raises(RuntimeError):
        conn.accept()
    with pytest.raises(RuntimeError):
        conn.ack_publish(1)  # nothing awaits acknowledgement


def test_publish_before_connack_waits_for_accept() -> None:
    """MQTT-3.1.4-5: nothing after CONNECT is processed before the server has accepted the connection."""
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    first = Publish("dev/1/t", b"1")
    second = Publish("dev/1/t", b"2", qos=1, packet_id=1)
    events = conn.receive_data(connect_bytes() + enc(first))
    assert [type(e) for e in events] == [ConnectRequested]
    assert conn.receive_data(enc(second) + enc(Pingreq())) == []
    assert conn.data_to_send() == b""  # not even the PINGRESP
    assert conn.inflight == 0
    conn.accept()
    assert conn.data_to_send() == b"\x20\x02\x00\x00"  # the CONNACK comes first
    assert conn.pending_events() == [PublishReceived(first, "dev/1/t"), PublishReceived(second, "dev/1/t")]
    assert conn.data_to_send() == b"\xd0\x00"
    assert conn.inflight == 1
    assert conn.pending_events() == []


def test_publish_before_connack_is_dropped_on_refuse() -> None:
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    conn.receive_data(connect_bytes() + enc(Publish("t", b"x")))
    conn.refuse(ReasonCode.BAD_USERNAME_OR_PASSWORD, "bad")
    assert conn.data_to_send() == b"\x20\x02\x00\x04"
    assert conn.pending_events() == []
    assert conn.receive_data(enc(Publish("t", b"y"))) == []


def test_first_packet_not_connect() -> None:
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    events = conn.receive_data(enc(Publish("t", b"x")) + connect_bytes())
    closed = closed_event(events)
    assert len(events) == 1
    assert closed.reason_code is ReasonCode.PROTOCOL_ERROR
    assert conn.state is ConnectionState.CLOSED
    assert conn.data_to_send() == b""  # MQTT-3.1.0-1: just close
    assert conn.receive_data(connect_bytes()) == []


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_second_connect_closes(version: int) -> None:
    conn = connected(version)
    closed = closed_event(conn.receive_data(connect_bytes(version)))
    assert closed.reason_code is ReasonCode.PROTOCOL_ERROR  # MQTT-3.1.0-2
    assert conn.state is ConnectionState.CLOSED
    expected = b"\xe0\x02\x82\x00" if version == MQTT_5 else b""
    assert conn.data_to_send() == expected


def test_second_connect_before_accept_waits() -> None:
    """A second CONNECT behind the first is buffered like anything else and fails only once accepted."""
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    assert [type(e) for e in conn.receive_data(connect_bytes() * 2)] == [ConnectRequested]
    conn.accept()
    assert closed_event(conn.pending_events()).reason_code is ReasonCode.PROTOCOL_ERROR


def test_mqtt_31_refused_with_0x01() -> None:
    """MQTT 3.1 says "MQIsdp" level 3; MQTT-3.1.2-2: answer return code 0x01 and close."""
    body = b"\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x03abc"
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    events = conn.receive_data(b"\x10" + bytes((len(body),)) + body)
    closed = closed_event(events)
    assert len(events) == 1
    assert closed.reason_code is ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
    assert conn.data_to_send() == b"\x20\x02\x00\x01"
    assert conn.state is ConnectionState.CLOSED


@pytest.mark.parametrize("level", [0, 3, 6, 255])
def test_unknown_level_refused(level: int) -> None:
    body = b"\x00\x04MQTT" + bytes((level,)) + b"\x02\x00\x3c\x00\x03abc"
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    closed = closed_event(conn.receive_data(b"\x10" + bytes((len(body),)) + body))
    assert closed.reason_code is ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
    assert conn.state is ConnectionState.CLOSED
    # The peer's format is unknown, so the answer is the 3.1.1 CONNACK (what mosquitto sends too).
    assert conn.data_to_send() == b"\x20\x02\x00\x01"


@pytest.mark.parametrize("data", [
    b"\x10\x0e\x00\x04MQTT\x04\x03\x00\x3c\x00\x02c1",  # reserved flag (MQTT-3.1.2-3)
    b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x02c1",  # MQTT 5 without a property length
    b"\x10\x00",
    b"\x10\xff\xff\xff\xff\x01",
])
def test_malformed_connect_closes(data: bytes) -> None:
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    closed = closed_event(conn.receive_data(data))
    assert closed.reason_code is ReasonCode.MALFORMED_PACKET
    assert conn.state is ConnectionState.CLOSED


def test_connect_too_large() -> None:
    conn = MQTTConnection(max_packet_size=64)
    closed = closed_event(conn.receive_data(b"\x10\xe8\x07"))  # 1000 bytes announced, none sent
    assert closed.reason_code is ReasonCode.PACKET_TOO_LARGE


# ---------------------------------------------------------------------------------------------------------------
# PUBLISH at QoS 0, 1 and 2.


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_qos0_publish(version: int) -> None:
    conn = connected(version)
    p = Publish("dev/1/temp", b"21.5")
    assert conn.receive_data(enc(p, version)) == [PublishReceived(p, "dev/1/temp")]
    assert conn.inflight == 0
    assert conn.data_to_send() == b""


def test_qos1_publish_and_ack() -> None:
    conn = connected()
    p = Publish("dev/1/temp", b"21.5", qos=1, packet_id=7)
    assert conn.receive_data(enc(p)) == [PublishReceived(p, "dev/1/temp")]
    assert conn.inflight == 1
    assert conn.data_to_send() == b""  # acknowledged only once durable
    conn.ack_publish(7)
    assert conn.data_to_send() == b"\x40\x02\x00\x07"
    assert conn.inflight == 0


def test_qos1_inflight_counts_and_pubacks_leave_in_the_order_the_publishes_came() -> None:
    conn = connected()
    conn.receive_data(b"".join(enc(Publish("t", b"x", qos=1, packet_id=i)) for i in (1, 2, 3)))
    assert conn.inflight == 3
    conn.ack_publish(2)  # decided before 1 (e.g. a message the pipeline drops): held until 1 is answered
    assert conn.inflight == 3  # still in flight for the device
    assert conn.data_to_send() == b""
    conn.ack_publish(1)
    assert conn.inflight == 1
    assert conn.data_to_send() == b"\x40\x02\x00\x01\x40\x02\x00\x02"  # MQTT-4.6.0-2
    conn.ack_publish(3)
    assert conn.inflight == 0
    assert conn.data_to_send() == b"\x40\x02\x00\x03"
    with pytest.raises(RuntimeError):
        conn.ack_publish(3)  # twice


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_a_group_commit_waits_for_an_earlier_publish_answered_one_by_one(version: int) -> None:
    """1 went another way (the pipeline's callback) and is still being committed when the group of 2 and 3 is: their
    PUBACKs wait for 1's; a refusal decided early (MQTT 5: 0x87 for 4) waits for all of them."""
    conn = connected(version)
    conn.receive_data(b"".join(enc(Publish("t", b"x", qos=1, packet_id=i), version) for i in (1, 2, 3, 4)))
    if version == MQTT_5:
        conn.ack_publish(4, ReasonCode.NOT_AUTHORIZED)
    assert conn.ack_committed([2, 3]) == 0
    assert conn.data_to_send() == b""
    conn.ack_publish(1)
    expected = [Puback(1), Puback(2), Puback(3)] + ([Puback(4, ReasonCode.NOT_AUTHORIZED)] if version == MQTT_5 else [])
    assert sent_packets(conn) == expected
    if version == MQTT_311:
        conn.ack_committed([4])
        assert sent_packets(conn) == [Puback(4)]
    assert conn.inflight == 0


def test_a_resend_while_its_answer_is_held_for_order_is_a_duplicate() -> None:
    """A 3.1.1 device resends (DUP) a publish whose PUBACK is decided but held behind an earlier one: the held
    answer covers it (no second event, no second place in the order, which would stall every later answer)."""
    conn = connected()
    conn.receive_data(b"".join(enc(Publish("t", b"x", qos=1, packet_id=i)) for i in (1, 2)))
    conn.ack_publish(2)
    assert conn.receive_data(enc(Publish("t", b"x", qos=1, dup=True, packet_id=2))) == []
    conn.ack_publish(1)
    assert sent_packets(conn) == [Puback(1), Puback(2)]
    conn.receive_data(enc(Publish("t", b"y", qos=1, packet_id=3)))
    conn.ack_publish(3)
    assert sent_packets(conn) == [Puback(3)] and conn.inflight == 0


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_ack_committed_sends_the_pubacks_of_a_group_in_order(version: int) -> None:
    conn = connected(version)
    ids = [1, 255, 256, 4660, 65535]
    conn.receive_data(b"".join(enc(Publish("t", b"x", qos=1, packet_id=i), version) for i in ids))
    assert conn.ack_committed(ids[:4]) == 0
    assert sent_packets(conn) == [Puback(i) for i in ids[:4]]
    assert conn.inflight == 1 and conn.awaits_ack(65535)
    assert conn.ack_committed([65535]) == 0
    assert conn.data_to_send() == b"\x40\x02\xff\xff"  # the 4-byte Success PUBACK, also under MQTT 5
    with pytest.raises(RuntimeError):
        conn.ack_committed([7])  # never received


def test_ack_committed_with_qos2_sends_pubrec_and_remembers_the_ids() -> None:
    conn = connected()
    conn.receive_data(b"".join(enc(Publish("t", b"x", qos=q, packet_id=i)) for i, q in ((1, 1), (2, 2), (3, 1))))
    assert conn.ack_committed([1, 2, 3]) == 1
    assert sent_packets(conn) == [Puback(1), Pubrec(2), Puback(3)]
    assert conn.session.awaiting_rel == {2} and conn.session.qos2_pending == set()
    conn.receive_data(enc(Pubrel(2)))
    assert sent_packets(conn) == [Pubcomp(2)]


def test_ack_committed_after_close_sends_nothing_but_keeps_the_qos2_state() -> None:
    conn = connected()
    conn.receive_data(b"".join(enc(Publish("t", b"x", qos=q, packet_id=i)) for i, q in ((4, 1), (5, 2))))
    conn.close(ReasonCode.UNSPECIFIED_ERROR, "connection lost")
    assert conn.ack_committed([4, 5]) == 1
    assert conn.data_to_send() == b""
    assert conn.inflight == 0
    assert conn.session.awaiting_rel == {5}  # a resend on the next connection gets PUBREC, not a second record


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_dup_retransmission_in_flight_is_not_a_new_event(version: int) -> None:
    conn = connected(version)
    p = Publish("t", b"x", qos=1, packet_id=9)
    assert len(conn.receive_data(enc(p, version))) == 1
    resend = Publish("t", b"x", qos=1, dup=True, packet_id=9)
    assert conn.receive_data(enc(resend, version)) == []
    assert conn.inflight == 1
    assert conn.data_to_send() == b""
    conn.ack_publish(9)
    assert conn.data_to_send() == b"\x40\x02\x00\x09"
    # Once acknowledged the id is free again: the same id is a new message.
    assert conn.receive_data(enc(p, version)) == [PublishReceived(p, "t")]


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_packet_id_reuse_without_dup_closes(version: int) -> None:
    conn = connected(version)
    conn.receive_data(enc(Publish("t", b"x", qos=1, packet_id=9), version))
    closed = closed_event(conn.receive_data(enc(Publish("t", b"other", qos=1, packet_id=9), version)))
    assert closed.reason_code is ReasonCode.PACKET_IDENTIFIER_IN_USE
    assert conn.state is ConnectionState.CLOSED
    assert conn.data_to_send() == (b"\xe0\x02\x91\x00" if version == MQTT_5 else b"")
    # The shell may still try to acknowledge the first copy: no error, nothing sent.
    conn.ack_publish(9)
    assert conn.data_to_send() == b""
    assert conn.inflight == 0


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_qos2_flow(version: int) -> None:
    conn = connected(version)
    p = Publish("t", b"once", qos=2, packet_id=5)
    assert conn.receive_data(enc(p, version)) == [PublishReceived(p, "t")]
    # A DUP before we acknowledged: nothing new, nothing sent.
    assert conn.receive_data(enc(Publish("t", b"once", qos=2, dup=True, packet_id=5), version)) == []
    assert conn.data_to_send() == b""
    conn.ack_publish(5)
    assert conn.data_to_send() == b"\x50\x02\x00\x05"  # PUBREC
    assert conn.inflight == 0
    # The device missed our PUBREC and resends: PUBREC again, no second delivery (MQTT 5 §4.3.3).
    resend = Publish("t", b"once", qos=2, dup=True, packet_id=5)
    assert conn.receive_data(enc(resend, version)) == []
    assert conn.data_to_send() == b"\x50\x02\x00\x05"
    assert conn.receive_data(enc(Pubrel(5), version)) == []
    assert conn.data_to_send() == b"\x70\x02\x00\x05"  # PUBCOMP
    # After PUBCOMP the id is free: the same id is a new message.
    assert conn.receive_data(enc(p, version)) == [PublishReceived(p, "t")]


@pytest.mark.parametrize(("version", "expected"), [(MQTT_311, b"\x70\x02\x00\x05"), (MQTT_5, b"\x70\x03\x00\x05\x92")])
def test_pubrel_for_unknown_id(version: int, expected: bytes) -> None:
    conn = connected(version)
    assert conn.receive_data(enc(Pubrel(5), version)) == []
    assert conn.data_to_send() == expected
    assert conn.state is ConnectionState.CONNECTED


def test_qos2_refused_5_sends_pubrec_error_and_forgets() -> None:
    conn = connected(MQTT_5)
    p = Publish("t", b"x", qos=2, packet_id=5)
    conn.receive_data(enc(p, MQTT_5))
    conn.ack_publish(5, ReasonCode.QUOTA_EXCEEDED)
    assert conn.data_to_send() == b"\x50\x03\x00\x05\x97"
    # MQTT 5 §4.3.3: after a PUBREC with an error the id is free; a resend is a new message.
    assert conn.receive_data(enc(p, MQTT_5)) == [PublishReceived(p, "t")]


@pytest.mark.parametrize("topic", ["", "a/+/b", "a/#", "#"])
def test_invalid_topic_name_closes(topic: str) -> None:
    conn = connected(MQTT_5)
    closed = closed_event(conn.receive_data(enc(Publish(topic, b"x"), MQTT_5)))
    assert closed.reason_code is ReasonCode.TOPIC_NAME_INVALID
    assert conn.data_to_send() == b"\xe0\x02\x90\x00"


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
@pytest.mark.parametrize("topic", ["", "a/+/b", "a/#", "a/b/c"])
def test_invalid_topic_after_valid_ones_closes(version: int, topic: str) -> None:
    # The engine checks a topic name once while the device keeps publishing to it (connection._valid_topic):
    # any other one is checked again.
    conn = connected(version, max_topic_levels=2)
    ok = Publish("a/b", b"x")
    for _ in range(2):
        assert conn.receive_data(enc(ok, version)) == [PublishReceived(ok, "a/b")]
    closed = closed_event(conn.receive_data(enc(Publish(topic, b"x"), version)))
    assert closed.reason_code is ReasonCode.TOPIC_NAME_INVALID


def test_misplaced_property_in_publish_is_malformed() -> None:
    # PUBLISH takes the engine's shortcut past decode_packet: the MQTT 5 §2.2.2.2 check still applies.
    conn = connected(MQTT_5)
    p = Publish("t", b"x", qos=1, packet_id=1, properties=Properties({PropertyId.SESSION_EXPIRY_INTERVAL: 5}))
    closed = closed_event(conn.receive_data(enc(p, MQTT_5)))
    assert closed.reason_code is ReasonCode.MALFORMED_PACKET
    assert conn.inflight == 0


def test_publish_properties_reach_the_shell() -> None:
    conn = connected(MQTT_5)
    props = Properties({PropertyId.CONTENT_TYPE: "application/json"}, user=(("k", "v"),))
    p = Publish("t", b"{}", qos=1, packet_id=1, properties=props)
    (event,) = conn.receive_data(enc(p, MQTT_5))
    assert isinstance(event, PublishReceived) and event.publish.properties == props


# ---------------------------------------------------------------------------------------------------------------
# Acknowledgements with an error reason, receive maximum, close().


def test_ack_publish_error_on_311_closes() -> None:
    """MQTT 3.1.1 has no negative PUBACK: refusing a publish means closing (MQTT-3.3.5-2)."""
    conn = connected(MQTT_311)
    conn.receive_data(enc(Publish("t", b"x", qos=1, packet_id=3)))
    conn.ack_publish(3, ReasonCode.NOT_AUTHORIZED)
    assert conn.state is ConnectionState.CLOSED
    assert conn.data_to_send() == b""
    assert conn.close_reason is not None
    assert conn.close_reason.reason_code is ReasonCode.NOT_AUTHORIZED
    assert conn.close_reason.by_peer is False


@pytest.mark.parametrize(("qos", "expected"), [(1, b"\x40\x03\x00\x03\x87"), (2, b"\x50\x03\x00\x03\x87")])
def test_ack_publish_error_on_5_sends_reason(qos: int, expected: bytes) -> None:
    conn = connected(MQTT_5)
    conn.receive_data(enc(Publish("t", b"x", qos=qos, packet_id=3), MQTT_5))
    conn.ack_publish(3, ReasonCode.NOT_AUTHORIZED)
    assert conn.data_to_send() == expected
    assert conn.state is ConnectionState.CONNECTED


def test_ack_publish_5_success_is_short_form() -> None:
    conn = connected(MQTT_5)
    conn.receive_data(enc(Publish("t", b"x", qos=1, packet_id=3), MQTT_5))
    conn.ack_publish(3)
    assert conn.data_to_send() == b"\x40\x02\x00\x03"


def test_receive_maximum_exceeded_5() -> None:
    conn = connected(MQTT_5, receive_maximum=2)
    conn.receive_data(b"".join(enc(Publish("t", b"x", qos=1, packet_id=i), MQTT_5) for i in (1, 2)))
    assert conn.inflight == 2
    closed = closed_event(conn.receive_data(enc(Publish("t", b"x", qos=2, packet_id=3), MQTT_5)))
    assert closed.reason_code is ReasonCode.RECEIVE_MAXIMUM_EXCEEDED
    assert conn.data_to_send() == b"\xe0\x02\x93\x00"  # MQTT 5 §3.3.4: DISCONNECT 0x93
    assert conn.state is ConnectionState.CLOSED


def test_receive_maximum_frees_on_ack_and_ignores_qos0() -> None:
    conn = connected(MQTT_5, receive_maximum=1)
    conn.receive_data(enc(Publish("t", b"x", qos=1, packet_id=1), MQTT_5))
    assert len(conn.receive_data(enc(Publish("t", b"q0"), MQTT_5))) == 1  # QoS 0 does not count
    conn.ack_publish(1)
    events = conn.receive_data(enc(Publish("t", b"x", qos=1, packet_id=2), MQTT_5))
    assert [type(e) for e in events] == [PublishReceived]


def test_receive_maximum_not_enforced_on_311() -> None:
    """3.1.1 has no receive maximum; the shell applies backpressure by not reading (see ``inflight``)."""
    conn = connected(MQTT_311, receive_maximum=1)
    events = conn.receive_data(b"".join(enc(Publish("t", b"x", qos=1, packet_id=i)) for i in (1, 2, 3)))
    assert [type(e) for e in events] == [PublishReceived] * 3
    assert conn.inflight == 3


def test_close_5_sends_disconnect_with_reason() -> None:
    conn = connected(MQTT_5)
    closed = conn.close(ReasonCode.SERVER_SHUTTING_DOWN, "shutdown")
    assert closed == ConnectionClosed(ReasonCode.SERVER_SHUTTING_DOWN, "shutdown", by_peer=False)
    assert conn.data_to_send() == b"\xe0\x02\x8b\x00"
    assert conn.state is ConnectionState.CLOSED
    # Closing again changes nothing and sends nothing.
    assert conn.close(ReasonCode.KEEP_ALIVE_TIMEOUT, "again") == closed
    assert conn.data_to_send() == b""


def test_close_311_sends_nothing() -> None:
    conn = connected(MQTT_311)
    closed = conn.close(ReasonCode.KEEP_ALIVE_TIMEOUT, "keepalive")
    assert closed.reason_code is ReasonCode.KEEP_ALIVE_TIMEOUT
    assert conn.data_to_send() == b""
    assert conn.state is ConnectionState.CLOSED


def test_close_before_accept_sends_nothing() -> None:
    conn = MQTTConnection(max_packet_size=MAX_PACKET)
    conn.receive_data(connect_bytes(MQTT_5))
    conn.close(ReasonCode.SERVER_SHUTTING_DOWN, "shutdown")
    assert conn.data_to_send() == b""
    assert conn.state is ConnectionState.CLOSED


def test_packet_too_large_after_connect_5() -> None:
    conn = connected(MQTT_5, max_packet_size=64)
    closed = closed_event(conn.receive_data(b"\x30\xe8\x07"))
    assert closed.reason_code is ReasonCode.PACKET_TOO_LARGE
    assert conn.data_to_send() == b"\xe0\x02\x95\x00"


# ---------------------------------------------------------------------------------------------------------------
# PINGREQ, SUBSCRIBE, DISCONNECT, unexpected packets.


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_pingreq(version: int) -> None:
    conn = connected(version)
    assert conn.receive_data(b"\xc0\x00\xc0\x00") == []
    assert conn.data_to_send() == b"\xd0\x00\xd0\x00"


def test_subscribe_and_unsubscribe_311() -> None:
    conn = connected()
    sub = Subscribe(10, (("a/b", SubscriptionOptions(1)), ("c/#", SubscriptionOptions(2))))
    assert conn.receive_data(enc(sub)) == [SubscribeRequested(sub)]
    conn.ack_subscribe(10, (1, ReasonCode.NOT_AUTHORIZED))
    assert conn.data_to_send() == b"\x90\x04\x00\x0a\x01\x80"  # 3.1.1 SUBACK failure is 0x80
    unsub = Unsubscribe(11, ("a/b",))
    assert conn.receive_data(enc(unsub)) == [UnsubscribeRequested(unsub)]
    conn.ack_unsubscribe(11, (0,))
    assert conn.data_to_send() == b"\xb0\x02\x00\x0b"


def test_subscribe_and_unsubscribe_5() -> None:
    conn = connected(MQTT_5)
    sub = Subscribe(10, (("a/b", SubscriptionOptions(1)),))
    assert conn.receive_data(enc(sub, MQTT_5)) == [SubscribeRequested(sub)]
    conn.ack_subscribe(10, (ReasonCode.NOT_AUTHORIZED,))
    assert conn.data_to_send() == b"\x90\x04\x00\x0a\x00\x87"
    conn.receive_data(enc(Unsubscribe(11, ("a/b", "x")), MQTT_5))
    conn.ack_unsubscribe(11, (0x00, 0x11))
    assert conn.data_to_send() == b"\xb0\x05\x00\x0b\x00\x00\x11"


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_disconnect_by_peer(version: int) -> None:
    conn = connected(version)
    p = Publish("t", b"after")
    events = conn.receive_data(enc(Disconnect(), version) + enc(p, version))
    assert events == [ConnectionClosed(ReasonCode.SUCCESS, "client disconnected", by_peer=True)]
    assert conn.state is ConnectionState.CLOSED
    assert conn.close_reason == events[0]
    # Later data is ignored, and nothing is ever sent.
    assert conn.receive_data(enc(p, version)) == []
    assert conn.pending_events() == []
    assert conn.data_to_send() == b""


def test_disconnect_with_will_5() -> None:
    conn = connected(MQTT_5)
    (closed,) = conn.receive_data(b"\xe0\x01\x04")
    assert closed == ConnectionClosed(ReasonCode.DISCONNECT_WITH_WILL, "client disconnected", by_peer=True)


@pytest.mark.parametrize("packet", [Puback(1), Pubrec(1), Pubcomp(1), Connack(False, ReasonCode.SUCCESS)])
@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_unexpected_packets_close(packet: Packet, version: int) -> None:
    conn = connected(version)
    closed = closed_event(conn.receive_data(enc(packet, version)))
    assert closed.reason_code is ReasonCode.PROTOCOL_ERROR
    assert conn.data_to_send() == (b"\xe0\x02\x82\x00" if version == MQTT_5 else b"")


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_malformed_after_connect(version: int) -> None:
    conn = connected(version)
    events = conn.receive_data(enc(Publish("ok", b"1"), version) + b"\x36\x03\x00\x01a")  # then QoS 3
    assert isinstance(events[0], PublishReceived)
    assert closed_event(events).reason_code is ReasonCode.MALFORMED_PACKET
    assert len(events) == 2
    assert conn.data_to_send() == (b"\xe0\x02\x81\x00" if version == MQTT_5 else b"")


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis: chunking does not change the outcome; fuzz never raises.


def drive(conn: MQTTConnection, chunks: list[bytes]) -> tuple[list[Event], bytes]:
    """A minimal shell: accept the CONNECT at once, then acknowledge every QoS 1/2 publish after the input ends.

    Acknowledging between reads would make the outcome depend on where the reads split the stream (an id reused
    after its PUBACK is new, while in flight it is an error), so the shell acknowledges only at the end.
    """
    events: list[Event] = []
    out = b""
    for chunk in chunks:
        new = conn.receive_data(chunk)
        if any(isinstance(e, ConnectRequested) for e in new):
            conn.accept()
            new += conn.pending_events()
        events += new
        out += conn.data_to_send()
    for event in events:
        if isinstance(event, PublishReceived) and event.publish.qos:
            assert event.publish.packet_id is not None
            conn.ack_publish(event.publish.packet_id)
    return events, out + conn.data_to_send()


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks = []
    pos = 0
    i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        chunks.append(data[pos : pos + size])
        pos += size
        i += 1
    return chunks


topics = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"), min_size=1, max_size=8)


@st.composite
def client_packets(draw: st.DrawFn) -> list[Packet]:
    """Several PUBLISHes (ids from a small pool, so DUPs, reuse and QoS 2 resends happen) and a few others."""
    packets: list[Packet] = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["publish", "publish", "publish", "pingreq", "pubrel", "subscribe"]))
        if kind == "publish":
            qos = draw(st.integers(0, 2))
            packets.append(Publish(draw(topics), draw(st.binary(max_size=30)), qos, draw(st.booleans()),
                                   qos > 0 and draw(st.booleans()), draw(st.integers(1, 4)) if qos else None))
        elif kind == "pingreq":
            packets.append(Pingreq())
        elif kind == "pubrel":
            packets.append(Pubrel(draw(st.integers(1, 4))))
        else:
            packets.append(Subscribe(draw(st.integers(1, 9)), ((draw(topics), SubscriptionOptions(1)),)))
    if draw(st.booleans()):
        packets.append(Disconnect())
    return packets


@st.composite
def client_streams(draw: st.DrawFn) -> tuple[int, bytes]:
    """A valid CONNECT followed by :func:`client_packets`."""
    version = draw(st.sampled_from([MQTT_311, MQTT_5]))
    packets = [Connect(version, draw(topics), True, draw(st.integers(0, 600))), *draw(client_packets())]
    return version, b"".join(encode_packet(p, version) for p in packets)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client_streams(), st.lists(st.integers(1, 16), min_size=1, max_size=20))
def test_chunking_does_not_change_events(stream: tuple[int, bytes], sizes: list[int]) -> None:
    _version, data = stream
    whole_events, whole_out = drive(MQTTConnection(max_packet_size=MAX_PACKET), [data])
    chunk_events, chunk_out = drive(MQTTConnection(max_packet_size=MAX_PACKET), split(data, sizes))
    assert chunk_events == whole_events
    assert chunk_out == whole_out
    byte_events, byte_out = drive(MQTTConnection(max_packet_size=MAX_PACKET), split(data, [1]))
    assert byte_events == whole_events
    assert byte_out == whole_out
    assert isinstance(whole_events[0], ConnectRequested)


@st.composite
def junk(draw: st.DrawFn, version: int) -> bytes:
    """Arbitrary bytes, or valid client packets with a few bytes damaged."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    data = bytearray(b"".join(encode_packet(p, version) for p in draw(client_packets())))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([MQTT_311, MQTT_5]).flatmap(lambda v: st.tuples(st.just(v), junk(v))),
       st.lists(st.integers(1, 32), min_size=1, max_size=10))
def test_fuzz_after_connect_never_raises(vj: tuple[int, bytes], sizes: list[int]) -> None:
    version, data = vj
    conn = connected(version, max_packet_size=256)
    closed = 0
    for chunk in split(data, sizes):
        was_closed = conn.state is ConnectionState.CLOSED
        events = conn.receive_data(chunk)  # must not raise
        if was_closed:
            assert events == []
        for event in events:
            assert isinstance(event, (PublishReceived, SubscribeRequested, UnsubscribeRequested, ConnectionClosed))
            if isinstance(event, ConnectionClosed):
                closed += 1
            elif isinstance(event, PublishReceived) and event.publish.qos:
                assert event.publish.packet_id is not None
                conn.ack_publish(event.publish.packet_id)
        if events and isinstance(events[-1], ConnectionClosed):
            assert conn.state is ConnectionState.CLOSED
        conn.data_to_send()
    assert closed <= 1
    assert (closed == 1) == (conn.state is ConnectionState.CLOSED)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(1, 32), min_size=1, max_size=10))
def test_fuzz_before_connect_never_raises(data: bytes, sizes: list[int]) -> None:
    conn = MQTTConnection(max_packet_size=256)
    for chunk in split(data, sizes):
        for event in conn.receive_data(chunk):
            assert isinstance(event, (ConnectRequested, ConnectionClosed))
            if isinstance(event, ConnectRequested):
                conn.accept()
                conn.pending_events()
        conn.data_to_send()
