"""The CoAP ingress in-process (a real Outbox file, real TLS, aiocoap/libcoap clients with fleet certificates):
overload answers, the rate-limit seam, malformed frames, connection and observation caps, downlink notifications.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.transports.tcp import _extract_message_size, _serialize

from conftest import Fleet
from edgegw.coap import CoAPServer
from edgegw.config import ACLSettings, CoAPSettings, OutboxSettings, TLSSettings
from edgegw.identity import server_ssl_context
from edgegw.mqtt.packets import Properties, PropertyId
from edgegw.outbox.store import Outbox
from edgegw.policy.acl import ACL

CLIENT = shutil.which("coap-client-openssl")


@asynccontextmanager
async def running(tmp_path: Path, fleet: Fleet, *, outbox: dict[str, Any] | None = None,
                  admit: Callable[[str, int], float] | None = None, **coap: Any) -> AsyncIterator[CoAPServer]:
    tls = TLSSettings(cert=fleet.folder / "server" / "gateway.crt", key=fleet.folder / "server" / "gateway.key",
                      ca=fleet.ca)
    box = await Outbox.open(OutboxSettings(path=tmp_path / "outbox.db", **(outbox or {})))
    writer = asyncio.create_task(box.run())
    settings = CoAPSettings(enabled=True, bind="127.0.0.1", port=0, **coap)
    extra = {"admit": admit} if admit is not None else {}
    server = CoAPServer(settings, server_ssl_context(tls), ACL.from_settings(ACLSettings()), box, **extra)
    await server.start()
    try:
        yield server
    finally:
        await asyncio.wait_for(server.drain(5), 15)
        box.stop()
        await writer
        await box.close()


@asynccontextmanager
async def device(fleet: Fleet, device_id: str) -> AsyncIterator[aiocoap.Context]:
    """An aiocoap client presenting ``device_id``'s certificate (the hook: its credentials map's context)."""
    ctx = await aiocoap.Context.create_client_context(transports=["tlsclient"])
    device_ctx = fleet.device_context(device_id)
    ctx.client_credentials.ssl_client_context = lambda scheme, hostinfo: device_ctx  # type: ignore[method-assign]
    try:
        yield ctx
    finally:
        await ctx.shutdown()


async def post(ctx: aiocoap.Context, port: int, path: str, payload: bytes = b"{}") -> aiocoap.Message:
    msg = aiocoap.Message(code=aiocoap.POST, uri=f"coaps+tcp://127.0.0.1:{port}/ps/{path}", payload=payload,
                          content_format=50)
    return await asyncio.wait_for(ctx.request(msg).response, 10)


async def test_full_outbox_and_rate_limit_answer_with_max_age(tmp_path: Path, fleet: Fleet) -> None:
    # reject-new with room for 10 records: near the top a device over its fair share gets 4.29, a full outbox 5.03.
    limited = {"dev-02"}
    async with running(tmp_path, fleet, outbox={"max_records": 10, "full_policy": "reject-new"},
                       admit=lambda device_id, nbytes: 2.5 if device_id in limited else 0.0, full_max_age=7) as srv:
        async with device(fleet, "dev-00") as a, device(fleet, "dev-01") as b, device(fleet, "dev-02") as c:
            answer = await post(c, srv.port, "t")
            assert (str(answer.code), answer.opt.max_age) == ("4.29 Too Many Requests", 3)  # ceil(2.5)
            assert str((await post(b, srv.port, "t")).code) == "2.01 Created"
            codes = [str((await post(a, srv.port, f"t/{i}")).code) for i in range(9)]
            assert codes[:8] == ["2.01 Created"] * 8
            share = await post(a, srv.port, "t/share")
            assert (str(share.code), share.opt.max_age) == ("4.29 Too Many Requests", 7)
            assert str((await post(b, srv.port, "t")).code) == "2.01 Created"
            full = await post(b, srv.port, "t")
            assert (str(full.code), full.opt.max_age) == ("5.03 Service Unavailable", 7)
            assert b"outbox full" in full.payload
        assert srv.stats.rate_limited == 1 and srv.stats.outbox_full >= 2
        assert srv.site.outbox.depth == 10


def _tls_client(fleet: Fleet, device_id: str) -> ssl.SSLContext:
    return fleet.device_context(device_id)


async def _exchange(port: int, ctx: ssl.SSLContext, data: bytes) -> tuple[list[int], bool]:
    """Send ``data`` on a fresh TLS connection; the codes of the frames received, and whether the server closed
    the connection (within 3 s: junk that is only the start of a frame just waits for more)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
    writer.write(data)
    buf = b""
    closed = False
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 3):
            buf += chunk
        closed = True
    except (ConnectionError, ssl.SSLError):
        closed = True
    except TimeoutError:
        pass
    writer.close()
    codes = []
    while (size := _extract_message_size(buf)) is not None and sum(size) <= len(buf):
        codes.append(buf[size[0] - 1])
        buf = buf[sum(size):]
    return codes, closed


