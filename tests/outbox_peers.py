"""Helpers for tests that drive a real :class:`Outbox` (real SQLite files) in process: a bounded wait, and an outbox
with its writer task running."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from edgegw.outbox import Outbox


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class Running:
    """An outbox with its group-commit writer running as a task."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.task = asyncio.create_task(outbox.run())

    async def settle(self) -> None:
        """Wait until everything submitted and acknowledged so far is committed."""
        box = self.outbox
        await eventually(lambda: not box._pending and not box._to_delete and not box._deleting
                         and not box._to_quarantine and box.committed_id == box._next_id - 1, 10,
                         "the writer to catch up")

    async def close(self) -> None:
        self.outbox.stop()
        await asyncio.wait_for(self.task, 10)
        await self.outbox.close()
