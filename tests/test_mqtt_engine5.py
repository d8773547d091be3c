"""MQTT 5 features, QoS 2 across reconnects and server-to-device delivery in the sans-I/O engine (no sockets)."""

from __future__ import annotations

import pytest

from edgegw.mqtt.codec import FrameReader, decode_packet, encode_packet
from edgegw.mqtt.connection import ConnectionClosed, ConnectionState, ConnectRequested, MQTTConnection, PublishReceived
from edgegw.mqtt.packets import (
    MQTT_5,
    MQTT_311,
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
    ReasonCode,
)
from edgegw.mqtt.session import Message, Outgoing, SessionState

P = PropertyId


def enc(packet: Packet, version: int = MQTT_5) -> bytes:
    return encode_packet(packet, version)


def sent(conn: MQTTConnection) -> list[Packet]:
    reader = FrameReader(1 << 20)
    reader.feed(conn.data_to_send())
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(decode_packet(frame[0], frame[1], conn.protocol_level))
    return out


def connect(version: int = MQTT_5, *, props: Properties | None = None, clean: bool = True, keepalive: int = 30,
            session: SessionState | None = None, present: bool = False, **kwargs: int) -> MQTTConnection:
    conn = MQTTConnection(max_packet_size=kwargs.pop("max_packet_size", 4096), **kwargs)
    c = Connect(version, "dev-1", clean, keepalive, properties=props or Properties())
    events = conn.receive_data(enc(c, version))
    assert [type(e) for e in events] == [ConnectRequested], events
    conn.accept(session_present=present, session=session)
    return conn


def connack(conn: MQTTConnection) -> Connack:
    packets = sent(conn)
    assert isinstance(packets[0], Connack)
    return packets[0]


def closed(events: list) -> ConnectionClosed:  # type: ignore[type-arg]
    assert events and isinstance(events[-1], ConnectionClosed), events
    return events[-1]


# --- CONNACK ---------------------------------------------------------------------------------------------------


def test_connack_states_limits_and_not_maximum_qos() -> None:
    conn = connect(topic_alias_maximum=10, receive_maximum=5)
    ack = connack(conn)
    assert ack.properties.get(P.TOPIC_ALIAS_MAXIMUM) == 10
    assert ack.properties.get(P.RECEIVE_MAXIMUM) == 5
    # MQTT 5 §3.2.2.3.4: Maximum QoS may only be 0 or 1; we support 2, so it is absent. No assigned client id.
    assert P.MAXIMUM_QOS not in ack.properties.values
    assert P.ASSIGNED_CLIENT_IDENTIFIER not in ack.properties.values
    assert P.SERVER_KEEP_ALIVE not in ack.properties.values


@pytest.mark.parametrize(("asked", "effective"), [(0, 60), (600, 60), (30, 30)])
def test_server_keep_alive(asked: int, effective: int) -> None:
    conn = connect(keepalive=asked, max_keepalive=60)
    assert conn.keepalive == effective
    ack = connack(conn)
    assert ack.properties.get(P.SERVER_KEEP_ALIVE) == (None if asked == effective else effective)


def test_keepalive_bound_applies_silently_to_311() -> None:
    conn = connect(MQTT_311, keepalive=0, max_keepalive=60)
    assert conn.keepalive == 60
    assert sent(conn) == [Connack(False, ReasonCode.SUCCESS)]


def test_session_expiry_capped_and_told() -> None:
    conn = connect(props=Properties({P.SESSION_EXPIRY_INTERVAL: 0xFFFFFFFF}), clean=False, max_session_expiry=300)
    assert conn.session_expiry == 300
    assert connack(conn).properties.get(P.SESSION_EXPIRY_INTERVAL) == 300


def test_session_expiry_311() -> None:
    assert connect(MQTT_311, clean=False, max_session_expiry=300).session_expiry == 300
    assert connect(MQTT_311, clean=True, max_session_expiry=300).session_expiry == 0


