"""Outbox bounds against real SQLite files: record/byte caps, fairness, TTL, the disk guard, space returned."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import structlog
from outbox_peers import Running, eventually

from edgegw.config import OutboxSettings
from edgegw.outbox import Outbox, OutboxFull
from edgegw.outbox.store import RECORD_OVERHEAD, ROOM_AGAIN_BELOW


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    made: list[Running] = []

    async def factory(**kw: object) -> Running:
        values: dict[str, object] = dict(path=tmp_path / "outbox.db", commit_window_ms=1, synchronous="normal",
                                         min_free_bytes=0)
        values.update(kw)
        run = Running(await Outbox.open(OutboxSettings(**values)))  # type: ignore[arg-type]
        made.append(run)
        return run

    yield factory
    for run in made:
        if not run.task.done():
            await run.close()


def rows(path: Path) -> list[tuple[str, bytes]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT device_id, payload FROM records ORDER BY id").fetchall()


# --- drop-oldest ---------------------------------------------------------------------------------------------


async def test_record_cap_drop_oldest_evicts_the_heaviest_device_and_counts(make, tmp_path: Path) -> None:
    run = await make(max_records=100)
    box = run.outbox
    for i in range(20):
        box.submit("quiet", "devices/quiet/t", b"q%d" % i, 1)
    await run.settle()
    for i in range(150):  # the chatty device alone overflows the outbox
        box.submit("chatty", "devices/chatty/t", b"c%d" % i, 1)
        if i % 40 == 39:
            await run.settle()
    await run.settle()
    assert box.depth == 100
    assert box.usage("quiet") == (20, box.usage("quiet")[1]), "the quiet device lost records to the chatty one"
    assert box.dropped == {"chatty": 70}
    on_disk = rows(tmp_path / "outbox.db")
    assert [p for d, p in on_disk if d == "chatty"] == [b"c%d" % i for i in range(70, 150)], "not the oldest"
    assert len(on_disk) == 100
    await run.close()


async def test_a_burst_awaiting_commit_does_not_evict_the_neighbours_first(make) -> None:
    """A chatty device's burst is longer than a group: its records of later groups count against the limit (so it
    is the device holding the most) but are not on disk yet. Eviction must not make up for them with the quiet
    devices' records, leaving the chatty device holding twice as much as each of them."""
    run = await make(max_records=100, commit_max_records=10)
    box = run.outbox
    for _ in range(45):
        box.submit("b", "devices/b/t", b"b", 1)
        box.submit("c", "devices/c/t", b"c", 1)
    await run.settle()
    for _ in range(60):  # QoS 0 from one connection: not bounded by a receive maximum, only by max_pending
        box.submit("a", "devices/a/t", b"a", 1)
    await run.settle()
    held = {d: box.usage(d)[0] for d in "abc"}
    assert box.depth == 100 == sum(held.values())
    # drop-oldest levels the heaviest down: whoever lost records holds at most one less than anyone else
    assert max(held.values()) - min(held.values()) <= 1, (held, box.dropped)
    await run.close()


async def test_byte_cap_drop_oldest_with_priorities(make, tmp_path: Path) -> None:
    size = 1000 + len("devices/a/t") + 1 + RECORD_OVERHEAD
    run = await make(max_bytes=40 * size)
    box = run.outbox
    box.submit("a", "devices/a/t", b"A" * 1000, 1, priority=2)  # an alarm: the last to be evicted
    for i in range(59):
        box.submit("a", "devices/a/t", b"%04d" % i + b"x" * 996, 1)
    await run.settle()
    assert box.bytes_held <= 40 * size and box.depth == 40
    assert box.dropped == {"a": 20}
    payloads = [p for _, p in rows(tmp_path / "outbox.db")]
    assert payloads[0] == b"A" * 1000, "the higher-priority record was evicted before lower ones"
    assert payloads[1][:4] == b"0020"
    await run.close()


async def test_counts_survive_a_restart(make, tmp_path: Path) -> None:
    run = await make()
    for i in range(30):
        run.outbox.submit(f"d{i % 3}", "devices/x/t", b"p" * i, 1)
    await run.settle()
    before = {d: run.outbox.usage(d) for d in ("d0", "d1", "d2")}
    await run.close()
    run = await make()
    assert {d: run.outbox.usage(d) for d in ("d0", "d1", "d2")} == before
    assert run.outbox.depth == 30 and run.outbox.bytes_held == sum(b for _, b in before.values())


# --- reject-new and fairness ---------------------------------------------------------------------------------


