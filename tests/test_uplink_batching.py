"""Batch frames (msgpack, optional zlib) against a real mosquitto, and uplink bytes per record with and without."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from edgegw.outbox.store import Outbox, Record
from edgegw.uplink.frames import decode_frame
from test_uplink import eventually, make_uplink, outbox, running, uplink_settings  # noqa: F401 - fixture

if TYPE_CHECKING:
    from conftest import LabPKI, Mosquitto, Received, Sink

N = 1200


def telemetry(outbox: Outbox, start: int) -> list[Record]:
    out = []
    for i in range(start, start + N):
        device = f"bt-{i % 3}"
        payload = json.dumps({"seq": i, "t": 21.5 + i % 7, "h": 40 + i % 11, "status": "ok"}).encode()
        out.append(outbox.submit(device, f"devices/{device}/telemetry", payload, 1))
    return out


def unpack(messages: list[Received]) -> list[dict]:
    out: list[dict] = []
    for m in messages:
        assert m.topic.startswith("edgegw/_batch"), m.topic
        compressed = m.topic.endswith("/zlib")
        assert m.user_properties["edgegw-frame"] == ("msgpack+zlib/1" if compressed else "msgpack/1")
        records = decode_frame(m.payload, compressed)
        assert int(m.user_properties["edgegw-records"]) == len(records)
        out.extend(records)
    return out


async def test_frames_carry_every_record_with_its_id_and_cost_fewer_bytes(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    per_record: dict[str, float] = {}

    # one message per record: the reference
    sink = sink_factory(mosquitto, topic="edgegw/#", client_id="sink-single")
    records = telemetry(outbox, 0)
    uplink = make_uplink(uplink_settings(mosquitto, pki), outbox)
    async with running(uplink):
        await eventually(lambda: outbox.depth == 0, 15, "single messages acknowledged")
        await sink.until(lambda m: len(m) >= N, 10)
    per_record["single"] = uplink.bytes_sent / uplink.sent
    sink.close()

    for compression in ("none", "zlib"):
        sink = sink_factory(mosquitto, topic="edgegw/#", client_id=f"sink-{compression}")
        start = N if compression == "none" else 2 * N
        records = telemetry(outbox, start)
        settings = uplink_settings(mosquitto, pki, batch_max_records=100, batch_max_bytes=16384,
                                   batch_compression=compression)
        uplink = make_uplink(settings, outbox)
        async with running(uplink):
            await eventually(lambda: outbox.depth == 0, 15, f"frames ({compression}) acknowledged")
            messages = await sink.until(lambda m: sum(int(x.user_properties["edgegw-records"]) for x in m) >= N,
                                        10)
        sink.close()
        got = unpack(messages)
        assert sorted(r["id"] for r in got) == [r.id for r in records], "a record missing or duplicated"
        by_id = {r.id: r for r in records}
        for item in got:
            record = by_id[item["id"]]
            assert item["payload"] == record.payload and item["device_id"] == record.device_id
            assert item["topic"] == f"edgegw/{record.device_id}/telemetry"
            assert item["received_at"] == record.received_at and item["priority"] == 1
        for device in ("bt-0", "bt-1", "bt-2"):
            seqs = [json.loads(r["payload"])["seq"] for r in got if r["device_id"] == device]
            assert seqs == sorted(seqs), "out of order within a device"
        assert uplink.frames_sent <= N // 50, f"{uplink.frames_sent} frames for {N} records"
        assert uplink.acked == N
        per_record[compression] = uplink.bytes_sent / uplink.sent

    print("\nuplink MQTT bytes per record (~60-byte JSON payloads, MQTT 5): "
          + ", ".join(f"{k} {v:.1f}" for k, v in per_record.items()))
    assert per_record["none"] < 0.7 * per_record["single"]
    assert per_record["zlib"] < per_record["none"]


async def test_linger_lets_a_trickle_of_live_records_share_frames(
        mosquitto: Mosquitto, sink_factory: Callable[..., Sink], pki: LabPKI, outbox: Outbox) -> None:
    import asyncio

    sink = sink_factory(mosquitto, topic="edgegw/#", client_id="sink-linger")
    settings = uplink_settings(mosquitto, pki, batch_max_records=100, batch_linger_ms=400.0)
    uplink = make_uplink(settings, outbox)
    n = 30
    async with running(uplink):
        await eventually(lambda: uplink.connected, 10, "uplink connected")
        sent = []
        for i in range(n):  # one record every 20 ms: without a linger, nearly every one would leave alone
            sent.append(outbox.submit("lg-1", "devices/lg-1/telemetry", b'{"seq":%d}' % i, 1))
            await asyncio.sleep(0.02)
        await eventually(lambda: outbox.depth == 0, 15, "lingered frames acknowledged")
        messages = await sink.until(lambda m: sum(int(x.user_properties["edgegw-records"]) for x in m) >= n, 10)
    got = unpack(messages)
    assert [r["id"] for r in got] == [r.id for r in sent], "a record missing, duplicated or out of order"
    # ~600 ms of records with a 400 ms linger: a handful of frames (a loaded machine can only make them fuller).
    assert uplink.frames_sent <= n // 5, f"{uplink.frames_sent} frames for {n} records"


async def test_frames_stay_under_a_small_server_maximum_packet_size_and_nothing_is_quarantined(
        mosquitto_factory: Callable[..., Mosquitto], sink_factory: Callable[..., Sink], pki: LabPKI,
        outbox: Outbox) -> None:
    """A broker announcing Maximum Packet Size 600 (mosquitto ``max_packet_size``): records of ~70 bytes each fit
    many times over, so frames must be cut to fit rather than be built to 1,024 bytes, refused as a whole and every
    record in them quarantined (the frame is not "a single oversized record")."""
    broker = mosquitto_factory(extra="max_packet_size 600").start()
    sink = sink_factory(broker, topic="edgegw/#")
    records: list[Record] = []
    for compression in ("none", "zlib"):
        for i in range(len(records), len(records) + 300):
            payload = json.dumps({"seq": i, "t": 21.5 + i % 7, "h": 40 + i % 11, "status": "ok"}).encode()
            records.append(outbox.submit(f"bt-{i % 3}", f"devices/bt-{i % 3}/telemetry", payload, 1))
        settings = uplink_settings(broker, pki, batch_max_records=100, batch_compression=compression)
        uplink = make_uplink(settings, outbox)
        async with running(uplink):
            await eventually(lambda: outbox.depth == 0, 15, "every record settled")
        assert uplink.refused == 0 and await outbox.count_quarantined() == 0, compression
        assert uplink.frames_sent < 300 // 2, "frames of one record each"
    messages = await sink.until(lambda m: sum(int(x.user_properties["edgegw-records"]) for x in m) >= 600, 10)
    assert sorted(r["id"] for r in unpack(messages)) == [r.id for r in records]


async def test_frames_count_non_ascii_topics_and_ids_in_bytes(
        mosquitto_factory: Callable[..., Mosquitto], sink_factory: Callable[..., Sink], pki: LabPKI,
        outbox: Outbox) -> None:
    """A frame's size is counted in bytes: a topic (or device id) in Chinese takes three bytes per character.
    Counted in characters, frames under a broker's Maximum Packet Size of 4,000 came out far larger, were refused
    as a whole and every record in them quarantined."""
    broker = mosquitto_factory(extra="max_packet_size 4000").start()
    sink = sink_factory(broker, topic="edgegw/#")
    device = "传感器-1"
    records = [outbox.submit(device, f"devices/{device}/" + "温度" * 20, b"%d" % i, 1) for i in range(200)]
    uplink = make_uplink(uplink_settings(broker, pki, batch_max_records=100), outbox)
    async with running(uplink):
        await eventually(lambda: outbox.depth == 0, 15, "every record settled")
    assert uplink.refused == 0 and await outbox.count_quarantined() == 0
    messages = await sink.until(lambda m: sum(int(x.user_properties["edgegw-records"]) for x in m) >= 200, 10)
    assert sorted(r["id"] for r in unpack(messages)) == [r.id for r in records]
