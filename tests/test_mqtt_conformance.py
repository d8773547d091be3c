"""Issue #3 audit: the features and limits no other test proved end to end, each against `edgegw run` as a process
with real clients (paho 3.1.1 / 5 over mTLS; our codec's RawClient where paho hides what the gateway sent, e.g. a
PUBREC reason code or a packet withheld by flow control). The upstream is a real mosquitto.

One gateway per test, with small limits so each one is reached in a few packets (LIMITS below). Where a feature is
proved elsewhere, docs/MQTT.md "Where each feature is tested" names the test.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import Fleet, GatewayProcess, Mosquitto, free_port, wait_until
from mqtt_peers import V5, V311, Got, PahoDevice, RawClient, props
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgegw.config import load_config
from edgegw.mqtt.packets import (
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Properties,
    PropertyId,
    Puback,
    Publish,
    Pubrec,
    ReasonCode,
    Suback,
    Subscribe,
    SubscriptionOptions,
)

ROOT = Path(__file__).resolve().parent.parent

LIMITS: dict[str, dict[str, Any]] = {
    "acl": {"publish": ["devices/{device_id}/#", "shared/#"], "subscribe": ["devices/{device_id}/#", "shared/#"]},
    "mqtt": {"max_subscriptions": 3, "max_queued_messages": 3, "max_queued_bytes": 4096, "max_inflight_messages": 2,
             "max_topic_length": 64, "max_topic_levels": 6, "receive_maximum": 2, "retained_max_count": 2,
             "max_keepalive": 120},
}


@pytest.fixture
def gw(mosquitto: Mosquitto, gateway_factory: Any) -> GatewayProcess:
    return gateway_factory(mosquitto, overrides={**LIMITS, "admin": {"port": 0}}).start()  # /metrics: any port


def device(fleet: Fleet, gw: GatewayProcess, device_id: str, **kw: Any) -> PahoDevice:
    return PahoDevice(fleet.device_context(device_id), gw.port, device_id, **kw).start()


def raw(fleet: Fleet, gw: GatewayProcess, device_id: str, connect_props: Properties | None = None,
        clean: bool = True) -> RawClient:
    c = RawClient(fleet.device_context(device_id), gw.port, MQTT_5)
    c.send(Connect(MQTT_5, device_id, clean, 30, properties=connect_props or Properties({})))
    ack = c.read()
    assert isinstance(ack, Connack) and ack.reason_code is ReasonCode.SUCCESS, ack
    return c


def nothing_within(c: RawClient, seconds: float) -> bool:
    """True if the gateway sends nothing for ``seconds`` (the socket stays usable after the timeout)."""
    try:
        packet = c.read(seconds)
    except TimeoutError:
        return True
    raise AssertionError(f"expected nothing, got {packet}")


def test_connack_v5_states_limits_assigns_no_id_and_refuses_mqtt31_and_enhanced_auth(fleet: Fleet, gw: GatewayProcess) -> None:
    dev = device(fleet, gw, "dev-00", keepalive=0)
    try:
        p = dev.connack_props
        assert (p.ReceiveMaximum, p.MaximumPacketSize, p.TopicAliasMaximum) == (2, 262144, 16)
        assert p.ServerKeepAlive == 120  # keep-alive 0 replaced by max_keepalive and told (Server Keep Alive)
        assert not hasattr(p, "AssignedClientIdentifier")
    finally:
        dev.close()
    # Refused devices: reconnect_on_failure=False, or loop_stop() waits out paho's 1 s reconnect delay.
    old = PahoDevice(fleet.device_context("dev-00"), gw.port, "dev-00", protocol=mqtt.MQTTv31,
                     reconnect_on_failure=False).start()
    old.client.loop_stop()
    assert old.connack is not None and old.connack.is_failure and not old.connected.is_set()
    assert "protocol" in str(old.connack).lower()  # 3.1.1 return code 1: unacceptable protocol version
    auth = PahoDevice(fleet.device_context("dev-10"), gw.port, "dev-10",
                      connect_props=props(PacketTypes.CONNECT, AuthenticationMethod="SCRAM-SHA-1"),
                      reconnect_on_failure=False).start()
    auth.client.loop_stop()
    assert auth.connack is not None and auth.connack.value == 0x8C and not auth.connected.is_set()


def test_publish_refusals_give_puback_and_pubrec_0x87_and_keep_the_connection(fleet: Fleet,
                                                                              gw: GatewayProcess) -> None:
    dev = PahoDevice(fleet.device_context("dev-01"), gw.port, "dev-01")
    # paho 2.2 ignores the Receive Maximum of the CONNACK (2 here); a conforming client honours it.
    dev.client.max_inflight_messages_set(LIMITS["mqtt"]["receive_maximum"])
    dev.start()
    assert dev.connack_props.ReceiveMaximum == LIMITS["mqtt"]["receive_maximum"]
    codes: dict[int, int] = {}
    dev.client.on_publish = lambda c, u, mid, reason, p: codes.__setitem__(mid, reason.value)
    try:
        mids = [dev.client.publish(topic, b"x", qos=1).mid
                for topic in ("devices/dev-01/ok", "devices/dev-02/steal", "$SYS/fake", "shared/ok")]
        wait_until(lambda: len(codes) == 4, 5, what="four PUBACKs")
        assert [codes[m] for m in mids] == [0, 0x87, 0x87, 0]
        assert dev.connected.is_set()
    finally:
        dev.close()
    c = raw(fleet, gw, "dev-01")  # paho ignores PUBREC reason codes: read the packet itself
    try:
        c.send(Publish("devices/dev-02/steal", b"x", 2, packet_id=5))
        assert c.read() == Pubrec(5, ReasonCode.NOT_AUTHORIZED)
        c.send(Publish("devices/dev-01/ok", b"y", 2, packet_id=6))
        assert c.read() == Pubrec(6)
    finally:
        c.close()
    denied = [e for e in gw.events("mqtt.publish_denied") if e.get("device_id") == "dev-01"]
    assert len(denied) == 3, denied


def test_max_subscriptions_dollar_filters_and_unsuback_codes(fleet: Fleet, gw: GatewayProcess) -> None:
    for dev_id, protocol in (("dev-02", V5), ("dev-03", V311)):
        _subscriptions(fleet, gw, dev_id, protocol)
    for dev_id in ("dev-02", "dev-03"):
        gw.wait_for_event("mqtt.subscribe_denied", device_id=dev_id, reason="max_subscriptions")


def _subscriptions(fleet: Fleet, gw: GatewayProcess, dev_id: str, protocol: Any) -> None:
    dev = device(fleet, gw, dev_id, protocol=protocol)
    unsubacks: dict[int, list[int]] = {}
    dev.client.on_unsubscribe = lambda c, u, mid, reasons, p: unsubacks.__setitem__(mid, [r.value for r in reasons])
    refused = 0x97 if protocol == V5 else 0x80
    try:
        codes = dev.subscribe([("shared/a", 1), ("shared/b", 1), ("shared/c", 2), ("shared/d", 1)])
        assert [c.value for c in codes] == [1, 1, 2, refused]  # max_subscriptions = 3
        # Subscribing again to a filter it has replaces it (MQTT-3.8.4-3): not a new one, so not refused.
        assert [c.value for c in dev.subscribe("shared/a", 0)] == [0]
        assert [c.value for c in dev.subscribe("$SYS/#", 0)] == [0x87 if protocol == V5 else 0x80]
        # Filters are held to max_topic_length (64) and max_topic_levels (6) like topic names: a device cannot
        # grow the subscription index with 100,000-level filters. 0x8F Topic Filter invalid (3.1.1: 0x80).
        invalid = 0x8F if protocol == V5 else 0x80
        long_filters = [("shared/" + "x" * 60, 1), ("shared/a/b/c/d/e/#", 1), ("$share/g/shared/a/b/c/d/e/f", 1)]
        assert [c.value for c in dev.subscribe(long_filters)] == [invalid] * 3
        _, unsub_mid = dev.client.unsubscribe(["shared/b", "shared/nope"])
        assert unsub_mid is not None
        mid: int = unsub_mid
        wait_until(lambda: mid in unsubacks, 5, what="UNSUBACK")
        if protocol == V5:
            assert unsubacks[mid] == [0x00, 0x11]  # removed / no subscription existed
        # The freed slot can be used again.
        assert [c.value for c in dev.subscribe("shared/d", 1)] == [1]
        assert dev.connected.is_set()
    finally:
        dev.close()


def test_retain_handling_0_1_2_and_the_retained_store_is_bounded(fleet: Fleet, gw: GatewayProcess) -> None:
    owner = device(fleet, gw, "dev-03")
    sub = device(fleet, gw, "dev-04")
    try:
        owner.client.publish("shared/rh/a", b"A", qos=1, retain=True).wait_for_publish(5)

        def subscribe(flt: str, rh: int) -> list[bytes]:
            before = len(sub.messages)
            sub.subscribe(flt, options=SubscribeOptions(qos=1, retainHandling=rh))
            got = until_marker(sub, before, "shared/rh/a")
            assert all(m.retain for m in got)
            return [m.payload for m in got]

        assert subscribe("shared/rh/#", 0) == [b"A"]
        assert subscribe("shared/rh/#", 0) == [b"A"]  # 0: at every subscribe, existing or not
        assert subscribe("shared/rh/+", 1) == [b"A"]  # 1: a new subscription gets them ...
        assert subscribe("shared/rh/+", 1) == []  # ... an existing one does not
        sub.client.unsubscribe(["shared/rh/#", "shared/rh/+"])
        time.sleep(0.2)
        assert subscribe("shared/rh/a", 2) == []  # 2: never

        # retained_max_count = 2: a third retained topic is not stored, but still delivered live.
        sub.subscribe("shared/rh/c", 1)
        owner.client.publish("shared/rh/b", b"B", qos=1, retain=True).wait_for_publish(5)
        owner.client.publish("shared/rh/c", b"C", qos=1, retain=True).wait_for_publish(5)
        wait_until(lambda: [m.payload for m in sub.messages][-1:] == [b"C"], 5, what="live C")
    finally:
        owner.close()
        sub.close()
    late = device(fleet, gw, "dev-05")
    try:
        late.subscribe("shared/rh/#", 1)
        assert sorted(m.payload for m in until_marker(late, 0, "shared/rh/a")) == [b"A", b"B"]
    finally:
        late.close()


def until_marker(dev: PahoDevice, before: int, topic: str) -> list[Got]:
    """What ``dev`` received from its message ``before`` on, up to a live (not retained) marker it publishes now to
    ``topic``, which one of its filters matches. The gateway queues a subscribe's retained messages right behind its
    SUBACK, so they are all in before the marker, sent after the SUBACK, comes back: no fixed wait."""
    mark = f"marker-{time.monotonic_ns()}".encode()
    dev.client.publish(topic, mark, qos=1)
    wait_until(lambda: any(m.payload == mark for m in dev.messages[before:]), 5, what=f"the marker on {topic}")
    got = dev.messages[before:]
    got = got[:[m.payload for m in got].index(mark)]
    return [m for m in got if not m.payload.startswith(b"marker-")]  # a later copy of an earlier marker: not ours


def test_topic_length_and_levels_disconnect_0x90(fleet: Fleet, gw: GatewayProcess) -> None:
    for topic in ("devices/dev-06/" + "x" * 64, "devices/dev-06/a/b/c/d/e"):  # 79 chars > 64; 7 levels > 6
        dev = device(fleet, gw, "dev-06", reconnect_on_failure=False)  # disconnected: no retry wanted
        try:
            dev.client.publish(topic, b"x", qos=1)
            wait_until(disconnected(dev), 5, what="DISCONNECT")
            assert dev.disconnect_reason.value == 0x90, (topic, dev.disconnect_reason)
        finally:
            dev.client.loop_stop()
    # 3.1.1 has no reason code: the connection is closed
    old = device(fleet, gw, "dev-06", protocol=V311, reconnect_on_failure=False)
    try:
        old.client.publish("devices/dev-06/" + "x" * 64, b"x", qos=1)
        wait_until(lambda: old.disconnect_reason is not None, 5, what="close")
    finally:
        old.client.loop_stop()
    errors = [e for e in gw.events("mqtt.protocol_error") if e.get("device_id") == "dev-06"]
    assert len(errors) == 3 and {e["reason"] for e in errors} == {"TOPIC_NAME_INVALID"}, errors


def disconnected(dev: PahoDevice) -> Callable[[], bool]:
    return lambda: dev.disconnect_reason is not None


def _publish_n(fleet: Fleet, gw: GatewayProcess, topic: str, n: int, size: int = 1) -> None:
    pub = device(fleet, gw, "dev-11")
    try:
        for i in range(n):
            pub.client.publish(f"{topic}/{i}", str(i).encode() * size, qos=1).wait_for_publish(5)
    finally:
        pub.close()


def test_receive_maximum_both_ways_and_max_inflight(fleet: Fleet, gw: GatewayProcess) -> None:
    # The device's Receive Maximum (1) bounds what the gateway has in flight to it.
    c = raw(fleet, gw, "dev-07", Properties({PropertyId.RECEIVE_MAXIMUM: 1}))
    c.send(Subscribe(1, (("shared/rm/#", SubscriptionOptions(1)),)))
    assert isinstance(c.read(), Suback)
    _publish_n(fleet, gw, "shared/rm", 3)
    first = c.read()
    assert isinstance(first, Publish) and first.payload == b"0"
    assert nothing_within(c, 0.5)
    c.send(Puback(first.packet_id))  # type: ignore[arg-type]
    second = c.read()
    assert isinstance(second, Publish) and second.payload == b"1"
    c.close()
    # A device allowing 10 still gets at most max_inflight_messages (2) at once.
    c = raw(fleet, gw, "dev-08", Properties({PropertyId.RECEIVE_MAXIMUM: 10}))
    c.send(Subscribe(1, (("shared/mi/#", SubscriptionOptions(1)),)))
    assert isinstance(c.read(), Suback)
    _publish_n(fleet, gw, "shared/mi", 3)
    got = [c.read(), c.read()]
    assert [p.payload for p in got] == [b"0", b"1"]  # type: ignore[union-attr]
    assert nothing_within(c, 0.5)
    c.send(Puback(got[0].packet_id))  # type: ignore[arg-type, union-attr]
    third = c.read()
    assert isinstance(third, Publish) and third.payload == b"2"
    c.close()
    # The gateway's Receive Maximum (2): a third QoS 2 publish without PUBREL is DISCONNECT 0x93 (MQTT 5 §4.9).
    c = raw(fleet, gw, "dev-09")
    c.send(*(Publish("devices/dev-09/rm", b"x", 2, packet_id=i) for i in (1, 2, 3)))
    seen = []
    while (packet := c.read()) is not None:
        seen.append(packet)
    assert seen[-1] == Disconnect(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED), seen
    c.close()


def test_offline_queue_bounded_by_count_and_bytes_oldest_dropped_counted_and_kept_across_restart(
        fleet: Fleet, gw: GatewayProcess) -> None:
    for dev_id, flt in (("dev-07", "shared/qc/#"), ("dev-08", "shared/qb/#")):
        d = device(fleet, gw, dev_id, clean=False, session_expiry=600)
        d.subscribe(flt, 1)
        d.close()
    wait_until(lambda: len(gw.events("mqtt.disconnected")) >= 2, 5, what="both offline")
    _publish_n(fleet, gw, "shared/qc", 5)  # max_queued_messages = 3: 0 and 1 dropped
    _publish_n(fleet, gw, "shared/qb", 4, size=1500)  # ~1.5 KB each, max_queued_bytes = 4096: 2 fit, 0 and 1 dropped
    from ops_peers import metrics, sample
    admin = gw.wait_for_event("admin.listening")["port"]
    assert sample(metrics(admin), "edgegw_session_queue_dropped_total") == 4
    assert gw.terminate() == 0
    gw.start()
    assert gw.wait_for_event("mqtt.sessions_restored")["sessions"] == 2
    for dev_id, prefix, kept in (("dev-07", "shared/qc", ["2", "3", "4"]), ("dev-08", "shared/qb", ["2", "3"])):
        back = device(fleet, gw, dev_id, clean=False, session_expiry=600)
        try:
            assert back.session_present
            got = back.wait_messages(len(kept))
            time.sleep(0.3)
            assert [m.topic for m in back.messages] == [f"{prefix}/{k}" for k in kept]  # oldest dropped, in order
        finally:
            back.close()
        assert gw.wait_for_event("mqtt.session_queue_dropped", device_id=dev_id)["dropped"] == 2
        assert got


def test_message_expiry_on_local_delivery(fleet: Fleet, gw: GatewayProcess) -> None:
    d = device(fleet, gw, "dev-10", clean=False, session_expiry=600)
    d.subscribe("shared/exp/#", 1)
    d.close()
    wait_until(lambda: bool(gw.events("mqtt.disconnected")), 5)
    pub = device(fleet, gw, "dev-11")
    try:
        for name, mei in (("short", 1), ("long", 60)):
            pub.client.publish(f"shared/exp/{name}", name.encode(), qos=1,
                               properties=props(MessageExpiryInterval=mei)).wait_for_publish(5)
    finally:
        pub.close()
    time.sleep(1.6)
    back = device(fleet, gw, "dev-10", clean=False, session_expiry=600)
    try:
        (m,) = back.wait_messages(1)
        time.sleep(0.3)
        assert [x.payload for x in back.messages] == [b"long"]  # the expired one is never delivered
        assert 0 < m.properties.MessageExpiryInterval < 60  # what is left, not what was sent
    finally:
        back.close()


def test_lab_listener_only_when_asked_and_never_in_the_example(mosquitto: Mosquitto, gateway_factory: Any) -> None:
    example = load_config(ROOT / "configs" / "edgegw.example.toml")
    assert example.mqtt.lab is False
    port = free_port()
    g = gateway_factory(mosquitto, overrides={"mqtt": {"lab_port": port}}).start()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert not g.events("mqtt.lab_listener_open")


def test_gateway_side_disconnects_takeover_0x8e_keepalive_0x8d_shutdown_0x8b(fleet: Fleet,
                                                                              gw: GatewayProcess) -> None:
    persistent = Properties({PropertyId.SESSION_EXPIRY_INTERVAL: 60})
    first = raw(fleet, gw, "dev-09", persistent)
    first.send(Subscribe(1, (("shared/to/#", SubscriptionOptions(1)),)))
    assert isinstance(first.read(), Suback)
    _publish_n(fleet, gw, "shared/to", 1)
    inflight = first.read()
    assert isinstance(inflight, Publish) and not inflight.dup  # not acknowledged before the takeover
    # The same certificate again, resuming: the older connection gets 0x8E, the new one the session and the
    # unacknowledged message again (DUP, same packet id).
    second = RawClient(fleet.device_context("dev-09"), gw.port, MQTT_5)
    try:
        second.send(Connect(MQTT_5, "dev-09", False, 30, properties=persistent))
        ack = second.read()
        assert isinstance(ack, Connack) and ack.session_present
        assert first.read() == Disconnect(ReasonCode.SESSION_TAKEN_OVER)
        assert first.read(2) is None  # and closed
        again = second.read()
        assert isinstance(again, Publish) and again.dup and again.packet_id == inflight.packet_id
        second.send(Puback(again.packet_id))  # type: ignore[arg-type]
    finally:
        first.close()
        second.close()
    paho = device(fleet, gw, "dev-09")  # a paho device taking over (clean start) works the same
    try:
        assert paho.connected.is_set()
        paho.client.publish("devices/dev-09/x", b"after", qos=1).wait_for_publish(5)
    finally:
        paho.close()
    idle = RawClient(fleet.device_context("dev-04"), gw.port, MQTT_5)
    idle.send(Connect(MQTT_5, "dev-04", True, 1))  # keep-alive 1 s, then silence: cut after 1.5 s
    assert isinstance(idle.read(), Connack)
    assert idle.read(5) == Disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT)
    idle.close()
    live = raw(fleet, gw, "dev-05")
    assert gw.terminate() == 0
    assert live.read() == Disconnect(ReasonCode.SERVER_SHUTTING_DOWN)
    live.close()


def test_a_reload_that_narrows_acl_subscribe_ends_the_subscriptions_it_no_longer_allows(
        fleet: Fleet, gw: GatewayProcess) -> None:
    import signal
    sub = device(fleet, gw, "dev-06")
    pub = device(fleet, gw, "dev-07")
    try:
        assert [c.value for c in sub.subscribe("shared/secret/#", 1)] == [1]
        text = gw.config_path.read_text()
        narrowed = text.replace('subscribe = ["devices/{device_id}/#", "shared/#"]', 'subscribe = ["devices/{device_id}/#"]')
        assert narrowed != text
        gw.config_path.write_text(narrowed)
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for_event("config.reloaded")
        pub.client.publish("shared/secret/x", b"not for dev-06 any more", qos=1).wait_for_publish(5)
        time.sleep(0.5)
        assert sub.messages == []
    finally:
        sub.close()
        pub.close()


def test_unsubscribe_disallowed_is_the_hook_a_reload_needs(tmp_path: Path) -> None:
    """What reload.py should call after swapping the ACL (the case above): pure broker state, no I/O."""
    from edgegw.config import ACLSettings, MQTTSettings
    from edgegw.mqtt.broker import LocalBroker
    from edgegw.policy.acl import ACL

    broker = LocalBroker(MQTTSettings(session_store=tmp_path / "s"), lambda key, m: None, clock=lambda: 0.0)
    wide = ACL.from_settings(ACLSettings(subscribe=("devices/{device_id}/#", "shared/#")))
    lab_key = "\x00lab:dev-01"
    for key in ("dev-01", lab_key):
        session, _ = broker.open_session(key, True)
        packet = Subscribe(1, (("devices/dev-01/cmd/#", SubscriptionOptions(1)),
                               ("shared/a/#", SubscriptionOptions(1)), ("$share/g/shared/b", SubscriptionOptions(1))))
        codes, _ = broker.subscribe(session, packet, wide, "dev-01")
        assert codes == (1, 1, 1)
    narrow = ACL.from_settings(ACLSettings())
    assert broker.unsubscribe_disallowed(narrow, keep=lambda key: key.startswith("\x00lab:")) == 2
    assert list(broker.sessions["dev-01"].filters) == ["devices/dev-01/cmd/#"]
    assert len(broker.sessions[lab_key].filters) == 3
    assert {s.device_id for s in broker.index.match("shared/a/x")} == {lab_key}
    assert {s.device_id for s in broker.index.match("devices/dev-01/cmd/go")} == {"dev-01", lab_key}