async def test_reject_new_refuses_synchronously_over_fair_share_first(make) -> None:
    run = await make(max_records=100, full_policy="reject-new")
    box = run.outbox
    committed: list[bool] = []
    for i in range(10):
        box.submit("quiet", "devices/quiet/t", b"q", 1, committed.append)
    accepted = 0
    with pytest.raises(OutboxFull) as info:
        for _ in range(200):
            box.submit("chatty", "devices/chatty/t", b"c", 1, committed.append)
            accepted += 1
    # past 90 % the chatty device (over 100 / 2 devices) is refused; the last 10 % stay for others
    assert info.value.reason == "device_share" and info.value.device_id == "chatty"
    assert accepted == 80 and box.depth == 90
    assert not box.has_room("chatty") and box.has_room("quiet") and box.has_room("newcomer")
    for _ in range(10):
        box.submit("quiet", "devices/quiet/t", b"q", 1, committed.append)
    with pytest.raises(OutboxFull) as info:
        box.submit("quiet", "devices/quiet/t", b"q", 1)
    assert info.value.reason == "records"
    assert box.rejected == {"chatty": 1, "quiet": 1}
    await run.settle()
    assert committed == [True] * 100, "a refused record must not get a callback"

    woken: list[int] = []
    box.when_room(lambda: woken.append(box.depth))
    fetched = await box.fetch_after(0, 100)
    box.ack([r.id for r in fetched[:5]])
    await run.settle()
    assert woken == [], "woken while still nearly full"
    box.ack([r.id for r in fetched[5:40]])
    await run.settle()
    assert woken == [60] and 60 < ROOM_AGAIN_BELOW * 100
    box.submit("chatty", "devices/chatty/t", b"c", 1)
    soon = asyncio.Event()
    box.when_room(soon.set)  # there is room already: called from the loop right away
    await asyncio.wait_for(soon.wait(), 5)
    await run.close()


async def test_reject_new_byte_cap(make) -> None:
    run = await make(max_bytes=10_000, full_policy="reject-new")
    box = run.outbox
    with pytest.raises(OutboxFull) as info:
        for _ in range(100):
            box.submit("solo", "devices/solo/t", b"x" * 1000, 1)
    assert info.value.reason == "bytes"  # one device: its fair share is the whole outbox
    assert 9 <= box.depth <= 10 and box.bytes_held <= 10_000
    with pytest.raises(OutboxFull):
        box.submit("solo", "devices/solo/t", b"x" * 20_000, 1)
    await run.close()


# --- TTL ------------------------------------------------------------------------------------------------------


async def test_expired_records_are_deleted_and_counted(make, tmp_path: Path) -> None:
    run = await make(ttl=0.3)
    box = run.outbox
    for i in range(12):
        box.submit(f"d{i % 2}", "devices/x/t", b"old", 1)
    await run.settle()
    with structlog.testing.capture_logs() as logs:
        await eventually(lambda: sum(box.expired.values()) == 12, 5, "the records to expire")
    assert box.expired == {"d0": 6, "d1": 6}
    assert rows(tmp_path / "outbox.db") == []
    assert any(e["event"] == "outbox.expired" and e["records"] == 12 for e in logs)
    await run.close()


# --- the quarantine table -------------------------------------------------------------------------------------


