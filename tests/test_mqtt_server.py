"""The MQTT server in-process with a real outbox and real paho devices (mTLS), no uplink: what lands in the
outbox records, and the downlink interface. The device clients run in their own threads; the test awaits."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet
from mqtt_peers import V311, PahoDevice, RawClient, props, until
from paho.mqtt.packettypes import PacketTypes
from test_tracing import TRACEPARENT

from edgegw.config import ACLSettings, MQTTSettings, OutboxSettings, TLSSettings
from edgegw.identity import server_ssl_context
from edgegw.mqtt.codec import FrameReader, encode_packet
from edgegw.mqtt.connection import ConnectionState
from edgegw.mqtt.forward import decode_record_properties
from edgegw.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Connack,
    Connect,
    Pingreq,
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
from edgegw.mqtt.server import MQTTServer
from edgegw.mqtt.session import Message
from edgegw.outbox.store import Outbox
from edgegw.policy.acl import ACL


class Harness:
    def __init__(self, server: MQTTServer, outbox: Outbox, fleet: Fleet) -> None:
        self.server = server
        self.outbox = outbox
        self.fleet = fleet

    async def device(self, device_id: str, **kwargs: Any) -> PahoDevice:
        dev = PahoDevice(self.fleet.device_context(device_id), self.server.port, device_id, **kwargs)
        return await asyncio.to_thread(dev.start)

    async def records(self, n: int, timeout: float = 5.0) -> list[Any]:
        """The committed records once there are at least ``n``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = await self.outbox.fetch_after(0, 1000)
            if len(found) >= n:
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{len(found)} records committed, expected {n}")
            await asyncio.sleep(0.02)


async def published(info: Any) -> None:
    await asyncio.to_thread(info.wait_for_publish, 5)


@contextlib.asynccontextmanager
async def running(fleet: Fleet, tmp_path: Path, acl: ACLSettings | None = None, mqtt: dict[str, Any] | None = None,
                  **outbox_options: Any) -> AsyncIterator[Harness]:
    tls = TLSSettings(cert=fleet.folder / "server" / "gateway.crt", key=fleet.folder / "server" / "gateway.key",
                      ca=fleet.ca)
    options = {"commit_window_ms": 1.0, **outbox_options}
    outbox = await Outbox.open(OutboxSettings(path=tmp_path / "outbox.db", **options))
    writer = asyncio.create_task(outbox.run())
    settings = MQTTSettings(bind="127.0.0.1", port=0, max_keepalive=120, session_store=tmp_path / "sessions.mp",
                            **(mqtt or {}))
    server = MQTTServer(settings, server_ssl_context(tls), ACL.from_settings(acl or ACLSettings()), outbox)
    await server.start()
    try:
        yield Harness(server, outbox, fleet)
    finally:
        await server.drain(2.0)
        outbox.stop()
        await writer
        await outbox.close()


