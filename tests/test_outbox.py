"""The outbox against real SQLite files: group commit, acknowledgement only after commit, restart, bad paths."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from edgegw.config import OutboxSettings
from edgegw.errors import OutboxError
from edgegw.outbox.store import PRIORITY_ALARM, PRIORITY_TELEMETRY, Outbox, Record


def settings(tmp_path: Path, **kw: object) -> OutboxSettings:
    return OutboxSettings(path=tmp_path / "outbox.db", **kw)  # type: ignore[arg-type]


def rows_on_disk(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, device_id, topic, payload, qos FROM records ORDER BY id").fetchall()


async def test_callback_only_after_commit_and_rows_visible_on_disk(tmp_path: Path) -> None:
    outbox = await Outbox.open(settings(tmp_path, commit_window_ms=20))
    writer = asyncio.create_task(outbox.run())
    seen: list[tuple[int, bool, int]] = []

    def on_commit(record_id: int, ok: bool) -> None:
        # At the moment of the callback the row must already be readable by another connection.
        on_disk = [r[0] for r in rows_on_disk(outbox._settings.path)]
        seen.append((record_id, ok, record_id in on_disk))

    for i in range(50):
        rec = outbox.submit("dev-1", f"devices/dev-1/t{i}", b"x" * i, 1, None)
        outbox._pending[-1] = (rec, outbox._pending[-1][1], lambda ok, rid=rec.id: on_commit(rid, ok))
    assert seen == []  # nothing acknowledged synchronously
    for _ in range(200):
        if len(seen) == 50:
            break
        await asyncio.sleep(0.01)
    assert [s[1] for s in seen] == [True] * 50
    assert all(s[2] for s in seen)
    assert outbox.commits == 1  # one group, one transaction
    outbox.stop()
    await writer
    await outbox.close()


async def test_group_cut_at_commit_max_records(tmp_path: Path) -> None:
    outbox = await Outbox.open(settings(tmp_path, commit_window_ms=1000, commit_max_records=10))
    writer = asyncio.create_task(outbox.run())
    done = asyncio.Event()
    count = 0

    def cb(ok: bool) -> None:
        nonlocal count
        count += 1
        if count == 25:
            done.set()

    for i in range(25):
        outbox.submit("d", "devices/d/x", b"p", 1, cb)
    await asyncio.wait_for(done.wait(), 5)  # far less than 3 windows of 1 s when groups are cut by size
    assert outbox.commits >= 3
    outbox.stop()
    await writer
    await outbox.close()


async def test_records_survive_restart_and_ids_never_reused(tmp_path: Path) -> None:
    s = settings(tmp_path)
    outbox = await Outbox.open(s)
    writer = asyncio.create_task(outbox.run())
    ids = [outbox.submit("d", f"devices/d/{i}", b"%d" % i, 1).id for i in range(5)]
    outbox.stop()
    await writer
    await outbox.close()

    outbox = await Outbox.open(s)
    assert outbox.depth == 5
    records = await outbox.fetch_after(0, 100)
    assert [r.id for r in records] == ids
    assert [r.payload for r in records] == [b"0", b"1", b"2", b"3", b"4"]
    writer = asyncio.create_task(outbox.run())
    outbox.ack(ids)  # all delivered: the table becomes empty
    outbox.stop()
    await writer
    await outbox.close()
    assert rows_on_disk(s.path) == []

    outbox = await Outbox.open(s)
    writer = asyncio.create_task(outbox.run())
    new = outbox.submit("d", "devices/d/x", b"y", 1)
    assert new.id > max(ids)  # AUTOINCREMENT: the cloud can deduplicate on ids
    outbox.stop()
    await writer
    await outbox.close()


async def test_fetch_hides_acked_records_and_quarantine_moves_them(tmp_path: Path) -> None:
    s = settings(tmp_path)
    outbox = await Outbox.open(s)
    writer = asyncio.create_task(outbox.run())
    ids = [outbox.submit("d", "devices/d/x", b"p", 1).id for _ in range(4)]
    await asyncio.wait_for(outbox.wait_for_records_after(ids[-1] - 1), 5)
    outbox.ack([ids[0]])
    assert [r.id for r in await outbox.fetch_after(0, 10)] == ids[1:]
    outbox.quarantine(ids[1], "refused upstream: 0x87")
    outbox.stop()
    await writer
    assert await outbox.count_quarantined() == 1
    await outbox.close()
    assert [r[0] for r in rows_on_disk(s.path)] == ids[2:]


async def test_unwritable_folder_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        import os
        if os.geteuid() == 0:
            pytest.skip("root can write anywhere")
        with pytest.raises(OutboxError, match=str(folder)):
            await Outbox.open(OutboxSettings(path=folder / "outbox.db"))
    finally:
        folder.chmod(0o700)


async def test_path_is_a_directory_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "outbox.db"
    target.mkdir()
    with pytest.raises(OutboxError, match="outbox.db"):
        await Outbox.open(OutboxSettings(path=target))


async def test_corrupt_file_is_moved_aside_loudly_and_a_new_one_created(tmp_path: Path) -> None:
    import structlog
    target = tmp_path / "outbox.db"
    garbage = b"this is not an sqlite database" * 100
    target.write_bytes(garbage)
    (tmp_path / "outbox.db-wal").write_bytes(b"junk wal")
    with structlog.testing.capture_logs() as logs:
        outbox = await Outbox.open(OutboxSettings(path=target))
    errors = [e for e in logs if e["event"] == "outbox.corrupt_moved_aside"]
    assert len(errors) == 1 and errors[0]["log_level"] == "error"
    aside = Path(errors[0]["moved_to"])
    assert aside.name.startswith("outbox.db.corrupt-") and aside.read_bytes() == garbage
    writer = asyncio.create_task(outbox.run())
    record = outbox.submit("d", "devices/d/x", b"after", 1)
    outbox.stop()
    await writer
    await outbox.close()
    assert rows_on_disk(target) == [(record.id, "d", "devices/d/x", b"after", 1)]
    # ids of the new file start above anything the old one can have used: the cloud deduplicates on them
    assert record.id > 1_600_000_000_000_000


async def test_damaged_page_is_detected_at_start(tmp_path: Path) -> None:
    target = tmp_path / "outbox.db"
    outbox = await Outbox.open(OutboxSettings(path=target))
    writer = asyncio.create_task(outbox.run())
    for i in range(2000):
        outbox.submit("d", f"devices/d/{i}", b"p" * 200, 1)
    outbox.stop()
    await writer
    await outbox.close()
    with sqlite3.connect(target) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(target.read_bytes())
    page = 4096
    for offset in range(3 * page, len(data) - page, 7 * page):  # scribble over some b-tree pages
        data[offset:offset + 64] = b"\xff" * 64
    target.write_bytes(bytes(data))
    outbox = await Outbox.open(OutboxSettings(path=target))
    try:
        assert outbox.depth == 0
        assert list(tmp_path.glob("outbox.db.corrupt-*"))
    finally:
        await outbox.close()


async def test_undecodable_record_is_quarantined_not_blocking(tmp_path: Path) -> None:
    s = settings(tmp_path)
    outbox = await Outbox.open(s)
    writer = asyncio.create_task(outbox.run())
    good = [outbox.submit("d", "devices/d/x", b"%d" % i, 1) for i in range(3)]
    outbox.stop()
    await writer
    await outbox.close()
    with sqlite3.connect(s.path) as db:  # damage one row the way a bad disk or a foreign writer would
        db.execute("UPDATE records SET topic = CAST(x'ff00fe' AS TEXT) WHERE id = ?", (good[1].id,))
        db.execute("INSERT INTO records (id, device_id, topic, payload, qos, received_at) "
                   "VALUES (?, 'd', 'devices/d/y', NULL, 7, 0)".replace("NULL", "x''"), (good[2].id + 1,))
    outbox = await Outbox.open(s)
    writer = asyncio.create_task(outbox.run())
    records = await outbox.fetch_after(0, 10)
    assert [r.id for r in records] == [good[0].id, good[2].id]
    outbox.stop()
    await writer
    assert await outbox.count_quarantined() == 2
    assert outbox.depth == 2
    await outbox.close()
    with sqlite3.connect(s.path) as db:
        reasons = [r[0] for r in db.execute("SELECT reason FROM quarantine ORDER BY id")]
    assert all(r.startswith("cannot decode record") for r in reasons) and "qos 7" in reasons[1]


async def test_record_of_no_priority_class_is_quarantined_not_stranded(tmp_path: Path) -> None:
    """After a restart the backlog is read class by class (7 down to 0): a damaged row whose priority is no class
    (out of range, or not a number) was read by none of them, so it was neither sent nor quarantined, and stayed
    (counted against its device) until the TTL, or for good with ``ttl = 0``."""
    s = settings(tmp_path, ttl=0)
    outbox = await Outbox.open(s)
    writer = asyncio.create_task(outbox.run())
    records = [outbox.submit("d", "devices/d/x", b"%d" % i, 1) for i in range(6)]
    outbox.stop()
    await writer
    await outbox.close()
    with sqlite3.connect(s.path) as db:  # damaged the way a bad disk or a foreign writer would
        for record, priority in zip(records[1:5], (9, -1, "x", 1.5), strict=True):
            db.execute("UPDATE records SET priority = ? WHERE id = ?", (priority, record.id))
    outbox = await Outbox.open(s)
    writer = asyncio.create_task(outbox.run())
    try:
        backlog = []
        for priority in range(7, -1, -1):  # as the uplink's backfill lane reads it
            backlog += [r.id for r in await outbox.fetch_backlog(priority, 0, outbox.committed_id, 100)]
        assert backlog == [records[0].id, records[5].id]
        for _ in range(500):
            if outbox.quarantined == 4:
                break
            await asyncio.sleep(0.01)
        assert await outbox.count_quarantined() == 4
        assert outbox.depth == 2 and outbox.usage("d")[0] == 2
    finally:
        outbox.stop()
        await writer
        await outbox.close()
    with sqlite3.connect(s.path) as db:
        reasons = [r[0] for r in db.execute("SELECT reason FROM quarantine ORDER BY id")]
    assert len(reasons) == 4 and all(r.startswith("cannot decode record: priority") for r in reasons)


async def test_version_1_file_is_migrated(tmp_path: Path) -> None:
    target = tmp_path / "outbox.db"
    with sqlite3.connect(target) as db:  # the schema of the first release, without auto_vacuum
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL,
                topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, received_at REAL NOT NULL,
                properties BLOB);
            CREATE TABLE quarantine (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, topic TEXT NOT NULL,
                payload BLOB NOT NULL, qos INTEGER NOT NULL, received_at REAL NOT NULL, properties BLOB,
                reason TEXT NOT NULL, quarantined_at REAL NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '1');
            INSERT INTO records (device_id, topic, payload, qos, received_at) VALUES ('d', 'devices/d/x', x'00', 1, 1);
        """)
    outbox = await Outbox.open(OutboxSettings(path=target))
    try:
        assert outbox.depth == 1 and outbox.usage("d") == (1, 1 + 11 + 1 + 64)
        [record] = await outbox.fetch_after(0, 10)
        assert (record.id, record.payload, record.priority) == (1, b"\x00", 1)
    finally:
        await outbox.close()
    with sqlite3.connect(target) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name='quarantine_by_device'").fetchone() == (1,)


