"""The publish fast path (edgegw/coap/_fastpath.py): publishes are answered from the outbox's ``on_commit`` without
an aiocoap task each, and keep every invariant of the rendered path: 2.01 only after the commit, flow control
(max_inflight), a connection gone before its commit, a crash in a stage answered 5.00, other requests still served
by aiocoap. In-process: a real Outbox file, real TLS, pipelined CoAP-over-TCP frames from a raw TLS client.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap.transports.tcp import _extract_message_size, _serialize
from conftest import Fleet
from test_coap_limits import device, post

from edgegw.coap import CoAPServer
from edgegw.config import ACLSettings, CoAPSettings, OutboxSettings, TLSSettings
from edgegw.identity import server_ssl_context
from edgegw.outbox.store import Outbox
from edgegw.policy.acl import ACL

CSM = _serialize(aiocoap.Message(code=aiocoap.numbers.codes.CSM))
CREATED, INTERNAL = 0x41, 0xA0  # 2.01, 5.00


def _post(token: int, path: str) -> bytes:
    msg = aiocoap.Message(code=aiocoap.POST, uri_path=("ps", *path.split("/")), payload=b'{"v":1}',
                          content_format=50)
    msg.token = token.to_bytes(2, "big")
    return _serialize(msg)


async def _answers(reader: asyncio.StreamReader, count: int) -> dict[int, int]:
    """Read until ``count`` responses (signalling frames skipped): token -> code."""
    got: dict[int, int] = {}
    buf = b""
    while len(got) < count:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, f"closed after {len(got)} answers"
        buf += chunk
        while (size := _extract_message_size(buf)) is not None and sum(size) <= len(buf):
            offset, tkl, _ = size
            frame, buf = buf[:sum(size)], buf[sum(size):]
            if frame[offset - 1] < 0xE0:
                got[int.from_bytes(frame[offset:offset + tkl], "big")] = frame[offset - 1]
    return got


@asynccontextmanager
async def held_writer(tmp_path: Path, fleet: Fleet, *, admit: Callable[[str, int], float] | None = None, **coap: Any) -> AsyncIterator[tuple[CoAPServer, Callable[[], None]]]:
    """The CoAP server on an outbox whose writer starts only when the test calls ``release()``."""
    tls = TLSSettings(cert=fleet.folder / "server" / "gateway.crt", key=fleet.folder / "server" / "gateway.key",
                      ca=fleet.ca)
    box = await Outbox.open(OutboxSettings(path=tmp_path / "outbox.db"))
    writers: list[asyncio.Task[None]] = []
    server = CoAPServer(CoAPSettings(enabled=True, bind="127.0.0.1", port=0, **coap), server_ssl_context(tls),
                        ACL.from_settings(ACLSettings()), box, **({"admit": admit} if admit else {}))
    await server.start()
    try:
        yield server, lambda: writers.append(asyncio.create_task(box.run())) if not writers else None
    finally:
        if not writers:
            writers.append(asyncio.create_task(box.run()))
        await asyncio.wait_for(server.drain(5), 15)
        box.stop()
        await writers[0]
        await box.close()


def _committed(db_path: Path, device_id: str) -> int:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        return int(db.execute("SELECT count(*) FROM records WHERE device_id = ?", (device_id,)).fetchone()[0])
    finally:
        db.close()


async def test_pipelined_publishes_take_no_task_each_and_respect_max_inflight(tmp_path: Path, fleet: Fleet) -> None:
    async with held_writer(tmp_path, fleet, max_inflight=8) as (srv, release):
        loop = asyncio.get_running_loop()
        created = 0

        def counting(loop_: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            nonlocal created
            created += 1
            return asyncio.Task(coro, loop=loop_, **kwargs)

        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=fleet.device_context("dev-04"),
                                                       server_hostname="127.0.0.1")
        # The outbox writer is not running yet: nothing can commit, so the publishes stay in flight for as long as
        # the test looks (no timing involved).
        loop.set_task_factory(counting)
        try:
            writer.write(CSM + b"".join(_post(i, f"fast/{i}") for i in range(40)))
            await writer.drain()
            assert srv.listener is not None
            for _ in range(150):
                if srv.listener.inflight >= 8:
                    break
                await asyncio.sleep(0.02)
            conn = next(iter(srv.listener.devices["dev-04"]))
            # Past max_inflight the connection is not read (what arrived in the same read is still served).
            assert 8 <= conn.inflight <= 40 and conn._paused, conn.inflight
            # None of them is answered before its commit.
            assert srv.stats.published == 0
            # Each request waiting for its commit used to be an aiocoap task (and a future): now none is.
            assert created < 5, created
            assert srv.context is not None and not any(t.incoming_requests for t in srv.context.request_interfaces)
        finally:
            loop.set_task_factory(None)
            release()
        got = await _answers(reader, 40)
        writer.close()
        assert got == {i: CREATED for i in range(40)}
        assert conn.inflight == 0 and not conn._paused and srv.stats.published == 40
        assert _committed(tmp_path / "outbox.db", "dev-04") == 40  # every 2.01 was a committed record


async def test_connection_gone_before_the_commit_and_a_crashing_stage(tmp_path: Path, fleet: Fleet) -> None:
    def admit(device_id: str, nbytes: int) -> float:
        if device_id == "dev-06":
            raise RuntimeError("limiter bug")
        return 0.0

    async with held_writer(tmp_path, fleet, admit=admit) as (srv, release):
        ctx = fleet.device_context("dev-05")
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=ctx, server_hostname="127.0.0.1")
        writer.write(CSM + b"".join(_post(i, f"gone/{i}") for i in range(10)))
        await writer.drain()
        for _ in range(100):
            if srv.listener is not None and srv.listener.inflight:
                break
            await asyncio.sleep(0.01)
        assert srv.listener is not None and srv.listener.inflight == 10
        conn = next(iter(srv.listener.devices["dev-05"]))
        writer.transport.abort()  # gone before the commit: the records stay, nobody is answered, nothing leaks
        for _ in range(150):  # the server saw the connection go while its publishes await the commit
            if srv.connection_count == 0:
                break
            await asyncio.sleep(0.02)
        assert srv.connection_count == 0 and conn.inflight == 10
        release()
        for _ in range(200):
            if not conn.inflight and _committed(tmp_path / "outbox.db", "dev-05") == 10:
                break
            await asyncio.sleep(0.02)
        assert conn.inflight == 0 and _committed(tmp_path / "outbox.db", "dev-05") == 10
        # A stage that raises: that request gets 5.00, the connection and the others go on.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=fleet.device_context("dev-06"),
                                                       server_hostname="127.0.0.1")
        writer.write(CSM + _post(1, "crash"))
        assert await _answers(reader, 1) == {1: INTERNAL}
        writer.write(_post(2, "crash"))
        assert await _answers(reader, 1) == {2: INTERNAL}
        writer.close()
        # Requests that are not publishes still go through aiocoap's rendering.
        async with device(fleet, "dev-05") as client:
            assert str((await post(client, srv.port, "after")).code) == "2.01 Created"
            listing = await asyncio.wait_for(client.request(aiocoap.Message(
                code=aiocoap.GET, uri=f"coaps+tcp://127.0.0.1:{srv.port}/.well-known/core")).response, 10)
            assert str(listing.code) == "2.05 Content" and b"/ps/" in listing.payload
            # The remembered ACL verdicts go with a reload's new rules.
            srv.site.acl = ACL.from_settings(ACLSettings(publish=("devices/{device_id}/other/#",)))
            assert str((await post(client, srv.port, "after")).code) == "4.03 Forbidden"
            assert str((await post(client, srv.port, "other/x")).code) == "2.01 Created"