def quarantined(path: Path) -> list[tuple[int, str, bytes]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, device_id, payload FROM quarantine ORDER BY id").fetchall()


def quarantined_bytes(path: Path) -> int:
    """The quarantine's bytes as the outbox counts them, recomputed from the file."""
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT coalesce(sum(length(CAST(payload AS BLOB)) + length(CAST(topic AS BLOB))"
                          f" + length(CAST(device_id AS BLOB)) + coalesce(length(properties), 0)"
                          f" + length(CAST(reason AS BLOB)) + {RECORD_OVERHEAD}), 0) FROM quarantine").fetchone()[0]


async def refuse(run: Running, device: str, payloads: list[bytes]) -> list[int]:
    """Commit these records, then quarantine them all as a refusing upstream would (PUBACK 0x97)."""
    box = run.outbox
    ids = [box.submit(device, f"devices/{device}/t", p, 1).id for p in payloads]
    await run.settle()
    moved = box.quarantined + len(ids)
    for rid in ids:
        box.quarantine(rid, "refused upstream: 0x97 Quota exceeded")
    # counted once the move committed (settle() cannot see a move under way: the writer took it off the queue)
    await eventually(lambda: box.quarantined == moved, 10, "the moves into quarantine")
    return ids


async def test_quarantine_is_capped_by_rows_oldest_first_across_a_restart(make, tmp_path: Path) -> None:
    """A device the upstream keeps refusing filled the quarantine table without limit (only the command-line purge
    deleted from it). Past ``quarantine_max_records`` the oldest rows of the device holding the most go, in the
    moving transaction, counted per device, with one warning per 10 s; the cap holds after a restart (the counts
    are rebuilt from the file)."""
    db = tmp_path / "outbox.db"
    run = await make(quarantine_max_records=10)
    box = run.outbox
    with structlog.testing.capture_logs() as logs:
        quiet = await refuse(run, "quiet", [b"q%d" % i for i in range(4)])
        noisy = await refuse(run, "noisy", [b"n%d" % i for i in range(8)])
        noisy += await refuse(run, "noisy", [b"n%d" % i for i in range(8, 20)])
    kept = quarantined(db)
    assert [rid for rid, _, _ in kept] == quiet + noisy[-6:], "not the heaviest device's oldest rows"
    assert box.quarantine_dropped == {"noisy": 14}
    assert box.quarantined == 24 and box.quarantine_held == (10, quarantined_bytes(db))
    full = [e for e in logs if e["event"] == "outbox.quarantine_full"]
    assert len(full) == 1 and full[0]["log_level"] == "warning", full  # rate-limited: never one line per record
    assert box.depth == 0, "quarantined records are still in the queue"
    await run.close()

    run = await make(quarantine_max_records=10)  # same file
    box = run.outbox
    assert box.quarantine_held == (10, quarantined_bytes(db))
    later = await refuse(run, "quiet", [b"Q%d" % i for i in range(3)])
    # quiet now holds the most (7 to 6): its own oldest go first, then noisy's once they are level
    assert [rid for rid, _, _ in quarantined(db)] == quiet[2:] + noisy[-5:] + later
    assert box.quarantine_dropped == {"quiet": 2, "noisy": 1}
    assert box.quarantine_held == (10, quarantined_bytes(db))
    await run.close()
    assert quiet[0] < noisy[0]


async def test_quarantine_cap_takes_from_the_device_holding_the_most_across_a_restart(make, tmp_path: Path) -> None:
    """The cap deleted the oldest rows of the whole table: a device the upstream keeps refusing deleted every
    other device's quarantined evidence (one device must never evict another's data). Now the oldest rows of the
    device holding the most go, as drop-oldest does for records; after a restart too, on a file made before the
    ``quarantine_by_device`` index (it is created at open)."""
    db = tmp_path / "outbox.db"
    run = await make(quarantine_max_records=20)
    box = run.outbox
    quiet = await refuse(run, "quiet", [b"q%d" % i for i in range(5)])
    noisy: list[int] = []
    for first in range(0, 50, 10):  # several moving transactions, each past the cap
        noisy += await refuse(run, "noisy", [b"n%d" % i for i in range(first, first + 10)])
    assert [rid for rid, _, _ in quarantined(db)] == quiet + noisy[-15:], "quiet lost rows to noisy"
    assert box.quarantine_dropped == {"noisy": 35}
    assert box.quarantine_held == (20, quarantined_bytes(db))
    await run.close()
    with sqlite3.connect(db) as other:  # as a file made before the index was
        other.execute("DROP INDEX quarantine_by_device")

    run = await make(quarantine_max_records=20)  # same file
    box = run.outbox
    with sqlite3.connect(db) as other:
        assert other.execute("SELECT sql FROM sqlite_master WHERE name='quarantine_by_device'").fetchone() == (
            "CREATE INDEX quarantine_by_device ON quarantine (device_id, id)",)
    assert box.quarantine_held == (20, quarantined_bytes(db))
    more = await refuse(run, "noisy", [b"N%d" % i for i in range(10)])
    later = await refuse(run, "quiet", [b"Q0"])
    assert [rid for rid, _, _ in quarantined(db)] == quiet + noisy[-4:] + more + later
    assert box.quarantine_dropped == {"noisy": 11}
    assert box.quarantine_held == (20, quarantined_bytes(db))
    await run.close()


async def test_quarantine_cap_finds_the_rows_of_a_damaged_device_id(make, tmp_path: Path) -> None:
    """Quarantined rows whose device id is not valid UTF-8, or not even stored as text (a damaged file), are still
    found by the id's bytes and trimmed first when that device holds the most; the counts stay those of the file."""
    db = tmp_path / "outbox.db"
    await (await make()).close()  # a file with the schema
    with sqlite3.connect(db) as other:
        for rid, device in [(1, "CAST(x'61ff' AS TEXT)"), (2, "CAST(x'61ff' AS TEXT)")] + [
                (rid, "x'61ff'") for rid in range(3, 7)]:
            other.execute(f"INSERT INTO quarantine VALUES ({rid}, {device}, 't', x'00', 1, 0, NULL, 'r', 0)")
    run = await make(quarantine_max_records=4)
    box = run.outbox
    assert box.quarantine_held == (6, quarantined_bytes(db))
    good = await refuse(run, "good", [b"g"])
    with sqlite3.connect(db) as other:
        assert [r[0] for r in other.execute("SELECT id FROM quarantine ORDER BY id")] == [4, 5, 6] + good
    assert box.quarantine_dropped == {"a\ufffd": 3}
    assert box.quarantine_held == (4, quarantined_bytes(db))
    await run.close()


async def test_quarantine_is_capped_by_bytes_oldest_first_across_a_restart(make, tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    cap = 20_000
    run = await make(quarantine_max_bytes=cap)
    box = run.outbox
    ids = await refuse(run, "a", [b"%04d" % i + b"x" * 996 for i in range(30)])  # ~1.1 kB per row
    assert box.quarantine_held[1] == quarantined_bytes(db) <= cap
    kept = quarantined(db)
    assert len(kept) < 20 and [rid for rid, _, _ in kept] == ids[-len(kept):], "not the oldest first"
    assert box.quarantine_dropped == {"a": 30 - len(kept)}
    await run.close()

    run = await make(quarantine_max_bytes=cap)
    box = run.outbox
    assert box.quarantine_held == (len(kept), quarantined_bytes(db))
    more = await refuse(run, "b", [b"y" * 3000 for _ in range(3)])
    held = box.quarantine_held
    assert held == (len(quarantined(db)), quarantined_bytes(db)) and held[1] <= cap
    assert [rid for rid, _, _ in quarantined(db)][-3:] == more
    # just enough of the oldest rows went: one more of them would have fitted
    assert cap - held[1] < len(b"x" * 1000) + 200
    assert set(box.quarantine_dropped) == {"a"}
    await run.close()


async def test_a_quarantined_row_larger_than_the_byte_cap_is_not_kept(make, tmp_path: Path) -> None:
    run = await make(quarantine_max_bytes=4096)
    box = run.outbox
    small = await refuse(run, "a", [b"small"])
    await refuse(run, "b", [b"z" * 5000])
    assert quarantined(tmp_path / "outbox.db") == [(small[0], "a", b"small")], "a paid for b's row"
    assert box.quarantine_dropped == {"b": 1}
    assert box.quarantine_held == (1, quarantined_bytes(tmp_path / "outbox.db"))
    await run.close()


async def test_quarantine_counts_survive_a_failed_commit(make, tmp_path: Path) -> None:
    """A group that moved and trimmed quarantined rows and then failed (a full disk, an I/O error; here a trigger
    failing the delete from ``records`` that follows the move) is rolled back: the counts in memory must follow the
    file, not the transaction that never happened."""
    db = tmp_path / "outbox.db"
    run = await make(quarantine_max_records=3)
    box = run.outbox
    await refuse(run, "a", [b"1", b"2", b"3"])
    ids = [box.submit("b", "devices/b/t", b"x" * 100, 1).id for _ in range(2)]
    await run.settle()
    held = box.quarantine_held
    with sqlite3.connect(db, timeout=5) as other:
        other.execute("CREATE TRIGGER fail BEFORE DELETE ON records WHEN old.device_id = 'b'"
                      " BEGIN SELECT RAISE(ABORT, 'simulated I/O error'); END")
    with structlog.testing.capture_logs() as logs:
        for rid in ids:
            box.quarantine(rid, "refused upstream: 0x97 Quota exceeded")
        await eventually(lambda: any(e["event"] == "outbox.commit_failed" for e in logs), 5, "a failed commit")
        await asyncio.sleep(0.2)  # the rollback and the recount after it
        assert box.quarantine_held == held == (3, quarantined_bytes(db)) and box.quarantine_dropped == {}
        with sqlite3.connect(db, timeout=5) as other:
            other.execute("DROP TRIGGER fail")
        await eventually(lambda: box.quarantined == 5, 10, "the moves to commit once the trigger is gone")
    assert box.quarantine_held == (3, quarantined_bytes(db)) and box.quarantine_dropped == {"a": 2}
    assert [d for _, d, _ in quarantined(db)] == ["a", "b", "b"]
    await run.close()


# --- the disk guard -------------------------------------------------------------------------------------------


async def test_disk_headroom_guard(make, tmp_path: Path) -> None:
    """The file is real; only the filesystem's free-space reading (os.statvfs) is replaced by a small disk whose
    free space shrinks as the outbox file grows."""
    db = tmp_path / "outbox.db"
    min_free = 50_000_000
    disk = {"capacity": 10**12}

    def free_bytes(folder: Path) -> int:
        return disk["capacity"] - file_bytes(db)

    Outbox.free_bytes = staticmethod(free_bytes)  # type: ignore[assignment]
    try:
        run = await make(full_policy="reject-new", min_free_bytes=min_free)
        box = run.outbox
        assert box.byte_limit == box._settings.max_bytes
        disk["capacity"] = min_free + file_bytes(db) + 200_000  # nearly full: 200 kB above the headroom
        box.submit("d", "devices/d/t", b"x", 1)
        await asyncio.sleep(0.6)  # the guard reads statvfs at most twice a second, with a group commit
        box.submit("d", "devices/d/t", b"x", 1)
        await run.settle()
        assert box.byte_limit < 150_000  # about half of the room: pages, indexes and the WAL cost more
        with pytest.raises(OutboxFull) as info:
            for _ in range(200):
                box.submit("d", "devices/d/t", b"x" * 1000, 1)
        assert info.value.reason == "disk"
        assert box.bytes_held <= box.byte_limit
        await run.close()

        run = await make(full_policy="drop-oldest", min_free_bytes=min_free)  # same file, drop-oldest now
        box = run.outbox
        for _ in range(300):
            box.submit("d", "devices/d/t", b"y" * 1000, 1)
        await run.settle()
        assert box.bytes_held <= box.byte_limit < 200_000
        assert sum(box.dropped.values()) >= 100
        # The disk never filled: the file dips into the headroom by at most about one group's WAL, which is what
        # min_free_bytes is there to absorb.
        assert free_bytes(tmp_path) > min_free - 1_000_000, "the file ate the headroom"
    finally:
        del Outbox.free_bytes  # back to the class default
        Outbox.free_bytes = staticmethod(__import__("edgegw.outbox.store", fromlist=["x"])._statvfs_free)


@pytest.mark.parametrize("policy", ["reject-new", "drop-oldest"])
async def test_disk_guard_lifts_once_the_disk_has_room_again_without_a_commit(make, policy: str) -> None:
    """The disk was full when the outbox opened (or during a spike), so the byte limit fell to 0 and every record is
    refused; with ``ttl = 0`` no TTL sweep commits, and a refused record commits nothing: the free space must still
    be read again, or the gateway refuses every device for good after the disk got room back."""
    disk = {"free": 0}
    Outbox.free_bytes = staticmethod(lambda folder: disk["free"])  # type: ignore[assignment]
    try:
        run = await make(full_policy=policy, ttl=0, min_free_bytes=10_000_000)
        box = run.outbox
        assert box.byte_limit == 0
        with pytest.raises(OutboxFull) as info:
            box.submit("d", "devices/d/t", b"x", 1)
        assert info.value.reason == "disk"
        woken = asyncio.Event()
        box.when_room(woken.set)  # a held MQTT 3.1.1 device waits for this
        disk["free"] = 10**12  # an operator freed space: logs rotated
        await asyncio.wait_for(woken.wait(), 5)
        assert box.byte_limit == box._settings.max_bytes
        committed: list[bool] = []
        box.submit("d", "devices/d/t", b"x", 1, committed.append)
        await run.settle()
        assert committed == [True]
    finally:
        del Outbox.free_bytes
        Outbox.free_bytes = staticmethod(__import__("edgegw.outbox.store", fromlist=["x"])._statvfs_free)


# --- space returned -------------------------------------------------------------------------------------------


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


async def test_space_is_returned_after_a_drain(make, tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    run = await make(commit_max_records=2000)
    box = run.outbox
    idle = file_bytes(db)
    payload = b"z" * 1000
    for i in range(20_000):  # ~20 MB
        box.submit(f"d{i % 10}", "devices/x/t", payload, 1)
        if i % 2000 == 1999:
            await run.settle()
    await run.settle()
    full = file_bytes(db)
    assert full > 20_000_000
    after = 0
    while True:
        batch = await box.fetch_after(after, 2000)
        if not batch:
            break
        box.ack(r.id for r in batch)
        after = batch[-1].id
        await run.settle()
    await eventually(lambda: box.depth == 0 and not box._vacuum_due, 20, "the drain and the vacuum")
    await eventually(lambda: file_bytes(db) < 2_000_000, 10, "the file to shrink")
    drained = file_bytes(db)
    print(f"\nspace: idle {idle:,} B, 20,000 x 1 kB held {full:,} B, drained {drained:,} B, "
          f"vacuumed {box.vacuumed_pages} pages")
    await run.close()
