"""MQTT 5 properties of a device's publish travel upstream: real peers only (a paho MQTT 5 device, `edgegw run` as a
process, mosquitto upstream, a paho MQTT 5 subscriber on it). Every wait is bounded."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from conftest import Fleet, LabPKI, free_port
from edgegw.outbox.store import Outbox, Record
from edgegw.uplink._wire import _record_properties, expiry_left
from mqtt_peers import PahoDevice, props
from ops_peers import metrics, sample
from test_uplink import eventually, make_uplink, outbox, rows_in, running, uplink_settings  # noqa: F401 (fixture)


def upstream_subscriber(pki: LabPKI, broker: Any) -> PahoDevice:
    sub = PahoDevice(pki.ssl_context("sink"), broker.port, "props-sink").start()
    assert sub.connected.is_set(), broker.log()
    sub.subscribe("cloud/#", 1)
    return sub


def test_device_properties_reach_the_upstream_subscriber(fleet: Fleet, pki: LabPKI, mosquitto: Any,
                                                         gateway_factory: Any) -> None:
    sub = upstream_subscriber(pki, mosquitto)
    gw = gateway_factory(mosquitto).start()
    dev = PahoDevice(fleet.device_context("dev-01"), gw.port, "dev-01").start()
    try:
        p = props(PayloadFormatIndicator=1, ContentType="application/json", ResponseTopic="devices/dev-01/reply",
                  CorrelationData=b"\x00\x01corr", MessageExpiryInterval=600)
        p.UserProperty = [("unit", "C"), ("unit", "F"), ("site", "plant-7")]
        dev.client.publish("devices/dev-01/telemetry", b'{"t": 21}', qos=1, properties=p).wait_for_publish(5)
        plain = dev.client.publish("devices/dev-01/plain", b"x", qos=1)
        plain.wait_for_publish(5)
        got = sub.wait_messages(2, timeout=15)
        assert len(got) == 2, gw.log()[-3000:]
        by_topic = {m.topic: m for m in got}
        m = by_topic["cloud/dev-01/telemetry"]
        assert m.payload == b'{"t": 21}'
        mp = m.properties
        assert mp.PayloadFormatIndicator == 1
        assert mp.ContentType == "application/json"
        assert mp.ResponseTopic == "cloud/dev-01/reply"  # rewritten like the topic
        assert mp.CorrelationData == b"\x00\x01corr"
        assert 590 <= mp.MessageExpiryInterval <= 600  # what is left of it
        names = [k for k, _ in mp.UserProperty]
        assert names[:4] == ["edgegw-record-id", "edgegw-device-id", "edgegw-received-at", "traceparent"]
        assert mp.UserProperty[4:] == [("unit", "C"), ("unit", "F"), ("site", "plant-7")]  # order and repeats
        # A publish without properties carries only ours (a traceparent made at ingress), and no expiry.
        q = by_topic["cloud/dev-01/plain"].properties
        assert [k for k, _ in q.UserProperty] == ["edgegw-record-id", "edgegw-device-id", "edgegw-received-at",
                                                  "traceparent"]
        assert not hasattr(q, "MessageExpiryInterval")
        assert not hasattr(q, "ResponseTopic")
    finally:
        dev.close()
        sub.close()


def test_a_record_whose_expiry_passed_is_dropped_not_sent(fleet: Fleet, pki: LabPKI, mosquitto_factory: Any,
                                                          sink_factory: Any, gateway_factory: Any) -> None:
    broker = mosquitto_factory(persistence=True).start()
    sink = sink_factory(broker, topic="cloud/#", persistent=True)  # its session queues what comes while it is away
    broker.stop()
    admin_port = free_port()
    gw = gateway_factory(broker, overrides={"log": {"level": "debug"},  # upstream down
                                            "admin": {"port": admin_port}}).start()
    dev = PahoDevice(fleet.device_context("dev-02"), gw.port, "dev-02").start()
    try:
        for payload, mei in ((b"short", 1), (b"long", 3600), (b"none", None)):
            p = props(MessageExpiryInterval=mei) if mei is not None else None
            dev.client.publish("devices/dev-02/t", payload, qos=1, properties=p).wait_for_publish(5)
        time.sleep(2.2)  # "short" expires in the outbox
        broker.start()
        got = sink.wait_for(lambda m: {x.payload for x in m} >= {b"long", b"none"}, 20)
        time.sleep(0.5)
        assert b"short" not in {x.payload for x in sink.snapshot()}, got
        expired = gw.wait_for_event("uplink.record_expired", device_id="dev-02", expiry=1)
        assert expired["age"] >= 1
        assert re.fullmatch(r"[0-9a-f]{32}", expired["trace_id"])  # the record's trace (made at ingress)
        assert sample(metrics(admin_port), "edgegw_uplink_expired_records_total") == 1
    finally:
        dev.close()
    assert gw.terminate() == 0
    (stopped,) = gw.events("gateway.stopped")
    assert stopped["outbox_depth"] == 0  # deleted, not left behind


TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_wire_encoding_decodes_with_paho() -> None:
    record = Record(4711, "dev-01", "devices/dev-01/t", b"{}", 1, 1_700_000_000.5,
                    msgpack.packb({"pfi": 0, "ct": "text/plain", "cd": b"\xff", "up": [["k", "v"], ["k", "w"]],
                                   "tp": TP}))
    carried = msgpack.unpackb(record.properties)
    packed = _record_properties(record, carried, 42, "cloud/dev-01/r").pack()
    decoded = PahoProperties(PacketTypes.PUBLISH)
    decoded.unpack(packed)
    assert decoded.PayloadFormatIndicator == 0 and decoded.MessageExpiryInterval == 42
    assert decoded.ContentType == "text/plain" and decoded.ResponseTopic == "cloud/dev-01/r"
    assert decoded.CorrelationData == b"\xff"
    assert decoded.UserProperty == [("edgegw-record-id", "4711"), ("edgegw-device-id", "dev-01"),
                                    ("edgegw-received-at", "2023-11-14T22:13:20.500Z"), ("traceparent", TP),
                                    ("k", "v"), ("k", "w")]
    # Remaining expiry: rounded up, never more than asked, None once passed (a clock that went back waits 0 s).
    assert expiry_left(10, 100.0, 100.2) == 10
    assert expiry_left(10, 100.0, 105.5) == 5
    assert expiry_left(10, 100.0, 110.0) is None
    assert expiry_left(10, 100.0, 50.0) == 10


# --- in process: the uplink against mosquitto, fed by a real outbox -------------------------------------------


@pytest.mark.parametrize("batch", [1, 50])
async def test_expired_and_damaged_records_leave_the_queue(mosquitto: Any, sink_factory: Any, pki: LabPKI,
                                                           outbox: Outbox, tmp_path: Path, batch: int) -> None:
    sink = sink_factory(mosquitto, topic="edgegw/#")
    outbox.submit("dev-01", "devices/dev-01/a", b"gone", 1, properties=msgpack.packb({"mei": 0}))
    outbox.submit("dev-01", "devices/dev-01/b", b"damaged", 1, properties=b"\xc1")  # not msgpack
    outbox.submit("dev-01", "devices/dev-01/c", b"kept", 1, properties=msgpack.packb({"mei": 3600, "ct": "x"}))
    outbox.submit("dev-02", "devices/dev-02/d", b"plain", 1)
    uplink = make_uplink(uplink_settings(mosquitto, pki, batch_max_records=batch), outbox)
    async with running(uplink):
        await eventually(lambda: outbox.depth == 0, 10, "the outbox emptied")
        if batch == 1:
            await sink.until(lambda m: {x.payload for x in m} >= {b"kept", b"plain"}, 10)
        else:
            await sink.until(lambda m: len(m) >= 1, 10)
    assert uplink.expired == {"dev-01": 1}
    assert await outbox.count_quarantined() == 1
    assert rows_in(tmp_path / "outbox.db") == 0


# --- the native client's fast path sends the very bytes of the general path -----------------------------------


class _Bytes:
    """Where the link's PUBLISHes go in the comparison below: only the bytes matter, not a socket."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_fast_path_sends_the_same_bytes_as_the_general_path(pki: LabPKI, outbox: Outbox,
                                                                  protocol: str) -> None:
    """``Uplink._send`` over the native client takes ``RecordWire`` for a record with no record properties or only
    the ingress's traceparent (``record_properties(NO_PROPERTIES, tp)``): every PUBLISH byte (topic, packet id,
    properties, payload) and ``bytes_sent`` must equal what the general path (msgpack, ``_record_properties``)
    gives, across ids, received times on millisecond edges, long device ids (a two-byte property length) and the
    topics the mapping treats differently. A record with other properties, or an unsendable topic, still goes the
    general way (quarantined with the same reason)."""
    import asyncio

    from edgegw.mqtt.forward import record_properties
    from edgegw.mqtt.packets import NO_PROPERTIES
    from edgegw.uplink._mqtt_client import NativeLink

    base = 1_700_000_000.0
    times = [base, base + 0.0004, base + 0.0009999, base + 0.001, base + 0.9995, base + 0.999999, base + 1,
             base + 59.123456, 1.5, 0.0]
    devices = ["dev-01", "d" * 90, "é-unicode"]
    topics = ["devices/{d}/telemetry", "devices/{d}/a/b/c", "other/{d}/x", "telemetry", "\x00routed/{d}/up",
              "devices/other/x"]
    records = []
    rid = 1
    for ts in times:
        for device in devices:
            for topic in topics:
                for stored in (None, record_properties(NO_PROPERTIES, TP)):
                    records.append(Record(rid, device, topic.format(d=device), b"p" * (rid % 300), 1, ts, stored))
                    rid = rid * 7 + 3 if rid < 10**17 else rid + 1  # ids of every length, up to 19 digits

    async def send(fast: bool) -> tuple[bytes, int]:
        uplink = make_uplink(uplink_settings(_Broker(), pki, protocol=protocol, topic_prefix="cloud"), outbox)
        link = NativeLink(uplink, asyncio.get_running_loop(), "127.0.0.1", 1)
        link.encoded = fast
        link.transport = _Bytes()  # type: ignore[assignment]
        for record in records:
            assert uplink._send(link, record) is True
            link.inflight.clear()
        link._flush()
        assert isinstance(link.transport, _Bytes)
        data = link.transport.data
        link.transport = None
        link.close(graceful=False)
        return data, uplink.bytes_sent

    fast, general = await send(True), await send(False)
    assert len(fast[0]) == fast[1] and fast[1] > 100 * len(records)
    assert fast == general

    # not for the fast path: other record properties, a wildcard in the mapped topic
    uplink = make_uplink(uplink_settings(_Broker(), pki, protocol=protocol, topic_prefix="cloud"), outbox)
    link = NativeLink(uplink, asyncio.get_running_loop(), "127.0.0.1", 1)
    link.transport = _Bytes()  # type: ignore[assignment]
    with_ct = Record(1, "dev-01", "devices/dev-01/t", b"x", 1, base, msgpack.packb({"ct": "a/b", "tp": TP}))
    assert uplink._send(link, with_ct) is True
    wildcard = Record(2, "dev+", "devices/dev+/t", b"x", 1, base, record_properties(NO_PROPERTIES, TP))
    assert uplink._send(link, wildcard) is False and uplink.refused == 1
    link.transport = None
    link.close(graceful=False)


class _Broker:
    host, port = "127.0.0.1", 1  # settings only: nothing connects
