"""The native uplink client (``uplink.client = "native"``) against a real mosquitto with mutual TLS, fed by a real
outbox; its PUBACK reader fed real bytes split at every position. The paho client stays selectable: the basic
delivery test runs with it too."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import structlog
from test_downlink import cloud_publish
from test_gateway_e2e import Device
from test_gateway_e2e import seqs_by_device as e2e_seqs_by_device
from test_uplink import eventually, make_uplink, outbox, running, seqs_by_device, submit, uplink_settings  # noqa: F401

from edgegw.config import UplinkSettings
from edgegw.mqtt.packets import PropertyId
from edgegw.outbox.store import Outbox
from edgegw.uplink._mqtt_client import NativeLink

if TYPE_CHECKING:
    from conftest import LabPKI, Mosquitto, Sink


def test_native_is_the_default_and_paho_selectable(pki: LabPKI) -> None:
    pair = pki.client("uplink")
    assert UplinkSettings(host="h", ca=pki.ca, cert=pair.cert, key=pair.key).client == "native"
    assert UplinkSettings(host="h", ca=pki.ca, cert=pair.cert, key=pair.key, client="paho").client == "paho"


@pytest.mark.parametrize("client", ["native", "paho"])
async def test_both_clients_deliver_in_order_with_live_records_handed_over_in_memory(
        client: str, mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    sink = sink_factory(mosquitto, topic="edgegw/#")
    devices = ["n1", "n2", "n3"]
    backlog = submit(outbox, devices, 500)  # committed before the uplink connects: read from SQLite
    await eventually(lambda: outbox.committed_id >= backlog[-1].id, 5, "the backlog committed")
    uplink = make_uplink(uplink_settings(mosquitto, pki, client=client), outbox)
    async with running(uplink):
        await eventually(lambda: outbox.depth == 0 and uplink.connected, 10, "the backlog acknowledged")
        live = []
        for start in range(500, 2500, 100):  # live records, committed while connected: handed over in memory
            live += submit(outbox, devices, 100, start)
            await asyncio.sleep(0.005)
        await eventually(lambda: outbox.depth == 0, 10, "the live records acknowledged")
        messages = await sink.until(lambda m: len(m) >= 2500, 10)
        if client == "native":
            link = uplink._link
            assert isinstance(link, NativeLink)
            # many PUBLISHes share one write (one loop turn), rather than one TLS record each
            assert link.writes < uplink.sent / 4, (link.writes, uplink.sent)
    assert len(messages) == 2500 and uplink.acked == 2500 and uplink.reconnects == 0
    by_device = seqs_by_device(messages)
    assert by_device == {d: sorted(s) for d, s in by_device.items()}, "out of order within a device"
    assert uplink.handed_off == len(live), "live records were read back from SQLite"


async def test_puback_reads_refill_the_window_without_waking_the_pump(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    """Room made by PUBACKs is refilled from the live lane in the same loop turn (refill()), so the pump task sleeps
    while the live lane has records: it wakes when a lane runs dry, not once per read of PUBACKs."""
    sink = sink_factory(mosquitto, topic="edgegw/#")
    devices = ["r1", "r2"]
    uplink = make_uplink(uplink_settings(mosquitto, pki, inflight_window=10), outbox)
    async with running(uplink):
        await eventually(lambda: uplink.connected, 10, "connected")
        link = uplink._link
        assert isinstance(link, NativeLink)
        records = submit(outbox, devices, 3000)  # three groups of commit_max_records, handed over in memory
        await eventually(lambda: outbox.depth == 0 and uplink.acked == 3000, 15, "all acknowledged")
        messages = await sink.until(lambda m: len(m) >= 3000, 10)
        # 3,000 records through a window of 10 take >= 300 reads of PUBACKs; the pump slept a few times per group.
        assert uplink.handed_off == len(records)
        assert link.waits < 60, (link.waits, link.writes)
    by_device = seqs_by_device(messages)
    assert by_device == {d: sorted(s) for d, s in by_device.items()}, "out of order within a device"
    assert sum(len(s) for s in by_device.values()) == 3000


async def test_receive_maximum_of_the_server_is_honoured(
        mosquitto_factory: Callable[..., Mosquitto], sink_factory: Callable[..., Sink], pki: LabPKI,
        outbox: Outbox) -> None:
    """mosquitto announces max_inflight_messages as its Receive Maximum and disconnects a client that exceeds it
    (0x93); our window of 100 must shrink to 5."""
    broker = mosquitto_factory(max_inflight_messages=5).start()
    sink = sink_factory(broker, topic="edgegw/#")
    uplink = make_uplink(uplink_settings(broker, pki, inflight_window=100), outbox)
    records = submit(outbox, ["r1", "r2"], 2000)
    with structlog.testing.capture_logs() as logs:
        async with running(uplink):
            await eventually(lambda: outbox.depth == 0, 15, "every record acknowledged")
            await sink.until(lambda m: len(m) >= len(records), 10)
    connected = [e for e in logs if e["event"] == "uplink.connected"]
    assert connected[0]["window"] == 5
    assert not any(e["event"] == "uplink.disconnected" for e in logs)
    assert uplink.reconnects == 0 and uplink.acked == 2000


async def test_puback_reader_handles_any_split_and_refusals(
        pki: LabPKI, outbox: Outbox, mosquitto: Mosquitto) -> None:
    """The PUBACK reader against bytes as a server sends them, cut at every position: 3.1.1-style (no reason),
    MQTT 5 with a success reason (0x10), a refusal with a reason string (quarantined), a PINGRESP in between."""
    settings = uplink_settings(mosquitto, pki)
    records = submit(outbox, ["p1"], 4)
    await eventually(lambda: outbox.committed_id >= records[-1].id, 5, "committed")
    wire = (b"\x40\x02\x00\x01"  # PUBACK 1
            + b"\xd0\x00"  # PINGRESP
            + b"\x40\x03\x00\x02\x10"  # PUBACK 2, no matching subscribers (a success)
            + b"\x40\x0a\x00\x03\x87\x06\x1f\x00\x03acl"  # PUBACK 3, not authorized, reason string "acl"
            + b"\x40\x04\x00\x04\x00\x00")  # PUBACK 4, success with an empty property length
    for cut in range(-1, len(wire) + 1):  # -1: one byte at a time
        uplink = make_uplink(settings, outbox)
        link = NativeLink(uplink, asyncio.get_running_loop(), "127.0.0.1", 1)
        link.inflight.update({i + 1: r for i, r in enumerate(records)})
        with structlog.testing.capture_logs() as logs:
            for chunk in [wire[i:i + 1] for i in range(len(wire))] if cut < 0 else (wire[:cut], wire[cut:]):
                link.data_received(chunk)
        assert not link.lost.done(), link.lost.result()
        assert link.inflight == {} and uplink.acked == 3 and uplink.refused == 1
        refused = [e for e in logs if e["event"] == "uplink.publish_refused"]
        assert refused[0]["record_id"] == records[2].id and refused[0]["reason"] == \
            "PUBACK Not authorized (0x87): acl"
        link.close(graceful=False)


async def test_garbage_from_the_server_drops_the_connection_not_the_process(
        pki: LabPKI, outbox: Outbox, mosquitto: Mosquitto) -> None:
    uplink = make_uplink(uplink_settings(mosquitto, pki), outbox)
    for garbage in (b"\x00\x00",  # reserved packet type
                    b"\x40\x01\x00",  # PUBACK without a whole packet id
                    b"\x30\xff\xff\xff\xff\x7f",  # remaining length of five bytes
                    b"\x20\x03\x00\x00\x00" * 2,  # a second CONNACK
                    b"\x34\x07\x00\x01t\x00\x01\x00x"):  # QoS 2 PUBLISH on our QoS 1 subscription
        link = NativeLink(uplink, asyncio.get_running_loop(), "127.0.0.1", 1)
        link.data_received(garbage)
        assert link.lost.done() and "protocol error" in link.lost.result(), garbage
        link.close(graceful=False)


async def test_keepalive_pings_an_idle_link_and_it_stays_up(
        mosquitto: Mosquitto, pki: LabPKI, outbox: Outbox) -> None:
    uplink = make_uplink(uplink_settings(mosquitto, pki, keepalive=1), outbox)
    async with running(uplink):
        await eventually(lambda: uplink.connected, 10, "connected")
        link = uplink._link
        assert isinstance(link, NativeLink)
        await asyncio.sleep(3.5)  # > 3 keepalive periods idle: PINGREQ / PINGRESP keep it alive
        assert uplink.connected and uplink._link is link and uplink.reconnects == 0
        submit(outbox, ["k1"], 3)
        await eventually(lambda: uplink.acked == 3, 5, "records after the idle period")


@pytest.mark.parametrize("client", ["native", "paho"])
def test_gateway_process_with_either_client(client: str, fleet: Any, mosquitto: Mosquitto, gateway_factory: Any,
                                            sink_factory: Callable[..., Sink]) -> None:
    """`[uplink] client` through a real `edgegw run`: paho devices in, mosquitto upstream, every message in order."""
    sink = sink_factory(mosquitto, topic="cloud/#")
    gw = gateway_factory(mosquitto, overrides={"uplink": {"client": client}}).start()
    connected = gw.wait_for_event("uplink.connected")
    assert connected["client"] == client
    devices = [Device(fleet, gw, f"dev-{i:02d}").connect() for i in range(4)]
    try:
        for seq in range(50):
            for d in devices:
                d.publish(seq)
        messages = sink.wait_for(lambda m: len(m) >= 200, 30)
    finally:
        for d in devices:
            d.close()
    per_device = e2e_seqs_by_device(messages)
    assert dict(per_device) == {d.device_id: list(range(50)) for d in devices}
    assert gw.terminate() == 0


@pytest.mark.parametrize("client", ["native", "paho"])
async def test_commands_carry_their_properties_down_with_either_client(
        client: str, mosquitto: Mosquitto, pki: LabPKI, outbox: Outbox) -> None:
    """A command with MQTT 5 properties (from mosquitto_pub, the cloud's side) reaches the downlink with them: the
    Response Topic mapped back to the device namespace, correlation data, user property, expiry."""
    calls: list[tuple[Any, ...]] = []

    def downlink(device_id: str, topic: str, payload: bytes, qos: int, properties: Any, *,
                 message_expiry: int | None = None) -> bool:
        calls.append((device_id, topic, payload, qos, properties, message_expiry))
        return True

    uplink = make_uplink(uplink_settings(mosquitto, pki, client=client, command_topic="{prefix}/+/cmd/#"), outbox)
    uplink.downlink = downlink
    async with running(uplink):
        await eventually(lambda: uplink._link is not None and uplink._link.commands_subscribed, 10, "SUBACK")
        await asyncio.to_thread(cloud_publish, pki, mosquitto, "edgegw/dev-07/cmd/set", "42", "-V", "mqttv5",
                                "-D", "publish", "response-topic", "edgegw/dev-07/cmd/reply",
                                "-D", "publish", "correlation-data", "c-1",
                                "-D", "publish", "user-property", "k", "v",
                                "-D", "publish", "message-expiry-interval", "60")
        await eventually(lambda: len(calls) == 1, 10, "the command")
    device_id, topic, payload, qos, props, expiry = calls[0]
    assert (device_id, topic, payload, qos) == ("dev-07", "devices/dev-07/cmd/set", b"42", 1)
    assert props.get(PropertyId.RESPONSE_TOPIC) == "devices/dev-07/cmd/reply"
    assert props.get(PropertyId.CORRELATION_DATA) == b"c-1"
    assert props.user == (("k", "v"),)
    assert expiry is not None and 0 < expiry <= 60
    assert uplink.commands_delivered == 1


async def test_native_link_runs_on_edgegw_tls_transport_checks_the_name_and_says_goodbye(
        mosquitto: Mosquitto, pki: LabPKI, outbox: Outbox) -> None:
    """Not asyncio's sslproto: the native client's TLS is edgegw's TLSTransport (client side, OpenSSL read-ahead).
    The server certificate is checked against ``tls_server_name``; a cancelled uplink sends DISCONNECT before it
    closes (mosquitto logs "disconnected", not "closed its connection")."""
    from test_uplink import CLIENT_ID

    from edgegw.mqtt._tls import TLSTransport

    wrong = make_uplink(uplink_settings(mosquitto, pki, tls_server_name="not-the-broker.example"), outbox)
    with structlog.testing.capture_logs() as logs:
        async with running(wrong):
            await eventually(lambda: wrong.connect_failures >= 1, 5, "the refused certificate")
    failure = next(e for e in logs if e["event"] == "uplink.connect_failed")
    assert failure["error"].startswith("SSLCertVerificationError") and "mismatch" in failure["error"], failure

    # a host name (resolved, every address tried in turn) rather than the address
    uplink = make_uplink(uplink_settings(mosquitto, pki, host="localhost"), outbox)
    async with running(uplink):
        await eventually(lambda: uplink.connected, 10, "connected")
        link = uplink._link
        assert isinstance(link, NativeLink) and isinstance(link.transport, TLSTransport)
        assert link.transport.read_ahead
        assert link.transport.get_extra_info("peercert")["subject"]
        submit(outbox, ["t1"], 50)
        await eventually(lambda: uplink.acked == 50 and outbox.depth == 0, 10, "records over the transport")
    await eventually(lambda: f"Client {CLIENT_ID} disconnected" in mosquitto.log(), 5, "the DISCONNECT")
    assert f"Client {CLIENT_ID} closed its connection" not in mosquitto.log()


async def test_server_keep_alive_shorter_than_ours_is_honoured_from_the_connack(
        mosquitto_factory: Callable[..., Mosquitto], pki: LabPKI, outbox: Outbox) -> None:
    """mosquitto's ``max_keepalive`` (10 s at least) answers a larger keepalive with Server Keep Alive 10
    (MQTT-3.2.2-21: the client must use it) and drops a client silent for 1.5 x 10 s (seen after 17-25 s). Our
    keepalive of 120 s (a first check after 30 s) must not decide when the first PINGREQ goes, or the idle link is
    dropped: the timer armed at connect ran on our keepalive until it first fired. Its next tick is checked rather
    than waited for (waiting out the broker's 15 s showed the same, in 25 s of the suite's time)."""
    broker = mosquitto_factory(extra="max_keepalive 10").start()
    uplink = make_uplink(uplink_settings(broker, pki, keepalive=120), outbox)
    async with running(uplink):
        await eventually(lambda: uplink.connected, 10, "connected")
        link = uplink._link
        assert link._keepalive == 10.0  # the CONNACK's Server Keep Alive
        assert link._timer is not None
        due = link._timer.when() - asyncio.get_running_loop().time()
        assert due <= 10.0 / 4 + 0.1, f"the first keep-alive check is {due:.1f} s away, the server drops at 15 s"


@pytest.mark.parametrize("client", ["native", "paho"])
async def test_connack_with_maximum_packet_size_zero_is_a_failed_attempt_not_a_quarantine(
        client: str, pki: LabPKI, outbox: Outbox, mosquitto: Mosquitto) -> None:
    """A server whose CONNACK says Maximum Packet Size 0 (a Protocol Error, MQTT 5 §3.2.2.3.6) broke the protocol:
    the attempt fails. Taken at its word, every record is "over the server's Maximum Packet Size" and the whole
    outbox would move to quarantine on that one connection."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    ctx.load_verify_locations(cafile=str(pki.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    connack = b"\x20\x08\x00\x00\x05\x27\x00\x00\x00\x00"  # accepted, property Maximum Packet Size = 0
    held: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read(1)  # the CONNECT has begun
        writer.write(connack)
        while await reader.read(65536):  # PUBLISHes, never acknowledged
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    records = submit(outbox, ["z1"], 50)
    await eventually(lambda: outbox.committed_id >= records[-1].id, 5, "committed")
    settings = uplink_settings(mosquitto, pki, port=port, client=client, reconnect_min=0.2, reconnect_max=0.4)
    uplink = make_uplink(settings, outbox)
    try:
        async with running(uplink):
            await eventually(lambda: uplink.connect_failures >= 2 or uplink.refused > 0, 10, "an attempt or more")
            await asyncio.sleep(0.3)
    finally:
        for w in held:
            w.transport.abort()
        server.close()
    assert uplink.refused == 0 and outbox.quarantined == 0 and outbox.depth == 50
    assert uplink.connect_failures >= 2


@pytest.mark.timeout(60, method="thread")  # a stuck loop cannot take the signal: kill the run
async def test_a_full_window_of_65535_with_a_command_subscription_does_not_hang_the_loop(
        pki: LabPKI, outbox: Outbox, mosquitto: Mosquitto) -> None:
    """``inflight_window`` may be 65535 and an MQTT 3.1.1 server announces no Receive Maximum: with the command
    SUBSCRIBE holding one packet id, the 65,535th PUBLISH in flight found no free id and searched for one forever,
    the event loop stuck (every device connection with it). A TLS server that reads everything and acknowledges
    nothing fills the window."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    ctx.load_verify_locations(cafile=str(pki.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    held: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read(1)
        writer.write(b"\x20\x02\x00\x00")  # CONNACK 3.1.1, accepted
        while await reader.read(1 << 20):  # SUBSCRIBE and PUBLISHes, never answered
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    settings = uplink_settings(mosquitto, pki, port=port, protocol="3.1.1", inflight_window=65535,
                               command_topic="{prefix}/+/cmd/#", keepalive=60)
    uplink = make_uplink(settings, outbox)
    try:
        async with running(uplink):
            for start in range(0, 65600, 5000):
                submit(outbox, ["w1"], 5000, start)
                await asyncio.sleep(0.05)
            await eventually(lambda: uplink.inflight >= 65534, 30, "the window filled")
            await asyncio.sleep(0.5)  # the loop still turns
            assert uplink.connected and uplink.inflight == 65534
    finally:
        for w in held:
            w.transport.abort()
        server.close()