@pytest.fixture
async def harness(fleet: Fleet, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running(fleet, tmp_path) as h:
        yield h


async def test_v5_publish_properties_reach_the_outbox_record(harness: Harness) -> None:
    dev = await harness.device("dev-00")
    try:
        assert dev.connected.is_set()
        p = props(PayloadFormatIndicator=1, ContentType="application/json", ResponseTopic="devices/dev-00/resp",
                  CorrelationData=b"\x00\x01", MessageExpiryInterval=120)
        p.UserProperty = [("site", "north"), ("site", "south")]
        await published(dev.client.publish("devices/dev-00/telemetry", b'{"t":1}', qos=1, properties=p))
        await published(dev.client.publish("devices/dev-00/plain", b"x", qos=1))
        records = await harness.records(2)
    finally:
        await asyncio.to_thread(dev.close)
    first, second = records[0], records[1]
    assert first.topic == "devices/dev-00/telemetry"
    carried = decode_record_properties(first.properties)
    assert TRACEPARENT.fullmatch(carried.pop("tp"))  # made at ingress (tests/test_tracing.py)
    assert carried == {
        "pfi": 1, "ct": "application/json", "rt": "devices/dev-00/resp", "cd": b"\x00\x01", "mei": 120,
        "up": [["site", "north"], ["site", "south"]]}
    assert list(decode_record_properties(second.properties)) == ["tp"]  # nothing else to carry


async def test_topic_alias_resolved_into_the_record(harness: Harness) -> None:
    dev = await harness.device("dev-01")
    try:
        assert dev.connack_props.TopicAliasMaximum == 16
        await published(dev.client.publish("devices/dev-01/a", b"1", qos=1, properties=props(TopicAlias=1)))
        await published(dev.client.publish("", b"2", qos=1, properties=props(TopicAlias=1)))
        records = await harness.records(2)
    finally:
        await asyncio.to_thread(dev.close)
    assert [(r.topic, r.payload) for r in records] == [("devices/dev-01/a", b"1"), ("devices/dev-01/a", b"2")]
    # The alias itself is not carried: only the traceparent made at ingress.
    assert all(list(decode_record_properties(r.properties)) == ["tp"] for r in records)


async def test_invalid_utf8_with_payload_format_1_gets_0x99(harness: Harness) -> None:
    dev = await harness.device("dev-02")
    try:
        info = dev.client.publish("devices/dev-02/t", b"\xff\xfe", qos=1, properties=props(PayloadFormatIndicator=1))
        await published(info)  # paho completes the message on any PUBACK; the reason code is 0x99
        utf8 = props(PayloadFormatIndicator=1)
        await published(dev.client.publish("devices/dev-02/t", b"ok", qos=1, properties=utf8))
        records = await harness.records(1)
        assert [r.payload for r in records] == [b"ok"]
        assert dev.connected.is_set()
    finally:
        await asyncio.to_thread(dev.close)


async def test_server_keep_alive_and_session_expiry_in_connack(harness: Harness) -> None:
    dev = await harness.device("dev-03", keepalive=0, clean=False, session_expiry=10**9)
    try:
        assert dev.connack_props.ServerKeepAlive == 120
        assert dev.connack_props.SessionExpiryInterval == 86400
        assert not hasattr(dev.connack_props, "MaximumQoS")
    finally:
        await asyncio.to_thread(dev.close)


async def test_downlink_reaches_the_devices_own_subscription_only(harness: Harness) -> None:
    dev = await harness.device("dev-04")
    other = await harness.device("dev-05")
    try:
        await asyncio.to_thread(dev.subscribe, "devices/dev-04/cmd/#", 1)
        await asyncio.to_thread(other.subscribe, "devices/dev-05/cmd/#", 1)
        user = Properties({PropertyId.CONTENT_TYPE: "text/plain"}, user=(("cmd-id", "42"),))
        assert harness.server.deliver_downlink("dev-04", "devices/dev-04/cmd/reboot", b"now", 1, user,
                                               message_expiry=60)
        assert not harness.server.deliver_downlink("dev-04", "devices/dev-04/other", b"x", 1)  # no subscription
        assert not harness.server.deliver_downlink("dev-99", "devices/dev-99/cmd/x", b"x", 1)  # no session
        await until(lambda: len(dev.messages) >= 1, 5, "downlink message")
        got = dev.messages[0]
        assert (got.topic, got.payload, got.qos) == ("devices/dev-04/cmd/reboot", b"now", 1)
        assert got.properties.ContentType == "text/plain"
        assert got.properties.UserProperty == [("cmd-id", "42")]
        assert 0 < got.properties.MessageExpiryInterval <= 60
        await asyncio.sleep(0.2)
        assert other.messages == []
    finally:
        await asyncio.to_thread(dev.close)
        other.close()


async def test_downlink_queued_for_offline_persistent_session(harness: Harness) -> None:
    dev = await harness.device("dev-06", protocol=V311, clean=False)
    await asyncio.to_thread(dev.subscribe, "devices/dev-06/cmd/#", 2)
    await asyncio.to_thread(dev.close)
    await until(lambda: "dev-06" not in harness.server.devices, 5, "disconnect")
    for i in range(3):
        assert harness.server.deliver_downlink("dev-06", f"devices/dev-06/cmd/{i}", b"x", 2)
    assert not harness.server.deliver_downlink("dev-06", "devices/dev-06/cmd/q0", b"x", 0)  # QoS 0 not queued
    again = await harness.device("dev-06", protocol=V311, clean=False)
    try:
        assert again.session_present
        await until(lambda: len(again.messages) >= 3, 5, "queued downlink")
        assert [m.topic for m in again.messages] == [f"devices/dev-06/cmd/{i}" for i in range(3)]
        assert {m.qos for m in again.messages} == {2}
    finally:
        await asyncio.to_thread(again.close)


async def test_will_goes_to_the_outbox(harness: Harness) -> None:
    dev = await harness.device("dev-07", will=("devices/dev-07/status", b"offline", 1, False),
                               will_props=props(PacketTypes.WILLMESSAGE, ContentType="text/plain"))
    assert dev.connected.is_set()
    dev.drop()
    records = await harness.records(1)
    assert (records[0].topic, records[0].payload) == ("devices/dev-07/status", b"offline")
    carried = decode_record_properties(records[0].properties)
    assert TRACEPARENT.fullmatch(carried.pop("tp"))
    assert carried == {"ct": "text/plain"}


async def test_normal_disconnect_discards_the_will(harness: Harness) -> None:
    dev = await harness.device("dev-08", will=("devices/dev-08/status", b"offline", 1, False))
    await asyncio.to_thread(dev.close)
    await until(lambda: "dev-08" not in harness.server.devices, 5, "disconnect")
    await asyncio.sleep(0.1)
    assert await harness.outbox.fetch_after(0, 10) == []


async def test_outbox_full_gives_0x97_on_5_and_holds_311(fleet: Fleet, tmp_path: Path) -> None:
    async with running(fleet, tmp_path, full_policy="reject-new", max_records=2) as h:
        def session(version: int, device_id: str, count: int) -> list[object]:
            c = RawClient(fleet.device_context(device_id), h.server.port, version)
            c.send(Connect(version, device_id, True, 30))
            assert isinstance(c.read(), Connack)
            acks = []
            for pid in range(1, count + 1):
                c.send(Publish(f"devices/{device_id}/t", b"x", 1, packet_id=pid))
                try:
                    acks.append(c.read(timeout=0.5))
                except TimeoutError:
                    acks.append("no answer")
            c.close()
            return acks

        acks5 = await asyncio.to_thread(session, MQTT_5, "dev-09", 3)
        assert acks5 == [Puback(1), Puback(2), Puback(3, ReasonCode.QUOTA_EXCEEDED)]
        # 3.1.1 has no negative PUBACK: the publish is held unanswered on an open connection (backpressure, see
        # tests/test_backpressure.py); the device keeps its message.
        assert await asyncio.to_thread(session, MQTT_311, "dev-10", 1) == ["no answer"]
        assert h.server.stats.publish_rejected == 1
        assert h.server.stats.publish_held == 1
        assert len(await h.outbox.fetch_after(0, 10)) == 2


async def test_qos2_resend_on_a_new_connection_before_the_commit_is_one_record(fleet: Fleet, tmp_path: Path) -> None:
    async with running(fleet, tmp_path, commit_window_ms=400.0) as h:
        def device_side() -> list[object]:
            ctx = fleet.device_context("dev-11")
            a = RawClient(ctx, h.server.port, MQTT_311)
            a.send(Connect(MQTT_311, "dev-11", False, 30))
            assert isinstance(a.read(), Connack)
            a.send(Publish("devices/dev-11/q2", b"once", 2, packet_id=3))
            a.close()  # gone before the (slow) group commit
            b = RawClient(ctx, h.server.port, MQTT_311)
            b.send(Connect(MQTT_311, "dev-11", False, 30))
            got = [b.read()]
            b.send(Publish("devices/dev-11/q2", b"once", 2, dup=True, packet_id=3))
            got.append(b.read())
            b.close()
            return got

        connack, ack = await asyncio.to_thread(device_side)
        assert isinstance(connack, Connack) and connack.session_present
        assert ack == Pubrec(3)
        await asyncio.sleep(0.5)
        assert [r.payload for r in await h.outbox.fetch_after(0, 10)] == [b"once"]


async def test_a_refusal_decided_at_once_waits_for_the_puback_of_an_earlier_publish(fleet: Fleet,
                                                                                    tmp_path: Path) -> None:
    """MQTT-4.6.0-2: PUBACKs in the order the PUBLISHes came. The first is allowed and waits for a slow group
    commit; the second (a topic the ACL refuses) is answered 0x87 at once by the gateway, but that answer leaves
    only after the first one's PUBACK."""
    async with running(fleet, tmp_path, commit_window_ms=400.0) as h:
        def device_side() -> list[object]:
            c = RawClient(fleet.device_context("dev-09"), h.server.port, MQTT_5)
            c.send(Connect(MQTT_5, "dev-09", True, 30))
            assert isinstance(c.read(), Connack)
            c.send(Publish("devices/dev-09/ok", b"a", 1, packet_id=1),
                   Publish("devices/dev-99/not-mine", b"b", 1, packet_id=2))
            got = [c.read(), c.read()]
            c.close()
            return got

        first, second = await asyncio.to_thread(device_side)
        assert first == Puback(1)
        assert second == Puback(2, ReasonCode.NOT_AUTHORIZED)


async def _small_window_client(harness: Harness, device_id: str, keepalive: int) -> tuple[RawClient, Any]:
    """A raw MQTT 3.1.1 client over TLS, connected, with 4 KiB socket buffers on both ends (the receive side set
    before connect, so the window stays small): what it does not read backs up into the gateway's transport at
    once. Returns it and the gateway's DeviceProtocol for it."""

    def connect() -> RawClient:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(5.0)
        raw.connect(("127.0.0.1", harness.server.port))
        c = RawClient.__new__(RawClient)
        ctx = harness.fleet.device_context(device_id)
        c.sock, c.version, c.frames = ctx.wrap_socket(raw, server_hostname="localhost"), MQTT_311, FrameReader(1 << 20)
        c.send(Connect(MQTT_311, device_id, True, keepalive))
        assert isinstance(c.read(), Connack)
        return c

    c = await asyncio.to_thread(connect)
    proto = harness.server.devices[device_id]
    assert proto.transport is not None
    proto.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return c, proto


async def test_a_device_that_never_reads_cannot_grow_the_gateways_write_buffer(harness: Harness) -> None:
    """Every PINGREQ (and PUBLISH, SUBSCRIBE, PUBREL) is answered; a device that writes them but never reads its
    socket fills the kernel buffers, then our transport's. Past the transport's high-water mark the gateway must
    stop reading that device (as it does for receive_maximum), not buffer its answers without bound."""
    c, proto = await _small_window_client(harness, "dev-07", 60)
    pings = encode_packet(Pingreq(), MQTT_311) * (1 << 19)  # 1 MiB of PINGREQs, 2 MiB... of PINGRESPs: 1 MiB

    def flood() -> int:
        c.sock.settimeout(3.0)
        sent = 0
        view = memoryview(pings)
        try:
            while sent < len(pings):
                sent += c.sock.send(view[sent:sent + 16384])
        except TimeoutError:
            pass  # the gateway stopped reading us: what we want
        return sent

    sent = await asyncio.to_thread(flood)
    await asyncio.sleep(0.5)
    buffered = proto.transport.get_write_buffer_size()
    assert buffered <= 256 * 1024, f"{buffered} bytes of answers buffered for a device that does not read"
    # Nothing is lost: once the device reads, every PINGREQ it managed to send gets its PINGRESP.
    c.sock.settimeout(5.0)
    got = 0
    while got < sent:
        data = await asyncio.to_thread(c.sock.recv, 65536)
        assert data
        got += len(data)
    assert got == sent
    await asyncio.to_thread(c.send, Publish("devices/dev-07/t", b"x", 1, packet_id=1))
    assert await asyncio.to_thread(c.read) == Puback(1)
    c.close()


async def test_a_restart_with_a_narrower_acl_ends_the_restored_subscriptions_it_no_longer_allows(
        fleet: Fleet, tmp_path: Path) -> None:
    """Routing trusts what SUBSCRIBE accepted. A persistent session's subscriptions come back from the session file
    at start: those the configuration now running no longer allows must end there, as a reload ends them
    (tests/test_mqtt_conformance.py::test_a_reload_that_narrows_acl_subscribe_...), or dev-05 keeps reading a space
    it lost the right to."""
    wide = ACLSettings(publish=("devices/{device_id}/#", "shared/#"), subscribe=("devices/{device_id}/#", "shared/#"))
    async with running(fleet, tmp_path, acl=wide) as h:
        sub = await h.device("dev-05", clean=False, session_expiry=600)
        assert [c.value for c in await asyncio.to_thread(sub.subscribe, "shared/secret/#", 1)] == [1]
        await asyncio.to_thread(sub.close)
    narrowed = ACLSettings(publish=("devices/{device_id}/#", "shared/#"))  # subscribe: the default, own space only
    async with running(fleet, tmp_path, acl=narrowed) as h:
        assert h.server.broker.index.match("shared/secret/x") == []
        sub = await h.device("dev-05", clean=False, session_expiry=600)
        pub = await h.device("dev-06")
        try:
            assert sub.session_present  # the session itself is kept, with what is still allowed
            await published(pub.client.publish("shared/secret/x", b"not for dev-05 any more", qos=1))
            await asyncio.sleep(0.3)
            assert sub.messages == []
        finally:
            await asyncio.to_thread(sub.close)
            await asyncio.to_thread(pub.close)


async def test_a_message_in_flight_too_large_for_the_resumed_connection_frees_its_slot(harness: Harness) -> None:
    """MQTT-3.1.2-25: nothing larger than the device's Maximum Packet Size is sent to it; such a message is dropped
    as if delivered. One already in flight when the device comes back with a smaller maximum must be dropped too,
    not kept in the window for ever: with Receive Maximum 1 the device would get nothing again."""

    def device_side() -> list[object]:
        ctx = harness.fleet.device_context("dev-03")
        expiry = Properties(values={PropertyId.SESSION_EXPIRY_INTERVAL: 600})
        a = RawClient(ctx, harness.server.port, MQTT_5)
        a.send(Connect(MQTT_5, "dev-03", True, 30, properties=expiry))
        assert isinstance(a.read(), Connack)
        a.send(Subscribe(1, (("devices/dev-03/in/#", SubscriptionOptions(1)),)))
        assert isinstance(a.read(), Suback)
        a.send(Publish("devices/dev-03/in/big", b"x" * 2000, 1, packet_id=1))
        got = [a.read(), a.read()]  # its PUBACK and its copy (to this own subscription), in either order
        assert any(isinstance(p, Publish) and len(p.payload) == 2000 for p in got)
        a.close()  # gone without acknowledging the copy: it stays in flight in the session
        small = Properties(values={PropertyId.SESSION_EXPIRY_INTERVAL: 600, PropertyId.MAXIMUM_PACKET_SIZE: 1000,
                                   PropertyId.RECEIVE_MAXIMUM: 1})
        b = RawClient(ctx, harness.server.port, MQTT_5)
        b.send(Connect(MQTT_5, "dev-03", False, 30, properties=small))
        connack = b.read()
        b.send(Publish("devices/dev-03/in/small", b"y", 1, packet_id=2))
        got = [connack, b.read()]
        try:
            got.append(b.read(timeout=2.0))
        except TimeoutError:
            got.append("nothing")
        b.close()
        return got

    connack, first, second = await asyncio.to_thread(device_side)
    assert isinstance(connack, Connack) and connack.session_present
    got = [first, second]
    assert Puback(2) in got
    assert any(isinstance(p, Publish) and p.payload == b"y" for p in got), got


async def test_a_will_is_not_published_where_the_acl_running_when_it_fires_refuses(fleet: Fleet,
                                                                                  tmp_path: Path) -> None:
    """A will is a publish like any other: checked at CONNECT, and again when it fires (after a delay, across a
    restart or a reload), under the ACL running then. Otherwise a device keeps one message's way into a space the
    operator has since taken from it."""
    wide = ACLSettings(publish=("devices/{device_id}/#", "shared/#"), subscribe=("devices/{device_id}/#", "shared/#"))
    async with running(fleet, tmp_path, acl=wide) as h:
        dev = await h.device("dev-04", clean=False, session_expiry=600, will=("shared/status", b"offline", 1, False),
                             will_props=props(PacketTypes.WILLMESSAGE, WillDelayInterval=1))
        dev.drop()  # lost link: the delayed will waits in the session, saved at the clean stop below
        await until(lambda: h.server.broker.pending_will("dev-04") is not None, 5, "the delayed will")
        await asyncio.to_thread(dev.client.loop_stop)
    narrowed = ACLSettings(subscribe=("devices/{device_id}/#", "shared/#"))  # publish: the default, own space only
    async with running(fleet, tmp_path, acl=narrowed) as h:
        watcher = await h.device("dev-05")
        try:
            assert [c.value for c in await asyncio.to_thread(watcher.subscribe, "shared/#", 1)] == [1]
            await until(lambda: h.server.broker.pending_will("dev-04") is None, 5, "the will's delay")
            await asyncio.sleep(0.2)
            assert await h.outbox.fetch_after(0, 10) == []
            assert watcher.messages == []
        finally:
            await asyncio.to_thread(watcher.close)


async def test_expired_retained_messages_leave_the_session_file(harness: Harness, tmp_path: Path) -> None:
    """Retained messages are bounded in memory (count, bytes), and an expired one is forgotten when a subscription
    looks it up. It must leave the session file then too: otherwise a device that publishes retained messages with
    a short Message Expiry on ever new topics, and subscribes to them, grows the file (read whole at every start)
    without bound."""
    dev = await harness.device("dev-02")
    try:
        short = props(MessageExpiryInterval=1)
        for i in range(20):
            await published(dev.client.publish(f"devices/dev-02/r/{i}", b"v", qos=1, retain=True, properties=short))
        await until(lambda: len(stored_retained(tmp_path)) == 20, 5, "the retained messages on disk")
        await asyncio.sleep(1.2)
        assert [c.value for c in await asyncio.to_thread(dev.subscribe, "devices/dev-02/r/#", 1)] == [1]
        assert len(harness.server.broker.retained) == 0  # expired: forgotten in memory, none delivered
        await asyncio.sleep(0.3)  # a few batch windows of the session journal
        assert dev.messages == []
        assert stored_retained(tmp_path) == []
    finally:
        await asyncio.to_thread(dev.close)


async def test_one_device_filling_the_retained_store_leaves_the_others_their_share(fleet: Fleet,
                                                                                    tmp_path: Path) -> None:
    """The retained store is bounded (count, bytes) and refuses a new retained message once full. One device
    retaining on ever new topics of its own filled it, and then every other device's retained messages were
    refused. From 90 % of a bound a device over its fair share is refused instead (still delivered and recorded),
    so the other device can still retain."""
    async with running(fleet, tmp_path, mqtt={"retained_max_count": 20}) as h:
        quiet, greedy = await h.device("dev-01"), await h.device("dev-00")
        try:
            await published(quiet.client.publish("devices/dev-01/status", b"on", qos=1, retain=True))
            for i in range(30):
                await published(greedy.client.publish(f"devices/dev-00/r/{i}", b"v", qos=1, retain=True))
            await published(quiet.client.publish("devices/dev-01/config", b"c", qos=1, retain=True))
            await h.records(32)  # refused or not, every publish was recorded
            retained = h.server.broker.retained
            assert [m.payload for m in retained.matching("devices/dev-01/#", 0.0)] == [b"on", b"c"]
            assert len(retained.matching("devices/dev-00/#", 0.0)) == 17  # 18 of 20: over its share of 10
            assert [c.value for c in await asyncio.to_thread(quiet.subscribe, "devices/dev-01/#", 1)] == [1]
            await until(lambda: sorted(m.payload for m in quiet.messages) == [b"c", b"on"], 5, "the retained ones")
        finally:
            await asyncio.to_thread(quiet.close)
            await asyncio.to_thread(greedy.close)


def stored_retained(tmp_path: Path) -> list[tuple[object, ...]]:
    """The retained table of the session file, read by a second connection (WAL: what is committed)."""
    db = sqlite3.connect(tmp_path / "sessions.db", timeout=5)
    try:
        return db.execute("SELECT topic FROM retained").fetchall()
    finally:
        db.close()


async def test_a_device_that_stops_reading_altogether_is_closed_at_its_keepalive(harness: Harness) -> None:
    """The other side of the test above: reading paused for a device that takes none of our answers is no reason
    to keep it for ever (its TCP stack may acknowledge a zero window for as long as it likes): with no progress
    for 1.5 keep-alive periods it is closed, as a silent device is."""
    c, proto = await _small_window_client(harness, "dev-08", 1)
    pings = encode_packet(Pingreq(), MQTT_311) * (1 << 18)

    def flood() -> None:
        c.sock.settimeout(1.0)
        with contextlib.suppress(TimeoutError, OSError):
            c.sock.sendall(pings)

    await asyncio.to_thread(flood)
    # Closed: the session is handed back at once; the transport then gives the unread output CLOSE_TIMEOUT.
    await until(lambda: proto.engine.state is ConnectionState.CLOSED, 6, "the keep-alive close")
    assert proto.engine.close_reason is not None
    assert proto.engine.close_reason.reason_code is ReasonCode.KEEP_ALIVE_TIMEOUT
    c.close()


async def test_a_slow_reader_getting_deliveries_faster_than_it_reads_is_not_closed_at_its_keepalive(
        harness: Harness) -> None:
    """Between the two tests above: reading is paused for a device whose answers pile up, QoS 0 deliveries keep
    coming (they are written until ``max_queued_bytes``) faster than it reads, so the buffer grows although the
    device is reading. Its keep-alive must count what it takes (bytes handed to the socket), not whether the buffer
    shrank: it was closed for a keep-alive timeout while reading."""
    c, proto = await _small_window_client(harness, "dev-09", 1)

    def subscribe() -> None:
        c.send(Subscribe(1, (("devices/dev-09/in/#", SubscriptionOptions(0)),)))
        assert isinstance(c.read(), Suback)

    await asyncio.to_thread(subscribe)

    def flood() -> None:  # PINGREQs until the gateway stops reading us (its answers pass the high-water mark)
        c.sock.settimeout(1.0)
        with contextlib.suppress(TimeoutError, OSError):
            c.sock.sendall(encode_packet(Pingreq(), MQTT_311) * (1 << 18))

    await asyncio.to_thread(flood)
    assert proto._write_blocked
    reading = True

    def read_slowly() -> int:  # ~80 KB/s, and a PINGREQ every 0.3 s as its keep-alive of 1 s asks
        got = 0
        c.sock.settimeout(2.0)
        ping = encode_packet(Pingreq(), MQTT_311)
        last_ping = time.monotonic()
        while reading:
            data = c.sock.recv(4096)
            if not data:
                break
            got += len(data)
            if time.monotonic() - last_ping > 0.3:
                c.sock.sendall(ping)
                last_ping = time.monotonic()
            time.sleep(0.05)
        return got

    reader = asyncio.create_task(asyncio.to_thread(read_slowly))
    payload = b"x" * 1000
    for _ in range(35):  # 3.5 s, over two keep-alive checks (1.5 s each): ~200 KB/s of QoS 0 deliveries
        for _ in range(20):
            harness.server.broker.route(Message("devices/dev-09/in/cmd", payload, 0))
        await asyncio.sleep(0.1)
        assert proto.engine.state is ConnectionState.CONNECTED, proto.engine.close_reason
    reading = False
    assert await reader > 100_000  # it did read all along
    c.close()


async def test_a_wildcard_subscribe_costs_what_it_matches_not_the_whole_retained_store(harness: Harness) -> None:
    """Retained messages are looked up for every filter of a SUBSCRIBE (retain handling 0: every time, and a
    filter may repeat in one packet). The lookup must cost what the filter can match, not a scan of every retained
    message of the fleet: one SUBSCRIBE of a few KB repeating ``devices/dev-01/#`` would otherwise hold the event
    loop, and every other device, for seconds."""
    for i in range(5000):  # the fleet's retained state (e.g. one status per device)
        harness.server.broker.route(Message(f"devices/fleet-{i:05d}/status", b"online", 1, retain=True))
    harness.server.broker.route(Message("devices/dev-01/status", b"mine", 1, retain=True))
    stalls: list[float] = []

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            stalls.append(loop.time() - before)

    def device_side() -> list[object]:
        c = RawClient(harness.fleet.device_context("dev-01"), harness.server.port, MQTT_311)
        c.send(Connect(MQTT_311, "dev-01", True, 30))
        assert isinstance(c.read(), Connack)
        c.send(Subscribe(1, (("devices/dev-01/#", SubscriptionOptions(0)),) * 300))
        got = [c.read(timeout=30.0), c.read(timeout=30.0)]
        c.close()
        return got

    tick = asyncio.create_task(ticker())
    try:
        suback, first = await asyncio.to_thread(device_side)
    finally:
        tick.cancel()
    assert isinstance(suback, Suback) and suback.reason_codes == (0,) * 300
    assert isinstance(first, Publish) and first.payload == b"mine" and first.retain
    assert max(stalls) < 0.25, f"the event loop stalled {max(stalls):.2f} s on one SUBSCRIBE"


async def test_a_filter_repeated_in_one_subscribe_sends_its_retained_messages_once(harness: Harness) -> None:
    """A SUBSCRIBE is answered by one SUBACK, then the retained messages of its filters. A filter repeated in the
    packet would send every matching retained message once per repeat, back to back: a device with 300 retained
    messages of its own made 90,000 PUBLISHes (and the loop stall, the memory) with one 6 KB packet; a 256 KB one
    against 10,000 retained messages would not fit in memory. Each retained message goes once per packet."""
    for i in range(300):
        harness.server.broker.route(Message(f"devices/dev-03/r/{i}", b"v", 0, retain=True))

    def device_side() -> tuple[object, int]:
        c = RawClient(harness.fleet.device_context("dev-03"), harness.server.port, MQTT_311)
        c.send(Connect(MQTT_311, "dev-03", True, 30))
        assert isinstance(c.read(), Connack)
        c.send(Subscribe(1, (("devices/dev-03/#", SubscriptionOptions(0)),) * 300))
        suback = c.read(timeout=30.0)
        n = 0
        try:
            while isinstance(c.read(timeout=1.0), Publish):
                n += 1
        except TimeoutError:
            pass
        c.close()
        return suback, n

    suback, publishes = await asyncio.to_thread(device_side)
    assert isinstance(suback, Suback) and suback.reason_codes == (0,) * 300
    assert publishes == 300


@pytest.mark.parametrize("persistent", [False, True], ids=["clean", "persistent"])
async def test_pipelined_subscribes_matching_retained_messages_are_bounded_by_the_output(harness: Harness,
                                                                                       persistent: bool) -> None:
    """Each SUBSCRIBE answers with every retained message its filters match, and all the packets of one read were
    processed at once: 50 pipelined SUBSCRIBEs (1.5 KB, one read) matching 2,000 retained messages each built
    100,000 PUBLISHes into the output of a device that reads nothing (clean session), or held 100,000 retained
    copies until the session journal's commit (persistent session); 3,000 of them took +1.25 GB. Past a bound
    (the write buffer's high-water mark, or ``max_queued_messages`` copies awaiting the commit) the packets after a
    SUBSCRIBE wait, in order, and reading stops until the output drained: what is queued stays within about one
    SUBSCRIBE's retained messages plus the bound, and every SUBSCRIBE still gets all of its retained messages."""
    device_id = "dev-04"
    matches, subscribes = 2000, 50
    for i in range(matches):
        harness.server.broker.route(Message(f"devices/{device_id}/r/{i}", b"v", 0, retain=True))
    peak = {"output": 0, "waiting": 0}

    async def sample() -> None:
        """The queued count, every loop turn: bytes queued for the device's socket (engine output + transport
        buffer), and retained copies held for SUBSCRIBEs awaiting the journal's commit."""
        while True:
            proto = harness.server.devices.get(device_id)
            if proto is not None and proto.transport is not None:
                output = proto.transport.get_write_buffer_size() + sum(len(b) for b in proto.engine._out)
                peak["output"] = max(peak["output"], output)
            # SUBACKs awaiting the commit: functools.partial(<ack>, packet id, codes, retained copies)
            pending: list[tuple[Any, ...]] = [getattr(cb, "args", ()) for cb in harness.server.session_db._callbacks]
            waiting = sum(len(args[2]) for args in pending if len(args) == 3)
            peak["waiting"] = max(peak["waiting"], waiting)
            await asyncio.sleep(0.001)

    def connect() -> RawClient:
        c = RawClient(harness.fleet.device_context(device_id), harness.server.port, MQTT_311)
        c.send(Connect(MQTT_311, device_id, not persistent, 60))
        assert isinstance(c.read(), Connack)
        return c

    def device_side(c: RawClient) -> tuple[list[object], int]:
        c.send(*(Subscribe(i + 1, ((f"devices/{device_id}/r/#", SubscriptionOptions(0)),))
                 for i in range(subscribes)))
        time.sleep(1.0)  # reads nothing meanwhile
        subacks: list[object] = []
        publishes = 0
        while len(subacks) < subscribes or publishes < subscribes * matches:
            packet = c.read(timeout=10.0)
            if packet is None:
                break
            if isinstance(packet, Publish):
                publishes += 1
            else:
                subacks.append(packet)
        c.close()
        return subacks, publishes

    c = await asyncio.to_thread(connect)
    proto = harness.server.devices[device_id]
    assert proto.transport is not None
    # A small kernel send buffer: what the device does not read stays in the gateway, where it is measured.
    proto.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sampler = asyncio.create_task(sample())
    try:
        subacks, publishes = await asyncio.to_thread(device_side, c)
    finally:
        sampler.cancel()
    # Every SUBACK, in order, and every retained message delivered.
    assert all(isinstance(p, Suback) for p in subacks)
    assert [p.packet_id for p in subacks] == list(range(1, subscribes + 1))  # type: ignore[attr-defined]
    assert publishes == subscribes * matches
    bound = harness.server.settings.max_queued_messages
    assert peak["waiting"] <= bound + matches, f"{peak['waiting']} retained copies held for the commit"
    assert peak["output"] <= 256 * 1024, f"{peak['output']} bytes queued for a device that reads nothing"


async def test_subscribes_deferred_for_a_device_that_reads_nothing_end_at_its_keepalive(harness: Harness) -> None:
    """The keep-alive rule of pause_writing holds for SUBSCRIBEs deferred behind their retained messages: the
    packets wait for the output to drain, and a device that takes none of it is closed at its keep-alive (its
    deferred packets forgotten) rather than kept, with its buffers, for as long as its TCP stack lets it."""
    device_id = "dev-05"
    for i in range(2000):
        harness.server.broker.route(Message(f"devices/{device_id}/r/{i}", b"v", 0, retain=True))
    c, proto = await _small_window_client(harness, device_id, 2)
    await asyncio.to_thread(c.send, *(Subscribe(i + 1, ((f"devices/{device_id}/r/#", SubscriptionOptions(0)),))
                                      for i in range(50)))
    await until(lambda: proto._deferred is not None, 5, "the SUBSCRIBEs deferred")
    await until(lambda: proto.engine.state is ConnectionState.CLOSED, 8, "the keep-alive close")
    assert proto.engine.close_reason is not None
    assert proto.engine.close_reason.reason_code is ReasonCode.KEEP_ALIVE_TIMEOUT
    assert proto._deferred is None
    c.close()