def test_record_is_frozen_with_its_own_constructor() -> None:
    record = Record(7, "d", "devices/d/t", b"p", 1, 12.5)
    assert record == Record(id=7, device_id="d", topic="devices/d/t", payload=b"p", qos=1, received_at=12.5,
                            properties=None, priority=PRIORITY_TELEMETRY)
    assert (record.properties, record.priority, record.size) == (None, PRIORITY_TELEMETRY, 1 + 11 + 1 + 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.id = 8  # type: ignore[misc]
    assert dataclasses.replace(record, priority=PRIORITY_ALARM).priority == PRIORITY_ALARM
    assert hash(record) == hash(Record(7, "d", "devices/d/t", b"p", 1, 12.5))


async def test_lock_timeout_is_how_long_both_connections_wait_for_another_writer(tmp_path: Path) -> None:
    """outbox.lock_timeout becomes SQLite's busy timeout of the writer and the reader (a backup tool holding the
    write lock delays a commit that long, then the commit fails and the devices are not acknowledged)."""
    outbox = await Outbox.open(settings(tmp_path, lock_timeout=1.5))
    try:
        for conn in (outbox._writer, outbox._reader):
            async with conn.execute("PRAGMA busy_timeout") as cur:
                assert (await cur.fetchone())[0] == 1500  # type: ignore[index]
    finally:
        await outbox.close()


@pytest.mark.parametrize("value", [0, -1, 601])
def test_lock_timeout_out_of_range_names_the_key(tmp_path: Path, value: float) -> None:
    from edgegw.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, lock_timeout=value)
    assert "outbox.lock_timeout" in str(info.value)


