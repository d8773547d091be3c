"""A TCP proxy whose link can be cut and restored: the upstream "goes away" without stopping the broker.

``cut()`` aborts every proxied connection (both sides, RST) and refuses new ones (accepted, then aborted at
once, like a firewall rejecting them) until ``restore()``. Bytes are forwarded untouched, so TLS runs end to end
between the client and the broker.
"""

from __future__ import annotations

import asyncio
import contextlib


class NetCut:
    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, connect_timeout: float = 5.0) -> None:
        self.target_host, self.target_port = target_host, target_port
        self.listen_host, self._listen_port = listen_host, listen_port
        self._connect_timeout = connect_timeout
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.is_cut = False
        self.connections = 0
        """Connections proxied so far."""
        self.refused = 0
        """Connections refused while cut (or because the target did not answer)."""
        self.cuts = 0

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets, "NetCut.start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> NetCut:
        self._server = await asyncio.start_server(self._on_client, self.listen_host, self._listen_port,
                                                  reuse_address=True)
        return self

    def cut(self) -> None:
        self.is_cut = True
        self.cuts += 1
        self._abort_all()

    def restore(self) -> None:
        self.is_cut = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    def _abort_all(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.is_cut:
                self.refused += 1
                writer.transport.abort()
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port), self._connect_timeout)
            except (OSError, TimeoutError):
                self.refused += 1
                writer.transport.abort()
                return
            if self.is_cut:  # cut while we were connecting
                self.refused += 1
                writer.transport.abort()
                up_writer.transport.abort()
                return
            self.connections += 1
            self._transports.update((writer.transport, up_writer.transport))
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                for w in (writer, up_writer):
                    self._transports.discard(w.transport)
                    w.transport.abort()
        finally:
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or error; then half-close ``writer`` so the other direction can finish."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.transport.is_closing():  # uvloop raises on a closed one
            writer.write_eof()
    except (OSError, ConnectionError):
        writer.transport.abort()
