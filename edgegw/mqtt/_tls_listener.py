"""The accept side of the device TLS listener: :class:`TLSListener`, plain listening sockets on the loop.

Accepted connections go to the caller still plain (no TLS work yet), so it can refuse past ``max_connections``
before any handshake and then hand the socket to :class:`edgegw.mqtt._tls.TLSTransport`.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

import structlog

log = structlog.get_logger("edgegw.mqtt")

ACCEPT_RETRY = 1.0
"""Seconds before accepting again after the process ran out of file descriptors or memory (asyncio's value)."""


class TLSListener:
    """Listening sockets whose accepted connections go, still plain, to ``on_accept(sock, peer)``.

    Quacks like the part of :class:`asyncio.Server` the gateway uses (``sockets``, ``is_serving``, ``close``,
    ``wait_closed``), so the readiness check and the port lookup do not care which one they get. Like
    ``loop.create_server`` it listens on every address the host name resolves to (IPv6 ones IPv6-only).
    """

    def __init__(self, sockets: list[socket.socket], on_accept: Callable[[socket.socket, str], None],
                 *, backlog: int) -> None:
        self._on_accept = on_accept
        self._backlog = backlog
        self._loop = asyncio.get_running_loop()
        self._sockets = tuple(sockets)
        self._serving = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets; none once closed (as ``asyncio.Server.sockets``)."""
        return self._sockets if self._serving else ()

    @classmethod
    async def create(cls, host: str, port: int, on_accept: Callable[[socket.socket, str], None],
                     *, backlog: int = 1024) -> TLSListener:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):  # getaddrinfo may repeat an entry
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio does
                sock.bind(address)
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        return cls(sockets, on_accept, backlog=backlog)

    def is_serving(self) -> bool:
        return self._serving

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Linux keeps reporting the socket readable: stop listening for a while instead of spinning.
                    log.error("mqtt.accept_failed", error=str(exc), retry_in=ACCEPT_RETRY)
                    self._loop.remove_reader(sock.fileno())
                    self._loop.call_later(ACCEPT_RETRY, self._resume, sock)
                    return
                raise
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio does for its TCP transports
            peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
            self._on_accept(conn, peer)
            if not self._serving:  # on_accept may have closed us
                return

    def _resume(self, sock: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    async def wait_closed(self) -> None:
        return None  # nothing outlives close(): the connections are the server's to end
