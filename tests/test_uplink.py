"""The uplink against a real mosquitto with mutual TLS, fed by a real outbox. No mocks."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Self

import pytest
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgegw.config import OutboxSettings, UplinkSettings
from edgegw.mqtt.forward import record_properties
from edgegw.mqtt.packets import NO_PROPERTIES
from edgegw.outbox.store import Outbox, Record
from edgegw.tlsutil import client_ssl_context
from edgegw.uplink import Uplink
from edgegw.uplink.frames import decode_frame
from edgegw.uplink.paho_bridge import _user_properties, iso_utc_ms

if TYPE_CHECKING:  # fixtures come from conftest.py; these are only annotations
    from conftest import LabPKI, Mosquitto, Received, Sink

CLIENT_ID = "edgegw-test"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    box = await Outbox.open(OutboxSettings(path=tmp_path / "outbox.db", commit_window_ms=2, synchronous="normal"))
    writer = asyncio.create_task(box.run(), name="outbox-writer")
    try:
        yield box
    finally:
        box.stop()
        await asyncio.wait_for(writer, 5)
        await box.close()


def uplink_settings(broker: Mosquitto, pki: LabPKI, **overrides: object) -> UplinkSettings:
    pair = pki.client("uplink")
    values: dict[str, object] = dict(host=broker.host, port=broker.port, ca=pki.ca, cert=pair.cert, key=pair.key,
                                     reconnect_min=0.05, reconnect_max=0.4, connect_timeout=3.0, keepalive=10)
    values.update(overrides)
    return UplinkSettings(**values)  # type: ignore[arg-type]


def make_uplink(settings: UplinkSettings, outbox: Outbox) -> Uplink:
    ctx = client_ssl_context(settings.ca, settings.cert, settings.key)
    return Uplink(settings, outbox, client_id=CLIENT_ID, ssl_context=ctx)


@asynccontextmanager
async def running(uplink: Uplink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(uplink.run(), name="uplink")
    try:
        yield task
    finally:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done, "Uplink.run() did not end within 5 s of being cancelled"
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        assert uplink.state == "down"


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def open_sockets() -> set[str]:
    """The sockets this process has open (``socket:[inode]``), to spot leaks."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def rows_in(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])
    finally:
        conn.close()


def submit(outbox: Outbox, devices: list[str], count: int, start: int = 0) -> list[Record]:
    """``count`` records round-robin over ``devices``; payload ``{device}:{seq}``."""
    out = []
    for i in range(start, start + count):
        device = devices[i % len(devices)]
        out.append(outbox.submit(device, f"devices/{device}/telemetry", f"{device}:{i}".encode(), 1))
    return out


def seqs_by_device(messages: list[Received]) -> dict[str, list[int]]:
    by: dict[str, list[int]] = {}
    for m in messages:
        device, seq = m.payload.decode().split(":")
        by.setdefault(device, []).append(int(seq))
    return by


# --- 1. the happy path, MQTT 5 ------------------------------------------------------------------------------


