"""Chaos, each case bounded in time: kill -9 of the gateway under load, and a silent blackhole upstream.

Real peers only: `edgegw run` as a child process killed with SIGKILL, paho devices with fleet certificates, mosquitto
with mutual TLS, a loopback TCP proxy that stops forwarding without closing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgegw.outbox.store import Outbox
from test_uplink import eventually, make_uplink, outbox, running, uplink_settings  # noqa: F401 - fixture

if TYPE_CHECKING:
    from conftest import Fleet, GatewayProcess, LabPKI, Mosquitto, Sink


class LoadDevice:
    """A paho device (own network thread) publishing QoS 1; remembers which payloads the gateway acknowledged."""

    def __init__(self, fleet: Fleet, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.sent: list[tuple[bytes, mqtt.MQTTMessageInfo]] = []
        self.connected = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=MQTTProtocolVersion.MQTTv5,
                             reconnect_on_failure=False)
        client.tls_set_context(fleet.device_context(device_id))
        client.max_inflight_messages_set(32)
        client.on_connect = lambda c, u, f, reason, p: reason.is_failure or self.connected.set()
        self.client = client
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        if not self.connected.wait(10):
            self.close()
            raise AssertionError(f"{device_id} did not connect within 10 s")

    def publish(self, tag: str, seq: int) -> None:
        payload = json.dumps({"device": self.device_id, "tag": tag, "seq": seq}).encode()
        self.sent.append((payload, self.client.publish(f"devices/{self.device_id}/telemetry", payload, qos=1)))

    def acked(self) -> set[bytes]:
        return {payload for payload, info in self.sent if info.is_published()}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def test_kill_9_under_load_five_times_loses_no_acknowledged_record(
        fleet: Fleet, mosquitto: Mosquitto, gateway_factory: Callable[..., GatewayProcess],
        sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory(mosquitto, topic="cloud/#")
    gw = gateway_factory(mosquitto)
    acked: set[bytes] = set()
    published = 0
    for cycle in range(5):
        gw.start()
        devices = [LoadDevice(fleet, gw.port, f"dev-{i:02d}") for i in range(4)]
        try:
            deadline = time.monotonic() + 0.8
            seq = 0
            while time.monotonic() < deadline:  # ~4 x 25 publishes every 10 ms, more than get acknowledged
                for _ in range(25):
                    for d in devices:
                        d.publish(f"c{cycle}", seq)
                    seq += 1
                time.sleep(0.01)
            published += seq * len(devices)
            gw.kill()  # SIGKILL while devices are publishing and the uplink is sending
        finally:
            for d in devices:
                d.close()
        acked |= set().union(*(d.acked() for d in devices))
    assert len(acked) > 1000, f"only {len(acked)} acknowledged: the load did not happen"
    gw.start()
    messages = sink.wait_for(lambda m: acked <= {x.payload for x in m}, 60)
    received = [m.payload for m in messages]
    missing = acked - set(received)
    duplicates = len(received) - len(set(received))
    print(f"\nkill -9 x5: {published} published, {len(acked)} acknowledged by the gateway, {len(set(received))} "
          f"received upstream, {len(missing)} acknowledged but lost, {duplicates} duplicates")
    assert not missing
    assert gw.terminate() == 0


class Blackhole:
    """A loopback TCP proxy. ``freeze()``: every byte in either direction is swallowed and nothing is closed, on
    established and new connections alike (a NAT or firewall that silently drops state). ``thaw()`` aborts the
    frozen connections and forwards again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.thaw()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            w.transport.abort()
            self._writers.discard(w)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if self.frozen:
                continue  # swallowed: the sender sees its bytes leave, nothing ever answers
            writer.write(data)
            await writer.drain()