def test_disconnect_may_change_session_expiry_unless_it_was_0() -> None:
    conn = connect(props=Properties({P.SESSION_EXPIRY_INTERVAL: 100}))
    sent(conn)
    conn.receive_data(enc(Disconnect(ReasonCode.SUCCESS, Properties({P.SESSION_EXPIRY_INTERVAL: 0}))))
    assert conn.session_expiry == 0
    conn = connect()
    sent(conn)
    ev = conn.receive_data(enc(Disconnect(ReasonCode.SUCCESS, Properties({P.SESSION_EXPIRY_INTERVAL: 50}))))
    assert closed(ev).reason_code is ReasonCode.PROTOCOL_ERROR  # MQTT-3.14.2-2


@pytest.mark.parametrize("prop", [P.RECEIVE_MAXIMUM, P.MAXIMUM_PACKET_SIZE])
def test_zero_receive_maximum_or_packet_size_is_a_protocol_error(prop: PropertyId) -> None:
    conn = MQTTConnection(max_packet_size=4096)
    ev = conn.receive_data(enc(Connect(MQTT_5, "d", True, 30, properties=Properties({prop: 0}))))
    assert closed(ev).reason_code is ReasonCode.PROTOCOL_ERROR


# --- topic alias, topic limits -----------------------------------------------------------------------------------


def test_topic_alias_set_then_used() -> None:
    conn = connect(topic_alias_maximum=2)
    sent(conn)
    first = Publish("devices/dev-1/t", b"1", properties=Properties({P.TOPIC_ALIAS: 2}))
    second = Publish("", b"2", properties=Properties({P.TOPIC_ALIAS: 2}))
    events = conn.receive_data(enc(first) + enc(second))
    assert [e.topic for e in events] == ["devices/dev-1/t", "devices/dev-1/t"]  # type: ignore[union-attr]
    # Re-mapping the alias to another topic is allowed (MQTT 5 §3.3.2.3.4).
    third = Publish("devices/dev-1/u", b"3", properties=Properties({P.TOPIC_ALIAS: 2}))
    events = conn.receive_data(enc(third) + enc(second))
    assert [e.topic for e in events] == ["devices/dev-1/u", "devices/dev-1/u"]  # type: ignore[union-attr]


@pytest.mark.parametrize("alias", [0, 3])
def test_topic_alias_out_of_range_is_0x94(alias: int) -> None:
    conn = connect(topic_alias_maximum=2)
    sent(conn)
    ev = conn.receive_data(enc(Publish("t", b"x", properties=Properties({P.TOPIC_ALIAS: alias}))))
    assert closed(ev).reason_code is ReasonCode.TOPIC_ALIAS_INVALID
    assert conn.data_to_send() == b"\xe0\x02\x94\x00"


def test_unmapped_topic_alias_is_a_protocol_error() -> None:
    conn = connect(topic_alias_maximum=2)
    sent(conn)
    ev = conn.receive_data(enc(Publish("", b"x", properties=Properties({P.TOPIC_ALIAS: 1}))))
    assert closed(ev).reason_code is ReasonCode.PROTOCOL_ERROR


def test_aliases_do_not_survive_the_connection() -> None:
    state = SessionState()
    conn = connect(topic_alias_maximum=2, session=state)
    conn.receive_data(enc(Publish("a/b", b"1", properties=Properties({P.TOPIC_ALIAS: 1}))))
    conn2 = connect(topic_alias_maximum=2, session=state, clean=False)
    ev = conn2.receive_data(enc(Publish("", b"x", properties=Properties({P.TOPIC_ALIAS: 1}))))
    assert closed(ev).reason_code is ReasonCode.PROTOCOL_ERROR


