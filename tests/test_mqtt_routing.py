"""Pure parts of local routing: filters, the subscription index, the subscribe ACL, retained store, carried
properties. No sockets."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgegw.config import ACLSettings
from edgegw.mqtt.forward import decode_record_properties, forwarded, record_properties
from edgegw.mqtt.packets import NO_PROPERTIES, Properties, PropertyId, SubscriptionOptions
from edgegw.mqtt.retained import RetainedStore
from edgegw.mqtt.session import Message, Outgoing, SessionState
from edgegw.mqtt.subscriptions import InvalidFilter, Subscription, SubscriptionIndex, filter_matches, parse_filter
from edgegw.policy.acl import ACL

P = PropertyId


def sub(device: str, flt: str, qos: int = 1, **kw: object) -> Subscription:
    group, _ = parse_filter(flt)
    return Subscription(device, flt, SubscriptionOptions(qos, **kw), share_group=group)  # type: ignore[arg-type]


@pytest.mark.parametrize("flt", ["", "a/#/b", "a#", "a/b+", "$share/g", "$share//a", "$share/g+/a", "$share/g/"])
def test_invalid_filters(flt: str) -> None:
    with pytest.raises(InvalidFilter):
        parse_filter(flt)


def test_shared_filter_parsed() -> None:
    assert parse_filter("$share/grp/a/+/c") == ("grp", "a/+/c")
    assert parse_filter("a/+/#") == (None, "a/+/#")


@pytest.mark.parametrize(("flt", "topic", "match"), [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
    ("a/#", "a/b/c", True), ("#", "a/b", True), ("+/+", "a/b", True), ("+", "a/b", False),
    ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("$SYS/#", "$SYS/x", True), ("a/+/c", "a//c", True),
])
def test_index_matches_like_the_spec(flt: str, topic: str, match: bool) -> None:
    index = SubscriptionIndex()
    index.add(sub("d", flt))
    assert bool(index.match(topic)) is match
    assert filter_matches(flt, topic) is match


levels = st.sampled_from(["a", "b", "", "$x"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "+", ""]), min_size=1, max_size=4).map("/".join)
                .filter(bool).flatmap(lambda f: st.sampled_from([f, f + "/#", "#"])), min_size=1, max_size=6),
       st.lists(levels, min_size=1, max_size=5).map("/".join))
def test_index_agrees_with_plain_matching(filters: list[str], topic: str) -> None:
    index = SubscriptionIndex()
    for i, flt in enumerate(filters):
        index.add(sub(f"d{i}", flt))
    got = sorted(s.device_id for s in index.match(topic))
    want = sorted(f"d{i}" for i, flt in enumerate(filters) if filter_matches(flt, topic))
    assert got == want


def test_remove_prunes_and_replace_counts_once() -> None:
    index = SubscriptionIndex()
    assert index.add(sub("d", "a/b"))
    assert not index.add(sub("d", "a/b", qos=2))  # replaces (MQTT-3.8.4-3)
    assert index.count == 1
    assert index.match("a/b")[0].options.qos == 2
    assert index.remove("d", "a/b") and not index.remove("d", "a/b")
    assert index.count == 0 and index.match("a/b") == []
    assert index._root.children == {}


def test_shared_subscription_round_robin() -> None:
    index = SubscriptionIndex()
    for d in ("x", "y"):
        index.add(sub(d, "$share/g/a/#"))
    index.add(sub("z", "a/b"))
    got = [sorted(s.device_id for s in index.match("a/b")) for _ in range(4)]
    assert got == [["x", "z"], ["y", "z"], ["x", "z"], ["y", "z"]]
    assert index.remove("x", "$share/g/a/#")
    assert [s.device_id for s in index.match("a/b") if s.share_group] == ["y"]


# --- subscribe ACL -----------------------------------------------------------------------------------------------

ACL_DEFAULT = ACL.from_settings(ACLSettings())


@pytest.mark.parametrize(("flt", "ok"), [
    ("devices/dev-01/#", True), ("devices/dev-01/cmd/+", True), ("devices/dev-01", True),
    ("devices/+/cmd", False), ("devices/#", False), ("#", False), ("+/dev-01/#", False),
    ("devices/dev-02/#", False), ("$SYS/#", False), ("devices/dev-01/+/#", True),
])
def test_may_subscribe(flt: str, ok: bool) -> None:
    assert ACL_DEFAULT.may_subscribe("dev-01", flt) is ok


@pytest.mark.parametrize("device_id", ["+", "#", "a/b", ""])
def test_wildcard_ids_subscribe_to_nothing(device_id: str) -> None:
    assert not ACL_DEFAULT.may_subscribe(device_id, f"devices/{device_id}/x")


def test_subscribe_patterns_from_settings() -> None:
    acl = ACL.from_settings(ACLSettings(subscribe=("devices/{device_id}/cmd/#", "broadcast/+")))
    assert acl.may_subscribe("d", "devices/d/cmd/x") and acl.may_subscribe("d", "broadcast/fw")
    assert not acl.may_subscribe("d", "devices/d/telemetry") and not acl.may_subscribe("d", "broadcast/#")


def test_open_acl_still_keeps_dollar_topics_out() -> None:
    acl = ACL.allow_all()
    assert acl.may_subscribe("x", "#") and acl.may_publish("x", "any/topic")
    assert not acl.may_subscribe("x", "$SYS/#") and not acl.may_publish("x", "$SYS/x")


# --- retained ----------------------------------------------------------------------------------------------------


def test_retained_bounds_and_delete() -> None:
    store = RetainedStore(max_count=2, max_bytes=10_000)
    assert store.put(Message("a/1", b"x", 1, True))
    assert store.put(Message("a/2", b"y", 1, True))
    assert not store.put(Message("a/3", b"z", 1, True))  # full: refused, not evicting another's
    assert store.put(Message("a/1", b"x2", 1, True))  # replacing is fine
    assert [m.payload for m in store.matching("a/+", 0)] == [b"y", b"x2"]
    assert store.put(Message("a/1", b"", 1, True))  # empty payload deletes (MQTT-3.3.1-10)
    assert len(store) == 1
    small = RetainedStore(max_count=10, max_bytes=60)
    assert not small.put(Message("t", b"x" * 100, 0, True))
    assert small.refused == 1


def test_retained_store_keeps_a_fair_share_for_every_device() -> None:
    """One device must not fill the retained store with its own topics so that every other device's retained
    messages are refused: from 90 % of either bound, a device over its fair share (bound / devices holding retained
    messages, counting the one asking) is refused a new topic; its own topics can always be replaced or deleted."""
    store = RetainedStore(max_count=20, max_bytes=100_000)
    assert store.put(Message("b/0", b"v", 1, True, sender="dev-b"))
    stored = sum(store.put(Message(f"a/{i}", b"v", 1, True, sender="dev-a")) for i in range(30))
    assert stored == 17 and store.held("dev-a")[0] == 17  # 18 of 20 (the 90 %): over its share of 10
    assert store.held("dev-a")[1] + store.held("dev-b")[1] == store.bytes
    assert store.put(Message("a/0", b"again", 1, True, sender="dev-a"))  # replacing its own: allowed
    assert store.put(Message("b/1", b"v", 1, True, sender="dev-b"))  # the other device still retains
    assert store.put(Message("c/0", b"v", 1, True, sender="dev-c"))  # and so does a newcomer, up to the bound
    assert not store.put(Message("c/1", b"v", 1, True, sender="dev-c"))  # full: everyone refused
    assert store.put(Message("a/1", b"", 1, True, sender="dev-a"))  # deleting its own: allowed
    assert store.held("dev-a")[0] == 16 and len(store) == 19
    assert store.refused == 14
    # Bytes alike: one device's large payloads leave room for the others.
    big = RetainedStore(max_count=1000, max_bytes=10_000)
    assert big.put(Message("b/0", b"v", 1, True, sender="dev-b"))
    while big.put(Message(f"a/{len(big)}", b"x" * 500, 1, True, sender="dev-a")):
        pass
    assert big.bytes <= 9_000 + 532 and big.held("dev-a")[1] > 5_000
    assert big.put(Message("b/1", b"y" * 500, 1, True, sender="dev-b"))
    # Expiry takes a message off its device's share too.
    exp = RetainedStore(10, 10_000)
    exp.put(Message("e/0", b"x", 0, True, sender="dev-e", expires_at=5.0))
    assert not exp.matching("e/#", 6.0) and exp.held("dev-e") == (0, 0) and exp.bytes == 0


def test_retained_expiry() -> None:
    store = RetainedStore(10, 10_000)
    store.put(Message("a", b"x", 0, True, expires_at=5.0))
    assert store.matching("#", 4.0) and not store.matching("#", 6.0)
    assert len(store) == 0


# --- session queue -----------------------------------------------------------------------------------------------


def test_session_queue_drops_oldest() -> None:
    state = SessionState(max_queued=2, max_queued_bytes=10_000)
    for i in range(4):
        state.enqueue(Outgoing(Message("t", bytes([i]), 1), 1))
    assert [o.message.payload for o in state.queue] == [b"\x02", b"\x03"]
    assert state.dropped == 2
    state.dequeue()
    assert state.queued_bytes == state.queue[0].message.size


# --- carried properties ------------------------------------------------------------------------------------------


def test_record_properties_schema() -> None:
    props = Properties({P.PAYLOAD_FORMAT_INDICATOR: 1, P.CONTENT_TYPE: "application/json",
                        P.RESPONSE_TOPIC: "devices/d/resp", P.CORRELATION_DATA: b"\x01\x02",
                        P.MESSAGE_EXPIRY_INTERVAL: 60, P.TOPIC_ALIAS: 3}, user=(("a", "1"), ("a", "2")))
    data = record_properties(props)
    assert data is not None
    assert msgpack.unpackb(data, raw=False) == {"pfi": 1, "ct": "application/json", "rt": "devices/d/resp",
                                                "cd": b"\x01\x02", "mei": 60, "up": [["a", "1"], ["a", "2"]]}
    assert decode_record_properties(data)["cd"] == b"\x01\x02"
    assert record_properties(NO_PROPERTIES) is None
    assert record_properties(Properties({P.TOPIC_ALIAS: 1})) is None
    fwd = forwarded(props)
    assert P.TOPIC_ALIAS not in fwd.values and fwd.user == props.user and fwd.get(P.CONTENT_TYPE)


# --- sessions saved at shutdown, restored at start ----------------------------------------------------------------


async def test_sessions_and_retained_survive_save_and_load(tmp_path: Path) -> None:
    from edgegw.config import MQTTSettings
    from edgegw.mqtt import persist
    from edgegw.mqtt.broker import LocalBroker
    from edgegw.mqtt.packets import ReasonCode, Subscribe

    wills: list[tuple[str, Message]] = []
    settings = MQTTSettings(session_store=tmp_path / "s.mp")
    broker = LocalBroker(settings, lambda k, m: wills.append((k, m)))
    session, present = broker.open_session("dev-1", clean_start=False)
    assert not present
    codes, _ = broker.subscribe(session, Subscribe(1, (("devices/dev-1/cmd/#", SubscriptionOptions(2)),),
                                                   Properties(subscription_ids=(5,))), ACL_DEFAULT, "dev-1")
    assert codes == (2,)
    session.state.awaiting_rel.add(77)
    session.expiry = 600
    session.disconnected_at = time.time()
    props = Properties({P.CONTENT_TYPE: "t"}, user=(("a", "b"),))
    broker.route(Message("devices/dev-1/cmd/x", b"queued", 1, properties=props))
    broker.route(Message("devices/dev-1/cmd/old", b"expired", 1, expires_at=broker.now() - 1))
    broker.retained.put(Message("devices/dev-1/state", b"on", 1, True, sender="dev-1"))
    broker.open_session("dev-2", clean_start=True)  # expiry 0: not saved
    persist.save(settings.session_store, broker)
    broker.close()

    again = LocalBroker(settings, lambda k, m: wills.append((k, m)))
    persist.load(settings.session_store, again)
    assert not settings.session_store.exists()  # consumed
    restored, present = again.open_session("dev-1", clean_start=False)
    assert present and restored.state.awaiting_rel == {77}
    assert [o.message.payload for o in restored.state.queue] == [b"queued"]
    assert restored.state.queue[0].message.properties == props
    assert restored.state.queue[0].subscription_ids == (5,)
    assert [s.device_id for s in again.index.match("devices/dev-1/cmd/y")] == ["dev-1"]
    assert "dev-2" not in again.sessions
    assert [m.payload for m in again.retained.matching("devices/dev-1/#", again.now())] == [b"on"]
    assert again.retained.held("dev-1")[0] == 1  # its fair share counts what was restored
    again.close()


async def test_unreadable_snapshot_is_moved_aside(tmp_path: Path) -> None:
    from edgegw.config import MQTTSettings
    from edgegw.mqtt import persist
    from edgegw.mqtt.broker import LocalBroker

    path = tmp_path / "s.mp"
    path.write_bytes(b"\x93garbage")
    broker = LocalBroker(MQTTSettings(session_store=path), lambda k, m: None)
    persist.load(path, broker)
    assert not path.exists() and list(tmp_path.glob("s.mp.corrupt-*"))
    assert broker.sessions == {}


class FakePeer:
    """A live connection for the broker: a real engine past CONNECT, its output decoded on demand."""

    def __init__(self, session_state: SessionState) -> None:
        from edgegw.mqtt.codec import encode_packet
        from edgegw.mqtt.connection import MQTTConnection
        from edgegw.mqtt.packets import MQTT_5, Connect

        self.engine = MQTTConnection(max_packet_size=4096, max_inflight_out=2)
        self.engine.receive_data(encode_packet(Connect(MQTT_5, "d", False, 30), MQTT_5))
        self.engine.accept(session=session_state)
        self.engine.data_to_send()
        self.backlogged = False

    def wrote(self) -> None:
        pass

    def publishes(self) -> list[object]:
        from edgegw.mqtt.codec import FrameReader, decode_packet
        from edgegw.mqtt.packets import MQTT_5, Publish

        reader = FrameReader(1 << 20)
        reader.feed(self.engine.data_to_send())
        out = []
        while (frame := reader.next_frame()) is not None:
            p = decode_packet(frame[0], frame[1], MQTT_5)
            if isinstance(p, Publish):
                out.append(p)
        return out


async def test_broker_limits_retain_handling_and_window(tmp_path: Path) -> None:
    from edgegw.config import MQTTSettings
    from edgegw.mqtt.broker import LocalBroker
    from edgegw.mqtt.packets import Subscribe

    broker = LocalBroker(MQTTSettings(max_subscriptions=2, session_store=tmp_path / "s"), lambda k, m: None)
    session, _ = broker.open_session("dev-01", clean_start=True)
    peer = FakePeer(session.state)
    broker.attach(session, peer, None)  # type: ignore[arg-type]
    broker.retained.put(Message("devices/dev-01/r", b"ret", 1, True))

    def subscribe(*filters: tuple[str, int]) -> tuple[int, ...]:
        packet = Subscribe(1, tuple((f, SubscriptionOptions(1, retain_handling=rh)) for f, rh in filters))
        codes, retained = broker.subscribe(session, packet, ACL_DEFAULT, "dev-01")
        broker.deliver_all(session, retained)
        return codes

    assert subscribe(("devices/dev-01/#", 1)) == (1,)
    assert [p.payload for p in peer.publishes()] == [b"ret"]  # type: ignore[attr-defined]
    from edgegw.mqtt.codec import encode_packet
    from edgegw.mqtt.packets import MQTT_5, Puback
    peer.engine.receive_data(encode_packet(Puback(1), MQTT_5))
    assert subscribe(("devices/dev-01/#", 1)) == (1,)  # not new: retain handling 1 sends nothing
    assert peer.publishes() == []
    assert subscribe(("devices/dev-01/r", 2)) == (1,)  # retain handling 2: never
    assert peer.publishes() == []
    assert subscribe(("devices/dev-01/x", 0)) == (0x97,)  # the third filter: quota exceeded
    # Window of 2 (max_inflight_out): the third QoS 1 copy waits in the session queue.
    for i in range(3):
        broker.route(Message("devices/dev-01/t", bytes([i]), 1, sender="dev-02"))
    assert [p.payload for p in peer.publishes()] == [b"\x00", b"\x01"]  # type: ignore[attr-defined]
    assert len(session.state.queue) == 1
    peer.engine.receive_data(encode_packet(Puback(2), MQTT_5))
    broker.pump(session, peer)  # type: ignore[arg-type]
    assert [p.payload for p in peer.publishes()] == [b"\x02"]  # type: ignore[attr-defined]
    # QoS 0 copies to a stalled socket are dropped, not buffered.
    peer.backlogged = True
    assert broker.route(Message("devices/dev-01/t", b"q0", 0)) == 0
    broker.close()


async def test_a_late_end_of_a_taken_over_connection_leaves_the_resumed_session_alone(tmp_path: Path) -> None:
    """The old connection's end arriving after a new one resumed the session (its close was still queued): the new
    connection's will is neither published nor dropped, and the session is not discarded with the old expiry 0."""
    from edgegw.config import MQTTSettings
    from edgegw.mqtt.broker import LocalBroker
    from edgegw.mqtt.packets import ReasonCode, Subscribe, Will

    published: list[tuple[str, Message]] = []
    broker = LocalBroker(MQTTSettings(session_store=tmp_path / "s"), lambda k, m: published.append((k, m)))
    session, _ = broker.open_session("dev-01", clean_start=False)
    old = FakePeer(session.state)
    broker.attach(session, old, Will("t/old", b"old", 1, False))  # type: ignore[arg-type]
    broker.subscribe(session, Subscribe(1, (("cmd/#", SubscriptionOptions(1)),)), ACL.allow_all(), "dev-01")
    again, present = broker.open_session("dev-01", clean_start=False)
    assert again is session and present
    new = FakePeer(session.state)
    new_will = Will("t/new", b"new", 1, False)
    broker.attach(session, new, new_will)  # type: ignore[arg-type]
    broker.connection_ended(session, old, 0, ReasonCode.UNSPECIFIED_ERROR)  # type: ignore[arg-type]
    assert published == []
    assert broker.sessions["dev-01"] is session and broker.live["dev-01"] is new
    assert session.will is new_will and session.filters
    # The new connection's own end still does what it should: its will goes.
    broker.connection_ended(session, new, 0, ReasonCode.UNSPECIFIED_ERROR)  # type: ignore[arg-type]
    assert [(k, m.topic) for k, m in published] == [("dev-01", "t/new")]
    assert "dev-01" not in broker.sessions
    broker.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(levels, min_size=1, max_size=4).map("/".join).filter(bool), min_size=1, max_size=8),
       st.lists(st.sampled_from(["a", "b", "+", "", "$x"]), min_size=1, max_size=4).map("/".join)
       .flatmap(lambda f: st.sampled_from([f, f + "/#", "#"])),
       st.lists(st.integers(0, 7), max_size=4))
def test_retained_lookup_agrees_with_plain_matching(topics: list[str], flt: str, deleted: list[int]) -> None:
    """The retained store walks a tree of topic levels for a wildcard filter (a scan of every retained message per
    SUBSCRIBE filter let one device hold the event loop); it must find exactly what filter_matches says, in the
    order the messages were stored, also after deletes."""
    store = RetainedStore(100, 1 << 20)
    for i, topic in enumerate(topics):
        store.put(Message(topic, str(i).encode(), 0, True))
    for i in deleted:
        if i < len(topics):
            store.put(Message(topics[i], b"", 0, True))
    live = {m.topic: m for m in (store._messages.values())}
    want = [m.payload for topic, m in live.items() if filter_matches(flt, topic)]
    assert [m.payload for m in store.matching(flt, 0.0)] == want
    for topic in list(live):  # and every branch is pruned once empty
        store.put(Message(topic, b"", 0, True))
    assert store._root.children == {}