async def test_delivers_with_user_properties_and_empties_outbox(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox, tmp_path: Path) -> None:
    sink = sink_factory(mosquitto, topic="edgegw/#")
    n = 3000
    records = submit(outbox, ["dev-a", "dev-b", "dev-c"], n)
    nested = outbox.submit("dev-a", "devices/dev-a/x/y", b"\x00\xff binary", 1)
    foreign = outbox.submit("dev-b", "sensors/t", b"foreign", 1)
    records += [nested, foreign]
    await eventually(lambda: outbox.committed_id >= foreign.id, 5, "the outbox to commit")
    fds_before = open_sockets()

    uplink = make_uplink(uplink_settings(mosquitto, pki), outbox)
    async with running(uplink):
        started = time.perf_counter()
        await eventually(lambda: outbox.depth == 0, 10, "every record acknowledged")
        elapsed = time.perf_counter() - started
        print(f"\nuplink: {len(records)} records acknowledged in {elapsed:.3f} s = {len(records) / elapsed:,.0f}/s "
              f"(connect + TLS included), last_rtt={uplink.last_rtt}")
        messages = await sink.until(lambda m: len(m) >= len(records), 10)
        assert uplink.connected and uplink.state == "connected"

        # live traffic after the backlog: the pump is woken by the commit, not by polling
        live = outbox.submit("dev-c", "devices/dev-c/live", b"live", 1)
        await sink.until(lambda m: any(x.payload == b"live" for x in m), 5)
        await eventually(lambda: outbox.depth == 0, 5, "the live record acknowledged")

    by_payload = {m.payload: m for m in messages}
    assert len(messages) == len(records) == len(by_payload), "no duplicates on a clean run"
    for record in records:
        got = by_payload[record.payload]
        if record is nested:
            assert got.topic == "edgegw/dev-a/x/y"
        elif record is foreign:
            assert got.topic == "edgegw/dev-b/sensors/t"
        else:
            assert got.topic == f"edgegw/{record.device_id}/telemetry"
        assert got.user_properties["edgegw-record-id"] == str(record.id)
        assert got.user_properties["edgegw-device-id"] == record.device_id
        stamp = got.user_properties["edgegw-received-at"]
        assert ISO_MS.match(stamp) and stamp == iso_utc_ms(record.received_at)
    ids = [int(m.user_properties["edgegw-record-id"]) for m in messages]
    assert ids == sorted(ids), "one connection, no loss: the subscriber sees outbox order"

    assert (uplink.sent, uplink.acked, uplink.refused, uplink.reconnects) == (n + 3, n + 3, 0, 0)
    assert uplink.last_rtt is not None and 0 < uplink.last_rtt < 5
    assert live.id > foreign.id
    await eventually(lambda: rows_in(tmp_path / "outbox.db") == 0, 2, "the rows deleted from the file")
    assert open_sockets() - fds_before == set(), "the uplink's socket was not closed"
    # cancelled while connected: it said goodbye with DISCONNECT rather than dropping the connection
    await eventually(lambda: f"Client {CLIENT_ID} disconnected." in mosquitto.log(), 2, "DISCONNECT in the broker log")


# --- 2. upstream down at start ------------------------------------------------------------------------------


async def test_backlog_accumulated_while_down_is_delivered_in_order(
        mosquitto_factory: Callable[..., Mosquitto], sink_factory: Callable[..., Sink], pki: LabPKI,
        outbox: Outbox) -> None:
    broker = mosquitto_factory(persistence=True).start()
    sink_factory(broker, topic="edgegw/#", persistent=True).close()  # the cloud side's durable subscription
    broker.stop()

    uplink = make_uplink(uplink_settings(broker, pki), outbox)
    devices = ["d1", "d2", "d3"]
    with structlog.testing.capture_logs() as logs:
        async with running(uplink):
            records = submit(outbox, devices, 600)
            await eventually(lambda: uplink.connect_failures >= 3, 5, "a few failed connection attempts")
            assert uplink.state != "connected" and outbox.depth == 600 and uplink.sent == 0

            broker.start()
            sink = sink_factory(broker, topic="edgegw/#", persistent=True)
            await eventually(lambda: outbox.depth == 0, 10, "the backlog acknowledged")
            messages = await sink.until(lambda m: len(m) >= len(records), 10)
    failures = [e for e in logs if e["event"] == "uplink.connect_failed"]
    assert failures and "ConnectionRefusedError" in failures[0]["error"]
    assert any(e["event"] == "uplink.connected" for e in logs)
    assert len(messages) == len(records)
    by_device = seqs_by_device(messages)
    assert by_device == {d: sorted(s) for d, s in by_device.items()}, "out of order within a device"
    assert sum(len(s) for s in by_device.values()) == 600
    assert uplink.reconnects == 0 and uplink.acked == 600


# --- 3. broker restarted mid-stream -------------------------------------------------------------------------


