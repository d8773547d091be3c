"""The session journal (edgegw/mqtt/sessiondb.py) on real SQLite files, and the engine rules the interop suites
brought up. What a crash leaves is read with a second SQLite connection (WAL: committed data only), never by
calling close() (which a killed process never does)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import msgpack
import pytest
from structlog.testing import capture_logs

from edgegw.config import MQTTSettings
from edgegw.mqtt.broker import LocalBroker
from edgegw.mqtt.codec import FrameReader, decode_packet, encode_packet
from edgegw.mqtt.connection import ConnectionClosed, MQTTConnection, PublishReceived
from edgegw.mqtt.packets import (
    MQTT_5,
    Connect,
    Disconnect,
    Packet,
    Properties,
    PropertyId,
    Publish,
    Pubrel,
    ReasonCode,
    Subscribe,
    SubscriptionOptions,
)
from edgegw.mqtt.session import Message
from edgegw.mqtt.sessiondb import SessionDB
from edgegw.policy.acl import ACL


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path, timeout=5)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def persistent(broker: LocalBroker, key: str, *filters: str) -> None:
    """A device that subscribed with a session expiry and went away (what connection_ended leaves)."""
    session, _ = broker.open_session(key, clean_start=False)
    session.expiry, session.durable, session.disconnected_at = 600, True, time.time()
    broker.journal.session_changed(session)
    broker.subscribe(session, Subscribe(1, tuple((f, SubscriptionOptions(2)) for f in filters)), ACL.allow_all(), key)


async def flushed(db: SessionDB) -> None:
    done = asyncio.Event()
    db.after_commit(lambda ok: done.set())
    await asyncio.wait_for(done.wait(), 5)


async def test_queue_and_subscriptions_are_on_disk_without_a_clean_stop(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    settings = MQTTSettings(session_store=tmp_path / "s.msgpack", max_queued_messages=3)
    broker = LocalBroker(settings, lambda k, m: None)
    db = SessionDB(path, broker)
    await db.open()
    await persistent(broker, "dev-1", "cmd/#")
    for i in range(5):  # past max_queued_messages: the oldest two are dropped, on disk too
        broker.deliver_to_session("dev-1", Message(f"cmd/{i}", b"x", 1, properties=Properties(user=(("k", "v"),))))
    broker.deliver_to_session("dev-1", Message("cmd/q0", b"x", 0))  # QoS 0: never queued for an offline device
    broker.route(Message("state/a", b"on", 1, retain=True))
    await flushed(db)
    assert len(rows(path, "SELECT row FROM messages")) == 3
    assert rows(path, "SELECT topic FROM retained") == [("state/a",)]
    (state,) = rows(path, "SELECT state FROM sessions")
    assert [f[0] for f in msgpack.unpackb(state[0])["filters"]] == ["cmd/#"]
    broker.close()

    # A new process: no close() ran (kill -9).
    again = LocalBroker(settings, lambda k, m: None)
    with capture_logs() as logs:
        await SessionDB(path, again).open()
    assert next(e for e in logs if e["event"] == "mqtt.sessions_restored")["sessions"] == 1
    session, present = again.open_session("dev-1", clean_start=False)
    assert present
    assert [o.message.topic for o in session.state.queue] == ["cmd/2", "cmd/3", "cmd/4"]
    assert session.state.queue[0].message.properties.user == (("k", "v"),)
    assert [s.device_id for s in again.index.match("cmd/x")] == ["dev-1"]
    assert [m.payload for m in again.retained.matching("state/#", again.now())] == [b"on"]
    again.close()


async def test_acknowledged_and_ended_sessions_leave_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    broker = LocalBroker(MQTTSettings(session_store=tmp_path / "s.msgpack"), lambda k, m: None)
    db = SessionDB(path, broker)
    await db.open()
    await persistent(broker, "dev-1", "a/#")
    await persistent(broker, "dev-2", "a/#")
    broker.route(Message("a/b", b"x", 1))
    await flushed(db)
    assert len(rows(path, "SELECT row FROM messages")) == 2
    session = broker.sessions["dev-1"]
    item = session.state.dequeue()
    session.state.finished(item)  # what the engine does on PUBACK
    broker.open_session("dev-2", clean_start=True)  # a clean start ends dev-2's old session and its queue
    await flushed(db)
    assert rows(path, "SELECT session FROM messages") == []  # dev-1's was acknowledged, dev-2's session ended
    assert rows(path, "SELECT id FROM sessions") == [("dev-1",)]
    await db.close()


async def test_a_retained_message_that_expired_while_stored_leaves_the_file_at_start(tmp_path: Path) -> None:
    """The start-up half of tests/test_mqtt_server.py::test_expired_retained_messages_leave_the_session_file: one
    that expired while the gateway was down is skipped at restore, and deleted, not read again at every start."""
    path = tmp_path / "s.db"
    settings = MQTTSettings(session_store=tmp_path / "s.msgpack")
    broker = LocalBroker(settings, lambda k, m: None)
    db = SessionDB(path, broker)
    await db.open()
    broker.route(Message("state/short", b"on", 1, retain=True, expires_at=broker.now() + 0.2))
    broker.route(Message("state/long", b"on", 1, retain=True))
    await flushed(db)
    await db.close()
    await asyncio.sleep(0.3)
    again = LocalBroker(settings, lambda k, m: None)
    db = SessionDB(path, again)
    await db.open()
    await flushed(db)
    assert rows(path, "SELECT topic FROM retained") == [("state/long",)]
    await db.close()


async def test_unreadable_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"not a database at all" * 100)
    broker = LocalBroker(MQTTSettings(session_store=tmp_path / "s.msgpack"), lambda k, m: None)
    db = SessionDB(path, broker)
    with capture_logs() as logs:
        await db.open()
    assert any(e["event"] == "mqtt.sessions_unreadable" and e["log_level"] == "error" for e in logs)
    assert list(tmp_path.glob("s.db.corrupt-*")) and broker.sessions == {}
    await persistent(broker, "dev-1", "a/#")  # and the new file works
    await flushed(db)
    assert rows(path, "SELECT id FROM sessions") == [("dev-1",)]
    await db.close()


async def test_subscription_is_committed_before_the_callback(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    broker = LocalBroker(MQTTSettings(session_store=tmp_path / "s.msgpack"), lambda k, m: None)
    db = SessionDB(path, broker)
    await db.open()
    await persistent(broker, "dev-1", "x/#")
    seen: list[list[tuple[object, ...]]] = []
    done = asyncio.Event()
    db.after_commit(lambda ok: (seen.append(rows(path, "SELECT id FROM sessions")), done.set()))
    await asyncio.wait_for(done.wait(), 5)
    assert seen == [[("dev-1",)]]  # what SUBACK waits for (server._subscribed)
    await db.close()


# --- engine rules found by the Paho interoperability suite (tests/test_mqtt_interop.py) ----------------------


def sent(conn: MQTTConnection) -> list[Packet]:
    reader = FrameReader(1 << 20)
    reader.feed(conn.data_to_send())
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(decode_packet(frame[0], frame[1], MQTT_5))
    return out


def connected(receive_maximum: int) -> MQTTConnection:
    conn = MQTTConnection(max_packet_size=4096, receive_maximum=receive_maximum)
    conn.receive_data(encode_packet(Connect(MQTT_5, "dev-1", True, 30), MQTT_5))
    conn.accept()
    sent(conn)
    return conn


def test_qos2_awaiting_pubrel_counts_against_receive_maximum() -> None:
    """MQTT 5 §4.9: a QoS 2 publish uses the quota until PUBCOMP, not until PUBREC (client_test5 flow_control2)."""
    conn = connected(receive_maximum=2)
    for pid in (1, 2):
        (event,) = conn.receive_data(encode_packet(Publish("t", b"x", 2, packet_id=pid), MQTT_5))
        assert isinstance(event, PublishReceived)
        conn.ack_publish(pid)  # committed: PUBREC sent, PUBREL not yet received
    events = conn.receive_data(encode_packet(Publish("t", b"x", 2, packet_id=3), MQTT_5))
    assert isinstance(events[-1], ConnectionClosed)
    assert events[-1].reason_code is ReasonCode.RECEIVE_MAXIMUM_EXCEEDED
    assert sent(conn)[-1] == Disconnect(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)


def test_pubrel_frees_the_quota() -> None:
    conn = connected(receive_maximum=1)
    conn.receive_data(encode_packet(Publish("t", b"x", 2, packet_id=1), MQTT_5))
    conn.ack_publish(1)
    conn.receive_data(encode_packet(Pubrel(1), MQTT_5))
    (event,) = conn.receive_data(encode_packet(Publish("t", b"y", 2, packet_id=2), MQTT_5))
    assert isinstance(event, PublishReceived)


@pytest.mark.parametrize("props", [
    Properties({PropertyId.SESSION_EXPIRY_INTERVAL: 10}),  # CONNECT/DISCONNECT only
    Properties({PropertyId.RECEIVE_MAXIMUM: 10}),
    Properties({PropertyId.WILL_DELAY_INTERVAL: 1}),
])
def test_a_property_not_allowed_in_publish_is_malformed(props: Properties) -> None:
    conn = connected(receive_maximum=8)
    events = conn.receive_data(encode_packet(Publish("t", b"x", 1, packet_id=1, properties=props), MQTT_5))
    assert isinstance(events[-1], ConnectionClosed) and events[-1].reason_code is ReasonCode.MALFORMED_PACKET
    assert sent(conn)[-1] == Disconnect(ReasonCode.MALFORMED_PACKET)


def test_a_property_not_allowed_in_connect_closes_without_connack() -> None:
    conn = MQTTConnection(max_packet_size=4096)
    events = conn.receive_data(encode_packet(
        Connect(MQTT_5, "dev-1", True, 30, properties=Properties({PropertyId.CONTENT_TYPE: "x"})), MQTT_5))
    assert isinstance(events[-1], ConnectionClosed) and events[-1].reason_code is ReasonCode.MALFORMED_PACKET


async def test_a_snapshot_of_an_older_version_is_imported_once(tmp_path: Path) -> None:
    from edgegw.mqtt import persist

    settings = MQTTSettings(session_store=tmp_path / "s.msgpack")
    old = LocalBroker(settings, lambda k, m: None)
    await persistent(old, "dev-1", "cmd/#")
    old.deliver_to_session("dev-1", Message("cmd/1", b"queued", 1))
    persist.save(settings.session_store, old)  # what an older version left at shutdown
    old.close()

    broker = LocalBroker(settings, lambda k, m: None)
    db = SessionDB(tmp_path / "s.db", broker)
    await db.open(legacy_snapshot=settings.session_store)
    assert not settings.session_store.exists()  # consumed
    await flushed(db)
    assert rows(tmp_path / "s.db", "SELECT id FROM sessions") == [("dev-1",)]
    assert len(rows(tmp_path / "s.db", "SELECT row FROM messages")) == 1
    await db.close()


async def test_a_session_file_that_cannot_be_opened_names_the_key(tmp_path: Path) -> None:
    from edgegw.errors import ConfigError

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    broker = LocalBroker(MQTTSettings(session_store=blocker / "s.msgpack"), lambda k, m: None)
    with pytest.raises(ConfigError, match="mqtt.session_store"):
        await SessionDB(blocker / "s.db", broker).open()
    assert blocker.read_text() == "x"  # nothing moved aside: the file was never the problem
