"""An in-process upstream ("cloud") broker for the demo and tests: amqtt 0.12.1 behind our own mutual-TLS listener.

amqtt's TLS listener hard-codes ``CERT_OPTIONAL`` (BRIEF §2): a client without a certificate gets in. So amqtt gets
one listener of type ``external`` (it opens no socket), and our ``asyncio.start_server`` with a ``CERT_REQUIRED``
context hands each verified connection to ``Broker.external_connected`` through amqtt's stream adapters.

amqtt config used (``amqtt.contexts.BrokerConfig.from_dict``, strict): ``listeners.default`` must exist; with
``type: external`` it is only a name connections are attached to. ``plugins`` replaces amqtt's defaults (event and
packet loggers, $SYS every 20 s) with just ``AnonymousAuthPlugin(allow_anonymous=True)``: without an auth plugin
that answers, amqtt refuses every CONNECT. Authentication is the TLS handshake here.

Not for device-facing use (BRIEF §2): amqtt acknowledges before anything is durable and is 3.1.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path
from typing import Any

_LISTENER = "default"
_QUIET = ("amqtt", "transitions")


def quiet_amqtt(level: int = logging.ERROR) -> None:
    """amqtt logs every connection at INFO and its state machine library chats at INFO too."""
    for name in _QUIET:
        logging.getLogger(name).setLevel(level)


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS >= 1.2, our certificate, client certificates required and verified against ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    return ctx


def _amqtt_config() -> dict[str, Any]:
    return {
        "listeners": {_LISTENER: {"type": "external"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class UpstreamBroker:
    """``await start()``, then clients connect to ``host:port`` with a certificate ``ca`` signed; ``close()``."""

    def __init__(self, *, ca: Path, cert: Path, key: Path, host: str = "127.0.0.1", port: int = 0,
                 handshake_timeout: float = 10.0) -> None:
        self.host = host
        self._requested_port = port
        self._ssl = server_context(ca, cert, key)
        self._handshake_timeout = handshake_timeout
        self._broker: Any = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.peers: list[str] = []
        """Certificate CNs of the clients that connected, in order."""

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets, "UpstreamBroker.start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> UpstreamBroker:
        quiet_amqtt()
        from amqtt.broker import Broker  # imported late: amqtt is heavy and only the demo needs it

        self._broker = Broker(_amqtt_config())
        await self._broker.start()
        try:
            self._server = await asyncio.start_server(self._on_client, self.host, self._requested_port,
                                                      ssl=self._ssl, reuse_address=True,
                                                      ssl_handshake_timeout=self._handshake_timeout)
        except BaseException:
            await self._broker.shutdown()
            raise
        return self

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter

        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        self.peers.append(_cn(writer.get_extra_info("peercert")))
        try:
            await self._broker.external_connected(StreamReaderAdapter(reader), StreamWriterAdapter(writer), _LISTENER)
        except Exception as exc:  # noqa: BLE001 - one bad client must not stop the listener
            logging.getLogger("amqtt").debug("client session ended with %r", exc)
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, shut amqtt down (bounded), drop whatever is still connected."""
        if self._server is not None:
            self._server.close()
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._broker.shutdown(), timeout)
            self._broker = None
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None


def _cn(peercert: dict[str, Any] | None) -> str:
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return "?"
