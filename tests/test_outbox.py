"""The outbox against real SQLite files: group commit, acknowledgement only after commit, restart, bad paths."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from edgegw.config import OutboxSettings
from edgegw.errors import OutboxError
from edgegw.outbox.store import Outbox


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
        outbox._pending[-1] = (rec, lambda ok, rid=rec.id: on_commit(rid, ok))
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


async def test_corrupt_file_fails_at_start_naming_it(tmp_path: Path) -> None:
    target = tmp_path / "outbox.db"
    target.write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(OutboxError, match="outbox.db"):
        await Outbox.open(OutboxSettings(path=target))