async def test_broker_restart_mid_stream_loses_nothing(
        mosquitto_factory: Callable[..., Mosquitto], sink_factory: Callable[..., Sink], pki: LabPKI,
        outbox: Outbox) -> None:
    broker = mosquitto_factory(persistence=True).start()
    sink = sink_factory(broker, topic="edgegw/#", persistent=True)
    uplink = make_uplink(uplink_settings(broker, pki, inflight_window=50), outbox)
    devices = ["m1", "m2", "m3", "m4"]
    total = 3000
    submitted: list[Record] = []

    async def produce() -> None:  # ~2,000 records/s for 1.5 s
        for start in range(0, total, 20):
            submitted.extend(submit(outbox, devices, 20, start))
            await asyncio.sleep(0.01)

    with structlog.testing.capture_logs() as logs:
        async with running(uplink):
            producer = asyncio.create_task(produce())
            await eventually(lambda: uplink.acked >= 500, 5, "the stream to flow")
            await asyncio.to_thread(broker.stop)
            acked_at_stop = uplink.acked
            await asyncio.sleep(0.4)
            assert not uplink.connected
            await asyncio.to_thread(broker.start)
            await asyncio.wait_for(producer, 10)
            await eventually(lambda: outbox.depth == 0, 10, "every record acknowledged after the restart")
            messages = await sink.until(lambda m: len({x.payload for x in m}) >= total, 10)
    assert acked_at_stop < total, "the broker was stopped after the stream ended: the test proved nothing"
    payloads = [m.payload for m in messages]
    assert set(payloads) == {r.payload for r in submitted}, "records lost"
    duplicates = len(payloads) - len(set(payloads))
    print(f"\nrestart: {total} records, {duplicates} duplicates at the subscriber, sent={uplink.sent}, "
          f"acked={uplink.acked}, reconnects={uplink.reconnects}")
    assert uplink.reconnects >= 1
    assert any(e["event"] == "uplink.disconnected" for e in logs)


# --- 4. MQTT 3.1.1 ------------------------------------------------------------------------------------------