async def test_a_commit_that_keeps_failing_is_retried_paced_and_stop_still_returns(tmp_path: Path) -> None:
    """Every write fails at once (a full disk: ENOSPC on the WAL; here ``query_only`` on the writer connection, real
    SQLite refusing every write) while upstream acknowledgements wait to be deleted. The retries must be paced (not
    a group commit, a rollback and a recount of the whole table in a tight loop), and stop() must still end the
    writer: the deletes it could not commit only mean a resend after the restart."""
    import structlog

    outbox = await Outbox.open(settings(tmp_path, ttl=0))
    writer = asyncio.create_task(outbox.run())
    try:
        for i in range(10):
            outbox.submit("dev", f"devices/dev/{i}", b"x", 1)
        while outbox.committed_id < outbox._next_id - 1:
            await asyncio.sleep(0.01)
        acked = await outbox.fetch_after(0, 5)
        await outbox._writer.execute("PRAGMA query_only=1")
        with structlog.testing.capture_logs() as logs:
            outbox.ack(r.id for r in acked)
            await asyncio.sleep(1.0)
            failures = sum(e["event"] == "outbox.commit_failed" for e in logs)
            assert 1 <= failures <= 5, f"{failures} failed commits in 1 s"
            outbox.stop()
            await asyncio.wait_for(writer, 5)
        assert any(e["event"] == "outbox.deletes_abandoned" and e["deletes"] == 5 for e in logs)
    finally:
        if not writer.done():
            writer.cancel()
        await outbox.close()
    assert len(rows_on_disk(tmp_path / "outbox.db")) == 10  # not deleted: sent again after the restart


