"""Outbox.submit(..., acker=, token=): a device connection is told once per group commit about all of its records in
the group (tokens in submit order), only once they are on disk, never about a record of a later group; a failed
commit tells it False. Real SQLite files."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from edgegw.config import OutboxSettings
from edgegw.outbox.store import Outbox


def settings(tmp_path: Path, **kw: object) -> OutboxSettings:
    return OutboxSettings(path=tmp_path / "outbox.db", **kw)  # type: ignore[arg-type]


def topics_on_disk(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT topic FROM records")}


class Acker:
    """Records every call, and whether each token's record was readable by another connection at that moment."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.calls: list[tuple[list[int], bool]] = []
        self.on_disk_when_told: list[bool] = []

    def records_committed(self, tokens: list[int], ok: bool) -> None:
        on_disk = topics_on_disk(self.path)
        self.calls.append((list(tokens), ok))
        self.on_disk_when_told.extend(f"{self.name}/{t}" in on_disk for t in tokens)

    @property
    def tokens(self) -> list[int]:
        return [t for tokens, _ in self.calls for t in tokens]


async def wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_one_call_per_group_and_acker_after_the_commit(tmp_path: Path) -> None:
    outbox = await Outbox.open(settings(tmp_path, commit_window_ms=50))
    writer = asyncio.create_task(outbox.run())
    a, b = Acker("a", outbox._settings.path), Acker("b", outbox._settings.path)
    plain: list[bool] = []
    try:
        for i in range(1, 31):  # interleaved, as two devices' publishes arrive
            acker = a if i % 3 else b
            outbox.submit("dev", f"{acker.name}/{i}", b"x", 1, acker=acker, token=i)
        outbox.submit("dev", "plain", b"x", 1, plain.append)  # a per-record callback in the same group
        assert a.calls == [] and b.calls == []  # nothing acknowledged synchronously
        await wait_until(lambda: len(plain) == 1)
        assert outbox.commits == 1
        assert a.calls == [([i for i in range(1, 31) if i % 3], True)]
        assert b.calls == [([i for i in range(1, 31) if not i % 3], True)]
        assert all(a.on_disk_when_told) and all(b.on_disk_when_told)
        assert plain == [True]
    finally:
        outbox.stop()
        await writer
        await outbox.close()


async def test_records_submitted_during_a_commit_are_told_with_the_next_group(tmp_path: Path) -> None:
    outbox = await Outbox.open(settings(tmp_path, commit_window_ms=0))
    writer = asyncio.create_task(outbox.run())
    a = Acker("a", outbox._settings.path)
    sent = 0

    def more() -> None:  # the writer's listener runs after each commit: submit while the next one may be running
        nonlocal sent
        if sent < 200:
            for _ in range(5):
                sent += 1
                outbox.submit("dev", f"a/{sent}", b"x", 1, acker=a, token=sent)

    outbox.add_commit_listener(more)
    try:
        more()
        for _ in range(40):  # and from the loop, between and during commits
            await asyncio.sleep(0)
            more()
        await wait_until(lambda: len(a.tokens) == sent == 200)
        assert a.tokens == list(range(1, 201))  # each once, in order
        assert all(a.on_disk_when_told)  # never told about a record of a later group
        assert all(ok for _, ok in a.calls)
        assert len(a.calls) == outbox.commits > 1
    finally:
        outbox.stop()
        await writer
        await outbox.close()


async def test_records_submitted_during_a_commit_without_ackers_wait_for_their_own(tmp_path: Path) -> None:
    outbox = await Outbox.open(settings(tmp_path, commit_window_ms=0))
    writer = asyncio.create_task(outbox.run())
    a = Acker("a", outbox._settings.path)
    try:
        for n in range(1, 21):
            outbox.ack([10_000 + n])  # a group of deletes only is committed ...
            for _ in range(3):
                await asyncio.sleep(0)
            outbox.submit("dev", f"a/{n}", b"x", 1, acker=a, token=n)  # ... while this one arrives
        await wait_until(lambda: len(a.tokens) == 20)
        assert a.tokens == list(range(1, 21))
        assert all(a.on_disk_when_told)
    finally:
        outbox.stop()
        await writer
        await outbox.close()


async def test_a_queue_longer_than_a_group_is_acknowledged_group_by_group(tmp_path: Path) -> None:
    # commit_max_records splits the queue: each acker's tokens are split at the group boundary.
    outbox = await Outbox.open(settings(tmp_path, commit_window_ms=0, commit_max_records=7))
    writer = asyncio.create_task(outbox.run())
    ackers = [Acker(name, outbox._settings.path) for name in "abc"]
    try:
        for i in range(1, 41):
            acker = ackers[i * i % 3]
            outbox.submit("dev", f"{acker.name}/{i}", b"x", 1, acker=acker, token=i)
        await wait_until(lambda: sum(len(x.tokens) for x in ackers) == 40)
        assert outbox.commits >= 6
        for acker in ackers:
            assert acker.tokens == [i for i in range(1, 41) if ackers[i * i % 3] is acker]
            assert all(acker.on_disk_when_told)
            assert all(ok and len(tokens) <= 7 for tokens, ok in acker.calls)
    finally:
        outbox.stop()
        await writer
        await outbox.close()


async def test_a_failed_commit_tells_the_acker_false(tmp_path: Path) -> None:
    outbox = await Outbox.open(settings(tmp_path, commit_window_ms=0))
    writer = asyncio.create_task(outbox.run())
    a = Acker("a", outbox._settings.path)
    lock = sqlite3.connect(outbox._settings.path, timeout=1, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the group commit waits, then fails
        for i in (1, 2, 3):
            outbox.submit("dev", f"a/{i}", b"x", 1, acker=a, token=i)
        await wait_until(lambda: bool(a.calls), timeout=20)
        assert a.calls == [([1, 2, 3], False)]
        lock.execute("ROLLBACK")
        outbox.submit("dev", "a/4", b"x", 1, acker=a, token=4)  # the outbox works again
        await wait_until(lambda: len(a.calls) == 2)
        assert a.calls[1] == ([4], True)
        assert topics_on_disk(outbox._settings.path) == {"a/4"}  # the failed ones were not stored
    finally:
        lock.close()
        outbox.stop()
        await writer
        await outbox.close()