async def test_malformed_frames_close_only_that_connection(tmp_path: Path, fleet: Fleet) -> None:
    csm = _serialize(aiocoap.Message(code=aiocoap.numbers.codes.CSM))
    early = aiocoap.Message(code=aiocoap.POST, uri_path=("ps", "t"), payload=b"{}")
    early.token = b"\x01"
    request = _serialize(early)
    ABORT, CSM = 0xE5, 0xE1
    cases = [
        csm + b"\x0f\x01" + b"\x00" * 20,                 # token length 15
        csm + b"\xf0" + (50_000_000).to_bytes(4, "big"),  # announces ~50 MB (over max_payload)
        request,                                          # a request before any CSM
        csm + b"\xd0\x05\x02" + b"\xff" * 30,              # options that do not parse
    ]
    rng = __import__("random").Random(5)
    cases += [csm + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))) for _ in range(30)]
    async with running(tmp_path, fleet) as srv, device(fleet, "dev-03") as good:
        ctx = _tls_client(fleet, "dev-03")
        results = await asyncio.gather(*(_exchange(srv.port, ctx, data) for data in cases))
        for data, (codes, closed) in zip(cases[:4], results[:4], strict=True):
            assert closed and codes[:1] == [CSM] and ABORT in codes, (data[:8].hex(), codes)
        assert str((await post(good, srv.port, "still-fine")).code) == "2.01 Created"
        assert srv.connection_stats is not None and srv.connection_stats.protocol_errors >= 3
        assert srv.connection_count == 1


async def test_connection_cap_idle_timeout_and_handshake_failures(tmp_path: Path, fleet: Fleet) -> None:
    async with running(tmp_path, fleet, max_connections=2, idle_timeout=0.4) as srv:
        stats = srv.connection_stats
        assert stats is not None
        ctx = _tls_client(fleet, "dev-04")
        held = [await asyncio.open_connection("127.0.0.1", srv.port, ssl=ctx, server_hostname="127.0.0.1")
                for _ in range(2)]
        # The third is refused at accept, before any TLS work.
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError)):
            r, w = await asyncio.open_connection("127.0.0.1", srv.port, ssl=ctx, server_hostname="127.0.0.1")
            await asyncio.wait_for(r.read(1), 5)
            raise ConnectionError("no data")  # the server closed it: read returned b""
        assert stats.refused_capacity == 1
        # Both held connections said nothing: closed by the idle sweep.
        for reader, writer in held:
            assert await asyncio.wait_for(reader.read(), 5) is not None
            writer.close()
        assert stats.idle_closed == 2
        # A client without a certificate: a failed handshake, counted.
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.load_verify_locations(cafile=str(fleet.ca))
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError)):
            r, w = await asyncio.open_connection("127.0.0.1", srv.port, ssl=bare, server_hostname="127.0.0.1")
            await asyncio.wait_for(r.readexactly(1), 5)
        assert stats.handshake_failed == 1