async def test_mqtt_311_and_tls_server_name(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    sink = sink_factory(mosquitto, topic="up/#")
    # connect to 127.0.0.1 but check the certificate for "localhost" (a SAN of the broker cert)
    settings = uplink_settings(mosquitto, pki, protocol="3.1.1", topic_prefix="up", tls_server_name="localhost")
    uplink = make_uplink(settings, outbox)
    records = submit(outbox, ["e1", "e2"], 200)
    async with running(uplink):
        await eventually(lambda: outbox.depth == 0, 10, "every record acknowledged")
        messages = await sink.until(lambda m: len(m) >= len(records), 10)
    assert sorted(m.payload for m in messages) == sorted(r.payload for r in records)
    assert {m.topic for m in messages} == {"up/e1/telemetry", "up/e2/telemetry"}
    assert all(m.user_properties == {} for m in messages), "MQTT 3.1.1 carries no properties"
    assert uplink.acked == 200


# --- 5. wrong client certificate ----------------------------------------------------------------------------


async def test_certificate_from_another_ca_never_connects(
        mosquitto: Mosquitto, pki: LabPKI, outbox: Outbox) -> None:
    settings = uplink_settings(mosquitto, pki, cert=pki.rogue_uplink.cert, key=pki.rogue_uplink.key)
    uplink = make_uplink(settings, outbox)
    records = submit(outbox, ["r1"], 50)
    fds_before = open_sockets()
    with structlog.testing.capture_logs() as logs:
        async with running(uplink):
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                assert not uplink.connected
                await asyncio.sleep(0.02)
            assert uplink.connect_failures >= 2
    failures = [e for e in logs if e["event"] == "uplink.connect_failed"]
    assert failures and all(e["log_level"] == "warning" for e in failures)
    assert any(re.search(r"ssl|certificate|alert", e["error"], re.I) for e in failures), failures[0]["error"]
    assert not any(e["event"] == "uplink.connected" for e in logs)
    assert outbox.depth == len(records) and uplink.sent == 0
    assert [r.id for r in await outbox.fetch_after(0, 100)] == [r.id for r in records]
    await eventually(lambda: not open_sockets() - fds_before, 2, "the sockets of failed attempts closed")


async def test_refused_connack_is_a_failed_attempt(
        mosquitto_factory: Callable[..., Mosquitto], pki: LabPKI, outbox: Outbox) -> None:
    broker = mosquitto_factory(extra="clientid_prefixes gw-").start()  # our client id does not qualify
    uplink = make_uplink(uplink_settings(broker, pki), outbox)
    submit(outbox, ["c1"], 5)
    with structlog.testing.capture_logs() as logs:
        async with running(uplink):
            await eventually(lambda: uplink.connect_failures >= 2, 5, "two refused attempts")
            assert not uplink.connected
    failures = [e for e in logs if e["event"] == "uplink.connect_failed"]
    assert failures[0]["error"] == "CONNACK refused: Not authorized (0x87)"
    assert outbox.depth == 5 and uplink.sent == 0


# --- a handshake that never completes: bounded by connect_timeout, and cancellable ---------------------------


async def test_hanging_handshake_times_out_and_cancel_does_not_wait_for_it(pki: LabPKI, outbox: Outbox) -> None:
    silent = socket.socket()  # accepts TCP (kernel backlog) but never answers the TLS ClientHello
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    pair = pki.client("uplink")

    def settings(connect_timeout: float) -> UplinkSettings:
        return UplinkSettings(host="127.0.0.1", port=silent.getsockname()[1], ca=pki.ca, cert=pair.cert,
                              key=pair.key, connect_timeout=connect_timeout, reconnect_min=0.05, reconnect_max=0.1)

    try:
        sockets_before = open_sockets()
        quick = make_uplink(settings(0.3), outbox)
        with structlog.testing.capture_logs() as logs:
            async with running(quick):
                await eventually(lambda: quick.connect_failures >= 1, 3, "the attempt to time out")
        failure = next(e for e in logs if e["event"] == "uplink.connect_failed")
        assert "timed out" in failure["error"]

        slow = make_uplink(settings(5.0), outbox)
        task = asyncio.create_task(slow.run())
        await eventually(lambda: len(open_sockets() - sockets_before) >= 1, 2, "the connect thread's socket")
        await asyncio.sleep(0.05)  # inside the blocking handshake, in the executor thread
        cancelled_at = time.monotonic()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
        assert done and time.monotonic() - cancelled_at < 1.0, "cancel waited for the connect thread"
        assert slow.state == "down"
    finally:
        silent.close()  # resets the queued connections: the abandoned handshake fails now rather than in 5 s
    await eventually(lambda: not open_sockets() - sockets_before, 3, "the abandoned socket closed by its thread")


# --- refused by the broker: quarantine, never retried ---------------------------------------------------------


async def test_publish_refused_by_acl_is_quarantined(
        mosquitto_factory: Callable[..., Mosquitto], sink_factory: Callable[..., Sink], pki: LabPKI,
        outbox: Outbox) -> None:
    acl = "user uplink\ntopic write edgegw/ok/#\n\nuser sink\ntopic read edgegw/#\n"
    broker = mosquitto_factory(acl=acl).start()
    sink = sink_factory(broker, topic="edgegw/#")
    uplink = make_uplink(uplink_settings(broker, pki), outbox)
    good = submit(outbox, ["ok"], 20)
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    bad = outbox.submit("nope", "devices/nope/telemetry", b"denied", 1,
                        properties=record_properties(NO_PROPERTIES, tp))
    good += submit(outbox, ["ok"], 20, start=20)
    with structlog.testing.capture_logs() as logs:
        async with running(uplink):
            await eventually(lambda: outbox.depth == 0, 10, "every record settled")
            messages = await sink.until(lambda m: len(m) >= len(good), 5)
            await asyncio.sleep(0.2)
    assert sorted(m.payload for m in messages) == sorted(r.payload for r in good)
    assert (uplink.acked, uplink.refused, uplink.sent) == (len(good), 1, len(good) + 1)
    assert await outbox.count_quarantined() == 1
    refused = [e for e in logs if e["event"] == "uplink.publish_refused"]
    assert len(refused) == 1 and refused[0]["record_id"] == bad.id and "0x87" in refused[0]["reason"]
    assert refused[0]["trace_id"] == tp[3:35]  # the quarantined record's trace


async def test_unsendable_records_are_quarantined_without_dropping_the_connection(
        mosquitto_factory: Callable[..., Mosquitto], sink_factory: Callable[..., Sink], pki: LabPKI,
        outbox: Outbox) -> None:
    broker = mosquitto_factory(extra="max_packet_size 2000").start()  # announced in CONNACK to MQTT 5 clients
    sink = sink_factory(broker, topic="edgegw/#")
    uplink = make_uplink(uplink_settings(broker, pki), outbox)
    good = submit(outbox, ["s1"], 10)
    too_big = outbox.submit("s1", "devices/s1/blob", b"x" * 5000, 1)
    wildcard = outbox.submit("s1", "devices/s1/a+b", b"w", 1)
    good += submit(outbox, ["s1"], 10, start=10)
    with structlog.testing.capture_logs() as logs:
        async with running(uplink):
            await eventually(lambda: outbox.depth == 0, 10, "every record settled")
            messages = await sink.until(lambda m: len(m) >= len(good), 5)
    assert sorted(m.payload for m in messages) == sorted(r.payload for r in good)
    reasons = {e["record_id"]: e["reason"] for e in logs if e["event"] == "uplink.publish_refused"}
    assert set(reasons) == {too_big.id, wildcard.id}
    assert "Maximum Packet Size 2000" in reasons[too_big.id] and "wildcard" in reasons[wildcard.id]
    assert await outbox.count_quarantined() == 2
    assert uplink.reconnects == 0 and not any(e["event"] == "uplink.disconnected" for e in logs)


class ThrottlingServer:
    """A scripted MQTT 5 server over mutual TLS that answers the first ``refuse`` PUBLISHes with PUBACK 0x97 (Quota
    exceeded, as AWS IoT does when it throttles) and the rest with 0x00; mosquitto cannot answer 0x97. Keeps every
    PUBLISH: (arrival time, payloads it carried, the reason code it got). ``late``: PUBLISH number -> seconds its
    PUBACK is held back (the time it went out in ``answered``)."""

    def __init__(self, pki: LabPKI, refuse: int, late: dict[int, float] | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
        self.ctx.load_verify_locations(cafile=str(pki.ca))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.refuse = refuse
        self.publishes: list[tuple[float, list[bytes], int]] = []
        self.late = late or {}
        self.answered: dict[int, float] = {}
        self.connections = 0
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self.host, 0, ssl=self.ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self._writers:
            w.transport.abort()
        assert self._server is not None
        self._server.close()

    def accepted(self) -> list[bytes]:
        return [p for _, payloads, code in self.publishes if code == 0 for p in payloads]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.connections += 1
        try:
            while True:
                first = (await reader.readexactly(1))[0]
                length = shift = 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                kind = first >> 4
                if kind == 1:  # CONNECT
                    writer.write(b"\x20\x03\x00\x00\x00")  # CONNACK, accepted, no properties
                elif kind == 3:  # PUBLISH, QoS 1
                    n = int.from_bytes(body[:2], "big")
                    topic = body[2:2 + n].decode()
                    mid = body[2 + n:4 + n]
                    pos, props, shift = 4 + n, 0, 0
                    while True:
                        byte = body[pos]
                        pos += 1
                        props |= (byte & 0x7F) << shift
                        shift += 7
                        if not byte & 0x80:
                            break
                    payload = bytes(body[pos + props:])
                    payloads = ([r["payload"] for r in decode_frame(payload)] if topic.endswith("/_batch")
                                else [payload])
                    index = len(self.publishes)
                    code = 0x97 if index < self.refuse else 0x00
                    self.publishes.append((time.monotonic(), payloads, code))
                    puback = b"\x40\x03" + mid + bytes((code,))
                    if index in self.late:
                        asyncio.get_running_loop().call_later(self.late[index], self._answer, writer, puback, index)
                    else:
                        self._answer(writer, puback, index)
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def _answer(self, writer: asyncio.StreamWriter, puback: bytes, index: int) -> None:
        if not writer.is_closing():
            writer.write(puback)
            self.answered[index] = time.monotonic()


@pytest.mark.parametrize("client,batch,window,refuse", [("native", 1, 10, 20), ("paho", 1, 10, 20),
                                                        ("native", 5, 1, 2)])
async def test_puback_quota_exceeded_backs_off_and_resends_nothing_quarantined(
        client: str, batch: int, window: int, refuse: int, pki: LabPKI, outbox: Outbox) -> None:
    """PUBACK 0x97 (Quota exceeded) is a throttle, not a verdict on the record: the records of that PUBLISH stay in
    the outbox and go again, in order, after a backoff on the same connection (1 s, then 2 s for a second one in a
    row), counted and logged once per backoff. Before, they were quarantined like any reason >= 0x80. The first
    ``refuse`` PUBLISHes (two windows' worth: two backoffs in a row) are refused; records committed during the
    backoff must not overtake the refused ones of their device."""
    devices = ["q1", "q2", "q3"]
    backlog = submit(outbox, devices, 30)
    await eventually(lambda: outbox.committed_id >= backlog[-1].id, 5, "committed")
    async with ThrottlingServer(pki, refuse) as server:
        settings = uplink_settings(server, pki, client=client, inflight_window=window, batch_max_records=batch)  # type: ignore[arg-type]
        uplink = make_uplink(settings, outbox)
        with structlog.testing.capture_logs() as logs:
            async with running(uplink):
                await eventually(lambda: any(code for _, _, code in server.publishes), 10, "a PUBACK 0x97")
                live = submit(outbox, devices, 15, start=30)  # while backing off
                await eventually(lambda: outbox.depth == 0, 20, "every record acknowledged")
                await asyncio.sleep(0.1)
    records = backlog + live
    assert await outbox.count_quarantined() == 0 and outbox.quarantined == 0 and uplink.refused == 0
    accepted = server.accepted()
    assert sorted(accepted) == sorted(r.payload for r in records), "a record lost or sent twice after acceptance"
    refused = [p for _, payloads, code in server.publishes if code == 0x97 for p in payloads]
    assert refused and set(refused) <= set(accepted), "the refused records were not sent again"
    assert uplink.throttled == refuse and uplink.acked == len(accepted)
    by_device: dict[str, list[int]] = {}
    for p in accepted:
        device, seq = p.decode().split(":")
        by_device.setdefault(device, []).append(int(seq))
    assert by_device == {d: sorted(s) for d, s in by_device.items()}, "out of order within a device"
    # the backoff: nothing for 1 s after the first refusal, then 2 s after the second round's
    times = [t for t, _, _ in server.publishes]
    resumed = times[window]  # the first round was one window of PUBLISHes
    assert resumed - times[0] >= 0.95, f"sent again {resumed - times[0]:.2f} s after the first 0x97"
    assert times[refuse] - resumed >= 1.95, f"second backoff {times[refuse] - resumed:.2f} s"
    warnings = [e for e in logs if e["event"] == "uplink.throttled"]
    assert len(warnings) == 2 and [w["backoff"] for w in warnings] == [1.0, 2.0], warnings
    assert all(w["log_level"] == "warning" for w in warnings)
    assert not any(e["event"] == "uplink.publish_refused" for e in logs)
    assert uplink.reconnects == 0 and server.connections == 1


@pytest.mark.parametrize("client", ["native", "paho"])
async def test_a_puback_quota_exceeded_after_the_backoff_ended_starts_a_new_one(
        client: str, pki: LabPKI, outbox: Outbox) -> None:
    """Two PUBLISHes in flight, both refused 0x97: the first at once (a 1 s backoff), the second 1.5 s later, once
    that backoff is over but while the pump still waits for it (nothing goes again while a PUBLISH is in flight).
    That second 0x97 is the upstream still throttling: it starts a second backoff (2 s, a backoff in a row). Before,
    it was taken for one of the first backoff (``throttled_until`` was still set, in the past) and ignored: the
    lanes went again at once into the throttling upstream."""
    backlog = submit(outbox, ["q1", "q2"], 10)
    await eventually(lambda: outbox.committed_id >= backlog[-1].id, 5, "committed")
    async with ThrottlingServer(pki, refuse=2, late={1: 1.5}) as server:
        settings = uplink_settings(server, pki, client=client, inflight_window=2)  # type: ignore[arg-type]
        uplink = make_uplink(settings, outbox)
        with structlog.testing.capture_logs() as logs:
            async with running(uplink):
                await eventually(lambda: outbox.depth == 0, 20, "every record acknowledged")
    assert await outbox.count_quarantined() == 0 and uplink.throttled == 2
    assert sorted(server.accepted()) == sorted(r.payload for r in backlog), "a record lost or sent twice"
    times = [t for t, _, _ in server.publishes]
    assert server.answered[1] - times[0] >= 1.45  # the second 0x97 came after the first backoff ended
    resumed = times[2]
    assert resumed - server.answered[1] >= 1.95, (
        f"sent again {resumed - server.answered[1]:.2f} s after a 0x97 that came after the backoff")
    warnings = [e for e in logs if e["event"] == "uplink.throttled"]
    assert [w["backoff"] for w in warnings] == [1.0, 2.0], warnings
    assert uplink.reconnects == 0 and server.connections == 1


@pytest.mark.parametrize("live_first", [True, False])
async def test_a_page_of_undecodable_rows_does_not_hide_the_good_rows_behind_it(
        live_first: bool, mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI,
        tmp_path: Path) -> None:
    """More damaged rows in a row than one outbox read takes (a bad stretch of the file): each read quarantines
    them and returns nothing, which must not read as "nothing left": the good rows behind them go up on this
    connection, not at the next reconnect (or never, on a connection that lasts)."""
    path = tmp_path / "damaged.db"
    box = await Outbox.open(OutboxSettings(path=path, synchronous="normal"))
    writer = asyncio.create_task(box.run())
    good = submit(box, ["u1"], 20)
    box.stop()
    await writer
    await box.close()
    first = good[0].id
    with sqlite3.connect(path) as db:  # 600 rows before the good ones with bad UTF-8 in the topic
        db.executemany("INSERT INTO records (id, device_id, topic, payload, qos, received_at) "
                       "VALUES (?, 'u1', CAST(x'ff00fe' AS TEXT), x'00', 1, ?)",
                       [(first - 1000 + i, time.time()) for i in range(600)])
    sink = sink_factory(mosquitto, topic="edgegw/#")
    box = await Outbox.open(OutboxSettings(path=path, synchronous="normal"))
    writer = asyncio.create_task(box.run())
    try:
        uplink = make_uplink(uplink_settings(mosquitto, pki, inflight_window=10, live_first=live_first), box)
        async with running(uplink):
            messages = await sink.until(lambda m: len(m) >= len(good), 10)
            await eventually(lambda: box.depth == 0, 5, "every row acknowledged or quarantined")
            assert uplink.reconnects == 0
        assert sorted(m.payload for m in messages) == sorted(r.payload for r in good)
        assert await box.count_quarantined() == 600
    finally:
        box.stop()
        await writer
        await box.close()


# --- small pure parts ------------------------------------------------------------------------------------------


def test_user_properties_decode_with_paho() -> None:
    record = Record(4711, "dév-1", "devices/dév-1/t", b"", 1, 1_700_000_000.1234)
    packed = _user_properties(record).pack()
    props = Properties(PacketTypes.PUBLISH)
    props.unpack(packed)
    assert props.UserProperty == [("edgegw-record-id", "4711"), ("edgegw-device-id", "dév-1"),
                                  ("edgegw-received-at", "2023-11-14T22:13:20.123Z")]
    assert iso_utc_ms(0.0) == "1970-01-01T00:00:00.000Z"
