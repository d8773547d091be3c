"""Live-first, paced backfill and priorities, against a real mosquitto with mutual TLS and a real outbox."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

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


async def test_a_device_held_by_its_pace_does_not_hold_back_devices_behind_its_backlog(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    """A device whose backlog is far longer than one read of the lane (3,000 records, the lane reads 400 at a time)
    and held back by ``backfill_device_rate``: another device's records behind all of it go on at once. Before,
    the lane stopped reading once a read's worth of records was held (B waited ~60 s behind A's pace)."""
    sink = sink_factory(mosquitto, topic="edgegw/#")
    heavy = [outbox.submit("heavy", "devices/heavy/t", b"h:%d" % i, 1) for i in range(3000)]
    light = [outbox.submit("light", "devices/light/t", b"l:%d" % i, 1) for i in range(10)]
    await eventually(lambda: outbox.committed_id >= light[-1].id, 5, "the backlog committed")
    uplink = make_uplink(uplink_settings(mosquitto, pki, backfill_device_rate=50.0), outbox)
    async with running(uplink):
        messages = await sink.until(lambda m: sum(x.payload.startswith(b"l:") for x in m) >= 10, 3)
        await asyncio.sleep(1.0)
        messages = sink.snapshot()
    seqs = {d: [int(m.payload.split(b":")[1]) for m in messages if m.payload.startswith(d)] for d in (b"h:", b"l:")}
    assert seqs[b"l:"] == list(range(10))
    assert seqs[b"h:"] == list(range(len(seqs[b"h:"]))), "the held device's records left out of order"
    assert len(seqs[b"h:"]) <= 50 + 50 * 5, "the held device's pace was not applied"
    assert outbox.quarantined == 0


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


class _Store:
    """The outbox's backlog reads over a list (``fetch_backlog``'s contract: one class, ids in (after, upto], not
    settled, in id order, at most ``limit``). Records sent stay until ``settle`` (in flight), so a record read
    again by a second pass and sent twice would show."""

    def __init__(self, records: list[Any]) -> None:
        self.records = records
        self.settled: set[int] = set()
        self.reads = 0
        self.rows = 0  # records returned (decoded, in the real outbox)

    async def fetch_backlog(self, priority: int, after_id: int, upto_id: int, limit: int,
                            skip_devices: Any = ()) -> list[Any]:
        self.reads += 1
        skip = set(skip_devices)  # a view of the lane's dict: read it now, as the real query's parameters are
        out = [r for r in self.records if r.priority == priority and after_id < r.id <= upto_id
               and r.id not in self.settled and r.device_id not in skip][:limit]
        self.rows += len(out)
        return out


@pytest.mark.parametrize("seed", range(6))
async def test_held_devices_past_the_bound_are_read_again_and_nothing_is_skipped_or_sent_twice(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lane alone (its real reads' contract, a clock of our own): many records of a few heavy devices held by
    the per-device pace, far past the held bound (fetch_size 16), light devices among and behind them, three
    priority classes. Every record leaves exactly once, in id order per device and class, and the light devices'
    records are not held behind the heavy ones' pace."""
    import random
    import types

    from edgegw.config import UplinkSettings
    from edgegw.outbox.store import Record
    from edgegw.uplink import _backfill
    from edgegw.uplink._backfill import Backfill

    clock = [1000.0]
    monkeypatch.setattr(_backfill, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    rnd = random.Random(seed)
    records = []
    for i in range(1, 1501):
        device = rnd.choice(["h1", "h1", "h1", "h2", "h2"] + [f"l{k}" for k in range(3)]) if i < 1400 else "late"
        records.append(Record(i, device, "t", b"x", 1, 0.0, None, rnd.choice([0, 1, 1, 2])))
    store = _Store(records)
    settings = UplinkSettings(host="h", ca="ca", cert="c", key="k",  # type: ignore[arg-type]
                              backfill_device_rate=20.0)
    lane = Backfill(store, settings, boundary=1500, fetch_size=16, backlog=1500)  # type: ignore[arg-type]
    sent: list[Any] = []
    when: dict[int, float] = {}

    def publish(record: Any) -> bool:
        sent.append(record)
        when[record.id] = clock[0]
        if rnd.random() < 0.5:
            store.settled.add(record.id)  # acknowledged at once, or later (still in flight when read again)
        return True

    while not lane.done and clock[0] < 1000.0 + 600:
        while lane.needs_fetch:
            await lane.fetch()
        lane.send(rnd.randint(1, 8), publish)
        clock[0] += 0.01
        if rnd.random() < 0.1:
            store.settled.update(r.id for r in sent)
    assert lane.done, "the lane never finished"
    ids = [r.id for r in sent]
    assert len(ids) == len(set(ids)) == len(records), "a record skipped or sent twice"
    for device in {r.device_id for r in records}:
        for priority in range(3):
            mine = [r.id for r in sent if r.device_id == device and r.priority == priority]
            assert mine == sorted(mine), f"{device} class {priority} out of order"
    start = 1000.0
    late = [when[r.id] - start for r in sent if r.device_id == "late" and r.priority == 2]
    # the heavy devices' first class needs ~8 s at 20/s; the late light device's records of it go within a second
    # (a lower class waits for the higher ones to finish, held devices included: priority first)
    assert late and max(late) < 1.0, f"the late device waited {max(late):.1f} s behind the held ones"
    assert lane.held_count <= 16 and not lane.held


async def test_a_long_held_backlog_is_not_read_again_in_full_for_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """One device with 5,000 records held by its pace and one light device behind them: the passes over what was let
    go stop once the device is let go again, so the reads stay proportional to the records (not records x passes)."""
    import types

    from edgegw.config import UplinkSettings
    from edgegw.outbox.store import Record
    from edgegw.uplink import _backfill
    from edgegw.uplink._backfill import Backfill

    clock = [1000.0]
    monkeypatch.setattr(_backfill, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    records = [Record(i, "heavy" if i <= 5000 else "light", "t", b"x", 1, 0.0) for i in range(1, 5011)]
    store = _Store(records)
    settings = UplinkSettings(host="h", ca="ca", cert="c", key="k",  # type: ignore[arg-type]
                              backfill_device_rate=100.0)
    lane = Backfill(store, settings, boundary=5010, fetch_size=64, backlog=5010)  # type: ignore[arg-type]
    sent: list[int] = []

    def publish(record: Any) -> bool:
        sent.append(record.id)
        store.settled.add(record.id)
        return True

    while not lane.done and clock[0] < 1000.0 + 120:
        while lane.needs_fetch:
            await lane.fetch()
        lane.send(100, publish)
        clock[0] += 0.01
    assert len(sent) == 5010 and sorted(sent) == list(range(1, 5011)), "a record skipped or sent twice"
    assert sent.index(5001) < 200, "the light device waited behind the heavy one's pace"
    assert [i for i in sent if i <= 5000] == list(range(1, 5001))
    assert store.reads < 3 * 5010 / 64, f"{store.reads} reads of 64 for 5,010 records"
    print(f"\n{store.reads} reads of 64 for 5,010 records")


async def test_a_device_held_by_its_pace_is_not_read_and_decoded_in_full_at_each_new_lane(
        outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """One device with 12,000 records in two classes held by its pace and a light device behind them, over a real
    outbox (its SQL, its decode), on two lanes in a row (a reconnect or a 0x97 resume builds a new one): to let the
    light device go, each lane reads about two reads' worth of rows, not the whole class. Before, once the held
    device was let go (spilled) its further rows were still read and decoded on the event loop only to be thrown
    away: the whole class, at every new lane (100,000 records: 398 reads, 100,000 rows decoded to keep 256 held).
    Counts calls, not time."""
    import types

    from edgegw.config import UplinkSettings
    from edgegw.outbox import _reads
    from edgegw.outbox.store import MAX_PRIORITY
    from edgegw.uplink import _backfill
    from edgegw.uplink._backfill import Backfill

    def backlog(device: str, n: int) -> list[Any]:
        return [outbox.submit(device, f"devices/{device}/t", b"%d" % i, 1, priority=2 - i % 2) for i in range(n)]

    records = backlog("heavy", 12000) + backlog("light0", 10)
    await eventually(lambda: outbox.committed_id >= records[-1].id, 10, "the backlog committed")
    decoded = [0]
    real_decode = _reads.decode_row

    def counting_decode(row: Any) -> Any:
        decoded[0] += 1
        return real_decode(row)

    reads = [0]
    real_fetch = outbox.fetch_backlog

    async def counting_fetch(*args: Any, **kwargs: Any) -> Any:
        reads[0] += 1
        return await real_fetch(*args, **kwargs)

    monkeypatch.setattr(_reads, "decode_row", counting_decode)
    monkeypatch.setattr(outbox, "fetch_backlog", counting_fetch)
    clock = [1000.0]
    monkeypatch.setattr(_backfill, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    settings = UplinkSettings(host="h", ca="ca", cert="c", key="k",  # type: ignore[arg-type]
                              backfill_device_rate=100.0)  # one second of burst: 100 records
    fetch_size = 256  # the pump's smallest read
    sent: list[Any] = []

    def publish(record: Any) -> bool:
        sent.append(record)
        outbox.ack([record.id])
        return True

    for lane_no in range(2):
        if lane_no:  # a second lane: the rest of the held device's backlog, a new light device behind it
            records += backlog("light1", 10)
            await eventually(lambda last=records[-1].id: outbox.committed_id >= last, 10, "committed")
        light = f"light{lane_no}"
        lane = Backfill(outbox, settings, outbox.committed_id, fetch_size, outbox.depth)
        decoded[0] = reads[0] = 0
        first_pass: tuple[int, int] | None = None
        while not lane.done:
            while lane.needs_fetch:
                await lane.fetch()
            lane.send(100, publish)
            clock[0] += 0.01
            if first_pass is None and sum(r.device_id == light and r.priority == 2 for r in sent) == 5:
                first_pass = (reads[0], decoded[0])
            if lane_no == 0 and len(sent) >= 2000:
                break  # the link lost: the rest goes on the next connection, from a new lane
        assert first_pass is not None, f"{light}'s records of the first class never left"
        print(f"\nlane {lane_no}: {light} out after {first_pass[0]} reads, {first_pass[1]} rows decoded")
        empty = MAX_PRIORITY - 2  # classes above 2: one (empty) read each
        assert first_pass[1] <= 3 * fetch_size and first_pass[0] <= empty + 4, (
            f"{first_pass[1]} rows decoded in {first_pass[0]} reads to let a light device past a held one")
    ids = [r.id for r in sent]
    assert len(ids) == len(set(ids)) == len(records), "a record skipped or sent twice"
    for priority in (2, 1):
        mine = [r.id for r in sent if r.device_id == "heavy" and r.priority == priority]
        assert mine == sorted(mine), f"the held device's class {priority} left out of order"