async def test_observations_get_commands_with_their_content_format(tmp_path: Path, fleet: Fleet) -> None:
    async with running(tmp_path, fleet, max_observations=1, idle_timeout=0.3) as srv, device(fleet, "dev-05") as dev:
        url = f"coaps+tcp://127.0.0.1:{srv.port}/ps/cmd/%2B"
        req = dev.request(aiocoap.Message(code=aiocoap.GET, uri=url, observe=0))
        first = await asyncio.wait_for(req.response, 10)
        assert str(first.code) == "2.05 Content" and first.opt.observe == 0
        second = await asyncio.wait_for(dev.request(aiocoap.Message(code=aiocoap.GET, uri=url, observe=0)).response,
                                        10)
        assert str(second.code) == "5.03 Service Unavailable"
        notes = req.observation.__aiter__()
        # Silent for several idle sweeps: a connection holding an observation is not closed as idle.
        await asyncio.sleep(1.0)
        assert srv.connection_stats is not None and srv.connection_stats.idle_closed == 0
        cbor = Properties(values={PropertyId.CONTENT_TYPE: "application/cbor"})
        assert not srv.deliver_downlink("dev-06", "devices/dev-06/cmd/x", b"other", 1)
        assert not srv.deliver_downlink("dev-05", "devices/dev-05/cmd/a/b", b"too deep", 1)  # "+": one level
        assert srv.deliver_downlink("dev-05", "devices/dev-05/cmd/reboot", b"\xa1ax\x01", 1, cbor)
        note = await asyncio.wait_for(notes.__anext__(), 10)
        assert (note.payload, note.opt.content_format) == (b"\xa1ax\x01", 60)
        assert srv.deliver_downlink("dev-05", "devices/dev-05/cmd/led", b"on", 0)
        note = await asyncio.wait_for(notes.__anext__(), 10)
        assert note.payload == b"on" and note.opt.content_format is None
        assert srv.stats.notifications == 2
    assert not srv.site.observers  # ended with the shutdown


class _Collect(asyncio.DatagramProtocol):
    def __init__(self, into: list[bytes]) -> None:
        self.into = into

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.into.append(data)


@pytest.mark.skipif(CLIENT is None, reason="libcoap3-bin (coap-client-openssl) not installed")
async def test_lab_listener_non_is_best_effort_and_con_waits_for_the_commit(tmp_path: Path, fleet: Fleet) -> None:
    async with running(tmp_path, fleet, lab=True, lab_port=0, outbox={"commit_window_ms": 200.0},
                       exchange_lifetime=0.5) as srv:
        assert srv.lab_port is not None
        # A burst of 300 datagrams (distinct message ids): all answered (SO_RCVBUF), and the message-id cache
        # empties after exchange_lifetime instead of holding each for 247 s.
        loop = asyncio.get_running_loop()
        answers: list[bytes] = []
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Collect(answers), remote_addr=("127.0.0.1", srv.lab_port))
        for mid in range(300):
            msg = aiocoap.Message(code=aiocoap.GET, uri_path=(".well-known", "core"), uri_query=(f"c=b-{mid % 3}",))
            msg.mtype, msg.mid, msg.token = aiocoap.NON, mid, mid.to_bytes(2, "big")
            transport.sendto(msg.encode())
        mman = srv.context.request_interfaces[-1].token_interface
        for _ in range(250):
            if len(answers) == 300 and not mman._recent_messages:
                break
            await asyncio.sleep(0.02)
        transport.close()
        assert len(answers) == 300 and not mman._recent_messages, (len(answers), len(mman._recent_messages))
        url = f"coap://127.0.0.1:{srv.lab_port}/ps/lab"
        for flags, device_id in ((["-N"], "non-1"), ([], "con-1")):
            proc = await asyncio.create_subprocess_exec(
                str(CLIENT), "-B", "5", *flags, "-m", "post", "-t", "json", "-e", "{}", f"{url}?c={device_id}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out = (await asyncio.wait_for(proc.communicate(), 15))[0].decode()
            assert "4." not in out and "5." not in out, out
        assert srv.stats.published == 2
    # The NON was accepted best-effort (answered without waiting, stored as QoS 0); the CON waited for its commit
    # (QoS 1, like a device's acknowledged publish).
    db = sqlite3.connect(tmp_path / "outbox.db")
    try:
        rows = dict(db.execute("SELECT device_id, qos FROM records WHERE topic LIKE 'devices/%/lab'").fetchall())
    finally:
        db.close()
    assert rows == {"non-1": 0, "con-1": 1}
