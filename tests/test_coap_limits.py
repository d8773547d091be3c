"""The CoAP ingress in-process (a real Outbox file, real TLS, aiocoap/libcoap clients with fleet certificates):
overload answers, the rate-limit seam, malformed frames, connection and observation caps, downlink notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.transports.tcp import _extract_message_size, _serialize
from OpenSSL import SSL

from conftest import Fleet
from edgegw.coap import CoAPServer
from edgegw.coap._dtls_client import DTLSClient, client_context
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


def _send_unread(tls: ssl.SSLSocket, data: bytes, total: int) -> None:
    """Send ``data`` until ``total`` bytes went or the socket is shut; never read anything."""
    sent = 0
    try:
        while sent < total:
            tls.sendall(data)
            sent += len(data)
    except OSError:
        pass


async def test_a_device_that_does_not_read_its_answers_is_not_read_either(tmp_path: Path, fleet: Fleet) -> None:
    """Every request makes an answer (a 4.15 here: five times the request's size). A device that sends and never
    reads must not make the gateway buffer those answers without bound: past the transport's high-water mark its
    connection is not read until it reads; other devices are served meanwhile."""
    bad = aiocoap.Message(code=aiocoap.POST, uri_path=("ps", "t"), payload=b"x", content_format=0)
    bad.token = b"\x01"
    async with running(tmp_path, fleet) as srv, device(fleet, "dev-03") as good:
        raw = socket.create_connection(("127.0.0.1", srv.port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        tls = await asyncio.to_thread(_tls_client(fleet, "dev-05").wrap_socket, raw, server_hostname="127.0.0.1")
        tls.sendall(_serialize(aiocoap.Message(code=aiocoap.numbers.codes.CSM)))
        # 3 MB of requests: answered in full, ~15 MB of answers would wait in the gateway for a device that never
        # reads them.
        flood = asyncio.create_task(asyncio.to_thread(_send_unread, tls, _serialize(bad) * 2000, 3_000_000))
        try:
            seen, still = -1, 0
            for _ in range(120):  # until the gateway stops reading it for a whole second (or 30 s)
                await asyncio.sleep(0.25)
                still = still + 1 if srv.stats.requests == seen else 0
                seen = srv.stats.requests
                if still >= 4:
                    break
            conns = [c for c in srv.listener._pool if c._device_id == "dev-05"]  # type: ignore[union-attr]
            buffered = conns[0]._transport.get_write_buffer_size() if conns and conns[0]._transport else 0
            assert still >= 4 and buffered < 4_000_000, f"{seen} requests read, {buffered} bytes of answers buffered"
            assert str((await post(good, srv.port, "meanwhile")).code) == "2.01 Created"
        finally:
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_RDWR)  # ends the sender's blocked sendall
            await flood
            tls.close()


async def test_commands_to_an_observer_that_does_not_read_are_dropped_not_buffered(tmp_path: Path,
                                                                                    fleet: Fleet) -> None:
    """An observation keeps its connection from the idle sweep. A device that observes and then stops reading
    must not make the gateway buffer every command for it: once its connection's write buffer is past the
    high-water mark, notifications to it are dropped and counted, as MQTT drops QoS 0 deliveries to a backlogged
    device."""
    observe = aiocoap.Message(code=aiocoap.GET, uri_path=("ps", "cmd", "+"), observe=0)
    observe.token = b"\x07"
    async with running(tmp_path, fleet) as srv:
        raw = socket.create_connection(("127.0.0.1", srv.port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        tls = await asyncio.to_thread(_tls_client(fleet, "dev-06").wrap_socket, raw, server_hostname="127.0.0.1")
        try:
            tls.sendall(_serialize(aiocoap.Message(code=aiocoap.numbers.codes.CSM)) + _serialize(observe))
            await _wait_for(lambda: len(srv.site.observers.get("dev-06", ())) == 1, "the observation")
            conn = srv.site.observers["dev-06"][0].remote
            assert conn is not None
            conn._transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            command = b"c" * 4000
            for i in range(2000):  # 8 MB of commands for a device that reads none of them
                srv.deliver_downlink("dev-06", f"devices/dev-06/cmd/{i % 7}", command, 0)
                if i % 100 == 0:
                    await asyncio.sleep(0.01)  # let the transport write what the socket takes
            buffered = conn._transport.get_write_buffer_size()
            assert buffered < 1_000_000, f"{buffered} bytes of notifications buffered for a device that does not read"
            assert srv.stats.notifications_dropped_backlog > 0
            assert srv.stats.notifications + srv.stats.notifications_dropped_backlog == 2000
        finally:
            tls.close()


async def test_requests_pipelined_in_one_read_stay_within_max_inflight(tmp_path: Path, fleet: Fleet) -> None:
    """aiocoap frames and dispatches every message of a read at once: 2,000 POSTs written together were all awaiting
    their commit on one connection with max_inflight = 4. Past max_inflight the rest waits, unread by aiocoap, and
    is served as the commits answer (the device sends nothing more: it waits for those answers)."""
    from edgegw.coap.tls_listener import DeviceConnection

    peak = 0
    started = DeviceConnection.request_started

    def counted(conn: DeviceConnection) -> None:
        nonlocal peak
        started(conn)
        peak = max(peak, conn.inflight)

    requests = []
    for i in range(2000):
        msg = aiocoap.Message(code=aiocoap.POST, uri_path=("ps", "p", str(i)), payload=b"{}", content_format=50)
        msg.token = i.to_bytes(2, "big")
        requests.append(_serialize(msg))
    DeviceConnection.request_started = counted  # type: ignore[method-assign]
    try:
        async with running(tmp_path, fleet, max_inflight=4, outbox={"commit_window_ms": 20.0}) as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=_tls_client(fleet, "dev-04"),
                                                          server_hostname="127.0.0.1")
            writer.write(_serialize(aiocoap.Message(code=aiocoap.numbers.codes.CSM)) + b"".join(requests))
            answers: dict[int, int] = {}
            buf = b""
            async with asyncio.timeout(60):
                while len(answers) < 2000:
                    buf += await reader.read(65536)
                    while (size := _extract_message_size(buf)) is not None and sum(size) <= len(buf):
                        tokenoffset, tkl, _ = size
                        code, token = buf[tokenoffset - 1], buf[tokenoffset:tokenoffset + tkl]
                        if code == 65:  # 2.01 (CSM, 7.01, is not an answer)
                            answers[int.from_bytes(token, "big")] = code
                        buf = buf[sum(size):]
            writer.close()
            assert peak <= 4, f"{peak} requests of one connection awaiting their commit, max_inflight = 4"
            assert srv.stats.published == 2000
    finally:
        DeviceConnection.request_started = started  # type: ignore[method-assign]


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


async def test_a_reload_that_narrows_acl_subscribe_ends_the_observations_it_no_longer_allows(tmp_path: Path,
                                                                                              fleet: Fleet) -> None:
    """Deliveries trust what the observe accepted (as MQTT routing trusts SUBSCRIBE): a reload whose ACL refuses an
    open observation's filter ends it (a last 4.03) instead of sending it commands the device may no longer get;
    the observations the new rules still allow go on."""
    async with running(tmp_path, fleet) as srv, device(fleet, "dev-07") as dev:
        base = f"coaps+tcp://127.0.0.1:{srv.port}/ps/"
        cmd = dev.request(aiocoap.Message(code=aiocoap.GET, uri=base + "cmd/%23", observe=0))
        status = dev.request(aiocoap.Message(code=aiocoap.GET, uri=base + "status/%23", observe=0))
        for req in (cmd, status):
            assert str((await asyncio.wait_for(req.response, 10)).code) == "2.05 Content"
        notes = status.observation.__aiter__()
        srv.site.acl = ACL.from_settings(ACLSettings(subscribe=["devices/{device_id}/status/#"]))
        assert not srv.deliver_downlink("dev-07", "devices/dev-07/cmd/reboot", b"now", 1)
        assert srv.deliver_downlink("dev-07", "devices/dev-07/status/get", b"please", 1)
        assert (await asyncio.wait_for(notes.__anext__(), 10)).payload == b"please"
        await _wait_for(lambda: len(srv.site.observers.get("dev-07", ())) == 1, "the refused observation's end")


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


async def test_put_answers_2_04_and_post_2_01_only_once_committed(tmp_path: Path, fleet: Fleet) -> None:
    # A 250 ms commit window: an answer sent before the commit would arrive long before the row is readable from
    # another connection (WAL: only committed data is visible there).
    async with running(tmp_path, fleet, outbox={"commit_window_ms": 250.0}) as srv, device(fleet, "dev-03") as ctx:
        for method, code, path in ((aiocoap.PUT, "2.04 Changed", "put/1"), (aiocoap.POST, "2.01 Created", "post/1")):
            msg = aiocoap.Message(code=method, uri=f"coaps+tcp://127.0.0.1:{srv.port}/ps/{path}", payload=b"{}",
                                  content_format=50)
            answer = await asyncio.wait_for(ctx.request(msg).response, 10)
            assert str(answer.code) == code
            db = sqlite3.connect(f"file:{tmp_path / 'outbox.db'}?mode=ro", uri=True, timeout=5)
            try:
                topics = [t for (t,) in db.execute("SELECT topic FROM records WHERE device_id = 'dev-03'")]
            finally:
                db.close()
            assert f"devices/dev-03/{path}" in topics, topics


# --- DTLS flow control and drain; the idle sweep's error guard ------------------------------------------------


@dataclass
class _Rig:
    """The ingress with DTLS on, over an outbox whose writer runs only once the test calls :meth:`start_writer`:
    until then every reliable publish waits for its commit (a real Outbox, merely not committing yet)."""

    server: CoAPServer
    outbox: Outbox
    writer: asyncio.Task[None] | None = None
    drained: bool = False

    def start_writer(self) -> None:
        if self.writer is None:
            self.writer = asyncio.create_task(self.outbox.run())

    async def drain(self, timeout: float = 5.0) -> None:
        self.drained = True
        await asyncio.wait_for(self.server.drain(timeout), timeout + 10)


@asynccontextmanager
async def dtls_rig(tmp_path: Path, fleet: Fleet, *, outbox: dict[str, Any] | None = None,
                   **coap: Any) -> AsyncIterator[_Rig]:
    tls = TLSSettings(cert=fleet.folder / "server" / "gateway.crt", key=fleet.folder / "server" / "gateway.key",
                      ca=fleet.ca)
    box = await Outbox.open(OutboxSettings(path=tmp_path / "outbox.db", **(outbox or {})))
    settings = CoAPSettings(enabled=True, bind="127.0.0.1", port=0, dtls=True, dtls_port=0, **coap)
    rig = _Rig(CoAPServer(settings, server_ssl_context(tls), ACL.from_settings(ACLSettings()), box, tls=tls), box)
    await rig.server.start()
    try:
        yield rig
    finally:
        rig.start_writer()
        if not rig.drained:
            await rig.drain()
        box.stop()
        assert rig.writer is not None
        await rig.writer
        await box.close()


def _dtls_device(fleet: Fleet, port: int, device_id: str) -> DTLSClient:
    pair = fleet.device(device_id)
    client = DTLSClient("127.0.0.1", port, client_context(fleet.ca, pair.cert, pair.key))
    try:
        client.handshake(5.0)
    except BaseException:
        client.close(notify=False)
        raise
    return client


def _post_con(client: DTLSClient, mids: Any) -> None:
    """CON POSTs to /ps/n/{mid}, token = message id; sent again with the same ids, they are retransmissions."""
    for mid in mids:
        msg = aiocoap.Message(code=aiocoap.POST, uri_path=("ps", "n", str(mid)), payload=b'{"n":%d}' % mid,
                              content_format=50)
        msg.mtype, msg.mid, msg.token = aiocoap.CON, mid, mid.to_bytes(2, "big")
        client.send(msg.encode())


def _answers(client: DTLSClient, seconds: float, *, ack_delay: float = 0.0) -> tuple[dict[int, str], bool]:
    """The responses (token -> code) that came within ``seconds``, each separate (CON) one ACKed as a device does
    (after ``ack_delay``: a slow radio); and whether the server closed the session (close_notify). Empty ACKs are
    skipped."""
    got: dict[int, str] = {}
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = aiocoap.Message.decode(client.recv(left))
        except TimeoutError:
            break
        except SSL.ZeroReturnError:
            return got, True
        except ConnectionRefusedError:  # the ICMP answer to an ACK sent after the server closed; read on
            continue
        if msg.code.is_response():
            got[int.from_bytes(msg.token, "big")] = str(msg.code)
            if msg.mtype is aiocoap.CON:
                time.sleep(ack_delay)
                empty = aiocoap.Message(code=Code.EMPTY)
                empty.mtype, empty.mid = aiocoap.ACK, msg.mid
                client.send(empty.encode())
    return got, False


def _until_answered(client: DTLSClient, mids: list[int], seconds: float) -> dict[int, str]:
    """A device's retransmissions: what has no answer yet is sent again (same message ids) every 0.5 s."""
    got: dict[int, str] = {}
    deadline = time.monotonic() + seconds
    while len(got) < len(mids) and time.monotonic() < deadline:
        _post_con(client, [m for m in mids if m not in got])
        got.update(_answers(client, 0.5)[0])
    return got


def _stored_topics(tmp_path: Path) -> list[str]:
    db = sqlite3.connect(f"file:{tmp_path / 'outbox.db'}?mode=ro", uri=True, timeout=5)
    try:
        return sorted(t for (t,) in db.execute("SELECT topic FROM records"))
    finally:
        db.close()


async def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_dtls_session_past_max_inflight_loses_new_requests_until_the_commits_answer(tmp_path: Path,
                                                                                         fleet: Fleet) -> None:
    async with dtls_rig(tmp_path, fleet, max_inflight=4) as rig:
        srv, dtls = rig.server, rig.server.dtls
        client = await asyncio.to_thread(_dtls_device, fleet, srv.dtls_port, "dev-06")
        try:
            # Ten CONs at once, nothing committing: four wait for their commit, six are dropped unread (no exchange,
            # no task, no record); nothing is answered 2.01 before its commit.
            await asyncio.to_thread(_post_con, client, range(1, 11))
            early, _ = await asyncio.to_thread(_answers, client, 0.5)
            assert early == {}, early
            assert srv.stats.requests == 4 and dtls.inflight == 4, (srv.stats, dtls.inflight)
            assert dtls.stats.requests_dropped_busy == 6, dtls.stats
            # The writer catches up: the four are answered, the session is read again, and the device's
            # retransmissions of the six get through. Each stored once (retransmissions of held ones are duplicates).
            rig.start_writer()
            answered = await asyncio.to_thread(_until_answered, client, list(range(1, 11)), 20)
            assert answered == {mid: "2.01 Created" for mid in range(1, 11)}, answered
            assert dtls.inflight == 0
        finally:
            client.close()
    assert _stored_topics(tmp_path) == sorted(f"devices/dev-06/n/{mid}" for mid in range(1, 11))


async def test_dtls_answers_a_device_does_not_acknowledge_stay_within_max_inflight(tmp_path: Path,
                                                                                    fleet: Fleet) -> None:
    """A commit slower than aiocoap's EMPTY_ACK_DELAY (0.1 s) makes each 2.01 a separate CON answer, and aiocoap sends
    one CON per device at a time (NSTART = 1): the others wait in its queue for the device's ACK. A device that
    never ACKs them got its next requests read all the same (they left max_inflight at the commit), so its queue of
    answers (each holding its request) grew for the ~90 s of the first one's retransmissions. Past max_inflight
    queued answers its new requests are dropped unread, like past max_inflight requests awaiting their commit."""
    async with dtls_rig(tmp_path, fleet, max_inflight=4) as rig:
        rig.start_writer()
        dtls = rig.server.dtls
        dtls._tuning.EMPTY_ACK_DELAY = 0.0  # a commit slower than the empty ACK (an SD card's fsync): separate 2.01s
        client = await asyncio.to_thread(_dtls_device, fleet, rig.server.dtls_port, "dev-10")
        try:
            for first in range(1, 41, 4):  # ten rounds of four, never an ACK of an answer
                await asyncio.to_thread(_post_con, client, range(first, first + 4))
                await asyncio.sleep(0.5)
            (session,) = dtls._sessions.values()
            queued = len(dtls._mman._backlogs.get(session.remote, ()))
            assert queued <= 4, f"{queued} answers queued for a device that does not ACK, max_inflight = 4"
            assert dtls.stats.requests_dropped_busy > 0
        finally:
            client.close()


async def test_dtls_sessions_are_not_read_while_the_outbox_is_congested(tmp_path: Path, fleet: Fleet) -> None:
    async with dtls_rig(tmp_path, fleet, outbox={"max_pending": 2}) as rig:
        srv, dtls = rig.server, rig.server.dtls
        a = await asyncio.to_thread(_dtls_device, fleet, srv.dtls_port, "dev-07")
        b = await asyncio.to_thread(_dtls_device, fleet, srv.dtls_port, "dev-08")
        try:
            await asyncio.to_thread(_post_con, a, range(1, 6))
            await _wait_for(lambda: srv.stats.requests == 2, "two requests of a")
            await asyncio.sleep(0.2)
            # Two records await commit (= max_pending): a is held although far below max_inflight (32).
            assert rig.outbox.congested and srv.stats.requests == 2 and dtls.stats.requests_dropped_busy == 3
            # Another session gets one request in, then is held too.
            await asyncio.to_thread(_post_con, b, range(11, 13))
            await _wait_for(lambda: dtls.stats.requests_dropped_busy == 4, "b's second request dropped")
            assert srv.stats.requests == 3
            rig.start_writer()  # the commit decongests: both are read again, the retransmissions get through
            got_a, got_b = await asyncio.gather(asyncio.to_thread(_until_answered, a, list(range(1, 6)), 20),
                                                asyncio.to_thread(_until_answered, b, [11, 12], 20))
            assert set(got_a.values()) == set(got_b.values()) == {"2.01 Created"}
            assert (sorted(got_a), sorted(got_b)) == ([1, 2, 3, 4, 5], [11, 12])
        finally:
            a.close()
            b.close()
    assert len(_stored_topics(tmp_path)) == 7


async def test_drain_answers_dtls_publishes_awaiting_their_commit(tmp_path: Path, fleet: Fleet) -> None:
    async with dtls_rig(tmp_path, fleet) as rig:
        srv = rig.server
        client = await asyncio.to_thread(_dtls_device, fleet, srv.dtls_port, "dev-09")
        try:
            await asyncio.to_thread(_post_con, client, [1, 2, 3])
            await _wait_for(lambda: srv.stats.requests == 3, "three publishes awaiting their commit")
            assert srv.inflight == 3
            drain = asyncio.create_task(rig.drain(10))
            await asyncio.sleep(0.3)
            assert not drain.done()  # it waits for the three (the writer is not running yet)
            await asyncio.to_thread(_post_con, client, [4])  # arrives while draining: dropped unread
            await _wait_for(lambda: srv.dtls.stats.requests_dropped_busy == 1, "the late request dropped")
            # The device reads until close_notify, and ACKs each separate response slowly: aiocoap sends the next
            # one only after that ACK (NSTART = 1), so two of the three wait in its queue when the commit is done.
            reader = asyncio.create_task(asyncio.to_thread(_answers, client, 12, ack_delay=0.3))
            rig.start_writer()
            await drain
            # Each publish got its 2.01 before the session closed: no resend after the restart, no duplicate.
            got, closed = await reader
        finally:
            client.close(notify=False)
        assert got == {1: "2.01 Created", 2: "2.01 Created", 3: "2.01 Created"} and closed, (got, closed)
    assert _stored_topics(tmp_path) == [f"devices/dev-09/n/{mid}" for mid in (1, 2, 3)]


async def test_idle_sweep_goes_on_after_a_close_that_raises(tmp_path: Path, fleet: Fleet) -> None:
    from structlog.testing import capture_logs

    async with running(tmp_path, fleet, idle_timeout=0.4) as srv:
        listener, stats = srv.listener, srv.connection_stats
        assert listener is not None and stats is not None
        ctx = _tls_client(fleet, "dev-10")
        first = await asyncio.open_connection("127.0.0.1", srv.port, ssl=ctx, server_hostname="127.0.0.1")
        await _wait_for(lambda: any(c.device_identity for c in listener._pool), "the first connection attached")
        (conn,) = listener._pool

        def broken_close() -> None:  # a fault in one connection's teardown
            raise RuntimeError("injected: close failed")

        conn.close = broken_close  # type: ignore[method-assign]
        with capture_logs() as logs:
            await _wait_for(lambda: stats.idle_closed == 1, "the sweep to reach the first connection")
            await asyncio.wait_for(first[0].read(), 5)  # read to EOF (after our CSM): that one is closed even so
        assert [e["event"] for e in logs].count("coap.sweep_failed") == 1, logs
        # The sweep is still running: a later silent connection is closed too.
        second = await asyncio.open_connection("127.0.0.1", srv.port, ssl=ctx, server_hostname="127.0.0.1")
        await asyncio.wait_for(second[0].read(), 5)
        await _wait_for(lambda: srv.connection_count == 0, "both connections forgotten")
        assert stats.idle_closed == 2
        for _, writer in (first, second):
            writer.close()


async def test_dtls_requests_are_still_checked_by_the_authorizer(tmp_path: Path, fleet: Fleet) -> None:
    # A DTLS remote is counted like a connection now, but has no connection-level verdict: a device refused after
    # its handshake (registry change, before any revalidation) still gets 4.03 on its next request.
    async with dtls_rig(tmp_path, fleet) as rig:
        rig.start_writer()
        srv = rig.server
        client = await asyncio.to_thread(_dtls_device, fleet, srv.dtls_port, "dev-11")
        try:
            assert await asyncio.to_thread(_until_answered, client, [1], 10) == {1: "2.01 Created"}
            srv.authorizer = lambda identity: "device is suspended" if identity.device_id == "dev-11" else None
            assert await asyncio.to_thread(_until_answered, client, [2], 10) == {2: "4.03 Forbidden"}
        finally:
            client.close()
    assert _stored_topics(tmp_path) == ["devices/dev-11/n/1"]