async def test_silent_blackhole_is_detected_by_keepalive_and_nothing_is_lost(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    sink = sink_factory(mosquitto, topic="edgegw/#")
    hole = Blackhole(mosquitto.port)
    port = await hole.start()
    settings = uplink_settings(mosquitto, pki, port=port, keepalive=1, connect_timeout=1.0,
                               tls_server_name="localhost")
    uplink = make_uplink(settings, outbox)
    submitted: list[bytes] = []

    def produce(n: int) -> None:
        for _ in range(n):
            payload = b"r:%d" % len(submitted)
            outbox.submit("bh", "devices/bh/t", payload, 1)
            submitted.append(payload)

    try:
        with structlog.testing.capture_logs() as logs:
            async with running(uplink):
                produce(200)
                await eventually(lambda: uplink.acked >= 200, 10, "the first records delivered")
                hole.freeze()
                frozen_at = time.monotonic()
                produce(300)  # sent into the hole: no PUBACK will come
                await eventually(lambda: not uplink.connected, 10, "the keepalive to notice the silent link")
                detected = time.monotonic() - frozen_at
                produce(100)  # arrives while the upstream is unreachable
                await asyncio.sleep(1.5)  # connection attempts into the hole time out
                hole.thaw()
                await eventually(lambda: uplink.connected, 10, "the reconnect after the thaw")
                produce(100)
                await eventually(lambda: outbox.depth == 0, 15, "everything acknowledged")
                messages = await sink.until(lambda m: set(submitted) <= {x.payload for x in m}, 10)
    finally:
        await hole.close()
    received = [m.payload for m in messages]
    disconnected = [e for e in logs if e["event"] == "uplink.disconnected"]
    print(f"\nblackhole: detected after {detected:.1f} s (keepalive 1 s), {len(submitted)} records, "
          f"{len(received) - len(set(received))} duplicates, {hole.connections} TCP connections, "
          f"{uplink.connect_failures} failed attempts")
    assert disconnected and disconnected[0]["reason"] == "Keep alive timeout"  # paho's words
    assert set(submitted) <= set(received)
    assert uplink.reconnects >= 1


def test_outbox_cap_reached_drop_oldest_counts_and_the_daemon_stays_up(
        fleet: Fleet, mosquitto_factory: Callable[..., Mosquitto],
        gateway_factory: Callable[..., GatewayProcess]) -> None:
    broker = mosquitto_factory()  # never started: the upstream is down for the whole test
    gw = gateway_factory(broker, overrides={"outbox": {"max_records": 300}}).start()
    devices = [LoadDevice(fleet, gw.port, f"dev-{i:02d}") for i in range(2)]
    try:
        for seq in range(500):
            for d in devices:
                d.publish("cap", seq)
        deadline = time.monotonic() + 30
        while sum(len(d.acked()) for d in devices) < 1000:
            assert time.monotonic() < deadline, "not every publish was acknowledged within 30 s"
            time.sleep(0.05)
    finally:
        for d in devices:
            d.close()
    assert gw.proc is not None and gw.proc.poll() is None, "the gateway died"
    assert gw.terminate() == 0
    closed = gw.events("outbox.closed")[-1]
    assert closed["depth"] == 300 and closed["dropped"] == 700
    full = gw.events("outbox.full")
    assert full and full[0]["policy"] == "drop-oldest" and full[0]["level"] == "warning"


def test_upstream_outage_through_the_gateway_all_delivered_live_first(
        fleet: Fleet, mosquitto_factory: Callable[..., Mosquitto], gateway_factory: Callable[..., GatewayProcess],
        sink_factory: Callable[..., Sink]) -> None:
    broker = mosquitto_factory(persistence=True).start()
    sink = sink_factory(broker, topic="cloud/#", persistent=True)
    gw = gateway_factory(broker, overrides={"uplink": {"backfill_rate": 400.0}}).start()
    gw.wait_for_event("uplink.connected")
    device = LoadDevice(fleet, gw.port, "dev-05")
    try:
        broker.stop()  # the upstream goes away; the device keeps publishing into the outbox
        for seq in range(800):
            device.publish("backlog", seq)
        wait_deadline = time.monotonic() + 20
        while len(device.acked()) < 800:
            assert time.monotonic() < wait_deadline, "the gateway did not acknowledge the backlog"
            time.sleep(0.02)
        broker.start()
        deadline = time.monotonic() + 20
        while len(gw.events("uplink.connected")) < 2:
            assert time.monotonic() < deadline, "the uplink did not reconnect"
            time.sleep(0.02)
        for seq in range(5):
            device.publish("live", seq)
        messages = sink.wait_for(lambda m: len({x.payload for x in m}) >= 805, 30)
    finally:
        device.close()
    tags = [json.loads(m.payload)["tag"] for m in messages]
    backlog_done = max(i for i, t in enumerate(tags) if t == "backlog")
    live_at = [i for i, t in enumerate(tags) if t == "live"]
    print(f"\noutage: 800 backlog records paced at 400/s; live records arrived at positions {live_at} "
          f"of {len(tags)} (backlog done at {backlog_done})")
    assert max(live_at) < backlog_done, "a live record waited for the backlog"
    backlog = [json.loads(m.payload)["seq"] for m in messages if json.loads(m.payload)["tag"] == "backlog"]
    assert sorted(set(backlog)) == list(range(800))
    first_seen = list(dict.fromkeys(backlog))  # a resent duplicate may come later: order of first arrival
    assert first_seen == sorted(first_seen), "the backlog left out of order"
    assert gw.terminate() == 0
