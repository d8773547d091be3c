"""Issue #4, the gaps the audit found (docs/OUTBOX.md "What the tests prove"): records/s and bytes/s pace against a
real broker, an honest drain ETA, batch frames within batch_max_bytes, a record kept until its PUBACK and resent
with the same id, and a flapping upstream opening its circuit. Real mosquitto with mutual TLS, real outbox."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
from test_uplink import (  # noqa: F401 - fixture
    eventually,
    make_uplink,
    outbox,
    running,
    submit,
    uplink_settings,
)

from edgegw.outbox.store import Outbox, Record
from edgegw.uplink.frames import decode_frame

if TYPE_CHECKING:
    from conftest import LabPKI, Mosquitto, Sink


class Proxy:
    """A loopback TCP proxy to a broker. ``swallow_acks``: bytes from the broker are dropped (the broker still gets
    and delivers every PUBLISH; its PUBACKs and PINGRESPs never arrive). ``flap_after``: each connection is aborted
    that many seconds after it opened (a broker that accepts, answers CONNACK, then drops)."""

    def __init__(self, target_port: int, *, flap_after: float | None = None) -> None:
        self.target_port = target_port
        self.flap_after = flap_after
        self.swallow_acks = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        """Abort every connection and forward both ways again."""
        self.swallow_acks = False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
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
        if self.flap_after is not None:
            loop = asyncio.get_running_loop()
            for w in (writer, up_writer):
                loop.call_later(self.flap_after, w.transport.abort)
        await asyncio.gather(self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True),
                             return_exceptions=True)
        for w in (writer, up_writer):
            w.transport.abort()
            self._writers.discard(w)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, from_broker: bool) -> None:
        while data := await reader.read(65536):
            if from_broker and self.swallow_acks:
                continue
            writer.write(data)
            await writer.drain()


# --- item 4: pace by records/s and bytes/s, and the ETA -------------------------------------------------------


async def test_backfill_records_and_bytes_pace_against_a_real_broker(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    """Lower bounds only (load can only slow things down): N records at R/s with one second of burst take at least
    (N - R) / R seconds; likewise for bytes."""
    sink = sink_factory(mosquitto, topic="edgegw/#")
    timings: dict[str, float] = {}
    # (name, pace, records, devices, payload bytes, lower bound): a bucket may go one record negative, hence -1
    cases = (("records", {"backfill_rate": 200.0}, 500, 2, 20, (500 - 200 - 1) / 200),
             ("bytes", {"backfill_bytes_rate": 40_000.0}, 200, 2, 400, (200 - 100 - 1) * 400 / 40_000),
             ("device-bytes", {"backfill_device_bytes_rate": 20_000.0}, 100, 1, 400, (100 - 50 - 1) * 400 / 20_000))
    for name, pace, count, devices, size, at_least in cases:
        before = len(sink.snapshot())
        records = [outbox.submit(f"{name}-{i % devices}", "devices/x/t", (b"%s:%05d:" % (name.encode(), i)).ljust(size,
                                 b"x"), 1) for i in range(count)]
        last = records[-1].id
        await eventually(lambda: outbox.committed_id >= last, 5, "the backlog committed")  # noqa: B023
        uplink = make_uplink(uplink_settings(mosquitto, pki, **pace), outbox)
        started = time.monotonic()
        async with running(uplink):
            await eventually(lambda: outbox.depth == 0, 20, f"the {name}-paced backlog drained")
            timings[name] = time.monotonic() - started
        expected = before + count
        messages = (await sink.until(lambda m: len(m) >= expected, 10))[before:]  # noqa: B023
        assert {m.payload for m in messages} == {r.payload for r in records}
        assert timings[name] >= at_least, f"the {name} pace was not applied: {timings[name]:.2f} s < {at_least} s"
    print(f"\npace: 500 records at 200/s in {timings['records']:.2f} s; 200 x 400 B at 40 kB/s in "
          f"{timings['bytes']:.2f} s; one device's 100 x 400 B at 20 kB/s per device in "
          f"{timings['device-bytes']:.2f} s")


def test_drain_eta_is_never_faster_than_the_configured_pace() -> None:
    """The burst of the first second once made the ETA 0.3 s for a 5 s drain (seen rate >> pace)."""
    from edgegw.config import UplinkSettings
    from edgegw.uplink._backfill import Backfill

    class Depth:
        depth = 1000

    settings = UplinkSettings(host="h", ca="ca", cert="c", key="k", backfill_rate=100.0)  # type: ignore[arg-type]
    lane = Backfill(Depth(), settings, boundary=1000, fetch_size=64, backlog=1000)  # type: ignore[arg-type]
    assert lane.eta() == 10.0  # nothing acknowledged yet: the configured pace
    lane.started -= 0.1
    lane.acked = 100  # the burst: 1,000/s seen
    assert lane.eta() == 9.0  # 900 left at 100/s, not 0.9 s
    unpaced = Backfill(Depth(), UplinkSettings(host="h", ca="ca", cert="c", key="k"),  # type: ignore[arg-type]
                       boundary=1000, fetch_size=64, backlog=1000)
    assert unpaced.eta() is None  # no pace and nothing seen: unknown
    unpaced.started -= 1.0
    unpaced.acked = 500
    assert unpaced.eta() is not None and 0.9 < unpaced.eta() < 1.1  # type: ignore[operator]


# --- item 5: frames stay within batch_max_bytes ---------------------------------------------------------------


async def test_frames_stay_within_batch_max_bytes_and_carry_every_id(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    sink = sink_factory(mosquitto, topic="edgegw/#")
    records = [outbox.submit(f"fb-{i % 3}", "devices/x/t", b"%05d" % i + b"y" * 200, 1) for i in range(400)]
    limit = 2048
    uplink = make_uplink(uplink_settings(mosquitto, pki, batch_max_records=100, batch_max_bytes=limit), outbox)
    async with running(uplink):
        await eventually(lambda: outbox.depth == 0, 15, "every frame acknowledged")
        messages = await sink.until(lambda m: sum(int(x.user_properties["edgegw-records"]) for x in m) >= 400, 10)
    sizes = [len(m.payload) for m in messages]
    got = [r for m in messages for r in decode_frame(m.payload)]
    print(f"\nframes within {limit} B: {len(messages)} frames, {min(sizes)}..{max(sizes)} B, "
          f"{len(got) / len(messages):.1f} records each")
    assert max(sizes) <= limit, "a frame exceeded batch_max_bytes"
    assert len(messages) < 400 / 4, "frames were not filled"  # ~9 records of ~260 B fit in 2 kB
    assert sorted(r["id"] for r in got) == [r.id for r in records]


# --- item 6: deleted only after the PUBACK; resent with the same id --------------------------------------------


async def test_record_without_puback_stays_and_is_resent_with_the_same_id(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    sink = sink_factory(mosquitto, topic="edgegw/#")
    proxy = Proxy(mosquitto.port)
    port = await proxy.start()
    uplink = make_uplink(uplink_settings(mosquitto, pki, port=port, keepalive=1, tls_server_name="localhost"),
                         outbox)
    try:
        async with running(uplink):
            await eventually(lambda: uplink.connected, 10, "the uplink to connect")
            proxy.swallow_acks = True  # the broker gets and delivers the records; no PUBACK comes back
            records: list[Record] = submit(outbox, ["al-1", "al-2"], 200)
            # delivered upstream up to the broker's Receive Maximum (mosquitto: 20), then the window is full ...
            first = await sink.until(lambda m: len(m) >= 20, 10)
            await asyncio.sleep(0.3)
            assert outbox.depth == 200, "a record was deleted before its PUBACK"  # ... and every record still held
            await eventually(lambda: not uplink.connected, 10, "the keepalive to give up on the silent link")
            proxy.cut()
            await eventually(lambda: outbox.depth == 0, 15, "the records acknowledged after the reconnect")
            messages = await sink.until(lambda m: {r.payload for r in records} <= {x.payload for x in m}, 10)
    finally:
        await proxy.close()
    by_payload = {r.payload: r.id for r in records}
    for m in messages:
        assert m.user_properties["edgegw-record-id"] == str(by_payload[m.payload]), "an id changed on resend"
    payloads = [m.payload for m in messages]
    resent = [m.payload for m in first if payloads.count(m.payload) >= 2]
    print(f"\nPUBACKs swallowed: {len(first)} records delivered without a PUBACK, all held; {len(resent)} of them "
          f"sent again with the same id after the reconnect")
    assert len(resent) == len(first), "a record whose PUBACK was lost was not sent again"
    assert uplink.reconnects >= 1


# --- item 7: round-robin against real brokers; a flapping upstream opens its circuit ------------------------


async def test_round_robin_takes_the_next_broker_at_each_connection_and_loses_nothing(
        mosquitto_factory: Callable[..., Mosquitto], sink_factory: Callable[..., Sink], pki: LabPKI,
        outbox: Outbox) -> None:
    brokers = [mosquitto_factory().start(), mosquitto_factory().start()]
    sinks = [sink_factory(b, topic="edgegw/#", client_id=f"sink-{i}") for i, b in enumerate(brokers)]
    names = [f"127.0.0.1:{b.port}" for b in brokers]
    settings = uplink_settings(brokers[0], pki, endpoints=(names[1],), endpoint_policy="round-robin",
                               breaker_failures=10)  # the test's own quick reconnects must not open a circuit
    uplink = make_uplink(settings, outbox)
    used: list[str] = []
    phases: list[list[Record]] = []
    async with running(uplink):
        for phase in range(4):
            await eventually(lambda: uplink.connected, 10, "the (re)connection")
            used.append(uplink.endpoint or "")
            phases.append(submit(outbox, [f"rr-{phase}"], 50))
            await eventually(lambda: outbox.depth == 0, 10, f"phase {phase} delivered")
            assert uplink._link is not None
            uplink._link.set_lost("test: connection dropped")
            await eventually(lambda: uplink.reconnects > phase, 10, "the reconnect")  # noqa: B023
    assert used == [names[0], names[1], names[0], names[1]]
    for phase, records in enumerate(phases):
        # the records of each connection reached the broker it was connected to (until() raises otherwise)
        wanted = {r.payload for r in records}
        await sinks[phase % 2].until(lambda m: wanted <= {x.payload for x in m}, 10)  # noqa: B023


async def test_flapping_endpoint_opens_its_circuit_and_is_not_hammered(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    """The first endpoint accepts, answers CONNACK and drops 1 s later, every time; the second is healthy."""
    sink = sink_factory(mosquitto, topic="edgegw/#")
    flapper = Proxy(mosquitto.port, flap_after=1.0)
    port = await flapper.start()
    settings = uplink_settings(mosquitto, pki, port=port, tls_server_name="localhost",
                               endpoints=(f"127.0.0.1:{mosquitto.port}",), breaker_failures=2, breaker_cooldown=60.0)
    uplink = make_uplink(settings, outbox)
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(uplink):
                await eventually(lambda: uplink.endpoint == f"127.0.0.1:{mosquitto.port}", 15,
                                 "the move to the healthy endpoint")
                records = submit(outbox, ["fl-1"], 300)
                await eventually(lambda: outbox.depth == 0, 15, "delivery through the healthy endpoint")
                await asyncio.sleep(1.0)  # time for more attempts on the flapper, were the circuit not open
                messages = await sink.until(lambda m: len(m) >= 300, 10)
    finally:
        await flapper.close()
    connected = [e for e in logs if e["event"] == "uplink.connected"]
    opened = [e for e in logs if e["event"] == "uplink.circuit_open"]
    print(f"\nflapping endpoint: {flapper.connections} connections to it, {len(connected)} connections in all")
    assert any(e.get("port") == port for e in connected), "the flapper never got as far as CONNACK"
    assert len(opened) == 1 and opened[0]["port"] == port
    assert flapper.connections == 2, "the flapping endpoint was tried again with its circuit open"
    assert {r.payload for r in records} <= {m.payload for m in messages}