async def test_backlog_read_without_skipped_devices_keeps_its_index_walk(tmp_path: Path) -> None:
    """``fetch_backlog(skip_devices=...)`` (the backfill's devices let go in a pass) leaves exactly their rows out,
    in every class, and its query plan is still the walk of records_by_priority (classes != 1) or of the primary
    key (class 1), with the device list built once per query: not a scan of the table or of another index."""
    outbox = await Outbox.open(settings(tmp_path))
    writer = asyncio.create_task(outbox.run())
    try:
        records = [outbox.submit(f"d{i % 3}", "devices/d/x", b"%d" % i, 1, priority=i % 3) for i in range(60)]
        for _ in range(500):
            if outbox.committed_id >= records[-1].id:
                break
            await asyncio.sleep(0.01)
        queries: list[tuple[str, tuple]] = []
        real_execute = outbox._reader.execute

        def recording_execute(sql: str, params: tuple = ()) -> object:
            queries.append((sql, params))
            return real_execute(sql, params)

        outbox._reader.execute = recording_execute  # type: ignore[method-assign]
        for priority in range(3):
            got = await outbox.fetch_backlog(priority, 0, outbox.committed_id, 100, {"d1": 0}.keys())
            assert [r.id for r in got] == [r.id for r in records if r.priority == priority and r.device_id != "d1"]
        outbox._reader.execute = real_execute  # type: ignore[method-assign]
        assert len(queries) == 3 and all("json_each" in sql for sql, _ in queries)
        with sqlite3.connect(outbox._settings.path) as db:
            for (sql, params), priority in zip(queries, range(3), strict=True):
                plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params)]
                walk = ("USING INTEGER PRIMARY KEY" if priority == 1
                        else "USING INDEX records_by_priority (priority=? AND id>? AND id<?)")
                assert plan[0].startswith("SEARCH records ") and walk in plan[0], plan
                assert "LIST SUBQUERY" in " ".join(plan) and "CORRELATED" not in " ".join(plan), plan
    finally:
        outbox.stop()
        await writer
        await outbox.close()
