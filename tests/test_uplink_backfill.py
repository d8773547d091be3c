"""Live-first, paced backfill and priorities, against a real mosquitto with mutual TLS and a real outbox."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from edgegw.outbox.store import Outbox
from test_uplink import eventually, make_uplink, outbox, running, uplink_settings  # noqa: F401 - fixture

if TYPE_CHECKING:
    from conftest import LabPKI, Mosquitto, Sink


def index_of(messages: list, payload: bytes) -> int:
    return next(i for i, m in enumerate(messages) if m.payload == payload)


async def test_live_records_overtake_a_paced_backlog_and_eta_is_exposed(
        mosquitto_factory: Callable[..., Mosquitto], sink_factory: Callable[..., Sink], pki: LabPKI,
        outbox: Outbox) -> None:
    broker = mosquitto_factory()
    backlog = [outbox.submit(f"old-{i % 4}", f"devices/old-{i % 4}/t", b"b:%d" % i, 1) for i in range(1500)]
    await eventually(lambda: outbox.committed_id >= backlog[-1].id, 5, "the backlog committed")
    broker.start()
    sink = sink_factory(broker, topic="edgegw/#")
    uplink = make_uplink(uplink_settings(broker, pki, backfill_rate=1000.0), outbox)
    etas: list[float | None] = []
    async with running(uplink):
        assert uplink.backfill_eta is None  # not connected yet
        await eventually(lambda: uplink.connected, 5, "the uplink to connect")
        live = [outbox.submit("new", "devices/new/t", b"live:%d" % i, 1) for i in range(5)]
        await eventually(lambda: uplink.acked >= 200, 10, "the backlog to start draining")
        etas.append(uplink.backfill_eta)
        assert 0 < uplink.backlog < 1500
        messages = await sink.until(lambda m: len(m) >= 1505, 20)
        await eventually(lambda: outbox.depth == 0, 5, "all acknowledged")
        assert uplink.backfill_eta == 0.0 and uplink.backlog == 0
    last_backlog = max(index_of(messages, r.payload) for r in backlog)
    for record in live:
        assert index_of(messages, record.payload) < last_backlog / 2, "a live record waited behind the backlog"
    assert etas[0] is not None and etas[0] > 0
    for device in range(4):  # in order per device
        seqs = [int(m.payload.split(b":")[1]) for m in messages if m.topic == f"edgegw/old-{device}/t"]
        assert seqs == sorted(seqs) and len(seqs) == 375


async def test_backlog_leaves_by_priority_then_in_order(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    sink = sink_factory(mosquitto, topic="edgegw/#")
    submitted = []
    for i in range(300):
        priority = (0, 1, 1, 2)[i % 4]  # bulk, telemetry, telemetry, alarm
        submitted.append(outbox.submit(f"p{i % 3}", "devices/x/t", b"%d:%d" % (priority, i), 1, priority=priority))
    await eventually(lambda: outbox.committed_id >= submitted[-1].id, 5, "the backlog committed")
    uplink = make_uplink(uplink_settings(mosquitto, pki, inflight_window=1), outbox)  # one at a time: strict order
    async with running(uplink):
        messages = await sink.until(lambda m: len(m) >= 300, 20)
    classes = [int(m.payload.split(b":")[0]) for m in messages]
    assert classes == sorted(classes, reverse=True), "a lower class left before a higher one"
    for device in range(3):
        for priority in range(3):
            seqs = [int(m.payload.split(b":")[1]) for m in messages
                    if m.topic == f"edgegw/p{device}/x/t" and m.payload.startswith(b"%d:" % priority)]
            assert seqs == sorted(seqs)


async def test_per_device_pace_does_not_hold_back_other_devices(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    sink = sink_factory(mosquitto, topic="edgegw/#")
    chatty = [outbox.submit("chatty", "devices/chatty/t", b"c:%d" % i, 1) for i in range(300)]
    quiet = [outbox.submit("quiet", "devices/quiet/t", b"q:%d" % i, 1) for i in range(20)]
    await eventually(lambda: outbox.committed_id >= quiet[-1].id, 5, "the backlog committed")
    uplink = make_uplink(uplink_settings(mosquitto, pki, backfill_device_rate=200.0), outbox)
    async with running(uplink):
        started = time.monotonic()
        messages = await sink.until(lambda m: len(m) >= 320, 20)
        elapsed = time.monotonic() - started
    quiet_last = max(index_of(messages, r.payload) for r in quiet)
    assert quiet_last < 250, "the quiet device waited behind the chatty device's pace"
    seqs = [int(m.payload.split(b":")[1]) for m in messages if m.payload.startswith(b"c:")]
    assert seqs == list(range(300)), "the chatty device's records left out of order"
    # 300 records at 200/s with one second of burst: at least (300 - 200) / 200 s (a lower bound: load only adds)
    assert elapsed >= 0.45, f"the per-device pace was not applied ({elapsed:.2f} s)"
    print(f"\nper-device pace 200/s: 320 records in {elapsed:.2f} s")


def test_backfill_pacing_by_bytes_and_per_device_keeps_device_order() -> None:
    """The pacer alone (pure logic, no sockets): global and per-device buckets, held devices keep their order."""
    from collections import deque

    from edgegw.config import UplinkSettings
    from edgegw.outbox.store import Record
    from edgegw.uplink._backfill import Backfill

    settings = UplinkSettings(host="h", ca="ca", cert="c", key="k",  # type: ignore[arg-type]
                              backfill_bytes_rate=1000.0, backfill_device_rate=2.0)
    lane = Backfill(None, settings, boundary=100, fetch_size=64, backlog=10)  # type: ignore[arg-type]
    lane.buf = deque([Record(i, "a" if i < 6 else "b", "t", b"x" * 100, 1, 0.0) for i in range(1, 10)])
    sent: list[int] = []
    n, delay = lane.send(100, lambda r: sent.append(r.id) or True)
    # device "a": 2 tokens (one second of burst) plus one that takes it negative; then "b" likewise
    assert sent == [1, 2, 3, 6, 7, 8] and n == 6
    assert delay is not None and 0 < delay <= 1.0
    assert [r.id for r in lane.held["a"]] == [4, 5] and [r.id for r in lane.held["b"]] == [9]
    sent.clear()
    lane._devices["a"].tokens = lane._devices["b"].tokens = 2.0  # as if a second passed for the devices only
    lane._bytes.tokens = 150.0  # ... but the bytes bucket allows two more records of 100 bytes
    n, delay = lane.send(100, lambda r: sent.append(r.id) or True)
    assert sent == [4, 5] and delay is not None, "held records must leave first, in order, within the byte pace"
