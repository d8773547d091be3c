"""edgegw/mqtt/_tls.py reads in bulk: OpenSSL reads ahead (one ``read`` per wake-up, not two per TLS record) and
the records waiting on a connection reach the protocol in one ``data_received``, not one call per record (a
device sends each PUBLISH as its own record). Against a real blocking :mod:`ssl` client in a thread."""

from __future__ import annotations

import array
import asyncio
import fcntl
import ssl
import termios
from typing import Any

import pytest
from conftest import Fleet
from test_tls_transport import server_context, serving, tls_client

pytestmark = pytest.mark.timeout(60)

RECORDS = 300
SIZE = 100


def _unread(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


async def test_records_that_wait_together_are_read_ahead_and_delivered_together(fleet: Fleet) -> None:
    async with serving(server_context(fleet)) as server:
        client = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-01"))
        try:
            transport, exc = await server.outcome()
            assert exc is None
            assert transport.read_ahead, "SSL_set_read_ahead could not be applied"
            peer = server.peers[0]
            transport.pause_reading()
            await asyncio.sleep(0.05)
            chunks_before, data_before = peer.chunks, len(peer.data)  # TLS 1.3 session tickets etc.: nothing
            sent = [bytes([i % 256]) * SIZE for i in range(RECORDS)]

            def send() -> None:
                for chunk in sent:
                    client.sendall(chunk)  # one TLS record each, as a device writes one PUBLISH each

            await asyncio.to_thread(send)
            fd = transport.get_extra_info("socket").fileno()
            deadline = asyncio.get_running_loop().time() + 10
            while _unread(fd) < RECORDS * SIZE:  # every record is in the kernel's buffer, none read yet
                assert asyncio.get_running_loop().time() < deadline, "the records did not arrive"
                await asyncio.sleep(0.01)
            assert peer.chunks == chunks_before, "read while paused"
            transport.resume_reading()
            while len(peer.data) < data_before + RECORDS * SIZE:
                assert asyncio.get_running_loop().time() < deadline, "not all records were delivered"
                peer.got.clear()
                await asyncio.wait_for(peer.got.wait(), 10)
            assert bytes(peer.data[data_before:]) == b"".join(sent)
            # 30,000 bytes through a 16 KiB scratch buffer: two calls (one per record would be 300).
            assert peer.chunks - chunks_before <= 3, peer.chunks - chunks_before
        finally:
            client.close()


@pytest.mark.parametrize("check", [True, False])
async def test_the_read_that_empties_the_socket_ends_the_loop_without_an_eagain_read(fleet: Fleet,
                                                                                      check: bool) -> None:
    """With read-ahead, OpenSSL says when it holds nothing more (``raw_pending``): the loop stops there, rather than
    calling ``recv_into`` once more only to get SSLWantReadError. Without the check (as where the layout is not
    verified) that last call comes at every wake-up; the data is the same either way."""
    bursts, per_burst = 8, 5
    async with serving(server_context(fleet)) as server:
        client = await asyncio.to_thread(tls_client, server.port, fleet.device_context("dev-01"))
        try:
            transport, exc = await server.outcome()
            assert exc is None and transport.read_ahead
            assert transport._raw_pending is not None
            if not check:
                transport._raw_pending = None
            real = transport._io  # what the read loop calls read(n, buffer) on (the _ssl._SSLSocket)
            calls = {"data": 0, "eagain": 0}

            class Counting:
                def read(self, *args: Any) -> int:
                    try:
                        n = real.read(*args)
                    except ssl.SSLWantReadError:
                        calls["eagain"] += 1
                        raise
                    calls["data"] += 1
                    return int(n)

                def write(self, data: bytes) -> int:
                    return int(real.write(data))

            transport._io = Counting()
            peer = server.peers[0]
            start = len(peer.data)
            sent: list[bytes] = []
            deadline = asyncio.get_running_loop().time() + 10
            for b in range(bursts):  # each burst read at its own wake-up: the previous one is delivered first
                burst = [bytes([(b * per_burst + i) % 256]) * SIZE for i in range(per_burst)]
                await asyncio.to_thread(lambda records=burst: [client.sendall(c) for c in records])  # a record each
                sent += burst
                while len(peer.data) < start + len(sent) * SIZE:
                    assert asyncio.get_running_loop().time() < deadline, "not all records were delivered"
                    peer.got.clear()
                    await asyncio.wait_for(peer.got.wait(), 10)
            assert bytes(peer.data[start:]) == b"".join(sent)
            assert calls["data"] >= bursts * per_burst
            if check:  # a record split across two reads could still end one wake-up with an EAGAIN: rare
                assert calls["eagain"] <= bursts // 4, calls
            else:
                assert calls["eagain"] >= bursts, calls
        finally:
            client.close()
