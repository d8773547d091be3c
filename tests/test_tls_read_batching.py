"""edgegw/mqtt/_tls.py reads in bulk: OpenSSL reads ahead (one ``read`` per wake-up, not two per TLS record) and
the records waiting on a connection reach the protocol in one ``data_received``, not one call per record (a
device sends each PUBLISH as its own record). Against a real blocking :mod:`ssl` client in a thread."""

from __future__ import annotations

import array
import asyncio
import fcntl
import termios

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
