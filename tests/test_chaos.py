"""Chaos, each case bounded in time: kill -9 of the gateway under load, a silent blackhole upstream, the outbox
cap reached, and the upstream down for 30 s while devices keep publishing.

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
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
import structlog
from conftest import free_port, wait_until
from ops_peers import metrics, sample
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from test_uplink import eventually, make_uplink, outbox, running, uplink_settings  # noqa: F401 - fixture

from edgegw.outbox.store import Outbox

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

    def publish(self, tag: str, seq: int, pad: str = "") -> None:
        fields: dict[str, object] = {"device": self.device_id, "tag": tag, "seq": seq}
        if pad:
            fields["pad"] = pad
        payload = json.dumps(fields).encode()
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


OUTAGE_SECONDS = 30.0
BACKFILL_RATE = 400.0  # ~1,350 records drain in ~3.4 s: the 1 s of live records after the restart overtake them
OUTAGE_RATE = 15  # publishes per second per device, through the outage and after it: a modest, steady fleet
PAD = "p" * 1500  # ~1.5 kB records, so the outage leaves a file big enough to show the space coming back


def test_upstream_outage_through_the_gateway_all_delivered_live_first(
        fleet: Fleet, mosquitto_factory: Callable[..., Mosquitto], gateway_factory: Callable[..., GatewayProcess],
        sink_factory: Callable[..., Sink]) -> None:
    """The upstream is down for a real 30 s while three devices keep publishing; after the restart the devices go
    on publishing: their new records must overtake the paced backlog (live-first), every acknowledged record must
    arrive, the drain's ETA must be visible on /metrics during the drain, and the file must shrink afterwards."""
    broker = mosquitto_factory(persistence=True).start()
    sink = sink_factory(broker, topic="cloud/#", persistent=True)
    admin = free_port()
    overrides = {"uplink": {"backfill_rate": BACKFILL_RATE}, "admin": {"port": admin}}
    gw = gateway_factory(broker, overrides=overrides).start()
    gw.wait_for_event("uplink.connected")
    devices = [LoadDevice(fleet, gw.port, f"dev-{i:02d}") for i in range(3)]
    seq = 0

    def publish_for(seconds: float, tag: str) -> None:
        nonlocal seq
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for d in devices:
                d.publish(tag, seq, PAD)
            seq += 1
            time.sleep(1 / OUTAGE_RATE)

    db = gw.folder / "outbox.db"
    idle_bytes = file_bytes(db)
    try:
        broker.stop()  # the upstream goes away; the devices keep publishing into the outbox
        stopped_at = time.monotonic()
        publish_for(OUTAGE_SECONDS, "outage")
        outage_records = seq * len(devices)
        wait_until(lambda: sum(len(d.acked()) for d in devices) == outage_records, 20,
                   what="the gateway to acknowledge the outage's records")
        held_bytes = file_bytes(db)
        broker.start()
        outage = time.monotonic() - stopped_at
        wait_until(lambda: len(gw.events("uplink.connected")) >= 2, 20, what="the uplink to reconnect")
        samples = metrics(admin)  # the drain has just begun: paced at 400/s it lasts over 3 s
        eta = sample(samples, "edgegw_outbox_drain_eta_seconds")
        backlog_gauge = sample(samples, "edgegw_uplink_backlog_records")
        publish_for(1.0, "live")
        wait_until(lambda: sum(len(d.acked()) for d in devices) == seq * len(devices), 20,
                   what="the live records to be acknowledged")
        acked = set().union(*(d.acked() for d in devices))
        messages = sink.wait_for(lambda m: acked <= {x.payload for x in m}, 30)
    finally:
        for d in devices:
            d.close()
    wait_until(lambda: file_bytes(db) < held_bytes / 4, 15, what="the drained file to shrink")
    drained_bytes = file_bytes(db)
    rows = [json.loads(m.payload) for m in messages]
    tags = [r["tag"] for r in rows]
    backlog_done = max(i for i, t in enumerate(tags) if t == "outage")
    live_at = [i for i, t in enumerate(tags) if t == "live"]
    print(f"\noutage {outage:.1f} s: {outage_records} records held ({held_bytes:,} B on disk), backlog paced at "
          f"{BACKFILL_RATE:.0f}/s (ETA {eta:.1f} s, {backlog_gauge:.0f} records at the reconnect); {len(live_at)} live "
          f"records at "
          f"positions {live_at[0]}..{live_at[-1]} of {len(tags)}, backlog done at {backlog_done}; file idle "
          f"{idle_bytes:,} B, after the drain {drained_bytes:,} B; {len(tags) - len({m.payload for m in messages})} "
          "duplicates")
    assert outage >= OUTAGE_SECONDS, "the outage was shorter than the test claims"
    assert outage_records > 1000, "too few records held for the backlog to matter"
    assert not acked - {m.payload for m in messages}, "acknowledged records lost"
    assert backlog_gauge > 0, "the backlog is not exposed"
    # The ETA may be pessimistic (the rate seen so far) but never faster than the configured pace.
    assert eta >= backlog_gauge / BACKFILL_RATE - 0.05, \
        f"ETA {eta:.2f} s for {backlog_gauge:.0f} records at {BACKFILL_RATE:.0f}/s"
    assert live_at and max(live_at) < backlog_done, "a live record waited for the backlog"
    for d in devices:  # in order per device (order of first arrival: a resent duplicate may come later)
        mine = [r["seq"] for r in rows if r["device"] == d.device_id and r["tag"] == "outage"]
        first_seen = list(dict.fromkeys(mine))
        assert first_seen == sorted(first_seen), f"{d.device_id}'s backlog left out of order"
    assert gw.terminate() == 0


def file_bytes(db: Path) -> int:
    """The outbox's bytes on disk, its WAL included."""
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
