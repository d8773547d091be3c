"""edgegw/mqtt/_tls.py, the device-facing TLS transport, against real TLS peers: blocking :mod:`ssl` clients in
threads (not asyncio's TLS, so not our own code on both ends) and raw sockets for the broken cases.

What it must keep from asyncio's start_tls: a handshake failure is reported once with a reason an operator can act
on, data of any size crosses intact in both directions, pause_reading really stops delivery (also of bytes
OpenSSL already decrypted) and resume_reading delivers them, write flow control calls pause_writing /
resume_writing at the water marks, close() sends what is buffered first, garbage ends one connection and nothing
else, and a reloaded context applies to the next handshake.
"""

from __future__ import annotations

import _ssl
import asyncio
import contextlib
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet
from structlog.testing import capture_logs

from edgegw.config import TLSSettings
from edgegw.identity import (
    describe_handshake_error,
    identity_from_peercert,
    server_ssl_context,
)
from edgegw.mqtt import _read_ahead, _tls
from edgegw.mqtt._tls import TLSListener, TLSTransport, read_ahead

pytestmark = pytest.mark.timeout(60)


class Peer(asyncio.Protocol):
    """The application side: records what the transport hands it."""

    def __init__(self) -> None:
        self.transport: TLSTransport | None = None
        self.data = bytearray()
        self.chunks = 0
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.got = asyncio.Event()
        self.pauses = self.resumes = 0
        self.on_data: Callable[[Peer, bytes], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.chunks += 1
        self.got.set()
        if self.on_data is not None:
            self.on_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        self.resumes += 1


class Server:
    def __init__(self, context: ssl.SSLContext, *, scratch: int = 16384, timeout: float = 5.0,
                 close_timeout: float = 30.0) -> None:
        self.context = context
        self.close_timeout = close_timeout
        self.scratch = memoryview(bytearray(scratch))
        self.timeout = timeout
        self.peers: list[Peer] = []
        self.transports: list[TLSTransport] = []
        self.outcomes: asyncio.Queue[tuple[TLSTransport, BaseException | None]] = asyncio.Queue()
        self.setup: Callable[[Peer], None] = lambda peer: None
        self.listener: TLSListener | None = None

    def on_accept(self, sock: socket.socket, peer: str) -> None:
        proto = Peer()
        self.setup(proto)
        self.peers.append(proto)
        self.transports.append(TLSTransport(
            sock, self.context, proto, self.scratch, handshake_timeout=self.timeout,
            close_timeout=self.close_timeout, on_handshake=lambda t, exc: self.outcomes.put_nowait((t, exc))))

    @property
    def port(self) -> int:
        assert self.listener is not None
        return int(self.listener.sockets[0].getsockname()[1])

    async def outcome(self) -> tuple[TLSTransport, BaseException | None]:
        return await asyncio.wait_for(self.outcomes.get(), 10)

    async def failure(self) -> str:
        _, exc = await self.outcome()
        assert exc is not None, "the handshake succeeded"
        return describe_handshake_error(exc)


def server_context(fleet: Fleet) -> ssl.SSLContext:
    return server_ssl_context(TLSSettings(cert=fleet.folder / "server" / "gateway.crt",
                                          key=fleet.folder / "server" / "gateway.key", ca=fleet.ca))


@contextlib.asynccontextmanager
async def serving(context: ssl.SSLContext, **options: Any) -> AsyncIterator[Server]:
    server = Server(context, **options)
    server.listener = await TLSListener.create("127.0.0.1", 0, server.on_accept)
    try:
        yield server
    finally:
        server.listener.close()
        for peer in server.peers:
            if peer.transport is not None:
                peer.transport.abort()


def tls_client(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(65536, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


def pattern(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


# --- handshakes ------------------------------------------------------------------------------------------------


async def test_handshake_gives_the_protocol_the_verified_identity(fleet: Fleet) -> None:
    async with serving(server_context(fleet)) as server:
        client = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-03"))
        try:
            transport, exc = await server.outcome()
            assert exc is None
            identity = identity_from_peercert(transport.get_extra_info("ssl_object").getpeercert())
            assert identity is not None and identity.device_id == "dev-03"
            assert transport.get_extra_info("peername")[0] == "127.0.0.1"
            assert transport.get_extra_info("no such thing", "dflt") == "dflt"
        finally:
            client.close()


async def test_handshake_failures_are_reported_once_with_a_reason(fleet: Fleet) -> None:
    def attempt(port: int, context: ssl.SSLContext) -> None:
        with contextlib.suppress(OSError):
            tls_client(port, context).recv(1)  # TLS 1.3: the server's verdict arrives after the client's Finished

    async with serving(server_context(fleet)) as server:
        await asyncio.to_thread(attempt, server.port, fleet.device_context("dev-00", with_cert=False))
        assert await server.failure() == "no client certificate presented"

        await asyncio.to_thread(attempt, server.port, fleet.device_context("dev-00", rogue=True))
        reason = await server.failure()
        assert reason.startswith("client certificate rejected") and "unable to get local issuer" in reason, reason

        expired = fleet.device_context("expired-01")
        await asyncio.to_thread(attempt, server.port, expired)
        assert "expired" in await server.failure()

        # The client waits for the gateway's answer (an alert, then the close) before it closes: closing first, as
        # a 5 s timeout did on a loaded machine, makes the gateway see a reset instead of the bytes it must refuse.
        def plain_text() -> None:
            with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                with contextlib.suppress(OSError):
                    sock.recv(1024)

        await asyncio.to_thread(plain_text)
        assert await server.failure() == "TLS error: HTTP_REQUEST"

        def garbage() -> None:
            with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
                sock.sendall(os.urandom(64))
                with contextlib.suppress(OSError):
                    sock.recv(1024)

        await asyncio.to_thread(garbage)
        assert (await server.failure()).startswith("TLS error: ")
        assert server.outcomes.empty()
        assert all(peer.transport is None and not peer.lost.done() for peer in server.peers)  # never told


async def test_close_during_handshake_and_timeout(fleet: Fleet) -> None:
    async with serving(server_context(fleet), timeout=0.5) as server:
        def hello_then_close() -> None:
            # Half a ClientHello (the first bytes a real client sends), then the TCP connection goes away.
            bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = fleet.device_context("dev-00").wrap_bio(bio_in, bio_out, server_hostname="localhost")
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
            hello = bio_out.read()
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(hello[: len(hello) // 2])

        await asyncio.to_thread(hello_then_close)
        assert await server.failure() == "connection lost during handshake (ConnectionResetError)"

        silent = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", server.port), 5)
        try:
            assert await server.failure() == "TLS handshake timed out"
            silent.settimeout(5)
            assert silent.recv(1) == b""  # and the socket was closed
        finally:
            silent.close()

        # The gateway ends a handshake (drain): reported, with its own exception, and the socket closed.
        silent = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", server.port), 5)
        try:
            while len(server.transports) < 3:
                await asyncio.sleep(0.01)
            server.transports[2].abort()
            _, exc = await server.outcome()
            assert isinstance(exc, ConnectionAbortedError)
            silent.settimeout(5)
            assert silent.recv(1) == b""
        finally:
            silent.close()


# --- data ------------------------------------------------------------------------------------------------------


async def test_large_payloads_cross_intact_both_ways(fleet: Fleet) -> None:
    """4 MiB from the client (256+ records) echoed back; the echo hits a full socket, so OpenSSL's "retry this
    write" path and the write buffer are used."""
    size = 4 * 1024 * 1024
    payload = pattern(size)
    async with serving(server_context(fleet)) as server:
        server.setup = lambda peer: setattr(peer, "on_data", lambda p, data: p.transport.write(data))

        def exchange() -> bytes:
            with tls_client(server.port, fleet.device_context("dev-01")) as sock:
                sock.sendall(payload)
                return recv_exactly(sock, size)

        echoed = await asyncio.to_thread(exchange)
        assert echoed == payload
        peer = server.peers[0]
        assert bytes(peer.data) == payload
        assert peer.chunks >= size // 16384  # one TLS record (<= 16 KiB) per read
        assert peer.transport is not None and peer.transport.get_write_buffer_size() == 0


async def test_write_flow_control_and_close_after_the_buffer(fleet: Fleet) -> None:
    """The server writes until the transport asks it to pause (the client is not reading), then closes: the
    client still reads every byte, in order, then a clean end of stream."""
    chunk = pattern(65536)
    async with serving(server_context(fleet)) as server:
        client = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-02"))
        try:
            transport, exc = await server.outcome()
            assert exc is None
            peer = server.peers[0]
            transport.set_write_buffer_limits(high=256 * 1024)
            assert transport.get_write_buffer_limits() == (64 * 1024, 256 * 1024)
            written = 0
            while not peer.pauses and written < 256 * 1024 * 1024:
                transport.write(chunk)
                written += len(chunk)
                await asyncio.sleep(0)
            assert peer.pauses == 1 and transport.get_write_buffer_size() > 256 * 1024
            transport.close()
            assert transport.is_closing()
            transport.write(b"late")  # dropped, like asyncio's
            received = await asyncio.to_thread(recv_all, client)
        finally:
            client.close()
        assert len(received) == written
        assert received == chunk * (written // len(chunk))
        assert peer.resumes == 1
        assert await asyncio.wait_for(peer.lost, 5) is None


async def test_pause_reading_holds_even_bytes_already_decrypted(fleet: Fleet) -> None:
    """A 16-byte scratch buffer: one 1000-byte record is read in 63 pieces, most of them out of OpenSSL's buffer
    rather than the socket. Paused after the first piece, nothing more arrives; resumed, all of it does."""
    async with serving(server_context(fleet), scratch=16) as server:
        def pause_once(peer: Peer) -> None:
            def on_data(p: Peer, data: bytes) -> None:
                if p.chunks == 1:
                    assert p.transport is not None
                    p.transport.pause_reading()
                    assert not p.transport.is_reading()
            peer.on_data = on_data

        server.setup = pause_once
        message = pattern(1000)
        client = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-04"))
        try:
            await asyncio.to_thread(client.sendall, message)
            peer = server.peers[0]
            await asyncio.wait_for(peer.got.wait(), 5)
            for _ in range(20):  # loop iterations in which a missed pause would deliver the rest
                await asyncio.sleep(0.01)
            assert bytes(peer.data) == message[:16]
            assert peer.transport is not None
            peer.transport.resume_reading()
            deadline = asyncio.get_running_loop().time() + 5
            while len(peer.data) < len(message) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            assert bytes(peer.data) == message
            assert peer.chunks == 63
        finally:
            client.close()


async def test_garbage_after_the_handshake_ends_that_connection_only(fleet: Fleet) -> None:
    async with serving(server_context(fleet)) as server:
        server.setup = lambda peer: setattr(peer, "on_data", lambda p, data: p.transport.write(b"ok:" + data))
        good = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-05"))
        bad = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-06"))
        try:
            for _ in range(2):
                assert (await server.outcome())[1] is None
            # Bytes on the TCP connection that are not TLS records of this session: a forged application-data
            # record, written past the client's TLS layer.
            with socket.socket(fileno=os.dup(bad.fileno())) as raw:
                raw.sendall(b"\x17\x03\x03\x00\x20" + os.urandom(32))
            lost = [p for p in server.peers if p.transport is not None]
            exc = await asyncio.wait_for(asyncio.wait(
                [p.lost for p in lost], return_when=asyncio.FIRST_COMPLETED), 5)
            done = [p for p in lost if p.lost.done()]
            assert len(done) == 1 and isinstance(done[0].lost.result(), ssl.SSLError), exc
            await asyncio.to_thread(good.sendall, b"hello")
            assert await asyncio.to_thread(recv_exactly, good, 8) == b"ok:hello"
        finally:
            good.close()
            bad.close()


async def test_peer_close_is_eof_then_connection_lost(fleet: Fleet) -> None:
    async with serving(server_context(fleet)) as server:
        client = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-07"))
        await asyncio.to_thread(client.sendall, b"bye")
        await asyncio.to_thread(client.unwrap)  # close_notify
        client.close()
        assert (await server.outcome())[1] is None
        peer = server.peers[0]
        assert await asyncio.wait_for(peer.lost, 5) is None
        assert bytes(peer.data) == b"bye"


@pytest.mark.parametrize("direct", [True, False])
async def test_peer_close_without_close_notify_is_an_eof_too(fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
                                                             direct: bool) -> None:
    """A device that loses power or is killed sends no close_notify (a "ragged" EOF): the bytes it sent before are
    delivered, then the connection ends like a clean close (no error), on both of the read loop's paths: the
    ``_ssl._SSLSocket`` called directly (raises SSLEOFError) and the ``SSLSocket`` wrapper (returns 0)."""
    if not direct:
        monkeypatch.setattr(_tls, "_direct_io", lambda sock: sock)
    async with serving(server_context(fleet)) as server:
        client = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-07"))
        transport, exc = await server.outcome()
        assert exc is None
        assert (type(transport._io) is getattr(_ssl, "_SSLSocket")) is direct
        await asyncio.to_thread(client.sendall, b"last words")
        raw = socket.socket(fileno=os.dup(client.fileno()))
        raw.shutdown(socket.SHUT_RDWR)  # the TCP connection ends, TLS never closed
        raw.close()
        client.close()
        peer = server.peers[0]
        assert await asyncio.wait_for(peer.lost, 5) is None
        assert bytes(peer.data) == b"last words"


async def test_next_handshake_uses_the_context_given_at_accept(fleet: Fleet, tmp_path: Path) -> None:
    """What hot reload relies on: the server passes its current context for each accepted socket. A context
    trusting another CA refuses the fleet's devices from the next handshake on; an established connection keeps
    working."""
    async with serving(server_context(fleet)) as server:
        server.setup = lambda peer: setattr(peer, "on_data", lambda p, data: p.transport.write(data))
        before = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-08"))
        try:
            assert (await server.outcome())[1] is None
            other_ca = fleet.folder.parent / "rogue" / "ca.crt"
            server.context = server_ssl_context(TLSSettings(cert=fleet.folder / "server" / "gateway.crt",
                                                            key=fleet.folder / "server" / "gateway.key",
                                                            ca=other_ca))

            def attempt() -> None:
                with contextlib.suppress(OSError):
                    tls_client(server.port, fleet.device_context("dev-09")).recv(1)

            await asyncio.to_thread(attempt)
            assert "client certificate rejected" in await server.failure()
            await asyncio.to_thread(before.sendall, b"still here")
            assert await asyncio.to_thread(recv_exactly, before, 10) == b"still here"
        finally:
            before.close()


async def test_listener_close_stops_accepting(fleet: Fleet) -> None:
    with capture_logs():
        async with serving(server_context(fleet)) as server:
            port = server.port
            assert server.listener is not None and server.listener.is_serving()
            server.listener.close()
            assert not server.listener.is_serving() and server.listener.sockets == ()
            await server.listener.wait_closed()
            with pytest.raises(OSError):
                await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 2)


async def test_a_failing_protocol_ends_its_connection_only(fleet: Fleet) -> None:
    async with serving(server_context(fleet)) as server:
        def setup(peer: Peer) -> None:
            def on_data(p: Peer, data: bytes) -> None:
                if data == b"boom":
                    raise RuntimeError("bug in the protocol")
                assert p.transport is not None
                p.transport.write(data)
            peer.on_data = on_data

        server.setup = setup
        good = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-10"))
        bad = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-11"))
        try:
            for _ in range(2):
                assert (await server.outcome())[1] is None
            with capture_logs() as logs:
                await asyncio.to_thread(bad.sendall, b"boom")
                failed = [p for p in server.peers if p.transport is not None]
                await asyncio.wait_for(asyncio.wait([p.lost for p in failed],
                                                    return_when=asyncio.FIRST_COMPLETED), 5)
            lost = [p for p in failed if p.lost.done()]
            assert len(lost) == 1 and isinstance(lost[0].lost.result(), RuntimeError)
            assert [e["callback"] for e in logs if e["event"] == "tls.protocol_callback_failed"] == \
                ["data_received"]
            await asyncio.to_thread(good.sendall, b"fine")
            assert await asyncio.to_thread(recv_exactly, good, 4) == b"fine"
        finally:
            good.close()
            bad.close()


async def test_close_gives_up_on_a_peer_that_does_not_read(fleet: Fleet) -> None:
    """close() with output buffered waits for the peer to take it, but not for ever: a device that stopped reading
    is aborted after ``close_timeout`` (asyncio's TLS had a 30 s shutdown timeout for the same reason)."""
    async with serving(server_context(fleet), close_timeout=0.3) as server:
        client = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-03"))
        try:
            transport, exc = await server.outcome()
            assert exc is None
            peer = server.peers[0]
            while not peer.pauses:
                transport.write(pattern(65536))
                await asyncio.sleep(0)
            transport.close()
            assert transport.is_closing() and transport.get_write_buffer_size() > 0
            assert await asyncio.wait_for(peer.lost, 5) is None
            assert transport.get_write_buffer_size() == 0 and transport.get_extra_info("peername") is None
        finally:
            client.close()


# --- through the MQTT server -----------------------------------------------------------------------------------


async def test_mqtt_server_logs_refusals_and_uses_a_reloaded_context(fleet: Fleet, tmp_path: Path) -> None:
    """The gateway's listener on this transport: a handshake failure is counted and logged with the peer and the
    reason; replacing ``server.ssl_context`` (what registry/reload.py does) applies to the next handshake while an
    established device keeps publishing."""
    from test_mqtt_server import published, running

    async with running(fleet, tmp_path) as h:
        dev = await h.device("dev-00")
        try:
            def attempt(context: ssl.SSLContext) -> None:
                with contextlib.suppress(OSError):
                    tls_client(h.server.port, context).recv(1)

            with capture_logs() as logs:
                await asyncio.to_thread(attempt, fleet.device_context("dev-01", with_cert=False))
                other_ca = fleet.folder.parent / "rogue" / "ca.crt"
                h.server.ssl_context = server_ssl_context(TLSSettings(
                    cert=fleet.folder / "server" / "gateway.crt", key=fleet.folder / "server" / "gateway.key",
                    ca=other_ca))
                await asyncio.to_thread(attempt, fleet.device_context("dev-01"))
                deadline = asyncio.get_running_loop().time() + 5
                while h.server.stats.handshake_failed < 2 and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.01)
            failed = [e for e in logs if e["event"] == "tls.handshake_failed"]
            assert [e["reason"] for e in failed][:1] == ["no client certificate presented"]
            assert len(failed) == 2 and failed[1]["reason"].startswith("client certificate rejected"), failed
            assert all(e["peer"].startswith("127.0.0.1:") for e in failed)
            assert h.server.stats.handshake_failed == 2
            await published(dev.client.publish("devices/dev-00/t", b"after reload", qos=1))
            records = await h.records(1)
            assert [r.payload for r in records] == [b"after reload"]
        finally:
            await asyncio.to_thread(dev.close)


async def test_listener_binds_every_address_of_the_host(fleet: Fleet) -> None:
    """As loop.create_server: "localhost" may be 127.0.0.1 and ::1; each address gets its own socket, and
    connections on any of them are handed over."""
    infos = {info[4][0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)}
    accepted: list[str] = []

    def on_accept(sock: socket.socket, peer: str) -> None:
        accepted.append(peer)
        sock.close()

    listener = await TLSListener.create("localhost", 0, on_accept)
    try:
        assert {s.getsockname()[0] for s in listener.sockets} == infos
        def connect(family: int, address: tuple[str, int]) -> None:
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.settimeout(5)
                client.connect(address)
                client.recv(1)  # the listener closes it

        for sock in listener.sockets:
            await asyncio.to_thread(connect, sock.family, sock.getsockname()[:2])
        assert len(accepted) == len(infos)
    finally:
        listener.close()


# --- read-ahead (a private CPython layout: only where verified, and checked before use) --------------------------


async def test_read_ahead_is_on_where_the_layout_was_verified(fleet: Fleet) -> None:
    # Where tests/test_tls_read_batching.py measures it.
    assert ("cpython", (3, 11)) in _read_ahead._VERIFIED_LAYOUTS
    async with serving(server_context(fleet)) as server:
        client = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-01"))
        try:
            transport, exc = await server.outcome()
            assert exc is None
            here = (sys.implementation.name, sys.version_info[:2])
            assert transport.read_ahead is (here in _read_ahead._VERIFIED_LAYOUTS), here
        finally:
            client.close()


async def test_without_read_ahead_the_transport_works_the_same(fleet: Fleet,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The safe path, as on an interpreter whose layout nobody checked: the ``SSL *`` is never read; many small
    records and a large payload still cross intact both ways."""
    monkeypatch.setattr(_read_ahead, "_VERIFIED_LAYOUTS", frozenset({("cpython", (3, 99))}))
    small = [bytes([i % 256]) * 100 for i in range(300)]  # one TLS record each, as a device's PUBLISHes
    large = pattern(1024 * 1024)
    async with serving(server_context(fleet)) as server:
        server.setup = lambda peer: setattr(peer, "on_data", lambda p, data: p.transport.write(data))

        def exchange() -> bytes:
            with tls_client(server.port, fleet.device_context("dev-02")) as sock:
                for chunk in small:
                    sock.sendall(chunk)
                sock.sendall(large)
                return recv_exactly(sock, 30000 + len(large))

        echoed = await asyncio.to_thread(exchange)
        transport, exc = await server.outcome()
        assert exc is None and transport.read_ahead is False
        assert echoed == b"".join(small) + large
        assert bytes(server.peers[0].data) == echoed


async def test_read_ahead_refuses_an_ssl_object_that_is_not_the_sockets_own(fleet: Fleet) -> None:
    """The layout check: the field before the ``SSL *`` must be, by address, the weak reference ``_ssl`` keeps to
    this very socket. An ``_SSLSocket`` of another socket (what a shifted layout would look like) is refused
    before any pointer is followed, even though its options match the context's."""
    context = server_context(fleet)
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    first = context.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    second = context.wrap_socket(b, server_side=True, do_handshake_on_connect=False)
    own = first._sslobj  # type: ignore[attr-defined]
    try:
        first._sslobj = second._sslobj  # type: ignore[attr-defined]
        assert read_ahead(first) is False
        first._sslobj = own  # type: ignore[attr-defined]
        here = (sys.implementation.name, sys.version_info[:2])
        assert read_ahead(first) is (here in _read_ahead._VERIFIED_LAYOUTS)
        first._sslobj = None  # type: ignore[attr-defined]  # closed: nothing to read
        assert read_ahead(first) is False
    finally:
        first._sslobj = own  # type: ignore[attr-defined]
        for s in (first, second, a_peer, b_peer):
            s.close()
