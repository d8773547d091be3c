"""Deletes after upstream acknowledgement against real SQLite files: id ranges, and usage counted exactly when an
acknowledged record was already evicted, expired, quarantined or acknowledged before."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from outbox_peers import Running, eventually

from edgegw.config import OutboxSettings
from edgegw.outbox import Outbox
from edgegw.outbox._upkeep import _RUNS_PER_STATEMENT, id_runs


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    made: list[Running] = []

    async def factory(**kw: object) -> Running:
        values: dict[str, object] = {"path": tmp_path / "outbox.db", "commit_window_ms": 1,
                                     "synchronous": "normal", "min_free_bytes": 0}
        values.update(kw)
        run = Running(await Outbox.open(OutboxSettings(**values)))  # type: ignore[arg-type]
        made.append(run)
        return run

    yield factory
    for run in made:
        if not run.task.done():
            await run.close()


def on_disk(path: Path) -> dict[str, tuple[int, int]]:
    with sqlite3.connect(path) as db:
        return {d: (n, b) for d, n, b in
                db.execute("SELECT device_id, count(*), sum(size) FROM records GROUP BY device_id")}


def ids_on_disk(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [r[0] for r in db.execute("SELECT id FROM records ORDER BY id")]


def assert_counts_match_disk(box: Outbox, path: Path) -> None:
    disk = on_disk(path)
    devices = set(disk) | set(box._usage)
    assert {d: box.usage(d) for d in devices} == {d: disk.get(d, (0, 0)) for d in devices}
    assert box.depth == sum(n for n, _ in disk.values())
    assert box.bytes_held == sum(b for _, b in disk.values())


def test_id_runs() -> None:
    assert id_runs([]) == []
    assert id_runs({7}) == [(7, 7)]
    assert id_runs([5, 3, 4, 10, 12, 11, 20]) == [(3, 5), (10, 12), (20, 20)]


async def test_acknowledged_runs_delete_exactly_those_records(make, tmp_path: Path) -> None:
    run = await make()
    box = run.outbox
    ids = [box.submit(f"d{i % 3}", "devices/x/t", b"p" * i, 1).id for i in range(60)]
    await run.settle()
    box.ack(ids[5:20])
    box.ack(ids[30:31])
    box.ack(reversed(ids[40:50]))
    await run.settle()
    assert ids_on_disk(tmp_path / "outbox.db") == ids[:5] + ids[20:30] + ids[31:40] + ids[50:]
    assert_counts_match_disk(box, tmp_path / "outbox.db")
    await run.close()


async def test_scattered_acknowledgements_beyond_the_ranges_per_statement(make, tmp_path: Path) -> None:
    run = await make()
    box = run.outbox
    ids = [box.submit(f"d{i % 4}", "devices/x/t", b"%d" % i, 1).id for i in range(8 * _RUNS_PER_STATEMENT)]
    await run.settle()
    acked = ids[::2]  # every other record: one run each, more than one statement's worth of ranges
    assert len(id_runs(acked)) > _RUNS_PER_STATEMENT
    box.ack(acked)
    await run.settle()
    assert ids_on_disk(tmp_path / "outbox.db") == ids[1::2]
    assert_counts_match_disk(box, tmp_path / "outbox.db")
    await run.close()


async def test_acknowledging_again_or_unknown_ids_counts_nothing(make, tmp_path: Path) -> None:
    run = await make()
    box = run.outbox
    ids = [box.submit("d", "devices/d/t", b"x" * 10, 1).id for i in range(20)]
    await run.settle()
    box.ack(ids[:10])
    await run.settle()
    assert box.usage("d")[0] == 10
    box.ack(ids[:10])  # a resend acknowledged twice (the upstream's PUBACK came after a reconnect)
    box.ack([ids[-1] + 1000, 1])  # never handed out
    await run.settle()
    assert box.usage("d")[0] == 10
    assert_counts_match_disk(box, tmp_path / "outbox.db")
    await run.close()


async def test_acknowledged_after_eviction_is_not_counted_twice(make, tmp_path: Path) -> None:
    run = await make(max_records=50)
    box = run.outbox
    a = [box.submit("a", "devices/a/t", b"a" * 30, 1).id for _ in range(40)]
    await run.settle()
    b = [box.submit("b", "devices/b/t", b"b" * 5, 1).id for _ in range(30)]
    await run.settle()
    assert box.depth == 50 and sum(box.dropped.values()) == 20
    evicted = sorted(set(a + b) - set(ids_on_disk(tmp_path / "outbox.db")))
    assert evicted and evicted[0] == a[0], "the oldest records of the heaviest device go first"
    # The uplink had them in flight when they were evicted: one run over evicted and held records.
    box.ack(a + b[:10])
    await run.settle()
    assert ids_on_disk(tmp_path / "outbox.db") == b[10:]
    assert box.usage("a") == (0, 0)
    assert_counts_match_disk(box, tmp_path / "outbox.db")
    await run.close()


async def test_acknowledged_in_the_same_group_as_a_quarantine(make, tmp_path: Path) -> None:
    run = await make(commit_window_ms=50)
    box = run.outbox
    ids = [box.submit(f"d{i % 2}", "devices/x/t", b"y" * i, 1).id for i in range(30)]
    await run.settle()
    box.quarantine(ids[3], "refused upstream")
    box.ack(ids[:10])  # overlaps the quarantined one
    await run.settle()
    assert ids_on_disk(tmp_path / "outbox.db") == ids[10:]
    assert await box.count_quarantined() == 1
    assert_counts_match_disk(box, tmp_path / "outbox.db")
    await run.close()


async def test_acknowledged_after_expiry_is_not_counted_twice(make, tmp_path: Path) -> None:
    run = await make(ttl=0.2)
    box = run.outbox
    old = [box.submit("d", "devices/d/t", b"o", 1).id for _ in range(10)]
    await run.settle()
    await eventually(lambda: box.expired.get("d") == 10, 5, "the records to expire")
    young = [box.submit("d", "devices/d/t", b"young", 1).id for _ in range(10)]
    await run.settle()
    box.ack(old + young[:4])
    await run.settle()
    assert ids_on_disk(tmp_path / "outbox.db") == young[4:]
    assert box.usage("d") == on_disk(tmp_path / "outbox.db")["d"]
    assert_counts_match_disk(box, tmp_path / "outbox.db")
    await run.close()
