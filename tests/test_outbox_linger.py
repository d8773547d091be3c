"""The outbox writer's linger (edgegw/outbox/store.py ``_linger``): a group of records is committed as soon as no
record came for a moment, not at the end of ``commit_window_ms``: the devices that sent them wait for the PUBACK
this commit gives before they send more. Against a real SQLite file, window set far beyond the test's bound."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edgegw.config import OutboxSettings
from edgegw.outbox import _writer
from edgegw.outbox.store import Outbox

pytestmark = pytest.mark.timeout(60)

WINDOW_MS = 60_000  # a commit that waited for the window would miss every bound below


async def test_a_quiet_group_is_committed_before_the_window_ends(tmp_path: Path) -> None:
    outbox = await Outbox.open(OutboxSettings(path=tmp_path / "outbox.db", commit_window_ms=WINDOW_MS))
    writer = asyncio.create_task(outbox.run())
    try:
        for round_ in range(3):
            committed: list[asyncio.Future[bool]] = []
            for i in range(5):
                fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
                committed.append(fut)
                outbox.submit("dev-1", f"devices/dev-1/t{round_}", b"%d" % i, 1, fut.set_result)
                await asyncio.sleep(0)  # they arrive over several loop turns, as from a device
            assert await asyncio.wait_for(asyncio.gather(*committed), 10) == [True] * 5
        assert outbox.commits == 3  # one group per burst: the quiet spell ends it, not the window
    finally:
        outbox.stop()
        await asyncio.wait_for(writer, 10)
        await outbox.close()


async def test_deletes_alone_linger_but_a_record_ends_it_at_once_by_default(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Deletes alone wait to share a transaction (here: far beyond the test's bound); with the default
    ``commit_window_ms`` (0) a record submitted meanwhile ends that wait: a device waits for its PUBACK."""
    monkeypatch.setattr(_writer, "_DELETES_WINDOW", 60.0)
    assert OutboxSettings().commit_window_ms == 0
    outbox = await Outbox.open(OutboxSettings(path=tmp_path / "outbox.db"))
    writer = asyncio.create_task(outbox.run())
    try:
        first: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        record = outbox.submit("dev-1", "devices/dev-1/t", b"1", 1, first.set_result)
        assert await asyncio.wait_for(first, 10)  # window 0: no wait at all
        outbox.ack([record.id])  # the writer now lingers on this delete
        await asyncio.sleep(0.05)
        assert outbox.depth == 1  # not committed: the delete alone is still waiting
        second: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        outbox.submit("dev-1", "devices/dev-1/t", b"2", 1, second.set_result)
        assert await asyncio.wait_for(second, 10)  # the record ended the linger, and the delete went with it
        assert outbox.depth == 1 and outbox.commits == 2
    finally:
        outbox.stop()
        await asyncio.wait_for(writer, 10)
        await outbox.close()