@pytest.mark.parametrize("topic", ["a" * 65, "/".join("x" * 9)])
def test_topic_length_and_levels(topic: str) -> None:
    conn = connect(max_topic_length=64, max_topic_levels=8)
    sent(conn)
    ev = conn.receive_data(enc(Publish(topic, b"x")))
    assert closed(ev).reason_code is ReasonCode.TOPIC_NAME_INVALID
    ok = connect(max_topic_length=64, max_topic_levels=8)
    assert [type(e) for e in ok.receive_data(enc(Publish("/".join("x" * 8), b"x")))] == [PublishReceived]


# --- QoS 2 from the device across reconnects --------------------------------------------------------------------


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_qos2_resend_after_reconnect_is_not_a_new_message(version: int) -> None:
    state = SessionState()
    conn = connect(version, clean=False, session=state)
    sent(conn)
    p = Publish("t", b"once", qos=2, packet_id=5)
    assert [type(e) for e in conn.receive_data(enc(p, version))] == [PublishReceived]
    conn.ack_publish(5)
    conn.close(ReasonCode.UNSPECIFIED_ERROR, "link lost before PUBREC arrived")
    # The device reconnects (same session) and resends with DUP: PUBREC again, no event.
    conn2 = connect(version, clean=False, session=state, present=True)
    sent(conn2)
    assert conn2.receive_data(enc(Publish("t", b"once", qos=2, dup=True, packet_id=5), version)) == []
    assert sent(conn2) == [Pubrec(5)]
    assert conn2.receive_data(enc(Pubrel(5), version)) == []
    assert sent(conn2) == [Pubcomp(5)]
    assert state.awaiting_rel == set()


def test_qos2_commit_after_the_connection_died_still_counts() -> None:
    state = SessionState()
    conn = connect(clean=False, session=state)
    conn.receive_data(enc(Publish("t", b"once", qos=2, packet_id=9)))
    conn.close(ReasonCode.UNSPECIFIED_ERROR, "gone")
    conn.ack_publish(9)  # the commit completes after the connection is gone
    assert state.awaiting_rel == {9}


# --- server -> device --------------------------------------------------------------------------------------------


def out(topic: str = "devices/dev-1/cmd", qos: int = 1, **kw: object) -> Outgoing:
    return Outgoing(Message(topic, b"go", qos), qos, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_outgoing_qos1(version: int) -> None:
    conn = connect(version)
    sent(conn)
    assert conn.send_publish(out(qos=1), now=0.0)
    (p,) = sent(conn)
    assert isinstance(p, Publish) and p.qos == 1 and p.packet_id == 1 and not p.dup
    assert conn.session.outgoing
    assert conn.receive_data(enc(Puback(1), version)) == []
    assert not conn.session.outgoing


def test_outgoing_qos2() -> None:
    conn = connect()
    sent(conn)
    conn.send_publish(out(qos=2), now=0.0)
    (p,) = sent(conn)
    assert isinstance(p, Publish) and p.qos == 2
    conn.receive_data(enc(Pubrec(p.packet_id)))  # type: ignore[arg-type]
    assert sent(conn) == [Pubrel(p.packet_id)]  # type: ignore[arg-type]
    conn.receive_data(enc(Pubcomp(p.packet_id)))  # type: ignore[arg-type]
    assert not conn.session.outgoing


def test_outgoing_qos2_refused_by_the_device_frees_the_id() -> None:
    conn = connect()
    sent(conn)
    conn.send_publish(out(qos=2), now=0.0)
    sent(conn)
    conn.receive_data(enc(Pubrec(1, ReasonCode.UNSPECIFIED_ERROR)))
    assert sent(conn) == [] and not conn.session.outgoing


def test_receive_maximum_of_the_client_bounds_the_window() -> None:
    conn = connect(props=Properties({P.RECEIVE_MAXIMUM: 2}), max_inflight_out=10)
    sent(conn)
    assert conn.send_publish(out(), 0.0) and conn.send_publish(out(), 0.0)
    assert not conn.can_send
    conn.receive_data(enc(Puback(1)))
    assert conn.can_send
    capped = connect(props=Properties({P.RECEIVE_MAXIMUM: 100}), max_inflight_out=1)
    capped.send_publish(out(), 0.0)
    assert not capped.can_send


def test_client_maximum_packet_size_drops_what_does_not_fit() -> None:
    conn = connect(props=Properties({P.MAXIMUM_PACKET_SIZE: 40}))
    sent(conn)
    big = Outgoing(Message("devices/dev-1/cmd", b"x" * 100, 1), 1)
    assert not conn.send_publish(big, 0.0)
    assert sent(conn) == [] and not conn.session.outgoing and conn.dropped_too_large == 1
    assert conn.send_publish(out(), 0.0)


def test_subscription_ids_and_remaining_expiry_are_sent() -> None:
    conn = connect()
    sent(conn)
    m = Message("a/b", b"x", 1, properties=Properties({P.MESSAGE_EXPIRY_INTERVAL: 100}, user=(("k", "v"),)),
                expires_at=1000.0)
    conn.send_publish(Outgoing(m, 1, (3, 7)), now=960.0)
    (p,) = sent(conn)
    assert isinstance(p, Publish)
    assert p.properties.subscription_ids == (3, 7)
    assert p.properties.get(P.MESSAGE_EXPIRY_INTERVAL) == 40
    assert p.properties.user == (("k", "v"),)


def test_redelivery_on_resume() -> None:
    state = SessionState()
    conn = connect(clean=False, session=state)
    sent(conn)
    conn.send_publish(out(qos=1), 0.0)
    conn.send_publish(out(qos=2), 0.0)
    conn.send_publish(out(qos=2), 0.0)
    sent(conn)
    conn.receive_data(enc(Pubrec(3)))
    conn.close(ReasonCode.UNSPECIFIED_ERROR, "gone")
    conn2 = connect(clean=False, session=state, present=True)
    packets = sent(conn2)
    assert isinstance(packets[0], Connack) and packets[0].session_present
    seen = [(type(p).__name__, getattr(p, "packet_id", None), getattr(p, "dup", None)) for p in packets[1:]]
    assert seen == [("Publish", 1, True), ("Publish", 2, True), ("Pubrel", 3, None)]


@pytest.mark.parametrize("packet", [Puback(4), Pubrec(4), Pubcomp(4)])
def test_acks_for_unknown_ids_close(packet: Packet) -> None:
    conn = connect()
    sent(conn)
    assert closed(conn.receive_data(enc(packet))).reason_code is ReasonCode.PROTOCOL_ERROR
    assert conn.state is ConnectionState.CLOSED


def test_packet_ids_skip_those_in_flight() -> None:
    state = SessionState(next_packet_id=65535)
    conn = connect(session=state)
    sent(conn)
    conn.send_publish(out(), 0.0)
    conn.send_publish(out(), 0.0)
    assert sorted(state.outgoing) == [1, 65535]


def test_qos2_resend_while_the_first_copy_is_still_committing_is_adopted() -> None:
    state = SessionState()
    first = connect(clean=False, session=state)
    sent(first)
    assert [type(e) for e in first.receive_data(enc(Publish("t", b"once", qos=2, packet_id=4)))] == [PublishReceived]
    first.close(ReasonCode.UNSPECIFIED_ERROR, "link lost; the commit is still running")
    second = connect(clean=False, session=state, present=True)
    sent(second)
    assert second.receive_data(enc(Publish("t", b"once", qos=2, dup=True, packet_id=4))) == []  # no new record
    assert second.awaits_ack(4) and sent(second) == []
    first.ack_publish(4)  # the commit completes: the first connection is gone ...
    second.ack_publish(4)  # ... so the shell acknowledges on the second
    assert sent(second) == [Pubrec(4)]
    assert state.qos2_pending == set() and state.awaiting_rel == {4}
